"""Fidelity of a student to its FP teacher on FP trajectories (no sampling, no feature space)."""

from __future__ import annotations

import torch
from torch import nn

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
