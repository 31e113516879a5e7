"""End to end: the FP digits run measures what the shipped reference says, writes its results
atomically, logs to W&B offline, and survives W&B failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.models.digits import load_reference
from lowbit.pipeline import run_experiment

TEST_OVERRIDES = ("metrics.num_samples=200", "sampler=ddim20")


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    from lowbit.cli import compose_config

    tmp = tmp_path_factory.mktemp("fp")
    cfg = compose_config([f"paths.cache_dir={tmp / 'cache'}", *TEST_OVERRIDES],
                         output_dir=tmp / "run")
    return cfg, run_experiment(cfg)


def test_fp_metrics_match_shipped_reference(fp_run):
    _, res = fp_run
    ref = load_reference()["fp_test"]
    m = res["metrics"]
    assert res["status"] == "done"
    # same seed, same samples, same metric code: the reference is reproduced (bit-level noise aside)
    assert m["fid"] == pytest.approx(ref["fid"], rel=0.05, abs=0.05)
    assert m["cond_acc"] == pytest.approx(ref["cond_acc"], abs=0.02)
    assert m["cond_acc"] > 0.9  # generated digits are the digits that were asked for
    assert 6.0 < m["is"] <= 10.0  # 10 well-separated classes: IS close to its maximum of 10


def test_results_json_schema_and_artifacts(fp_run):
    cfg, res = fp_run
    out = cfg.paths.output_dir
    on_disk = json.loads(Path(out, "results.json").read_text())
    for key in ("model", "method", "bits", "dataset", "sampler", "metrics", "cost", "status",
                "config", "version"):
        assert key in on_disk
    assert on_disk["config"]["sampler"]["steps"] == 20  # resolved config
    assert {"sample_s", "total_s", "peak_mem_mb", "size_mb"} <= set(on_disk["cost"])

    assert len(list(Path(out, "samples").glob("*.png"))) == 200
    from PIL import Image

    with Image.open(Path(out, "grid.png")) as grid:  # 16×16 digits enlarged to 64×64 tiles
        assert min(grid.size) >= 10 * 64
    assert list(Path(out, "wandb").glob("offline-run-*")), "an offline W&B run was written"


def test_finished_run_is_skipped_unless_forced(fp_run, monkeypatch):
    cfg, res = fp_run
    import lowbit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "sample_many", lambda *a, **k: pytest.fail("re-sampled"))
    assert run_experiment(cfg)["metrics"] == res["metrics"]


def test_wandb_failure_keeps_results(make_cfg, monkeypatch):
    import lowbit.tracking as tracking

    class Broken:
        def __init__(self, *a, **k):
            raise OSError("no space left on device")

    import wandb

    monkeypatch.setattr(wandb, "init", Broken)
    cfg = make_cfg("metrics.num_samples=20", "sampler=ddim20", "sampler.steps=3")
    res = run_experiment(cfg)
    saved = json.loads(Path(cfg.paths.output_dir, "results.json").read_text())
    assert saved["status"] == "done" and saved["metrics"] == res["metrics"]
    assert "no space left" in saved["wandb_error"]
    assert tracking  # the tracker module reported instead of raising


def test_results_go_to_the_wandb_run_of_the_training_curves(make_cfg, monkeypatch):
    """The pipeline's W&B run and the fine-tune's WandbLogger share one run id."""
    import wandb

    from lowbit.train.fit import build_loggers

    calls, logged = [], []

    class Recorder:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            self.summary = {}

        def log(self, data, *a, **k):
            logged.append(data)

        def finish(self, *a, **k):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: Recorder(**kw))
    cfg = make_cfg("metrics.num_samples=20", "sampler=ddim20", "sampler.steps=3", "logger=wandb",
                   "metrics.grid_size=12", "method=ptq", "bits=w8a8", "time_vs_fp=false")
    results = run_experiment(cfg)
    assert len(calls) == 1 and calls[0]["resume"] == "allow"
    train_logger = build_loggers(cfg, Path(cfg.paths.output_dir))[1]
    assert calls[0]["id"] == train_logger._wandb_init["id"]
    # the grid captioned with its labels row by row, and a table of the grid's samples with their
    # label and PSNR to the FP sample of the same seed
    (data,) = logged
    assert data["samples"]._caption.startswith("row 1: 0 1 2 3 4 5 6 7 8 9; row 2: 0 1")
    table = data["sample_table"]
    assert table.columns == ["index", "image", "condition", "psnr_to_fp"]
    assert len(table.data) == 12 and table.data[3][2] == "class 3"
    psnr = [row[3] for row in table.data]
    assert min(psnr) > 20 and abs(sum(psnr) / 12 - results["metrics"]["psnr"]) < 10


def test_peak_memory_is_per_run_not_per_process():
    """A big allocation before the run does not leak into the run's peak (Hydra's basic
    launcher runs all jobs of a sweep in one process)."""
    import torch

    from lowbit.memory import PeakMemory, rss_mb

    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    with PeakMemory(torch.device("cpu")) as pm:
        small = torch.ones(16 * 2**20 // 4) + 1  # 16 MiB more during the run
        assert small.sum() > 0
    assert pm.read() >= rss_mb() - 1
    assert pm.peak_mb < rss_mb() + 48  # the 64 MiB released before the run does not count
