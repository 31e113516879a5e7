"""``method=efficientdm``: EfficientDM — QALoRA + TALSQ, data-free distillation (ICLR 2024).

- **QALoRA**: every quantized Conv/Linear (except the layers kept at 8 bits: time-embedding MLP,
  input conv, output conv) gets a LoRA whose update is merged *before* weight quantization,
  ``Ŵ = Q(W₀ + B·A)`` (EfficientDM Eq. 5), with the per-channel weight Δ (and zero point)
  learnable. Linear: A [r, in], B [out, r]; conv: A = k×k conv (c_in → r), B = 1×1 conv
  (r → c_out), so B·A is again a k×k kernel. After training :func:`merge_lora_` folds B·A into
  W₀ and removes the adapters: only Ŵ is stored and inference costs nothing extra.
- **Scale-aware optimisation**: the LoRA of each layer learns at ``mean(Δ_w) / lora_lr_div``
  (the reference code's per-layer AdamW learning rate), or at ``lora_lr`` with it off.
- **TALSQ**: activation Δ and zero point per sampling step (timestep-aware quantizers), initialised
  by calibration and learnt (LSQ); for another step count the buckets are interpolated
  (``interp: linear``, the paper) instead of the code's ``[::5]`` subsampling.
- **Loss**: MSE between the student's and the FP model's guided ε at each step of an FP
  trajectory from pure noise; the trajectory advances with the FP prediction; one optimiser step
  per denoising step (:class:`~lowbit.methods.distill.FPTrajectoryStream`). The timestep comes
  from the model's ``timestep`` argument, not a decrementing call counter.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
import time
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.distill import (
    DistillationModule,
    FPTrajectoryData,
    FPTrajectoryStream,
    ParamGroup,
    fit_distillation,
    param_group,
    quantized_student,
    select_params,
    trainable_share,
)
from lowbit.methods.ptq import calibration_set, quant_config, sampler_config
from lowbit.quant import QuantConv2d, QuantLinear, QuantModuleMixin, model_size
from lowbit.quant.qmap import register_module_class

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# QALoRA
# ------------------------------------------------------------------------------------------------
class LoRAWeights(nn.Module):
    """The low-rank update ``scaling · B·A`` of one layer's weight, as a tensor shaped like it: a
    *weight* adapter for the quantized layers' adapter slot (``layer.set_adapter``; parameters
    ``<layer>.lora.A`` / ``.B``), so the weight quantizer sees ``W₀ + B·A`` (EfficientDM Eq. 5).

    Linear ``[out, in]``: A ``[r, in]``, B ``[out, r]``. Conv ``[out, in, kh, kw]``: A is a k×k
    conv kernel ``[r, in, kh, kw]``, B a 1×1 conv ``[out, r, 1, 1]``; conv(conv(x, A), B) =
    conv(x, B·A) for a 1×1 B, so the update merges exactly. A: Kaiming-uniform, B: zero (the
    student starts as the PTQ model)."""

    adapts = "weight"

    def __init__(self, weight_shape: Sequence[int], rank: int, scaling: float = 1.0) -> None:
        super().__init__()
        out_f, in_f, *kernel = weight_shape
        self.rank, self.scaling = int(rank), float(scaling)
        a = torch.empty(self.rank, in_f, *kernel)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA / PEFT
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_f, self.rank, *([1] * len(kernel))))
        self.weight_shape = tuple(weight_shape)

    def delta(self) -> Tensor:
        return (self.B.flatten(1) @ self.A.flatten(1)).reshape(self.weight_shape) * self.scaling


register_module_class(
    LoRAWeights,
    describe=lambda m: {"weight_shape": list(m.weight_shape), "rank": m.rank,
                        "scaling": m.scaling},
    build=lambda _e, s, _c: LoRAWeights(s["weight_shape"], int(s["rank"]), float(s["scaling"])))


class _HasQALoRA(type):
    """``isinstance(m, QALoRALinear)``: a quantized layer of that base class with a QALoRA in its
    adapter slot (the layer's class itself never changes)."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, cls.base) and isinstance(getattr(obj, "adapter", None), LoRAWeights)


class QALoRALinear(metaclass=_HasQALoRA):
    base = QuantLinear


class QALoRAConv2d(metaclass=_HasQALoRA):
    base = QuantConv2d


def add_lora_(model: nn.Module, rank: int, alpha: float | None = None,
              include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> list[str]:
    """Attach a QALoRA to the adapter slot of every quantized Linear/Conv2d matching ``include``
    and not ``exclude``; returns their names. ``alpha``: LoRA scaling α/r (``None``: 1)."""
    names = []
    for name, m in model.named_modules():
        if type(m) not in (QuantLinear, QuantConv2d) or m.adapter is not None:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include) or any(
                fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if getattr(m, "groups", 1) != 1:
            continue  # a grouped conv's B·A is not a grouped kernel
        scaling = 1.0 if alpha is None else float(alpha) / rank
        m.set_adapter(LoRAWeights(m.weight.shape, rank, scaling).to(m.weight.device))
        names.append(name)
    if not names:
        raise ValueError(f"add_lora_: no quantized layer matches {list(include)} minus "
                         f"{list(exclude)}")
    return names


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every QALoRA into its weight (W₀ ← W₀ + B·A) and empty the adapter slot: the quantized
    layer then computes exactly what the training-time path ``Q(W₀ + B·A)`` computed. Returns the
    count."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantModuleMixin) and isinstance(m.adapter, LoRAWeights):
            m.weight.copy_(m.effective_weight())
            m.set_adapter(None)
            n += 1
    return n


def mean_weight_step(module: QuantModuleMixin) -> float:
    """Mean weight Δ of a quantized layer (over channels and split halves)."""
    scales = module.quant_params("weight_scale")
    return float(torch.cat([s.detach().reshape(-1) for s in scales]).mean()) if scales else 0.0


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
class EfficientDM(Method):
    name = "efficientdm"

    @property
    def label(self) -> str:
        c = self.cfg
        opts = []
        if int(c.rank) != 32:
            opts.append(f"r{int(c.rank)}")
        if not c.scale_aware:
            opts.append("-scale_aware")
        if not c.talsq:
            opts.append("-talsq")
        return self.name + (f"({','.join(opts)})" if opts else "")

    def train_sampler(self, ctx: MethodContext):
        """The FP sampler of the training trajectories (``train_steps`` steps, default: the
        evaluation sampler's)."""
        s = sampler_config(ctx.cfg)
        steps = self.cfg.get("train_steps")
        return dataclasses.replace(s, steps=int(steps)) if steps else s

    def adapt_(self, student: nn.Module) -> list[str]:
        """Attach the QALoRAs; returns the adapted layers' names."""
        c = self.cfg
        return add_lora_(student, int(c.rank), c.get("alpha"), exclude=list(c.lora_exclude))

    def param_groups(self, student: nn.Module, lora_layers: list[str]) -> list[ParamGroup]:
        c = self.cfg
        mods = dict(student.named_modules())
        groups: list[ParamGroup] = []
        if c.scale_aware:
            # EfficientDM's scale-aware LoRA: per-layer lr = mean(Δ_w) / div
            for name in lora_layers:
                lr = mean_weight_step(mods[name]) / float(c.lora_lr_div)
                groups.append(ParamGroup(f"lora/{name}", select_params(student, "lora", [name]),
                                         lr, float(c.weight_decay)))
        else:
            groups.append(param_group(student, "lora", "lora", float(c.lora_lr),
                                      weight_decay=float(c.weight_decay)))
        wq = list(lora_layers)  # learnable weight Δ/zero point of the QALoRA layers
        groups.append(param_group(student, "weight_scale", "weight_scale", float(c.weight_step_lr),
                                  wq))
        if c.train_weight_zero_point:
            groups.append(param_group(student, "weight_zero_point", "weight_zero_point",
                                      float(c.weight_step_lr), wq, allow_empty=True))
        groups += self.act_groups(student)
        return [g for g in groups if g.params]

    def act_groups(self, student: nn.Module) -> list[ParamGroup]:
        """TALSQ: the activation Δ and zero points (per step) learn at ``act_lr``."""
        c, groups = self.cfg, []
        if c.talsq:
            ex = list(c.act_param_exclude)
            groups.append(param_group(student, "act_scale", "act_scale", float(c.act_lr),
                                      param_exclude=ex))
            groups.append(param_group(student, "act_zero_point", "act_zero_point",
                                      float(c.act_lr), param_exclude=ex, allow_empty=True))
        return [g for g in groups if g.params]

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        c = self.cfg
        train_sampler = self.train_sampler(ctx)
        qcfg = quant_config(ctx.cfg)
        if c.talsq:  # TALSQ: one Δ/zero point per sampling step of the training schedule
            qcfg = qcfg.with_overrides({"act": {"timestep_aware": True, "interp": str(c.interp)}})
        t0 = time.perf_counter()
        cal_ctx = ctx
        if train_sampler.steps != int(ctx.cfg.sampler.steps):
            cal_cfg = ctx.cfg.copy()
            cal_cfg.sampler.steps = train_sampler.steps
            cal_ctx = copy.copy(ctx)
            cal_ctx.cfg = cal_cfg
        traj = calibration_set(cal_ctx, teacher, int(c.calib_n), int(c.calib_steps))
        ctx.cost["trajectory_s"] = time.perf_counter() - t0
        student, info = quantized_student(teacher, qcfg, traj, int(c.calib_batch),
                                          int(c.max_samples))
        ctx.cost["calib_s"] = info.pop("calib_s")
        ctx.report.update(info)

        torch.manual_seed(int(ctx.cfg.seed))  # LoRA A init (also restored by a resumed run)
        adapted = self.adapt_(student)
        groups = self.param_groups(student, adapted)
        steps = int(c.steps)
        module = DistillationModule(student, teacher, groups, max_steps=steps,
                                    guidance_scale=float(train_sampler.guidance_scale),
                                    optimizer="adamw", schedule=str(c.schedule),
                                    grad_clip=c.get("grad_clip"))
        stream = FPTrajectoryStream(teacher, ctx.loaded, train_sampler, int(c.batch_size),
                                    seed=int(ctx.cfg.seed) + 20_000)
        stats = fit_distillation(module, FPTrajectoryData(stream), ctx.cfg.trainer,
                                 ctx.output_dir / "checkpoints", max_steps=steps,
                                 resume=bool(ctx.cfg.get("resume")),
                                 epoch_steps=int(c.ckpt_every),
                                 log_dir=ctx.output_dir / "train_logs")
        n_train = module.trainable_params
        merged = merge_lora_(student)  # only Ŵ is kept (no inference cost)
        student.requires_grad_(False)
        ctx.cost.update(finetune_s=stats.seconds, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        size = model_size(student)
        ctx.cost["size_mb"] = size.total_mb
        ctx.report["size"] = size.to_dict()
        ctx.report["finetune"] = {"fit": stats.to_dict(), "adapted_layers": len(adapted),
                                  "merged": merged, "config": OmegaConf.to_container(c)}
        return student.eval()
