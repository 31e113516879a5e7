"""The fit: a Lightning Trainer from the ``trainer`` group, one checkpoint callback, loggers from
the ``logger`` group, exact resume."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from lowbit.train.data import StepDataModule
from lowbit.train.module import StudentModule

log = logging.getLogger(__name__)

CKPT_NAME = "last.ckpt"
CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG_DIR = "train_logs"


@dataclass
class FitStats:
    """What one :func:`fit_module` did (JSON-able via ``to_dict``).

    ``seconds``: the fit's training wall time over every attempt that made it — the seconds that
    earlier, interrupted attempts had stored in the checkpoint it resumed from
    (``seconds_before``) plus this attempt's; for a finished fit that is only loaded, the time
    stored with it. Time an interrupted attempt spent after its last checkpoint is redone, and
    counted, by the attempt that resumes. ``start_step``: the step this attempt started at (0
    fresh, the checkpoint's step when resumed, ``steps`` when a finished fit was loaded)."""

    steps: int
    seconds: float
    trainable_params: int
    resumed_from: str | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    groups: dict[str, int] = field(default_factory=dict)
    seconds_before: float = 0.0
    start_step: int = 0

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "resumed": self.resumed}


class LastCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt`` (model, optimiser, scheduler, loop state) at every epoch
    end — every ``checkpoint_every`` steps — atomically (temporary file + rename).

    It also keeps the fit's training clock: its state in the checkpoint (``callbacks`` →
    :attr:`STATE_KEY`) is the training wall time up to that save, summed over the attempts
    before it, so a resumed fit reports the time of the whole fit. The clock runs from
    ``started`` (a ``time.perf_counter()`` value; default: when the fit starts) until
    :meth:`stop`; ``start_step`` is the step this attempt started training at."""

    STATE_KEY = "LastCheckpoint"

    def __init__(self, dirpath: Path, started: float | None = None) -> None:
        self.path = Path(dirpath) / CKPT_NAME
        self.started = started
        self.stopped: float | None = None
        self.seconds_before = 0.0  # from the checkpoint a resumed fit starts from
        self.start_step = 0  # the step this attempt starts at (after a restore)

    @property
    def state_key(self) -> str:
        return self.STATE_KEY

    @property
    def seconds(self) -> float:
        """Training wall time of the fit so far, earlier attempts included."""
        if self.started is None:
            return self.seconds_before
        end = self.stopped if self.stopped is not None else time.perf_counter()
        return self.seconds_before + end - self.started

    def stop(self) -> None:
        """Freeze the clock (the fit is done): later saves store, and :attr:`seconds` returns,
        the time at this call."""
        self.stopped = time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = int(trainer.global_step)

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds_before = float(state_dict["seconds"])

    def save(self, trainer: L.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(str(tmp))  # every rank calls it; rank 0 writes the file
        if trainer.is_global_zero:
            tmp.replace(self.path)
        trainer.strategy.barrier("LastCheckpoint.save")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


def stored_seconds(state: dict[str, Any]) -> float:
    """The training seconds a loaded checkpoint holds (0 for one written without the clock)."""
    entry = (state.get("callbacks") or {}).get(LastCheckpoint.STATE_KEY) or {}
    return float(entry.get("seconds", 0.0))


# ------------------------------------------------------------------------------------------------
# loggers
# ------------------------------------------------------------------------------------------------
def wandb_run_id(cfg: Any) -> str:
    """The W&B run id of a job: ``logger.run_id`` when set, else derived from the run directory,
    so the training curves (WandbLogger) and the results the pipeline logs later land in the
    same W&B run, and a resumed job continues it."""
    run_id = cfg.logger.get("run_id") if cfg.get("logger") is not None else None
    if run_id:
        return str(run_id)
    out = str(Path(cfg.paths.output_dir).resolve())
    return hashlib.sha256(out.encode()).hexdigest()[:16]


def build_loggers(cfg: Any, run_dir: Path, stage: str | None = None) -> list[Any]:
    """Lightning loggers of a job: a CSVLogger in ``<run dir>/train_logs[/<stage>]`` always; a
    WandbLogger (offline unless ``logger.mode`` says otherwise, files in the run dir, run id
    :func:`wandb_run_id`) when ``logger.name == "wandb"``. Stages log under ``<stage>/train/…``."""
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(run_dir)
    log_dir = run_dir / TRAIN_LOG_DIR
    loggers: list[Any] = [CSVLogger(str(log_dir), name=stage or "", version="")]
    lg = cfg.get("logger") if cfg is not None else None
    if lg is not None and lg.get("name") == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = str(lg.get("mode", "offline"))
        loggers.append(WandbLogger(
            project=lg.get("project"), entity=lg.get("entity"), group=lg.get("group"),
            save_dir=str(run_dir), id=wandb_run_id(cfg), offline=mode == "offline",
            mode=mode, resume="allow", prefix=stage or "", tags=list(cfg.get("tags", []) or []),
            name=run_name(cfg), log_model=False))
    return loggers


def run_name(cfg: Any) -> str:
    """``<model>-<method>-<bits>-<sampler>``: the W&B run name the pipeline uses too."""
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.bits.name}-{cfg.sampler.name}"


# ------------------------------------------------------------------------------------------------
# the fit
# ------------------------------------------------------------------------------------------------
def build_trainer(trainer_cfg: Any, ckpt_dir: Path, max_steps: int,
                  loggers: Sequence[Any] | bool = False, callbacks: Sequence[L.Callback] = (),
                  started: float | None = None, **overrides: Any) -> L.Trainer:
    """A ``lightning.Trainer`` from the ``trainer`` config group with the training settings:
    ``max_steps``, ``last.ckpt`` in ``ckpt_dir`` at every epoch end (:class:`LastCheckpoint`,
    its training clock started at ``started``), no validation."""
    kw: dict[str, Any] = dict(
        max_steps=int(max_steps), max_epochs=-1,
        callbacks=[LastCheckpoint(ckpt_dir, started), *callbacks],
        logger=list(loggers) if loggers else False,
        default_root_dir=str(ckpt_dir), num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, enable_checkpointing=False,
    )
    kw.update(overrides)
    lightning_cfg = {k: v for k, v in _mapping(trainer_cfg).items() if k not in LOWBIT_KEYS}
    return instantiate(lightning_cfg, **kw)


#: keys of the ``trainer`` group that lowbit reads and Lightning does not take
LOWBIT_KEYS = ("gradient_checkpointing",)


def _mapping(trainer_cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(trainer_cfg, DictConfig):
        return OmegaConf.to_container(trainer_cfg, resolve=True)
    return dict(trainer_cfg)


def set_gradient_checkpointing_(net: nn.Module, on: bool) -> None:
    """Recompute each block's activations in backward instead of keeping them (diffusers'
    ``enable_gradient_checkpointing``): the student's activation memory drops to about the
    blocks' inputs plus one block's recompute, at about one more forward pass per step. The
    quantizers recompute exactly what they computed: a timestep-aware quantizer keeps the step
    its hook set until the next forward of the network."""
    if not on:
        if getattr(net, "is_gradient_checkpointing", False):
            net.disable_gradient_checkpointing()
        return
    if not getattr(net, "_supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.gradient_checkpointing=true: {type(net).__name__} has no "
                         f"gradient checkpointing in diffusers; pass "
                         f"trainer.gradient_checkpointing=false")
    net.enable_gradient_checkpointing()


def _load_finished(module: StudentModule, path: Path, max_steps: int) -> float | None:
    """Load ``path`` into ``module`` if it is the checkpoint of a finished fit; returns the
    training seconds stored with it (``None``: not finished, nothing loaded)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if int(state.get("global_step", -1)) < max_steps:
        return None
    module.load_state_dict(state["state_dict"])
    return stored_seconds(state)


