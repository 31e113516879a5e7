"""``method=quest``: QuEST — selective fine-tuning of a PTQ student (arXiv 2402.03666).

Starts from PTQ: weights quantized per channel, their rounding reconstructed block by block
with Q-Diffusion's AdaRound as in the reference code (``recon: none`` rounds to nearest), and
timestep-aware activation quantizers, per-channel at A4 as the ``bits`` config says. Then it
fine-tunes a few layers against the FP teacher on the cached FP calibration trajectories
(data-free):

- **TLA** (Temporal Layer Alignment): the time-embedding projection of each ResBlock
  (``time_emb_proj`` in diffusers, ``emb_layers`` in LDM code) — weights, bias and their
  activation Δ. Loss L_TLA (those layers' outputs vs FP) + L_global.
- **CMA** (Critical Module Alignment): the weights of the activation-sensitive layers (a list per
  model family: attention projections, feed-forward) and **all** activation Δ except the
  time-embedding ones. Loss L_CMA (the critical layers' outputs vs FP) + L_global.

Run in order (``method.stages``), the two stages optimise the paper's L_TLA + L_CMA + 2·L_global.
Weight quantizer Δ stay fixed. Quantizers switch with the model's real ``timestep`` argument (the
timestep hook), not the reference code's hard-coded ``i % 10`` counter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from typing import Any

from torch import nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.ptq import (
    CalibParams,
    calibration_set,
    check_adaround,
    quant_config,
    weight_reconstruction,
)
from lowbit.models.adapter import FAMILIES
from lowbit.train import (
    CachedTrajectoryData,
    LayerMSE,
    ParamGroup,
    StudentModule,
    TeacherMSE,
    build_student,
    fit,
    param_group,
    trainable_share,
)
from lowbit.train.hparams import HParamError, MethodParams, TrainParams, instantiate_partial

log = logging.getLogger(__name__)

STAGES = ("tla", "cma")
RECON = ("none", "adaround")


def family_layers(table: Any, model_name: str, family: str | None = None) -> list[str]:
    """The layer patterns of ``table`` for a model: the first model-name glob that matches
    ``model_name``, else the entry of its ``family`` (``unet``, ``unet_text``, ``dit``: how the
    stock diffusers network of that family names its layers), else ``default``."""
    table = dict(table or {})
    for glob, layers in table.items():
        if glob != "default" and glob not in FAMILIES and fnmatch.fnmatchcase(model_name, glob):
            return list(layers)
    if family is not None and family in table:
        return list(table[family])
    if "default" not in table:
        raise ValueError(f"no layer list for model {model_name!r} (family {family}) in "
                         f"{sorted(table)}; add one (or a 'default' entry)")
    return list(table["default"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageParams(MethodParams):
    """One QuEST stage: its steps, learning rates (weights, activation Δ) and loss weights."""

    steps: int
    lr: float
    act_lr: float
    local_weight: float = 1.0
    global_weight: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuESTParams(CalibParams, TrainParams):
    steps: int = 0  # per stage: tla.steps, cma.steps
    stages: tuple[str, ...]
    interp: str = "nearest"
    train_act_zero_point: bool = False
    act_param_exclude: tuple[str, ...] = ()
    temporal_layers: tuple[str, ...]
    time_embedding_layers: tuple[str, ...]
    critical_layers: dict
    tla: StageParams
    cma: StageParams
    # the PTQ start's weights: round to nearest (none) or Q-Diffusion's AdaRound/BRECQ block
    # reconstruction (adaround), which QuEST's reference code runs before its two stages
    recon: str = "adaround"
    adaround: dict = dataclasses.field(default_factory=dict)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        st = list(self.stages)
        if not st or len(set(st)) != len(st) or any(s not in STAGES for s in st):
            raise HParamError(f"{prefix}.stages={st}: a non-empty list of distinct stages from "
                              f"{list(STAGES)}, e.g. [tla,cma] or [tla]")
        if self.recon not in RECON:
            raise HParamError(f"{prefix}.recon={self.recon!r}: choose one of {', '.join(RECON)}")
        check_adaround(self.adaround, prefix)
        if self.steps:
            raise HParamError(f"{prefix}.steps: QuEST's steps are per stage (tla.steps, "
                              f"cma.steps)")


class QuEST(Method):
    name = "quest"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = QuESTParams.from_cfg(cfg)

    @property
    def stages(self) -> list[str]:
        return list(self.params.stages)

    @property
    def label(self) -> str:
        """``quest``, ``quest[tla]`` for one stage; ``(rtn)`` when the start's weights are
        rounded to nearest instead of AdaRound-reconstructed as the reference code does."""
        label = self.name if self.stages == list(STAGES) else f"{self.name}[{'+'.join(self.stages)}]"
        return label if self.params.recon == "adaround" else f"{label}(rtn)"

    # -- what each stage trains ---------------------------------------------------------------------
    def stage_groups(self, student: nn.Module, stage: str, model_name: str,
                     family: str | None = None, model_critical: list[str] | None = None
                     ) -> tuple[list[ParamGroup], LayerMSE | None]:
        """Parameter groups and local loss of ``stage`` (``tla`` | ``cma``). The critical layers
        are the model config's ``quest_critical_layers`` (``model_critical``) when it names them,
        else ``critical_layers``' entry for the model name or family."""
        p = self.params
        temporal = list(p.temporal_layers)
        if stage == "tla":
            sc = p.tla
            groups = [
                param_group(student, "tla/weight", "weight", sc.lr, temporal),
                param_group(student, "tla/bias", "bias", sc.lr, temporal, allow_empty=True),
                param_group(student, "tla/act_scale", "act_scale", sc.act_lr, temporal),
            ]
            if p.train_act_zero_point:
                groups.append(param_group(student, "tla/act_zero_point", "act_zero_point",
                                          sc.act_lr, temporal, allow_empty=True))
            layers = temporal
        else:
            sc = p.cma
            critical = (list(model_critical) if model_critical
                        else family_layers(p.critical_layers, model_name, family))
            # all activation Δ except the time-embedding ones (the TLA stage's, and the MLP's)
            not_temporal = [*temporal, *p.time_embedding_layers]
            ex = list(p.act_param_exclude)
            groups = [
                param_group(student, "cma/weight", "weight", sc.lr, critical),
                param_group(student, "cma/act_scale", "act_scale", sc.act_lr,
                            exclude=not_temporal, param_exclude=ex),
            ]
            if p.train_act_zero_point:
                groups.append(param_group(student, "cma/act_zero_point", "act_zero_point",
                                          sc.act_lr, exclude=not_temporal, allow_empty=True,
                                          param_exclude=ex))
            layers = critical
        local = LayerMSE(stage, layers, sc.local_weight) if sc.local_weight else None
        return [g for g in groups if g.params], local

    # -- the method --------------------------------------------------------------------------------
    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        # timestep-aware activation quantizers (one Δ per calibration step), QuEST §3
        qcfg = quant_config(ctx.cfg).with_overrides(
            {"act": {"timestep_aware": True, "interp": p.interp}})
        t0 = time.perf_counter()
        traj = calibration_set(ctx, teacher, p.calib_n, p.calib_steps)
        ctx.cost["trajectory_s"] = time.perf_counter() - t0
        reconstruct = (weight_reconstruction(p.adaround, traj, p.calib_batch_size, ctx)
                       if p.recon == "adaround" else None)
        student, info = build_student(teacher, qcfg, traj.batches(p.calib_batch_size),
                                      max_samples=p.max_samples, transform=reconstruct)
        ctx.cost["calib_s"] = info.calib_s
        ctx.report.update(info.report())

        model_name = str(ctx.cfg.model.name)
        model_critical = ctx.cfg.model.get("quest_critical_layers")
        seed = int(ctx.cfg.seed)
        stats, trainable_ids, t_fit = {}, set(), 0.0
        for stage in self.stages:
            sc = getattr(p, stage)
            groups, local = self.stage_groups(student, stage, model_name, ctx.model.family,
                                              model_critical)
            terms = [TeacherMSE(sc.global_weight)]
            if local is not None:
                terms.append(local.resolve(student, teacher))
            module = StudentModule(
                student, teacher, ctx.model, groups, terms, max_steps=sc.steps,
                optimizer=instantiate_partial(p.optimizer, "method.optimizer"),
                scheduler=instantiate_partial(p.scheduler, "method.scheduler"),
                grad_clip=p.grad_clip)
            data = CachedTrajectoryData(traj, p.batch_size, seed=seed,
                                        stream=f"quest/{stage}/order")
            st = fit(module, data, ctx, max_steps=sc.steps, checkpoint_every=p.checkpoint_every,
                     stage=stage)
            t_fit += st.seconds
            trainable_ids |= {id(q) for g in groups for _, q in g.params}
            stats[stage] = st.to_dict()
        student.requires_grad_(False)
        n_train = sum(q.numel() for q in student.parameters() if id(q) in trainable_ids)
        ctx.cost.update(finetune_s=t_fit, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        ctx.report["finetune"] = {"stages": stats, "config": p.to_dict()}
        return student.eval()
