"""lowbit.plots and ``lowbit-report --plot`` on a synthetic sweep: the DataFrame keeps the seed
grouping of the report, the Pareto front is the non-dominated set, and every figure the columns
allow is written (and logged to an offline W&B run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.plots import bit_widths, load_sweep, pareto_front, plot_sweep
from lowbit.report import main
from lowbit.rundir import GRID, RESULTS
from lowbit.tracking import upscale_nearest

# (method, bits, cache) -> per seed (fid, psnr, size_mb, cache_speedup)
RUNS = {
    ("fp", "fp", "none"): [(10.0, float("inf"), 4.4, None), (11.0, float("inf"), 4.4, None)],
    ("ptq", "w8a8", "none"): [(10.5, 39.0, 1.2, None), (10.9, 39.4, 1.2, None)],
    ("ptq", "w4a4", "none"): [(270.0, 11.0, 0.6, None), (280.0, 12.0, 0.6, None)],
    ("quest", "w4a4", "none"): [(19.0, 22.0, 0.6, None), (21.0, 22.4, 0.6, None)],
    ("fp", "fp", "deepcache(N=3,b=1)"): [(10.2, 26.0, 4.4, 1.8), (10.8, 26.4, 4.4, 1.9)],
}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    job = 0
    for (method, bits, cache), seeds in RUNS.items():
        for seed, (fid, psnr, size, speed) in enumerate(seeds):
            d = root / str(job)
            d.mkdir(parents=True)
            cost = {"size_mb": size, "ops": 66e6 * size / 4.4}
            if speed is not None:
                cost["cache_speedup"] = speed
            config = {"model": {"name": "digits"}, "method": {"name": method},
                      "bits": {"name": bits}, "sampler": {"kind": "ddim", "steps": 20},
                      "cache": {"name": cache}, "seed": seed}
            res = {"model": "digits", "method": method, "bits": bits, "dataset": "digits",
                   "sampler": "ddim20", "cache": cache, "status": "done", "seed": seed,
                   "metrics": {"fid": fid, "psnr": "inf" if psnr == float("inf") else psnr},
                   "cost": cost, "config": config}
            (d / RESULTS).write_text(json.dumps(res))
            Image.fromarray(np.full((170, 170, 3), 40 * job % 255, np.uint8)).save(d / GRID)
            job += 1
    return root


def test_load_sweep_groups_seeds(sweep):
    df = load_sweep(sweep)
    assert len(df) == len(RUNS) and set(df["n"]) == {2}
    q = df[(df["method"] == "quest")].iloc[0]
    assert q["fid"] == pytest.approx(20.0) and q["fid_std"] == pytest.approx(np.std([19, 21],
                                                                                   ddof=1))
    assert (q["w_bits"], q["a_bits"]) == (4.0, 4.0)
    assert set(df["cache"]) == {"none", "deepcache(N=3,b=1)"}
    assert len(load_sweep(sweep, per_seed=True)) == 2 * len(RUNS)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_sweep(sweep / "0" / "nothing-here")


def test_bit_widths():
    assert bit_widths("w4a8") == (4.0, 8.0) and bit_widths("fp") == (32.0, 32.0)
    assert bit_widths("w4a4_pchan") == (4.0, 4.0)
    assert all(np.isnan(bit_widths("odd")))


def test_pareto_front_is_the_non_dominated_set():
    cost = [1.0, 2.0, 3.0, 1.5, 3.0]
    fid = [9.0, 5.0, 4.0, 9.5, 6.0]
    assert pareto_front(cost, fid) == [0, 1, 2]  # 3 and 4 are beaten on both
    # higher is better: the signs flip
    assert pareto_front(cost, [-f for f in fid], lower_is_better=False) == [0, 1, 2]


def test_upscale_nearest_enlarges_small_tiles_only():
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    big = upscale_nearest(img, 64)
    assert big.shape == (64, 64, 3) and (big[::4, ::4] == img).all()
    assert upscale_nearest(np.zeros((128, 128)), 64).shape == (128, 128)


def test_plot_sweep_writes_every_figure(sweep, tmp_path):
    files = {p.name for p in plot_sweep(sweep, tmp_path / "plots", metrics=("fid", "psnr"))}
    assert {"fid_vs_bits.png", "psnr_vs_bits.png", "size_mb_vs_fid.png", "ops_vs_fid.png",
            "speedup_vs_fid.png", "grids.png"} <= files
    with Image.open(tmp_path / "plots" / "grids.png") as im:
        assert im.size[0] > 170  # grids side by side, enlarged


def test_report_plot_flag_and_wandb(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep), "--plot", "--plot-dir", str(tmp_path / "figs"),
                 "--wandb-project", "lowbit-test"]) == 0
    out = capsys.readouterr().out
    assert "| cache |" in out.splitlines()[0]
    assert (tmp_path / "figs" / "fid_vs_bits.png").is_file()
    assert list((sweep / "wandb").glob("offline-run-*")), "the report's W&B run"


class _Run:
    def __init__(self, name, summary, config):
        self.name, self.summary, self.config = name, summary, config


class _Api:
    """What load_wandb_project reads of ``wandb.Api()``: ``runs(path)``."""

    def __init__(self, sweep: Path):
        self.runs_ = []
        for path in sorted(sweep.rglob(RESULTS)):
            res = json.loads(path.read_text())
            summary = {f"metrics/{k}": v for k, v in res["metrics"].items()}
            summary |= {f"cost/{k}": v for k, v in res["cost"].items()}
            summary |= {k: res[k] for k in ("model", "method", "bits", "sampler", "cache", "seed",
                                            "status")}
            self.runs_.append(_Run(path.parent.name, summary, res["config"]))
        self.runs_.append(_Run("report-sweep", {"report": "table"}, {}))  # not a job

    def runs(self, path):
        assert path == "me/lowbit"
        return self.runs_


def test_wandb_project_reads_like_the_sweep(sweep):
    from lowbit.plots import load_wandb_project

    a = load_sweep(sweep).sort_values(["method", "bits", "cache"]).reset_index(drop=True)
    b = load_wandb_project("lowbit", "me", api=_Api(sweep)).sort_values(
        ["method", "bits", "cache"]).reset_index(drop=True)
    for col in ("method", "bits", "cache", "n", "fid", "fid_std", "size_mb"):
        assert list(a[col]) == list(b[col]), col
