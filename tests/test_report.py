"""lowbit-report on synthetic sweeps: jobs that differ only in ``seed`` become one row with
mean ± std and n; ``--per-seed`` keeps a row per job; failed and unreadable jobs keep theirs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lowbit.report import MeanStd, aggregate, collect, columns, main, to_markdown
from lowbit.rundir import RESULTS


def _config(method: str, seed: int, job: str, calib_n: int = 32) -> dict:
    return {"model": {"name": "digits"}, "method": {"name": method, "calib_n": calib_n},
            "bits": {"name": "w4a4" if method != "fp" else "fp"}, "dataset": {"name": "digits"},
            "sampler": {"name": "ddim20", "kind": "ddim", "steps": 20}, "seed": seed,
            # where and how a job ran: never a reason to keep seeds apart
            "paths": {"output_dir": f"/sweep/{job}"}, "threads": 1 + seed % 2}


def _write(root: Path, job: str, method: str, seed: int, metrics: dict, cost: dict,
           status: str = "done", **config) -> None:
    res = {"model": "digits", "method": method, "bits": "w4a4" if method != "fp" else "fp",
           "dataset": "digits", "sampler": "ddim20", "status": status, "seed": seed,
           "metrics": metrics, "cost": cost, "config": _config(method, seed, job, **config)}
    if status != "done":
        res["error"] = "NonFiniteError: the samples are NaN"
    (root / job).mkdir(parents=True)
    (root / job / RESULTS).write_text(json.dumps(res))


FID = {"ptq": [10.0, 12.0, 17.0], "fp": [3.0, 3.5, 4.5]}
SIZE = {"ptq": [0.6, 0.6, 0.6], "fp": [4.4, 4.4, 4.4]}
TOTAL_S = {"ptq": [30.0, 41.0, 35.0], "fp": [9.0, 8.0, 12.0]}


@pytest.fixture
def sweep(tmp_path):
    """Jobs 0–2: PTQ at seeds 0–2; 3–5: FP at seeds 0–2 (psnr "inf"); 6: PTQ seed 3, failed;
    7–8: PTQ with another calib_n at seeds 0–1; 9: not a result."""
    root = tmp_path / "sweep"
    for m, first in (("ptq", 0), ("fp", 3)):
        for s in range(3):
            psnr = "inf" if m == "fp" else 20.0 + s
            _write(root, str(first + s), m, s,
                   {"fid": FID[m][s], "psnr": psnr, "fid_ref": "digits/heldout",
                    "fid_n": 500, "kid": None if s == 1 else 0.01 * (s + 1)},
                   {"size_mb": SIZE[m][s], "total_s": TOTAL_S[m][s]})
    _write(root, "6", "ptq", 3, {}, {}, status="failed")
    for s in range(2):
        _write(root, str(7 + s), "ptq", s, {"fid": 30.0 + s, "psnr": 15.0,
                                             "fid_ref": f"digits/split{s}",
                                             **({"is": 9.0} if s == 0 else {})}, {}, calib_n=64)
    (root / "9").mkdir()
    (root / "9" / RESULTS).write_text("[1, 2]")
    return root


def test_seeds_become_one_row_with_mean_std_and_n(sweep):
    rows = aggregate(collect(sweep))
    by_job = {r["job"]: r for r in rows}
    assert list(by_job) == ["3,4,5", "0,1,2", "6", "7,8", "9"]  # FP first, then sweep order
    fp, ptq, other = by_job["3,4,5"], by_job["0,1,2"], by_job["7,8"]
    assert (ptq["n"], ptq["seed"], fp["seed"]) == (3, "0,1,2", "0,1,2")
    for row, m in ((ptq, "ptq"), (fp, "fp")):
        for col, values in (("fid", FID[m]), ("size_mb", SIZE[m]), ("total_s", TOTAL_S[m])):
            cell = row[col]
            assert isinstance(cell, MeanStd) and cell.n == 3
            # numpy as the oracle of the mean and the sample (ddof=1) standard deviation
            assert cell.mean == pytest.approx(np.mean(values), rel=1e-12)
            assert cell.std == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-12)
    # psnr of identical images is "inf" at every seed: inf ± 0, not NaN
    assert (fp["psnr"].mean, fp["psnr"].std) == (float("inf"), 0.0)
    # a metric missing at one seed (null) is averaged over the seeds that have it, and says so
    assert (ptq["kid"].n, ptq["kid"].of) == (2, 3) and ptq["kid"].mean == pytest.approx(0.02)
    assert str(ptq["kid"]).endswith("(2 of 3)") and "of" not in str(ptq["fid"])
    # strings: one value when the seeds agree, all of them when they do not
    assert ptq["fid_ref"] == "digits/heldout" and other["fid_ref"] == "digits/split0,digits/split1"
    assert other["n"] == 2 and other["fid"].mean == pytest.approx(30.5)
    assert str(other["is"]) == "9 ± n/a (1 of 2)"  # one seed has no spread
    # failed and unreadable jobs are never averaged: their own row, their error
    assert by_job["6"]["n"] == 1 and by_job["6"]["status"] == "failed" and by_job["6"]["error"]
    assert by_job["9"]["status"] == "unreadable"


def test_table_and_csv_show_mean_std(sweep):
    assert main([str(sweep), "--md", str(sweep / "table.md")]) == 0
    table = (sweep / "table.md").read_text()
    header = table.splitlines()[0]
    assert "| seed | n |" in header and "fid_std" not in header
    ptq_line = next(ln for ln in table.splitlines() if ln.startswith("| 0,1,2 "))
    assert f"| {np.mean(FID['ptq']):.4g} ± {np.std(FID['ptq'], ddof=1):.4g} |" in ptq_line
    fp_line = next(ln for ln in table.splitlines() if ln.startswith("| 3,4,5 "))
    assert "| inf ± 0 |" in fp_line
    rows = list(csv.DictReader((sweep / "results.csv").open()))  # noqa: SIM115
    assert len(rows) == 5
    ptq = next(r for r in rows if r["job"] == "0,1,2")
    assert float(ptq["fid"]) == pytest.approx(np.mean(FID["ptq"]))
    assert float(ptq["fid_std"]) == pytest.approx(np.std(FID["ptq"], ddof=1))
    assert float(ptq["total_s_std"]) == pytest.approx(np.std(TOTAL_S["ptq"], ddof=1))
    fp = next(r for r in rows if r["job"] == "3,4,5")
    assert (float(fp["psnr"]), float(fp["psnr_std"])) == (float("inf"), 0.0)
    assert ptq["n"] == "3" and ptq["seed"] == "0,1,2"


def test_per_seed_flag_keeps_a_row_per_job(sweep):
    assert main([str(sweep), "--per-seed"]) == 0
    rows = list(csv.DictReader((sweep / "results.csv").open()))  # noqa: SIM115
    assert sorted(r["job"] for r in rows) == [str(i) for i in range(10)]
    fp0 = next(r for r in rows if r["job"] == "3")
    assert fp0["psnr"] == "inf" and fp0["seed"] == "0" and "fid_std" not in fp0
    text = to_markdown(collect(sweep), columns(collect(sweep)))
    assert "±" not in text and "| inf |" in text


def test_single_seed_rows_are_plain_values(tmp_path):
    root = tmp_path / "sweep"
    _write(root, "0", "ptq", 0, {"fid": 10.0, "psnr": 20.0}, {"size_mb": 0.6})
    _write(root, "1", "ptq", 0, {"fid": 11.0, "psnr": 19.0}, {"size_mb": 0.6}, calib_n=8)
    rows = aggregate(collect(root))
    assert [(r["job"], r["n"], r["fid"]) for r in rows] == [("0", 1, 10.0), ("1", 1, 11.0)]
    assert "±" not in to_markdown(rows, columns(rows))
