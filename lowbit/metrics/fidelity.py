"""Fidelity of a student to its FP teacher: paired image metrics on the same seeds, and ε error
on FP trajectories (no sampling, no feature space).

Paired metrics compare each sample of a run with the FP model's sample drawn from the same noise
and condition, so they measure degradation directly — unlike FID against the digits, which
rewards prototypical digits (DESIGN.md, "Measured caution").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowbit.metrics.base import Metric, MetricInputs

if TYPE_CHECKING:
    from lowbit.data.trajectories import TrajectorySet


def _on(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def eps_mse(student: nn.Module, teacher: nn.Module, traj: TrajectorySet, batch_size: int) -> float:
    """Mean squared difference of the two models' raw ε over every input of ``traj``
    (cond and uncond halves alike); ε has unit variance, so 0.01 ≈ 20 dB SQNR."""
    err, n = 0.0, 0
    for batch in traj.batches(batch_size):
        e, k = _sq_error(student, teacher, traj, batch)
        err, n = err + e, n + k
    return err / n


def _sq_error(student: nn.Module, teacher: nn.Module, traj: TrajectorySet,
              batch: dict[str, Tensor]) -> tuple[float, int]:
    """Summed squared ε difference of one batch of network inputs, and its number of values."""
    batch = _on(batch, _device(teacher))
    d = (traj.denoiser.output_eps(student(**batch)) - traj.denoiser.output_eps(teacher(**batch)))
    return torch.sum(d.double() ** 2).item(), d.numel()


@torch.no_grad()
def eps_error_by_step(student: nn.Module, teacher: nn.Module, traj: TrajectorySet,
                      batch_size: int) -> dict[str, list[float] | list[int] | float]:
    """The student's ε error per trajectory step, and a summary that is not the t≈0 step's.

    The plain mean over steps (:func:`eps_mse`) is dominated by the last, least noisy step:
    there the quantization error on an almost clean x_t is amplified by 1/√(1−ᾱ_t) in ε, yet
    that step barely changes the image (measured on the digits model, W4A4 PTQ, DDIM-10: the
    t = 0 step holds 70 % of the plain sum). ``weighted`` weights each step's ε-MSE by
    (1−ᾱ_t) — the variance of the noise term of x_t = √ᾱ x₀ + √(1−ᾱ) ε, i.e. the error of the
    noise *added back* — so every step counts by what it changes (there no step holds more than
    14 % of it). The error in x₀ space, ε-MSE·(1−ᾱ)/ᾱ, is the mirror image: dominated by the
    noisiest step (65 % at t = 900), so it is not the summary.

    Returns ``timesteps`` (one per kept step, noisiest first), ``mse`` (per step), ``share``
    (each step's share of the plain sum), ``mean`` (= :func:`eps_mse`), ``weights`` (1−ᾱ_t),
    ``weighted`` and ``weighted_share`` (each step's share of the weighted sum)."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(**dict(traj.denoiser.noise_schedule)).alphas_cumprod.double()
    per_step, counts = [], []
    for s in range(traj.xt.shape[0]):
        err, n = 0.0, 0
        for batch in traj.batches(batch_size, steps=[s]):
            e, k = _sq_error(student, teacher, traj, batch)
            err, n = err + e, n + k
        per_step.append(err / n)
        counts.append(n)
    ts = [int(t) for t in traj.timesteps.tolist()]
    w = [1.0 - float(alphas[t]) for t in ts]
    total = sum(m * c for m, c in zip(per_step, counts, strict=True))
    w_terms = [wi * m for wi, m in zip(w, per_step, strict=True)]
    w_total = sum(w_terms)
    return {"timesteps": ts, "mse": per_step,
            "share": [m * c / total if total else 0.0 for m, c in zip(per_step, counts, strict=True)],
            "mean": total / sum(counts),
            "weights": w,
            "weighted": w_total / sum(w),
            "weighted_share": [x / w_total if w_total else 0.0 for x in w_terms]}


def _unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] → float64 [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"paired metrics take uint8 images, got {images.dtype}")
    return images.detach().cpu().double() / 255.0


def paired_mse(images: Tensor, fp_images: Tensor) -> float:
    """Mean squared error over all pixels of two uint8 image sets of the same shape, on the
    [0, 1] scale."""
    if images.shape != fp_images.shape:
        raise ValueError(f"paired metrics need the FP samples of the same seeds: shapes "
                         f"{tuple(images.shape)} and {tuple(fp_images.shape)} differ")
    return float(torch.mean((_unit(images) - _unit(fp_images)) ** 2))


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for images on the [0, 1] scale; ``inf`` when the images are identical."""
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


#: the recorded PSNR of identical images. JSON has no infinity (lowbit writes non-finite floats as
#: null), so the value is the string that ``float()`` reads back as ``inf``; lowbit-report shows
#: and averages it as such.
PSNR_IDENTICAL = "inf"


class PairedFidelity(Metric):
    """``mse`` and ``psnr`` of a run's samples against the FP model's samples on the same seeds
    (``metrics.items.fidelity``). Needs no feature extractor, so it measures any model, also
    random-weight architecture presets.

    ``psnr`` is the PSNR of the mean squared error over all samples (dB, [0, 1] scale): a mean of
    per-image PSNRs would be infinite as soon as one sample equals its FP sample exactly. When
    every sample equals its FP sample (an FP run compared with itself) it is
    :data:`PSNR_IDENTICAL`, ``"inf"``: a value results.json can hold and a table can show, where
    a float ``inf`` would be written as null.
    """

    needs_fp_images = True

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        if ctx.fp_images is None:
            raise ValueError("paired fidelity needs the FP model's samples on the same seeds "
                             "(MetricInputs.fp_images)")
        mse = paired_mse(ctx.images, ctx.fp_images)
        psnr = psnr_from_mse(mse)
        return {f"{self.prefix}mse": mse,
                f"{self.prefix}psnr": PSNR_IDENTICAL if math.isinf(psnr) else psnr}


class EpsError(Metric):
    """The student's ε error to the FP teacher on held-out FP trajectories, recorded per run
    (``metrics.items.eps_error``): ``eps_mse`` (plain mean over steps and samples) and
    ``eps_mse_weighted`` (each step weighted by 1−ᾱ_t, see :func:`eps_error_by_step`), and with
    ``per_step`` the ε-MSE of every kept step as ``eps_mse_t<t>``.

    The trajectories are the FP model's, sampled with the run's sampler from the seed stream
    ``eps_error`` of the run's seed — neither the calibration noise nor the evaluation noise —
    for ``n`` samples at ``steps`` uniformly spaced kept steps, and cached like calibration
    trajectories. An FP run (the student is the teacher) records 0 without computing; a
    guidance-distilled consistency student (``method=rglcd``) records nothing.

    n: held-out samples; steps: kept steps (at most the sampler's); batch_size: samples per
    forward (guidance doubles the network batch); per_step: also record every step's ε-MSE.
    """

    needs_models = True

    def __init__(self, n: int = 16, steps: int = 10, batch_size: int = 32,
                 per_step: bool = False) -> None:
        self.n = n
        self.steps = steps
        self.batch_size = batch_size
        self.per_step = per_step

    def check(self, dataset=None, key: str = "metrics") -> None:
        from lowbit.config import ConfigError

        for name in ("n", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}.{name}", v, "must be a positive integer",
                                  f"pass {key}.{name}=16, or {key}=null to leave the ε error out")
        if not isinstance(self.per_step, bool):
            raise ConfigError(f"{key}.per_step", self.per_step, "must be true or false",
                              f"pass {key}.per_step=false")

    def trajectories(self, ctx: MetricInputs) -> TrajectorySet:
        """The held-out FP trajectories of ``ctx``'s run (generated once, then cached)."""
        from lowbit.data.trajectories import fp_trajectories
        from lowbit.train.seeds import derive_seed

        conditions = ctx.dataset.conditions(self.n) if ctx.dataset is not None else None
        return fp_trajectories(ctx.model, ctx.sampler, n=self.n, calib_steps=self.steps,
                               seed=derive_seed(int(ctx.seed), "eps_error"),
                               cache_dir=ctx.cache_dir, conditions=conditions)

    def __call__(self, ctx: MetricInputs) -> dict[str, float]:
        if ctx.model is None or ctx.student is None or ctx.sampler is None:
            raise ValueError("the ε error needs the FP model, the student and the sampler "
                             "(MetricInputs.model, .student, .sampler)")
        teacher = ctx.model.net
        if ctx.student is teacher:
            return {"eps_mse": 0.0, "eps_mse_weighted": 0.0}
        from lowbit.models.guidance import guidance_embedding

        if guidance_embedding(ctx.student) is not None:
            # a guidance-distilled consistency student (RG-LCD) predicts the ODE's end from one
            # call at its w; its ε is not meant to equal the teacher's at the same input
            return {}
        by_step = eps_error_by_step(ctx.student, teacher, self.trajectories(ctx),
                                    self.batch_size)
        out = {"eps_mse": by_step["mean"], "eps_mse_weighted": by_step["weighted"]}
        if self.per_step:
            out.update({f"eps_mse_t{t}": m
                        for t, m in zip(by_step["timesteps"], by_step["mse"], strict=True)})
        return out
