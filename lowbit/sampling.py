"""Sampling over diffusers schedulers with classifier-free guidance.

``GuidedDenoiser.__call__`` is the single place where the denoiser is called during sampling:
it always passes ``timestep`` to the model, so a forward pre-hook on the model (timestep-aware
quantizers, caches) sees the real timestep whatever the scheduler.
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
from torch import nn

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


class GuidedDenoiser(nn.Module):
    """ε(x_t, t, c) with classifier-free guidance for class-conditional models.

    Conditional and unconditional inputs go through the model as one batch, so a quantized model
    sees both in every forward (as Q-Diffusion's calibration assumes).
    """

    def __init__(self, model: nn.Module, null_class: int | None, conditional: bool = True) -> None:
        super().__init__()
        self.model = model
        self.null_class = null_class
        self.conditional = conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                guidance_scale: float = 1.0) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if not self.conditional:
            return self.model(x, t).sample
        if labels is None or guidance_scale == 1.0 or self.null_class is None:
            return self.model(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.null_class)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]),
                         class_labels=torch.cat([labels, null])).sample
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample(denoiser: GuidedDenoiser, scheduler, labels: torch.Tensor, sample_shape: tuple[int, ...],
           generator: torch.Generator, guidance_scale: float = 1.0, eta: float = 0.0,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run the scheduler's reverse process for one batch; returns x_0 in model space.

    ``callback(i, t, x_t, eps)`` is called at every step (trajectory capture for calibration).
    The initial noise and any stochastic step draw from ``generator``, so a seed fixes the result.
    """
    device = next(denoiser.parameters()).device
    x = torch.randn((len(labels), *sample_shape), generator=generator).to(device)
    x = x * scheduler.init_noise_sigma
    labels = labels.to(device)
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
        step_kwargs["generator"] = generator
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = denoiser(x_in, t.to(device), labels, guidance_scale)
        if callback is not None:
            callback(i, t, x_in, eps)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def sample_many(denoiser: GuidedDenoiser, noise_schedule: dict, cfg: SamplerConfig,
                labels: torch.Tensor, sample_shape: tuple[int, ...], seed: int,
                callback: StepCallback | None = None, progress: bool = True) -> torch.Tensor:
    """Sample ``len(labels)`` images in batches. Batch ``b`` uses seed ``seed + b`` so results
    do not depend on how many batches ran before (resumable, parallelisable)."""
    from tqdm.auto import tqdm

    out = []
    starts = range(0, len(labels), cfg.batch_size)
    for b, s in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        sched = build_scheduler(noise_schedule, cfg.kind, cfg.steps)
        gen = torch.Generator().manual_seed(seed + b)
        out.append(sample(denoiser, sched, labels[s : s + cfg.batch_size], sample_shape, gen,
                          cfg.guidance_scale, cfg.eta, callback).cpu())
    return torch.cat(out)
