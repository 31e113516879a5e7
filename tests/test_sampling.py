"""Sampling: lowbit's loop against diffusers' own pipeline, determinism, guidance."""

from __future__ import annotations

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from lowbit.models.adapter import Denoiser
from lowbit.sampling import SamplerConfig, build_scheduler, sample, sample_many

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def _tiny_unconditional() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16),
                       layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def test_loop_matches_diffusers_ddim_pipeline():
    unet = _tiny_unconditional()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**SCHEDULE))
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=10,
               eta=0.0, output_type="np").images  # [B, H, W, C] in [0, 1]
    den = Denoiser(unet, SCHEDULE, "none", (1, 8, 8))
    ours = sample(den, build_scheduler(SCHEDULE, "ddim", 10), None, 3,
                  generator=torch.Generator().manual_seed(7))
    ours = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-5


def test_unconditional_model_gets_no_labels():
    unet = _tiny_unconditional()
    den = Denoiser(unet, SCHEDULE, "none", (1, 8, 8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    assert set(den.inputs(x, t, None)) == {"sample", "timestep"}
    with torch.no_grad():
        assert torch.equal(den.guided(x, t, None, 3.0), unet(x, t.expand(2)).sample)


def _digits():
    from lowbit.models.digits import load_digits_model

    return load_digits_model()


def test_sampling_is_deterministic_for_a_seed():
    m = _digits()
    labels = torch.arange(8) % 10
    for kind in ("ddim", "ddpm"):
        cfg = SamplerConfig(kind=kind, steps=5, eta=1.0, guidance_scale=2.0, batch_size=4)
        a = sample_many(m, cfg, labels, 8, seed=3, progress=False)
        b = sample_many(m, cfg, labels, 8, seed=3, progress=False)
        c = sample_many(m, cfg, labels, 8, seed=4, progress=False)
        assert torch.equal(a, b), kind
        assert (a - c).abs().mean() > 0.05, kind


def test_guidance_mixes_conditional_and_unconditional_predictions():
    m = _digits()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor(400), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        e_c = m.net(x, t.expand(4), class_labels=y).sample
        e_u = m.net(x, t.expand(4), class_labels=torch.full_like(y, 10)).sample
        e_g = m.guided(x, t, y, 3.0)
        assert torch.allclose(e_g, e_u + 3.0 * (e_c - e_u), atol=1e-5)
        assert torch.allclose(m.guided(x, t, y, 1.0), e_c, atol=1e-6)


def test_denoiser_sees_the_real_timestep():
    """The single denoiser call passes the scheduler's timestep: a forward pre-hook sees it."""
    m = _digits()
    seen = []
    h = m.net.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["timestep"][0])), with_kwargs=True)
    sched = build_scheduler(m.noise_schedule, "plms", 6)
    sample(m, sched, torch.arange(2), 2, torch.Generator().manual_seed(0), guidance_scale=2.0)
    h.remove()
    assert seen == [int(t) for t in sched.timesteps]
