"""Sampling over diffusers schedulers with classifier-free guidance.

The network is called only through the denoiser adapter (:class:`~lowbit.models.adapter.Denoiser`),
which always passes ``timestep`` by keyword, so a forward pre-hook on the network (timestep-aware
quantizers, caches) sees the real timestep whatever the scheduler. Samples stay in the model's
space (latents for latent models); :meth:`Denoiser.decode` gives images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from lowbit.models.adapter import Denoiser

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "plms": PNDMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


@dataclass
class SamplerConfig:
    kind: str = "ddim"
    steps: int = 20
    eta: float = 0.0
    guidance_scale: float = 1.0
    batch_size: int = 250

    @classmethod
    def from_cfg(cls, sampler_cfg) -> SamplerConfig:
        """From the ``sampler`` config group (its ``name`` is only a label)."""
        return cls(**{k: sampler_cfg[k] for k in ("kind", "steps", "eta", "guidance_scale",
                                                   "batch_size")})


def build_scheduler(noise_schedule: dict, kind: str, steps: int):
    """A diffusers scheduler for the model's own noise schedule, set to ``steps`` steps."""
    if kind not in SCHEDULERS:
        raise ValueError(f"sampler.kind={kind!r} is unknown; choose one of {sorted(SCHEDULERS)}")
    extra = {"skip_prk_steps": True} if kind == "plms" else {}  # PLMS = PNDM without Runge-Kutta
    sched = SCHEDULERS[kind].from_config({**noise_schedule, **extra})
    sched.set_timesteps(steps)
    return sched


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def step_kwargs(scheduler, eta: float, generator: torch.Generator) -> dict:
    """Keyword arguments of ``scheduler.step`` for η and the stochastic samplers' noise."""
    kw: dict = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
        kw["generator"] = generator
    return kw


@torch.no_grad()
def sample(denoiser: Denoiser, scheduler, cond: torch.Tensor | None, n: int,
           generator: torch.Generator, guidance_scale: float = 1.0, eta: float = 0.0,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run the scheduler's reverse process for one batch of ``n`` samples; returns x_0 in the
    model's space.

    ``callback(i, t, x_t, eps)`` is called at every step (trajectory capture for calibration).
    The initial noise and any stochastic step draw from ``generator``, so a seed fixes the result.
    """
    device = denoiser.device
    x = torch.randn((n, *denoiser.sample_shape), generator=generator).to(device)
    x = x * scheduler.init_noise_sigma
    cond = cond.to(device) if cond is not None else None
    kw = step_kwargs(scheduler, eta, generator)
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = denoiser.guided(x_in, t.to(device), cond, guidance_scale)
        if callback is not None:
            callback(i, t, x_in, eps)
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x


def sample_many(denoiser: Denoiser, cfg: SamplerConfig, cond: torch.Tensor | None, n: int,
                seed: int, callback: StepCallback | None = None, progress: bool = True
                ) -> torch.Tensor:
    """Sample ``n`` images in batches of ``cfg.batch_size`` with conditioning ``cond`` (``[n, …]``
    or None). Batch ``b`` uses seed ``seed + b`` so results do not depend on how many batches ran
    before (resumable, parallelisable)."""
    from tqdm.auto import tqdm

    out = []
    starts = range(0, n, cfg.batch_size)
    for b, s in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        sched = build_scheduler(denoiser.noise_schedule, cfg.kind, cfg.steps)
        gen = torch.Generator().manual_seed(seed + b)
        m = min(cfg.batch_size, n - s)
        c = cond[s : s + m] if cond is not None else None
        out.append(sample(denoiser, sched, c, m, gen, cfg.guidance_scale, cfg.eta,
                          callback).cpu())
    return torch.cat(out)
