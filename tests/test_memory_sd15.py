"""The memory measurement of ``experiments/memory_sd15`` on a shrunk SD v1.x U-Net: the tensor
accounting (live and saved bytes, the linear projection) and what one fine-tuning and one
calibration step hold."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# accounting checks of experiments/memory_sd15 (about 20 s): outside the default suite
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "memory_sd15" / "measure.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("memory_sd15_measure", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def arch(measure):
    # the SD v1.x block structure at width 32, 8×8 latents, 4 text tokens of width 32
    return measure.Arch("test", 32, 32, 8, 4)


def finetune(measure, arch, batch: int, method: str = "quest", **kw):
    """Two optimisation steps; the PTQ student's activation ranges by min–max (quicker than the
    recipes' MSE search, the same tensors)."""
    torch.manual_seed(0)
    return measure.measure_finetune(arch, batch, method, act_init="minmax", **kw)


def test_live_bytes_follow_allocations_and_frees(measure):
    with measure.TensorMemory() as mem:
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        c = torch.empty(500)
    assert mem.peak == 3000 * 4
    assert mem.bytes == 2500 * 4
    del b, c


def test_saved_storages_counted_once_until_freed(measure):
    x = torch.randn(64, 32, requires_grad=True)
    n = x.numel() * 4
    with measure.TensorMemory([x]) as mem:
        h = x * 3  # a product with a number saves nothing
        s, c = h.sin(), h.cos()  # both save h: one storage
        y = s * c  # saves s and c
        assert mem.saved_bytes == 3 * n
        y.sum().backward()
        del h, s, c, y
    assert mem.saved_peak == 3 * n
    assert mem.saved_bytes == 0  # the graph and the tensors are gone
    torch.testing.assert_close(x.grad, 3 * torch.cos(6 * x).detach(), atol=1e-5, rtol=1e-4)


def test_linear_projection_and_largest_batch(measure):
    runs = [{"batch": 2, "v": 10.0}, {"batch": 4, "v": 16.0}]
    assert measure.linear(2, 10.0, 4, 16.0) == (4.0, 3.0)
    assert measure.project(runs, "v", 8) == 28.0
    assert measure.max_batch(runs, "v", 30.0) == 8
    assert measure.max_batch(runs, "v", 30.0, step=3) == 6


def test_finetune_step_accounting(measure, arch):
    r = finetune(measure, arch, 2)
    numel = sum(p.numel() for p in measure.build_unet(arch).parameters())
    assert r["teacher_params"] == numel
    assert r["teacher_param_bytes"] == 4 * numel  # float32
    assert r["param_bytes"] == 4 * r["params"] > 4 * numel  # + the quantizers' step sizes
    assert r["trainable_param_bytes"] == 4 * r["trainable_params"] > 0
    assert r["grad_bytes"] == r["trainable_param_bytes"]
    assert r["optimizer_moment_bytes"] == 2 * r["trainable_param_bytes"]  # Adam: m and v
    assert r["projected_bytes"] == r["resident_bytes"] + r["live_peak_bytes"]
    assert r["live_peak_bytes"] >= r["saved_bytes"] > 0
    assert r["steps"][0]["saved_bytes"] == r["steps"][1]["saved_bytes"] == r["saved_bytes"]


@pytest.fixture(scope="module")
def quest_runs(measure, arch):
    return {b: finetune(measure, arch, b) for b in (1, 2, 3)}


@pytest.mark.slow
def test_saved_activations_grow_linearly_with_the_batch(quest_runs):
    # a fixed part (the quantized weights the layers save) + the same bytes per sample
    s = {b: r["saved_bytes"] for b, r in quest_runs.items()}
    assert s[2] - s[1] == s[3] - s[2] > 0
    assert s[1] - (s[2] - s[1]) > 0
    assert len({r["optimizer_moment_bytes"] for r in quest_runs.values()}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("saved", ["disk", "zeros"])
def test_activations_kept_out_of_memory_count_as_held(measure, arch, quest_runs, saved):
    """Saved activations kept on disk, or only as their layout, count as live while autograd
    holds them: the projection equals the in-memory run's; from disk the losses (so the
    gradients) are the same too."""
    run = finetune(measure, arch, 2, saved=saved)
    ref = quest_runs[2]
    assert run["held_bytes"] > 0 and ref["held_bytes"] == 0
    assert run["projected_bytes"] == ref["projected_bytes"]
    assert run["saved_bytes"] == ref["saved_bytes"]
    if saved == "disk":
        assert [s["loss"] for s in run["steps"]] == [s["loss"] for s in ref["steps"]]


@pytest.mark.slow
def test_efficientdm_step_trains_lora_and_talsq(measure, arch):
    r = finetune(measure, arch, 2, "efficientdm")
    assert r["groups"]["lora"]["groups"] > 0 and r["groups"]["act_scale"]["numel"] > 0
    assert r["optimizer_moment_bytes"] == 2 * r["trainable_param_bytes"]  # AdamW: m and v
    assert r["grad_bytes"] == r["trainable_param_bytes"]


@pytest.mark.slow
def test_calibration_observers_stay_bounded(measure, arch):
    # percentile ranges keep a sample of values as MSE ranges do, and finalize quicker
    r = measure.measure_calibration(arch, 3, max_samples=256, act_init="percentile")
    assert r["calibrated"] == r["observer"]["observers"] > 0
    assert r["observer"]["buckets"] == r["observer"]["observers"]  # one timestep: one bucket
    assert r["observer"]["samples"] > 0 and r["observer"]["bytes"] <= r["observer_bound_per_bucket"]
    # the eval-mode weight cache: one quantized copy of the quantized layers' weights
    assert 0 < r["weight_cache_bytes"] < r["teacher_param_bytes"]