def fit_module(module: StudentModule, data: StepDataModule, trainer_cfg: Any, ckpt_dir: Path,
               max_steps: int, *, resume: bool = False, checkpoint_every: int = 25,
               loggers: Sequence[Any] | bool = False, callbacks: Sequence[L.Callback] = (),
               **trainer_overrides: Any) -> FitStats:
    """Train ``module`` for ``max_steps`` optimiser steps on ``data``; ``<ckpt_dir>/last.ckpt``
    is written every ``checkpoint_every`` steps and at the end. ``resume``: continue from that
    file if it is there (a finished fit is loaded, not re-run)."""
    t0 = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / CKPT_NAME
    resume_from = str(last) if resume and last.is_file() else None
    groups = {g.name: g.numel for g in module.groups}
    if max_steps <= 0:
        return FitStats(0, 0.0, module.trainable_params, groups=groups)
    if resume_from:
        finished = _load_finished(module, last, max_steps)
        if finished is not None:
            log.info("fit already finished in %s: loaded", last)
            module.apply_trainable()
            return FitStats(max_steps, finished, module.trainable_params, resume_from,
                            groups=groups, seconds_before=finished, start_step=max_steps)
    data.epoch_steps, data.max_steps = int(checkpoint_every), int(max_steps)
    set_gradient_checkpointing_(module.student,
                                bool(_mapping(trainer_cfg).get("gradient_checkpointing", False)))
    trainer = build_trainer(trainer_cfg, ckpt_dir, max_steps, loggers, callbacks, started=t0,
                            **trainer_overrides)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    if getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver"):
        # the fit ran in spawned processes (ddp_spawn): this process's module and trainer did
        # not step; rank 0 left the finished state in last.ckpt
        seconds = _load_finished(module, last, max_steps) if last.is_file() else None
        if seconds is None:
            raise RuntimeError(f"the spawned fit did not finish: no finished {last}")
        module.apply_trainable()
        return FitStats(max_steps, seconds, module.trainable_params, resume_from, groups=groups,
                        start_step=0 if resume_from is None else -1)
    if trainer.global_step < max_steps:
        raise RuntimeError(f"fit stopped at step {trainer.global_step} of {max_steps}")
    clock = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    clock.stop()
    LastCheckpoint(ckpt_dir).save(trainer)  # the finished state, whatever the epoch ends
    hist = module.loss_history
    return FitStats(max_steps, clock.seconds, module.trainable_params, resume_from,
                    hist[0] if hist else None, hist[-1] if hist else None, groups,
                    clock.seconds_before, clock.start_step)


def fit(module: StudentModule, data: StepDataModule, ctx: Any, *, max_steps: int,
        checkpoint_every: int, stage: str | None = None,
        callbacks: Sequence[L.Callback] = ()) -> FitStats:
    """:func:`fit_module` inside a run: trainer from ``ctx.cfg.trainer``, checkpoints in
    ``<run dir>/checkpoints[/<stage>]``, ``resume`` from ``ctx.cfg.resume``, loggers from the
    ``logger`` group (:func:`build_loggers`)."""
    ckpt_dir = Path(ctx.output_dir) / CHECKPOINT_DIR
    if stage:
        ckpt_dir = ckpt_dir / stage
    loggers = build_loggers(ctx.cfg, Path(ctx.output_dir), stage)
    return fit_module(module, data, ctx.cfg.trainer, ckpt_dir, max_steps,
                      resume=bool(ctx.cfg.get("resume", False)),
                      checkpoint_every=checkpoint_every, loggers=loggers, callbacks=callbacks)
