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


@torch.no_grad()
def eps_mse(student: nn.Module, teacher: nn.Module, traj: TrajectorySet, batch_size: int) -> float:
    """Mean squared difference of the two models' raw ε over every input of ``traj``
    (cond and uncond halves alike); ε has unit variance, so 0.01 ≈ 20 dB SQNR."""
    err, n = 0.0, 0
    for batch in traj.batches(batch_size):
        err += torch.sum((student(**batch).sample - teacher(**batch).sample) ** 2).item()
        n += batch["sample"].numel()
    return err / n


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


class PairedFidelity(Metric):
    """``mse`` and ``psnr`` of a run's samples against the FP model's samples on the same seeds
    (``metrics.items.fidelity``). Needs no feature extractor, so it measures any model, also
    random-weight architecture presets.

    ``psnr`` is the PSNR of the mean squared error over all samples (dB, [0, 1] scale): a mean of
    per-image PSNRs would be infinite as soon as one sample equals its FP sample exactly. It is
    ``inf`` only when every sample equals its FP sample (an FP run compared with itself).
    """

    needs_fp_images = True

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __call__(self, ctx: MetricInputs) -> dict[str, float]:
        if ctx.fp_images is None:
            raise ValueError("paired fidelity needs the FP model's samples on the same seeds "
                             "(MetricInputs.fp_images)")
        mse = paired_mse(ctx.images, ctx.fp_images)
        return {f"{self.prefix}mse": mse, f"{self.prefix}psnr": psnr_from_mse(mse)}
