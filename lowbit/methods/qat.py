"""``method=qat``: full quantization-aware fine-tuning, the baseline of EfficientDM's cost claim.

The same PTQ initialisation, data (FP trajectories from pure noise, one optimiser step per
denoising step) and loss (guided-ε MSE against the FP teacher) as ``method=efficientdm``, but
instead of low-rank adapters **every** weight, bias and quantizer step size (weights and the
per-step activations) trains. Comparing the two at the same number of steps measures what the
LoRA restriction saves in trainable parameters, time and memory, and what it costs in quality.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lowbit.methods.efficientdm import EfficientDM
from lowbit.methods.ptq import CalibParams
from lowbit.train import ParamGroup, param_group
from lowbit.train.hparams import TrainParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATParams(CalibParams, TrainParams):
    trajectory_steps: int | None = None
    weight_decay: float = 0.0
    weight_lr: float = 1.0e-5
    weight_step_lr: float = 1.0e-6
    train_weight_zero_point: bool = True
    talsq: bool = True
    act_lr: float = 5.0e-4
    act_param_exclude: tuple[str, ...] = ()
    interp: str = "linear"


class QAT(EfficientDM):
    name = "qat"
    params_class = QATParams

    @property
    def label(self) -> str:
        return self.name if self.params.talsq else f"{self.name}(-talsq)"

    def adapt_(self, student: nn.Module) -> list[str]:
        return []  # no adapters: the weights themselves train

    def param_groups(self, student: nn.Module, lora_layers: list[str]) -> list[ParamGroup]:
        p = self.params
        groups = [
            param_group(student, "weight", "weight", p.weight_lr, weight_decay=p.weight_decay),
            param_group(student, "bias", "bias", p.weight_lr, allow_empty=True),
            param_group(student, "weight_scale", "weight_scale", p.weight_step_lr),
        ]
        if p.train_weight_zero_point:
            groups.append(param_group(student, "weight_zero_point", "weight_zero_point",
                                      p.weight_step_lr, allow_empty=True))
        groups += self.act_groups(student)
        return [g for g in groups if g.params]
