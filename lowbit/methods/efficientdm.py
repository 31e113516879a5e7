"""``method=efficientdm``: EfficientDM — QALoRA + TALSQ, data-free distillation (ICLR 2024).

- **QALoRA**: every quantized Conv/Linear (except the layers kept at 8 bits: time-embedding MLP,
  input conv, output conv) gets a LoRA whose update is merged *before* weight quantization,
  ``Ŵ = Q(W₀ + B·A)`` (EfficientDM Eq. 5), with the per-channel weight Δ (and zero point)
  learnable. Linear: A [r, in], B [out, r]; conv: A = k×k conv (c_in → r), B = 1×1 conv
  (r → c_out), so B·A is again a k×k kernel (:class:`~lowbit.quant.lora.LoRAWeights` in the
  quantized layers' adapter slot). After training :func:`merge_lora_` folds B·A into
  W₀ and removes the adapters: only Ŵ is stored and inference costs nothing extra.
- **Scale-aware optimisation**: the LoRA of each layer learns at ``mean(Δ_w) / lora_lr_div``
  (the reference code's per-layer AdamW learning rate), or at ``lora_lr`` with it off.
- **TALSQ**: activation Δ and zero point per sampling step (timestep-aware quantizers), initialised
  by calibration and learnt (LSQ); for another step count the buckets are interpolated
  (``interp: linear``, the paper) instead of the code's ``[::5]`` subsampling.
- **Loss**: MSE between the student's and the FP model's guided ε at each step of an FP
  trajectory from pure noise; the trajectory advances with the FP prediction; one optimiser step
  per denoising step (:class:`~lowbit.train.data.FPTrajectoryStream`). The timestep comes
  from the model's ``timestep`` argument, not a decrementing call counter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.ptq import (
    CalibParams,
    calibration_set,
    prompt_pool,
    quant_config,
    sampler_config,
)
from lowbit.quant import QuantConv2d, QuantLinear, QuantModuleMixin, TimestepActQuantizer
from lowbit.quant.lora import LoRAWeights
from lowbit.sampling import build_scheduler
from lowbit.train import (
    FPTrajectoryData,
    FPTrajectoryStream,
    ParamGroup,
    StudentModule,
    TeacherMSE,
    build_student,
    derive_seed,
    fit,
    param_group,
    select_params,
    trainable_share,
)
from lowbit.train.hparams import HParamError, TrainParams

log = logging.getLogger(__name__)

__all__ = ["EfficientDM", "EfficientDMParams", "LoRAWeights", "add_lora_", "has_qalora",
           "mean_weight_step", "merge_lora_", "talsq_buckets_"]


# ------------------------------------------------------------------------------------------------
# QALoRA
# ------------------------------------------------------------------------------------------------
def has_qalora(module: nn.Module) -> bool:
    """A quantized Linear/Conv2d with a QALoRA (:class:`LoRAWeights`) in its adapter slot."""
    return isinstance(module, QuantModuleMixin) and isinstance(module.adapter, LoRAWeights)


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


@torch.no_grad()
def talsq_buckets_(model: nn.Module, timesteps: Sequence[int] | Tensor) -> int:
    """TALSQ: one activation Δ (and zero point) per *training* timestep. Every timestep-aware
    quantizer of ``model`` gets a bucket at each of ``timesteps``, initialised with its current
    (calibrated) Δ at that timestep — equal where the calibration kept the step, interpolated
    between the neighbouring calibration steps (``interp``) elsewhere. Without it, a schedule with
    more steps than ``calib_steps`` would share one learnt Δ among several training steps.
    Returns the number of quantizers re-bucketed."""
    ts = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).unique()
    n = 0
    for q in model.modules():
        if not isinstance(q, TimestepActQuantizer) or q.num_buckets == 0:
            continue
        if q.num_buckets == ts.numel() and torch.equal(q.timesteps.cpu(), ts):
            continue
        before = q.timestep
        scales, zps = [], []
        for t in ts:
            q.set_timestep(t)
            sc, zp = q.current_qparams()
            scales.append(sc.detach().clone())
            zps.append(None if zp is None else zp.detach().clone())
        zp = None if zps[0] is None else torch.stack(zps)
        q.set_qparams(torch.stack(scales), zp, timesteps=ts)
        q.set_timestep(before)
        n += 1
    return n


def mean_weight_step(module: QuantModuleMixin) -> float:
    """Mean weight Δ of a quantized layer (over channels and split halves)."""
    scales = module.quant_params("weight_scale")
    return float(torch.cat([s.detach().reshape(-1) for s in scales]).mean()) if scales else 0.0


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class EfficientDMParams(CalibParams, TrainParams):
    trajectory_steps: int | None = None  # sampler steps of the training trajectories
    weight_decay: float = 0.0
    rank: int = 32
    alpha: float | None = None
    lora_exclude: tuple[str, ...] = ()
    scale_aware: bool = True
    lora_lr_div: float = 2500.0
    lora_lr: float = 1.0e-4
    weight_step_lr: float = 1.0e-6
    train_weight_zero_point: bool = True
    talsq: bool = True
    act_lr: float = 5.0e-4
    act_param_exclude: tuple[str, ...] = ()
    interp: str = "linear"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.rank < 1:
            raise HParamError(f"{prefix}.rank={self.rank}: must be positive")
        if self.trajectory_steps is not None and self.trajectory_steps < 1:
            raise HParamError(f"{prefix}.trajectory_steps={self.trajectory_steps}: a positive "
                              f"step count, or null for the evaluation sampler's")


class EfficientDM(Method):
    name = "efficientdm"
    params_class: type[EfficientDMParams] = EfficientDMParams

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = self.params_class.from_cfg(cfg)

    @property
    def label(self) -> str:
        p = self.params
        opts = []
        if p.rank != 32:
            opts.append(f"r{p.rank}")
        if not p.scale_aware:
            opts.append("-scale_aware")
        if not p.talsq:
            opts.append("-talsq")
        return self.name + (f"({','.join(opts)})" if opts else "")

    def train_sampler(self, ctx: MethodContext):
        """The FP sampler of the training trajectories (``trajectory_steps`` steps, default: the
        evaluation sampler's)."""
        s = sampler_config(ctx.cfg)
        steps = self.params.trajectory_steps
        return dataclasses.replace(s, steps=steps) if steps else s

    def adapt_(self, student: nn.Module) -> list[str]:
        """Attach the QALoRAs; returns the adapted layers' names."""
        p = self.params
        return add_lora_(student, p.rank, p.alpha, exclude=list(p.lora_exclude))

    def param_groups(self, student: nn.Module, lora_layers: list[str]) -> list[ParamGroup]:
        p = self.params
        mods = dict(student.named_modules())
        groups: list[ParamGroup] = []
        if p.scale_aware:
            # EfficientDM's scale-aware LoRA: per-layer lr = mean(Δ_w) / div
            for name in lora_layers:
                lr = mean_weight_step(mods[name]) / p.lora_lr_div
                groups.append(ParamGroup(f"lora/{name}", select_params(student, "lora", [name]),
                                         lr, p.weight_decay))
        else:
            groups.append(param_group(student, "lora", "lora", p.lora_lr,
                                      weight_decay=p.weight_decay))
        wq = list(lora_layers)  # learnable weight Δ/zero point of the QALoRA layers
        groups.append(param_group(student, "weight_scale", "weight_scale", p.weight_step_lr, wq))
        if p.train_weight_zero_point:
            groups.append(param_group(student, "weight_zero_point", "weight_zero_point",
                                      p.weight_step_lr, wq, allow_empty=True))
        groups += self.act_groups(student)
        return [g for g in groups if g.params]

    def act_groups(self, student: nn.Module) -> list[ParamGroup]:
        """TALSQ: the activation Δ and zero points (per step) learn at ``act_lr``."""
        p, groups = self.params, []
        if p.talsq:
            ex = list(p.act_param_exclude)
            groups.append(param_group(student, "act_scale", "act_scale", p.act_lr,
                                      param_exclude=ex))
            groups.append(param_group(student, "act_zero_point", "act_zero_point", p.act_lr,
                                      param_exclude=ex, allow_empty=True))
        return [g for g in groups if g.params]

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        seed = int(ctx.cfg.seed)
        train_sampler = self.train_sampler(ctx)
        qcfg = quant_config(ctx.cfg)
        if p.talsq:  # TALSQ: one Δ/zero point per sampling step of the training schedule
            qcfg = qcfg.with_overrides({"act": {"timestep_aware": True, "interp": p.interp}})
        t0 = time.perf_counter()
        traj = calibration_set(ctx, teacher, p.calib_n, p.calib_steps, train_sampler)
        ctx.cost["trajectory_s"] = time.perf_counter() - t0
        student, info = build_student(teacher, qcfg, traj.batches(p.calib_batch_size),
                                      max_samples=p.max_samples)
        ctx.cost["calib_s"] = info.calib_s
        ctx.report.update(info.report())
        if p.talsq:  # one Δ per training step, also when calib_steps keeps fewer
            train_t = build_scheduler(ctx.model.noise_schedule, train_sampler.kind,
                                      train_sampler.steps).timesteps
            ctx.report["talsq_buckets"] = len(set(train_t.tolist()))
            talsq_buckets_(student, train_t)

        with torch.random.fork_rng(devices=[]):  # LoRA A init from its own stream
            torch.manual_seed(derive_seed(seed, f"{self.name}/lora_init"))
            adapted = self.adapt_(student)
        groups = self.param_groups(student, adapted)
        module = StudentModule(student, teacher, ctx.model, groups,
                               [TeacherMSE(guidance_scale=train_sampler.guidance_scale)],
                               max_steps=p.steps, optimizer=p.build_optimizer(),
                               scheduler=p.build_scheduler(), grad_clip=p.grad_clip)
        stream = FPTrajectoryStream(ctx.model.with_net(teacher), train_sampler, p.batch_size,
                                    seed=seed, stream="fp_trajectories",
                                    conditions=prompt_pool(ctx))
        stats = fit(module, FPTrajectoryData(stream), ctx, max_steps=p.steps,
                    checkpoint_every=p.checkpoint_every)
        n_train = module.trainable_params
        merged = merge_lora_(student)  # only Ŵ is kept (no inference cost)
        student.requires_grad_(False)
        ctx.cost.update(finetune_s=stats.seconds, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        ctx.report["finetune"] = {"fit": stats.to_dict(), "adapted_layers": len(adapted),
                                  "merged": merged, "config": p.to_dict()}
        return student.eval()
