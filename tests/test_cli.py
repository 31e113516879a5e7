"""The console scripts as a user runs them: a real multirun into tmp_path, then lowbit-report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "LOWBIT_CACHE": str(cwd / "cache")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_then_report(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = [str(BIN / "lowbit"), "-m", "sampler=ddim20,plms20", "sampler.steps=4",
            "metrics.num_samples=40", "logger=none", f"hydra.sweep.dir={sweep}"]
    if launcher == "joblib":
        # one thread per job: two jobs share the machine without OpenMP spin-waiting
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1"]
    p = _run(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in sweep.iterdir() if x.is_dir()) == ["0", "1"]

    r = _run([str(BIN / "lowbit-report"), str(sweep)], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert len(lines) == 4  # header, rule, two jobs
    assert "fid" in lines[0] and "cond_acc" in lines[0]
    # the sampler column names the effective sampler: the presets ran at 4 steps
    assert "ddim4" in r.stdout and "plms4" in r.stdout and "ddim20" not in r.stdout
    rows = list(csv.DictReader((sweep / "results.csv").open()))  # noqa: SIM115
    assert [row["sampler"] for row in rows] == ["ddim4", "plms4"]
    for job in ("0", "1"):  # each job folder holds its own attempt: .hydra/ swapped in, no staging
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
        assert not [x for x in (sweep / job).iterdir() if x.name.startswith(".staging")]
    assert all(row["status"] == "done" and float(row["cond_acc"]) > 0.5 for row in rows)


def test_bad_value_fails_with_message(tmp_path):
    p = _run([str(BIN / "lowbit"), "metrics.num_samples=-3", "logger=none",
              f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert p.returncode != 0
    assert "metrics.num_samples=-3" in p.stderr and "Fix:" in p.stderr


def test_report_on_missing_folder(tmp_path):
    r = _run([str(BIN / "lowbit-report"), str(tmp_path / "nope")], tmp_path)
    assert r.returncode == 2 and "not a folder" in r.stderr
