"""Timestep-aware activation quantizers driven by the top-level model's ``timestep`` argument.

Calibrated on a 20-step DDIM schedule, run with a 50-step one: the Δ in use at every call is the
nearest calibration bucket's (or the linear interpolation between neighbours), read from inside
the forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from lowbit.models.digits import DIGITS_NOISE_SCHEDULE, DIGITS_UNET_CONFIG, build_digits_unet
from lowbit.models.presets import build_preset, example_inputs
from lowbit.quant import (
    QuantConfig,
    TimestepActQuantizer,
    calibrate_,
    quantize_,
    timestep_aware_quantizers,
)


def _config(interp: str = "nearest") -> QuantConfig:
    return QuantConfig.from_dict({"name": "w8a8-t", "weight": {"init": "minmax"},
                                  "act": {"init": "minmax", "timestep_aware": True,
                                          "interp": interp}})


def _ddim_timesteps(steps: int) -> list[int]:
    sch = DDIMScheduler(**DIGITS_NOISE_SCHEDULE)
    sch.set_timesteps(steps)
    return sch.timesteps.tolist()


def _calibration(timesteps: list[int], b: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [dict(sample=torch.randn(b, 1, 16, 16, generator=g) * (1 + t / 500),
                 timestep=torch.tensor(t), class_labels=torch.randint(0, 10, (b,), generator=g))
            for t in timesteps]


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, list[int]]:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    report = quantize_(model, _config())
    assert report.timestep_hook
    ts20 = _ddim_timesteps(20)
    calibrate_(model, _calibration(ts20))
    return model, ts20


def _record_scales(q: TimestepActQuantizer) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """(timestep, Δ, zero point) at each call of ``q``, read while the forward pass runs."""
    calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def hook(mod: TimestepActQuantizer, _args: tuple) -> None:
        s, z = mod.current_qparams()
        calls.append((float(mod.timestep), s.detach().clone(), z.detach().clone()))

    return calls, q.register_forward_pre_hook(hook)


def test_nearest_bucket_on_a_different_schedule(calibrated) -> None:
    model, ts20 = calibrated
    q = model.down_blocks[1].attentions[0].to_q.input_quantizer
    assert isinstance(q, TimestepActQuantizer) and q.timesteps.tolist() == sorted(ts20)
    buckets = {t: (q.scale[i].clone(), q.zero_point[i].clone()) for i, t in
               enumerate(q.timesteps.tolist())}
    assert len({float(s) for s, _ in buckets.values()}) > 10  # buckets really differ
    calls, handle = _record_scales(q)
    sch = DDIMScheduler(**DIGITS_NOISE_SCHEDULE)
    sch.set_timesteps(50)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    try:
        with torch.no_grad():
            for t in sch.timesteps:  # a plain diffusers scheduler loop, positional timestep
                x = sch.step(model(x, t, class_labels=y).sample, t, x).prev_sample
    finally:
        handle.remove()
    assert [c[0] for c in calls] == sch.timesteps.float().tolist()
    for t, s, z in calls:
        nearest = min(buckets, key=lambda c: (abs(c - t), c))
        assert torch.equal(s, buckets[nearest][0]) and torch.equal(z, buckets[nearest][1]), t
    assert torch.isfinite(x).all()


def test_linear_interpolation_between_buckets(calibrated) -> None:
    model, _ = calibrated
    q = model.up_blocks[1].resnets[0].conv1.input_quantizer
    ts = q.timesteps.tolist()
    q.spec = QuantConfig.from_dict({"act": {"interp": "linear", "timestep_aware": True}}).act
    calls, handle = _record_scales(q)
    x = _calibration([0])[0]
    try:
        with torch.no_grad():
            for t in [ts[3], 130, 131, ts[-1] + 40, -5]:  # on a bucket, between, beyond both ends
                model(x["sample"], timestep=torch.tensor([t, t]), class_labels=x["class_labels"])
    finally:
        handle.remove()
        q.spec = _config().act
    on, mid1, mid2, above, below = calls
    torch.testing.assert_close(on[1], q.scale[3], rtol=0, atol=0)
    for t, s, z in (mid1, mid2):
        hi = next(i for i, c in enumerate(ts) if c >= t)
        w = (t - ts[hi - 1]) / (ts[hi] - ts[hi - 1])
        torch.testing.assert_close(s, (1 - w) * q.scale[hi - 1] + w * q.scale[hi])
        zr = (1 - w) * q.zero_point[hi - 1] + w * q.zero_point[hi]
        assert float(z) == float(torch.round(zr))  # integer zero point
    assert torch.equal(above[1], q.scale[-1]) and torch.equal(below[1], q.scale[0])


def test_hook_reads_keyword_batched_and_rejects_mixed_timesteps(calibrated) -> None:
    model, ts20 = calibrated
    qs = timestep_aware_quantizers(model)
    b = _calibration([ts20[0]])[0]
    with torch.no_grad():
        model(b["sample"], timestep=torch.full((2,), 333), class_labels=b["class_labels"])
    assert all(float(q.timestep) == 333 for q in qs)
    with torch.no_grad():
        model(b["sample"], 7, b["class_labels"])  # python int, positional
    assert all(float(q.timestep) == 7 for q in qs)
    with pytest.raises(ValueError, match="different timesteps"):
        model(b["sample"], torch.tensor([10, 20]), class_labels=b["class_labels"])


def test_dit_timestep_vector_from_pipeline_style_call() -> None:
    model = build_preset("dit")
    quantize_(model, _config())
    calibrate_(model, [example_inputs(model, 2, t) for t in (999, 500, 1)])
    q = model.transformer_blocks[0].attn1.matmul_quantizers.softmax
    assert q.timesteps.tolist() == [1.0, 500.0, 999.0]
    with torch.no_grad():
        out = model(**example_inputs(model, 3, 480)).sample  # timestep expanded to [B]
    assert float(q.timestep) == 480 and int(q.bucket_index()) == 1
    assert torch.isfinite(out).all()


def test_calibration_needs_a_timestep_per_batch() -> None:
    model = build_digits_unet().eval()
    quantize_(model, _config())
    b = _calibration([10])[0]
    with pytest.raises(ValueError, match="called without a `timestep`"):
        calibrate_(model, [{"sample": b["sample"], "timestep": None,
                            "class_labels": b["class_labels"]}])


def test_quantized_unet_runs_in_a_diffusers_pipeline() -> None:
    """DDIMPipeline calls ``unet(image, t)`` itself: no lowbit code in the loop."""
    torch.manual_seed(0)
    cfg = {k: v for k, v in DIGITS_UNET_CONFIG.items() if k != "num_class_embeds"}
    unet = UNet2DModel(**cfg).eval()
    quantize_(unet, _config())
    g = torch.Generator().manual_seed(0)
    calibrate_(unet, [{"sample": torch.randn(2, 1, 16, 16, generator=g), "timestep": t}
                      for t in _ddim_timesteps(20)])
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**DIGITS_NOISE_SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=7, generator=torch.Generator().manual_seed(1),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    q = unet.mid_block.attentions[0].matmul_quantizers.q
    assert float(q.timestep) == pipe.scheduler.timesteps[-1]
