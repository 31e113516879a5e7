"""lowbit.train — the one training stack of every fine-tuning method.

- :func:`~lowbit.train.student.build_student` — deep copy → ``quantize_`` → (transform) →
  ``calibrate_``: the PTQ student every method starts from.
- :mod:`~lowbit.train.params` — which parameters train (by role and module pattern), in
  :class:`~lowbit.train.params.ParamGroup` s with their learning rates.
- :mod:`~lowbit.train.losses` — pluggable loss terms (ε-MSE to the teacher, diffusion loss,
  layer-local MSE; methods add their own).
- :mod:`~lowbit.train.data` — step-indexed data: cached trajectories, an FP trajectory stream,
  real images + noise; every batch a pure function of the step.
- :class:`~lowbit.train.module.StudentModule` — the LightningModule: frozen teacher (never
  checkpointed), student, terms, optimiser and scheduler from config.
- :func:`~lowbit.train.fit.fit` — Trainer from ``trainer``, ``last.ckpt`` (atomic, exact
  resume), CSV + W&B loggers from ``logger``.
- :mod:`~lowbit.train.seeds` — named seed streams; :mod:`~lowbit.train.hparams` — typed method
  hyper-parameters.

Typical use inside a :class:`~lowbit.methods.base.Method`::

    student, info = build_student(teacher, qcfg, traj.batches(128))
    groups = [param_group(student, "lora", "lora", lr=1e-4)]
    module = StudentModule(student, teacher, ctx.model, groups, [TeacherMSE(guidance_scale=w)],
                           max_steps=p.steps, optimizer=p.build_optimizer(),
                           scheduler=p.build_scheduler())
    data = FPTrajectoryData(FPTrajectoryStream(ctx.model.with_net(teacher), sampler, 16, seed))
    stats = fit(module, data, ctx, max_steps=p.steps, checkpoint_every=p.checkpoint_every)
"""

from lowbit.train.data import (
    CachedTrajectoryData,
    FPTrajectoryData,
    FPTrajectoryStream,
    NoiseSchedule,
    RealImageData,
    StepDataModule,
    real_calibration_batches,
)
from lowbit.train.features import FeatureTap, TimestepBlock, as_tensor, tapped, timestep_blocks
from lowbit.train.fit import (
    FitStats,
    LastCheckpoint,
    build_loggers,
    build_trainer,
    fit,
    fit_module,
    wandb_run_id,
)
from lowbit.train.hparams import HParamError, MethodParams, instantiate_partial
from lowbit.train.losses import DiffusionLoss, LayerMSE, LossTerm, StepOutputs, TeacherMSE
from lowbit.train.module import StudentModule
from lowbit.train.params import (
    ParamGroup,
    param_group,
    qat_groups,
    requires_grad_params,
    select_params,
    trainable_share,
)
from lowbit.train.seeds import derive_seed, generator
from lowbit.train.student import StudentInfo, build_student

__all__ = [
    "CachedTrajectoryData", "DiffusionLoss", "FPTrajectoryData", "FPTrajectoryStream",
    "FeatureTap", "FitStats", "HParamError", "LastCheckpoint", "LayerMSE", "LossTerm",
    "MethodParams", "NoiseSchedule", "ParamGroup", "RealImageData", "StepDataModule",
    "StepOutputs", "StudentInfo", "StudentModule", "TeacherMSE", "TimestepBlock", "as_tensor",
    "build_loggers", "build_student", "build_trainer", "derive_seed", "fit", "fit_module",
    "generator", "instantiate_partial", "param_group", "qat_groups", "real_calibration_batches",
    "requires_grad_params", "select_params", "tapped", "timestep_blocks", "trainable_share",
    "wandb_run_id",
]
