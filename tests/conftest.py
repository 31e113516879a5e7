"""Shared fixtures. Tests never touch the network: W&B runs offline in tmp folders."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OMP_NUM_THREADS wins, so a busy machine can run the suite on one thread without spin-waits
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real lowbit config with overrides; the run dir is a tmp folder."""
    from lowbit.cli import compose_config

    def _make(*overrides: str, output_dir=None):
        base = [f"paths.cache_dir={tmp_path.parent / 'lowbit-cache'}"]
        return compose_config([*base, *overrides], output_dir=output_dir or tmp_path / "run")

    return _make


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def omp_threads():
    """OMP_NUM_THREADS torch threads for a module (on a shared machine 1 can be faster); use with
    ``pytestmark = pytest.mark.usefixtures("omp_threads")``."""
    with _torch_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))):
        yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of small tensors (more threads spin-wait on a busy machine)."""
    with _torch_threads(1):
        yield


@pytest.fixture
def held_out_eps_error(make_cfg, tmp_path):
    """``f(seed, *overrides)``: train the method the overrides compose (its ``prepare`` on the
    digits model, one torch thread) and return its (1−ᾱ)-weighted ε error against FP on 32
    held-out FP trajectories (their own noise, seed 777) — the x₀-space measure of the effect
    tests, which compare a method with the same run with a component switched off."""
    from pathlib import Path

    from lowbit.data.trajectories import fp_trajectories
    from lowbit.methods import MethodContext, build_method
    from lowbit.methods.ptq import sampler_config
    from lowbit.metrics.fidelity import eps_error_by_step
    from lowbit.models.digits import load_digits_model

    def run(seed: int, *overrides: str) -> float:
        out = tmp_path / f"{seed}-{len(list(tmp_path.iterdir()))}"
        cfg = make_cfg(*overrides, f"seed={seed}", "logger=none", output_dir=out)
        loaded = load_digits_model()
        ctx = MethodContext(cfg=cfg, output_dir=out, cache_dir=Path(cfg.paths.cache_dir),
                            model=loaded)
        with _torch_threads(1):
            held = fp_trajectories(loaded, sampler_config(cfg), n=32, calib_steps=10, seed=777,
                                   cache_dir=ctx.cache_dir)
            torch.manual_seed(seed)
            student = build_method(cfg.method).prepare(loaded.net, ctx)
            return eps_error_by_step(student, loaded.net, held, batch_size=32)["weighted"]

    return run
