"""``method=binary_baseline``: the plain binarizers the binary papers compare against, trained with
the same QAT loop and steps as BinaryDM/BiDM (diffusion loss on real images, no distillation).

- ``variant=xnor`` (XNOR-Net): weights ``α·sign(w)`` with α = mean|w| per output channel,
  recomputed from the latent weights; activations ``sign(x)`` with the clipped STE at A1, the bits
  config's quantizer (e.g. 4-bit LSQ) otherwise.
- ``variant=react`` (ReActNet-style): as xnor, but 1-bit activations get a learnable per-channel
  threshold, ``sign(x + t_c)``, with the piecewise-quadratic ApproxSign STE.
"""

from __future__ import annotations

from torch import nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.qat_data import (
    QATDiffusionModule,
    build_binary_student,
    fit,
    quant_config,
    record_training,
)
from lowbit.quant.binary import BinarySpec

VARIANTS = ("xnor", "react")


class BinaryBaseline(Method):
    name = "binary_baseline"

    @property
    def label(self) -> str:
        return str(self.cfg.variant)

    def spec(self, act_bits: int | None) -> BinarySpec:
        variant = str(self.cfg.variant)
        if variant not in VARIANTS:
            raise ValueError(f"method.variant={variant!r}: choose one of {', '.join(VARIANTS)}")
        act = "keep" if act_bits != 1 else ("rsign" if variant == "react" else "sign")
        return BinarySpec(weight="xnor", act=act)

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        c = self.cfg
        spec = self.spec(quant_config(ctx).act.bits)
        student = build_binary_student(teacher, ctx, spec, calib_batches=int(c.calib_batches))
        module = QATDiffusionModule(
            student, teacher, ctx.loaded.noise_schedule, ctx.loaded.null_class, [],
            lr=float(c.lr), scale_lr=float(c.scale_lr), max_steps=int(c.steps),
            p_uncond=float(c.p_uncond),
            kd_weight=float(c.kd_weight))
        info = fit(module, ctx, int(c.steps), int(c.batch_size), int(c.checkpoint_every))
        record_training(ctx, info, student, teacher)
        return student.eval()
