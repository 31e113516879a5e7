"""``method=qat``: full quantization-aware fine-tuning, the baseline of EfficientDM's cost claim.

The same PTQ initialisation, data (FP trajectories from pure noise, one optimiser step per
denoising step) and loss (guided-ε MSE against the FP teacher) as ``method=efficientdm``, but
instead of low-rank adapters **every** weight, bias and quantizer step size (weights and the
per-step activations) trains. Comparing the two at the same number of steps measures what the
LoRA restriction saves in trainable parameters, time and memory, and what it costs in quality.
"""

from __future__ import annotations

from torch import nn

from lowbit.methods.distill import ParamGroup, param_group
from lowbit.methods.efficientdm import EfficientDM


class QAT(EfficientDM):
    name = "qat"

    @property
    def label(self) -> str:
        return self.name if self.cfg.talsq else f"{self.name}(-talsq)"

    def adapt_(self, student: nn.Module) -> list[str]:
        return []  # no adapters: the weights themselves train

    def param_groups(self, student: nn.Module, lora_layers: list[str]) -> list[ParamGroup]:
        c = self.cfg
        wd = float(c.weight_decay)
        groups = [
            param_group(student, "weight", "weight", float(c.weight_lr), weight_decay=wd),
            param_group(student, "bias", "bias", float(c.weight_lr), allow_empty=True),
            param_group(student, "weight_scale", "weight_scale", float(c.weight_step_lr)),
        ]
        if c.train_weight_zero_point:
            groups.append(param_group(student, "weight_zero_point", "weight_zero_point",
                                      float(c.weight_step_lr), allow_empty=True))
        groups += self.act_groups(student)
        return [g for g in groups if g.params]
