"""``method=irqlora``: IR-QLoRA (Qin et al., ICML 2024) applied to a low-bit diffusion model.

An LLM method: frozen low-bit base weights (NF or integer grid, blocks of 64) plus a LoRA trained
on top, with two information-retention parts. Here the LoRA is trained by data-free distillation
on FP sampling trajectories exactly as EfficientDM's QALoRA is (:mod:`lowbit.train`:
MSE to the FP model's guided ε along FP trajectories, one optimiser step per denoising step), so
the two are comparable at the same weight bits.

- **ICQ** (Information Calibration Quantization, IR-QLoRA Eq. 6–7): the quantizer is
  :class:`~lowbit.quant.blockwise.BlockwiseGridQuantizer` (NF or integer levels per block of 64
  weights, entropy-maximising centre/range search, τ double-quantized); this method chooses the
  grid, block, candidates and span (``method.*``).
- **IEC** (Information Elastic Connection): the LoRA is :class:`~lowbit.quant.lora.IECLoRA`,
  ``z = A(x) + β₁·groupmean_r(x)``, ``out = B(z) + β₂·repeat(z, o/r)``, β₁, β₂ learnable scalars
  initialised to 0; ``method.iec=false`` leaves a plain LoRA side branch.
- The LoRA stays a side branch (it cannot be merged into an NF/int grid): it is counted in the
  size and OPs. Layers the bits rules keep at 8 bits (input/output conv, time-embedding MLP) get
  no LoRA and keep their uniform quantizer.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.ptq import prompt_pool, quant_config, sampler_config
from lowbit.quant import QuantConv2d, QuantLinear
from lowbit.quant.blockwise import GRIDS, BlockwiseGridQuantizer
from lowbit.quant.lora import IECLoRA
from lowbit.train import (
    FPTrajectoryData,
    FPTrajectoryStream,
    StudentModule,
    TeacherMSE,
    build_student,
    derive_seed,
    fit,
    param_group,
    trainable_share,
)
from lowbit.train.hparams import HParamError, TrainParams

log = logging.getLogger(__name__)

__all__ = ["GRIDS", "BlockwiseGridQuantizer", "IECLoRA", "IRQLoRA", "IRQLoRAParams",
           "apply_irqlora_"]


def apply_irqlora_(model: nn.Module, bits: int, grid: str, rank: int, *, block: int = 64,
                   icq: bool = True, iec: bool = True, scaling: float = 1.0,
                   candidates: int = 201, span: float = 0.1) -> list[str]:
    """Replace the ``bits``-bit weight quantizers of a ``quantize_``-d model by ICQ blockwise
    quantizers and attach IEC LoRAs to those layers, in place; returns the layer names."""
    names = []
    for name, m in list(model.named_modules()):
        if type(m) not in (QuantLinear, QuantConv2d) or m.weight_quantizer.passthrough \
                or m.weight_quantizer.bits != bits:
            continue
        if m.split or m.weight.numel() % block or getattr(m, "groups", 1) != 1:
            raise ValueError(f"{name}: IR-QLoRA needs an unsplit layer whose weight count is a "
                             f"multiple of block={block} (set split_shortcut: false)")
        m.weight_quantizer = BlockwiseGridQuantizer(m.weight, bits, grid, block, icq,
                                                    candidates, span, f"{name}.weight")
        m.set_adapter(IECLoRA(m, rank, scaling, iec))  # <layer>.lora: output side branch
        names.append(name)
    if not names:
        raise ValueError(f"apply_irqlora_: no {bits}-bit layer to quantize")
    return names


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class IRQLoRAParams(TrainParams):
    grid: str = "nf"
    block: int = 64
    icq: bool = True
    icq_candidates: int = 201
    icq_span: float = 0.1
    iec: bool = True
    rank: int = 8
    alpha: float | None = None
    lr: float
    weight_decay: float = 0.0

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.grid not in GRIDS:
            raise HParamError(f"{prefix}.grid={self.grid!r}: choose one of {', '.join(GRIDS)}")
        for key in ("block", "icq_candidates", "rank"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


class IRQLoRA(Method):
    name = "irqlora"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = IRQLoRAParams.from_cfg(cfg)

    @property
    def label(self) -> str:
        p = self.params
        parts = [p.grid]
        if not p.icq:
            parts.append("no-icq")
        if not p.iec:
            parts.append("no-iec")
        return f"{self.name}({','.join(parts)})"

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        qcfg = quant_config(ctx.cfg)
        if qcfg.act.enabled:
            raise ValueError(f"bits={qcfg.name}: IR-QLoRA quantizes weights only (use w4a16, "
                             f"w3a16 or w2a16)")
        # blocks of 64 run along the flattened weight, so the [h | skip] split is not used
        qcfg = qcfg.with_overrides({"split_shortcut": False})

        def icq(student: nn.Module) -> list[str]:
            return apply_irqlora_(student, int(qcfg.weight.bits), p.grid, p.rank, block=p.block,
                                  icq=p.icq, iec=p.iec, scaling=float(p.alpha or p.rank) / p.rank,
                                  candidates=p.icq_candidates, span=p.icq_span)

        # weights only: nothing to calibrate; calib_s is the ICQ search. The LoRA init draws from
        # its own seed stream, never the global RNG (a resumed run starts where this one did)
        dev = next(teacher.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(derive_seed(int(ctx.cfg.seed), f"{self.name}/lora_init"))
            student, info = build_student(teacher, qcfg, None, transform=icq)
        layers = info.transform
        ctx.cost["calib_s"] = info.calib_s
        ctx.report.update(info.report())
        mods = dict(student.named_modules())
        ctx.report["code_entropy"] = float(torch.stack(
            [mods[n].weight_quantizer.entropy(mods[n].weight) for n in layers]).mean())

        groups = [param_group(student, "lora", "lora", p.lr, weight_decay=p.weight_decay)]
        sampler = sampler_config(ctx.cfg)
        module = StudentModule(student, teacher, ctx.model, groups,
                               [TeacherMSE(guidance_scale=sampler.guidance_scale)],
                               max_steps=p.steps, optimizer=p.build_optimizer(),
                               scheduler=p.build_scheduler(), grad_clip=p.grad_clip)
        # EfficientDM's data: the same stream of FP trajectories
        stream = FPTrajectoryStream(ctx.model.with_net(teacher), sampler, p.batch_size,
                                    seed=int(ctx.cfg.seed), stream="fp_trajectories",
                                    conditions=prompt_pool(ctx))
        stats = fit(module, FPTrajectoryData(stream), ctx, max_steps=p.steps,
                    checkpoint_every=p.checkpoint_every)
        student.requires_grad_(False)
        n_train = module.trainable_params
        ctx.cost.update(finetune_s=stats.seconds, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        ctx.report["finetune"] = {"fit": stats.to_dict(), "lora_layers": len(layers),
                                  "config": p.to_dict()}
        return student.eval()
