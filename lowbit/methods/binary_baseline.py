"""``method=binary_baseline``: the plain binarizers the binary papers compare against, trained with
the same QAT loop and steps as BinaryDM/BiDM (diffusion loss on real images, no distillation).

- ``variant=xnor`` (XNOR-Net): weights ``α·sign(w)`` with α = mean|w| per output channel,
  recomputed from the latent weights; activations ``sign(x)`` with the clipped STE at A1, scaled
  by XNOR-Net's ``K = k ∗ mean_c|x|`` (k the fixed k×k box filter 1/k²); the bits config's
  quantizer (e.g. 4-bit LSQ, no K) otherwise.
- ``variant=react`` (ReActNet-style): as xnor, but 1-bit activations get a learnable per-channel
  threshold, ``sign(x + t_c)``, with the piecewise-quadratic ApproxSign STE.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lowbit.methods.base import MethodContext
from lowbit.methods.binary_qat import BinaryQAT, BinaryQATParams
from lowbit.methods.ptq import quant_config
from lowbit.quant.binary import BinarySpec
from lowbit.train.hparams import HParamError

VARIANTS = ("xnor", "react")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryBaselineParams(BinaryQATParams):
    variant: str = "xnor"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.variant not in VARIANTS:
            raise HParamError(f"{prefix}.variant={self.variant!r}: choose one of "
                              f"{', '.join(VARIANTS)}")


class BinaryBaseline(BinaryQAT):
    name = "binary_baseline"
    params_class = BinaryBaselineParams

    @property
    def label(self) -> str:
        return self.params.variant

    def spec(self, act_bits: int | None) -> BinarySpec:
        variant = self.params.variant
        if act_bits != 1:
            return BinarySpec(weight="xnor", act="keep")
        if variant == "react":
            return BinarySpec(weight="xnor", act="rsign")
        return BinarySpec(weight="xnor", act="sign", scaling="xnor")  # XNOR-Net's K with sign(x)

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        spec = self.spec(quant_config(ctx.cfg).act.bits)
        student = self.binary_student(teacher, ctx, spec)
        self.train(student, teacher, ctx)
        student.requires_grad_(False)
        return student.eval()
