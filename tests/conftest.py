"""Shared fixtures. Tests never touch the network: W&B runs offline in tmp folders."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit.ablate import torch_threads

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


@pytest.fixture(scope="module")
def omp_threads():
    """OMP_NUM_THREADS torch threads for a module (on a shared machine 1 can be faster); use with
    ``pytestmark = pytest.mark.usefixtures("omp_threads")``."""
    with torch_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))):
        yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of small tensors (more threads spin-wait on a busy machine)."""
    with torch_threads(1):
        yield


@pytest.fixture
def held_out_eps_error(tmp_path):
    """``f(seed, *overrides)``: train the method the overrides compose (its ``prepare`` on the
    digits model, one torch thread) and return its (1−ᾱ)-weighted ε error against FP on 32
    held-out FP trajectories (their own noise, seed 777) — the x₀-space measure of the effect
    tests, which compare a method with the same run with a component switched off
    (:func:`lowbit.ablate.held_out_eps_error`, what ``lowbit-ablate`` runs)."""
    from lowbit.ablate import held_out_eps_error as probe

    cache = tmp_path.parent / "lowbit-cache"

    def run(seed: int, *overrides: str) -> float:
        out = tmp_path / f"{seed}-{len(list(tmp_path.iterdir()))}"
        return probe([f"paths.cache_dir={cache}", *overrides], seed, out)

    return run
