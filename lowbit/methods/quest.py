"""``method=quest``: QuEST — selective fine-tuning of a PTQ student (arXiv 2402.03666).

Starts from PTQ (weights quantized per channel, timestep-aware activation quantizers, per-channel
at A4 as the ``bits`` config says) and fine-tunes a few layers against the FP teacher on the
cached FP calibration trajectories (data-free):

- **TLA** (Temporal Layer Alignment): the time-embedding projection of each ResBlock
  (``time_emb_proj`` in diffusers, ``emb_layers`` in LDM code) — weights, bias and their
  activation Δ. Loss L_TLA (those layers' outputs vs FP) + L_global.
- **CMA** (Critical Module Alignment): the weights of the activation-sensitive layers (a list per
  model family: attention projections, feed-forward) and **all** activation Δ except the
  time-embedding ones. Loss L_CMA (the critical layers' outputs vs FP) + L_global.

Run in order (``method.stages``), the two stages optimise the paper's L_TLA + L_CMA + 2·L_global.
Weight quantizer Δ stay fixed. Quantizers switch with the model's real ``timestep`` argument (the
timestep hook), not QuEST's hard-coded ``i % 10`` counter (issue #17).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.distill import (
    CachedTrajectoryData,
    DistillationModule,
    LocalLoss,
    ParamGroup,
    fit_distillation,
    param_group,
    quantized_student,
    trainable_share,
)
from lowbit.methods.ptq import calibration_set, quant_config
from lowbit.quant import model_size

log = logging.getLogger(__name__)

STAGES = ("tla", "cma")


def family_layers(table: Any, model_name: str) -> list[str]:
    """The layer patterns of ``table`` (``{model-name glob: [patterns]}``) for ``model_name``:
    the first glob that matches, else ``default``."""
    table = dict(table or {})
    for glob, layers in table.items():
        if glob != "default" and fnmatch.fnmatchcase(model_name, glob):
            return list(layers)
    if "default" not in table:
        raise ValueError(f"no layer list for model {model_name!r} in {sorted(table)}; add one "
                         f"(or a 'default' entry)")
    return list(table["default"])


class QuEST(Method):
    name = "quest"

    @property
    def stages(self) -> list[str]:
        stages = [str(s) for s in self.cfg.stages]
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages or len(set(stages)) != len(stages):
            raise ValueError(f"method.stages={stages}: a non-empty list of distinct stages from "
                             f"{list(STAGES)}, e.g. [tla,cma] or [tla]")
        return stages

    @property
    def label(self) -> str:
        return self.name if self.stages == list(STAGES) else f"{self.name}[{'+'.join(self.stages)}]"

    # -- what each stage trains ---------------------------------------------------------------------
    def stage_groups(self, student: nn.Module, stage: str, model_name: str
                     ) -> tuple[list[ParamGroup], LocalLoss | None]:
        """Parameter groups and local loss of ``stage`` (``tla`` | ``cma``)."""
        c = self.cfg
        temporal = list(c.temporal_layers)
        if stage == "tla":
            sc = c.tla
            groups = [
                param_group(student, "tla/weight", "weight", sc.lr, temporal),
                param_group(student, "tla/bias", "bias", sc.lr, temporal, allow_empty=True),
                param_group(student, "tla/act_scale", "act_scale", sc.act_lr, temporal),
            ]
            if c.train_act_zero_point:
                groups.append(param_group(student, "tla/act_zero_point", "act_zero_point",
                                          sc.act_lr, temporal, allow_empty=True))
            layers = temporal
        else:
            sc = c.cma
            critical = family_layers(c.critical_layers, model_name)
            # all activation Δ except the time-embedding ones (the TLA stage's, and the MLP's)
            not_temporal = [*temporal, *c.time_embedding_layers]
            ex = list(c.act_param_exclude)
            groups = [
                param_group(student, "cma/weight", "weight", sc.lr, critical),
                param_group(student, "cma/act_scale", "act_scale", sc.act_lr,
                            exclude=not_temporal, param_exclude=ex),
            ]
            if c.train_act_zero_point:
                groups.append(param_group(student, "cma/act_zero_point", "act_zero_point",
                                          sc.act_lr, exclude=not_temporal, allow_empty=True,
                                          param_exclude=ex))
            layers = critical
        local = LocalLoss(stage, layers, float(sc.local_weight)) if sc.local_weight else None
        return [g for g in groups if g.params], local

    # -- the method --------------------------------------------------------------------------------
    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        c = self.cfg
        stages = self.stages
        # timestep-aware activation quantizers (one Δ per calibration step), QuEST §3
        qcfg = quant_config(ctx.cfg).with_overrides(
            {"act": {"timestep_aware": True, "interp": str(c.interp)}})
        t0 = time.perf_counter()
        traj = calibration_set(ctx, teacher, int(c.calib_n), int(c.calib_steps))
        ctx.cost["trajectory_s"] = time.perf_counter() - t0
        student, info = quantized_student(teacher, qcfg, traj, int(c.calib_batch),
                                          int(c.max_samples))
        ctx.cost["calib_s"] = info.pop("calib_s")
        ctx.report.update(info)

        model_name = str(ctx.cfg.model.name)
        ckpt_root = ctx.output_dir / "checkpoints"
        stats, trainable_ids, t_fit = {}, set(), 0.0
        for i, stage in enumerate(stages):
            sc = c[stage]
            groups, local = self.stage_groups(student, stage, model_name)
            module = DistillationModule(
                student, teacher, groups, max_steps=int(sc.steps),
                global_weight=float(sc.global_weight), local_losses=[local] if local else [],
                optimizer="adam", grad_clip=c.get("grad_clip"))
            data = CachedTrajectoryData(traj, int(c.batch_size), seed=int(ctx.cfg.seed) + i)
            st = fit_distillation(module, data, ctx.cfg.trainer, ckpt_root / stage,
                                  max_steps=int(sc.steps), resume=bool(ctx.cfg.get("resume")),
                                  epoch_steps=int(c.ckpt_every),
                                  log_dir=ctx.output_dir / "train_logs" / stage)
            t_fit += st.seconds
            trainable_ids |= {id(p) for g in groups for _, p in g.params}
            stats[stage] = st.to_dict()
        student.requires_grad_(False)
        n_train = sum(p.numel() for p in student.parameters() if id(p) in trainable_ids)
        ctx.cost.update(finetune_s=t_fit, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        size = model_size(student)
        ctx.cost["size_mb"] = size.total_mb
        ctx.report["size"] = size.to_dict()
        ctx.report["finetune"] = {"stages": stats, "config": OmegaConf.to_container(c)}
        return student.eval()
