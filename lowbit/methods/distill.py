"""Data-free teacher–student distillation of a quantized student, under a Lightning Trainer.

The shared machinery of the fine-tuning methods (QuEST, EfficientDM, full QAT, IR-QLoRA …):

- :func:`quantized_student` — the PTQ initialisation every method starts from: a deep copy of
  the FP teacher, :func:`~lowbit.quant.quantize_`-d and calibrated on FP trajectories.
- :func:`select_params` / :func:`param_group` — which parameters train, chosen by **role** and
  **module-name pattern** (``role="weight", include=["*time_emb_proj"]``). Roles are the quant
  roles of :data:`lowbit.quant.ROLES` (``weight, bias, weight_scale, weight_zero_point, act_scale,
  act_zero_point``) plus ``lora``: every parameter inside a child named ``lora`` or ``lora_*`` of a
  matching module (the convention LoRA-style adapters follow: ``layer.lora.A``).
- :class:`DistillationModule` — a ``LightningModule`` with a frozen FP teacher (kept out of the
  module's ``state_dict`` and checkpoints) and a student; loss = ``global_weight`` · MSE of the
  U-Net outputs (raw cond/uncond outputs, or the classifier-free-guided ε) + Σ ``weight`` · MSE of
  chosen layers' outputs (:class:`LocalLoss`, forward hooks on both models). Logs ``train/...``.
- Data, as a pure function of the optimisation step so that a resumed run sees exactly the batches
  an uninterrupted run would have seen:
  :class:`CachedTrajectoryData` reads a cached :class:`~lowbit.data.trajectories.TrajectorySet`
  (QuEST); :class:`FPTrajectoryData` runs the FP sampler from pure noise and advances the
  trajectory with the FP prediction, one optimiser step per denoising step (EfficientDM).
- :func:`fit_distillation` — builds the Trainer from the ``trainer`` config group, checkpoints to
  ``<ckpt_dir>/last.ckpt`` at every epoch end (an epoch = ``ckpt_every`` steps) and, with
  ``resume=True``, continues from it.

Typical use inside a :class:`~lowbit.methods.base.Method`::

    student, info = quantized_student(teacher, qcfg, traj)
    groups = [param_group(student, "lora", "lora", lr=1e-4),
              param_group(student, "act_scale", "act_scale", lr=5e-4)]
    module = DistillationModule(student, teacher, groups, max_steps=200)
    data = FPTrajectoryData(FPTrajectoryStream(teacher, ctx.loaded, sampler, batch_size=16, seed=0))
    stats = fit_distillation(module, data, ctx.cfg.trainer, ctx.output_dir / "checkpoints",
                             max_steps=200, resume=bool(ctx.cfg.resume))
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lowbit.data.trajectories import TrajectorySet
from lowbit.models import LoadedModel
from lowbit.quant import ROLES, QuantConfig, calibrate_, quant_params, quantize_
from lowbit.sampling import SamplerConfig, build_scheduler

log = logging.getLogger(__name__)

LORA_ROLE = "lora"
CKPT_NAME = "last.ckpt"


# ------------------------------------------------------------------------------------------------
# PTQ initialisation
# ------------------------------------------------------------------------------------------------
def quantized_student(teacher: nn.Module, qcfg: QuantConfig, traj: TrajectorySet,
                      batch_size: int = 128, max_samples: int = 4096
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """A quantized, calibrated copy of ``teacher`` (the PTQ student every method starts from) and
    ``{"quant": QuantReport dict, "calibration": CalibrationResult dict, "calib_s": seconds}``."""
    student = copy.deepcopy(teacher)
    report = quantize_(student, qcfg)
    log.info("%s", report.summary())
    t0 = time.perf_counter()
    calib = calibrate_(student, traj.batches(batch_size), max_samples=max_samples)
    return student, {"quant": report.to_dict(), "calibration": calib.to_dict(),
                     "calib_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# trainable parameters
# ------------------------------------------------------------------------------------------------
def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _is_lora_name(param_name: str) -> bool:
    return any(part == "lora" or part.startswith("lora_") for part in param_name.split("."))


def select_params(model: nn.Module, role: str, include: Sequence[str] = ("*",),
                  exclude: Sequence[str] = (), param_exclude: Sequence[str] = ()
                  ) -> list[tuple[str, nn.Parameter]]:
    """``(qualified parameter name, parameter)`` of ``role`` in the quantized modules whose names
    match ``include`` and none of ``exclude`` (shell-style patterns, e.g. ``"*time_emb_proj"``);
    ``param_exclude`` drops qualified parameter names (e.g. ``"*.softmax.scale"``).

    ``role``: one of :data:`lowbit.quant.ROLES`, or ``"lora"`` (parameters under a ``lora``/
    ``lora_*`` child of a matching module). Duplicates (shared parameters) are returned once.
    """
    if role != LORA_ROLE and role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; allowed: {', '.join(ROLES)}, lora.")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out: dict[int, tuple[str, nn.Parameter]] = {}
    if role == LORA_ROLE:
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            cut = next((i for i, s in enumerate(parts) if s == "lora" or s.startswith("lora_")),
                       None)
            if cut is not None and _matches(".".join(parts[:cut]), include, exclude):
                out[id(p)] = (pname, p)
    else:
        for mname, p in quant_params(model, role):
            if _matches(mname, include, exclude):
                out[id(p)] = (names.get(id(p), f"{mname}.<{role}>"), p)
    return [(n, p) for n, p in out.values()
            if not any(fnmatch.fnmatchcase(n, q) for q in param_exclude)]


@dataclass
class ParamGroup:
    """One optimiser parameter group: named parameters, a learning rate, a weight decay."""

    name: str
    params: list[tuple[str, nn.Parameter]]
    lr: float
    weight_decay: float = 0.0

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def param_group(model: nn.Module, name: str, role: str, lr: float,
                include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                weight_decay: float = 0.0, allow_empty: bool = False,
                param_exclude: Sequence[str] = ()) -> ParamGroup:
    """:func:`select_params` as a :class:`ParamGroup`; an empty selection is an error (a pattern
    that matches nothing is a config mistake) unless ``allow_empty``."""
    params = select_params(model, role, include, exclude, param_exclude)
    if not params and not allow_empty:
        raise ValueError(f"parameter group {name!r}: no {role} parameters in modules matching "
                         f"{list(include)} (excluding {list(exclude)}); check the layer patterns.")
    return ParamGroup(name, params, float(lr), float(weight_decay))


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
@dataclass
class LocalLoss:
    """Layer-local MSE between the student's and the teacher's outputs of the modules whose names
    match ``patterns`` (QuEST's L_TLA / L_CMA), averaged over the layers, times ``weight``."""

    name: str
    patterns: Sequence[str]
    weight: float = 1.0


class _OutputTaps:
    """Forward hooks that store the outputs of named modules of one model during a forward."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, Tensor] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        def store(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return store

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def guided_eps(out: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance on a [cond | uncond] batch: ε_u + w·(ε_c − ε_u)."""
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


MODEL_KEYS = ("sample", "timestep", "class_labels")


class DistillationModule(L.LightningModule):
    """Teacher–student distillation of a quantized student against its frozen FP teacher.

    ``groups``: what trains (everything else in the student is frozen); ``global_weight``: weight
    of the output MSE; ``guidance_scale``: ``None`` compares the raw outputs of the whole
    [cond | uncond] batch, a number compares the guided ε (EfficientDM's loss); ``local_losses``:
    layer-local MSE terms; ``optimizer``: ``adam`` | ``adamw``; ``schedule``: ``constant`` |
    ``linear`` (decay to 0 at ``max_steps``); ``grad_clip``: max gradient norm or ``None``.

    Batches are dicts with the denoiser's kwargs (``sample``, ``timestep``, ``class_labels``), the
    ``step`` they belong to and optionally ``target`` (the teacher's output on that input, which
    spares a teacher forward when no local loss needs the teacher's activations).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, groups: Sequence[ParamGroup], *,
                 max_steps: int, global_weight: float = 1.0, guidance_scale: float | None = None,
                 local_losses: Sequence[LocalLoss] = (), optimizer: str = "adam",
                 schedule: str = "constant", grad_clip: float | None = None) -> None:
        super().__init__()
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer={optimizer!r}: choose adam or adamw")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"schedule={schedule!r}: choose constant or linear")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never checkpointed
        teacher.requires_grad_(False).eval()
        self.groups = [g for g in groups if g.params]
        if not self.groups:
            raise ValueError("DistillationModule: nothing to train (all parameter groups empty)")
        seen: set[int] = set()
        for g in self.groups:
            for n, p in g.params:
                if id(p) in seen:
                    raise ValueError(f"parameter {n} is in two groups; give each one group")
                seen.add(id(p))
        self.max_steps = int(max_steps)
        self.global_weight = float(global_weight)
        self.guidance_scale = guidance_scale
        self.local_losses = list(local_losses)
        self.optimizer_name, self.schedule, self.grad_clip = optimizer, schedule, grad_clip
        self._local_names = {ll.name: self._resolve(ll) for ll in self.local_losses}
        self._taps: tuple[_OutputTaps, _OutputTaps] | None = None
        self.loss_history: list[float] = []

    def _resolve(self, ll: LocalLoss) -> list[str]:
        s_names = {n for n, _ in self.student.named_modules()}
        names = [n for n, _ in self.teacher.named_modules()
                 if n and n in s_names and any(fnmatch.fnmatchcase(n, p) for p in ll.patterns)]
        if not names:
            raise ValueError(f"local loss {ll.name!r}: no module matches {list(ll.patterns)}")
        return names

    # -- trainable parameters ----------------------------------------------------------------------
    @property
    def trainable_params(self) -> int:
        return sum(g.numel for g in self.groups)

    def apply_trainable(self) -> None:
        """Freeze the student except the selected groups. Called again at train start because
        loading a checkpoint may reset quantizer trainability to the quant spec's default."""
        self.student.requires_grad_(False)
        for g in self.groups:
            for _, p in g.params:
                p.requires_grad_(True)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()
        self.student.train()  # no dropout in these U-Nets; train mode only silences Lightning
        if self.local_losses and self._taps is None:
            names = sorted({n for ns in self._local_names.values() for n in ns})
            self._taps = (_OutputTaps(self.student, names), _OutputTaps(self.teacher, names))

    def on_fit_end(self) -> None:
        if self._taps is not None:
            for t in self._taps:
                t.remove()
            self._taps = None

    def on_train_start(self) -> None:
        self.apply_trainable()

    def configure_optimizers(self) -> Any:
        self.apply_trainable()
        pgs = [{"params": [p for _, p in g.params], "lr": g.lr, "weight_decay": g.weight_decay,
                "name": g.name} for g in self.groups]
        opt_cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        opt = opt_cls(pgs, foreach=False)
        if self.schedule == "constant":
            return opt
        total = max(1, self.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _LinearDecay(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        clip = self.grad_clip if self.grad_clip is not None else gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # -- loss --------------------------------------------------------------------------------------
    def _compare(self, out: Tensor) -> Tensor:
        return out if self.guidance_scale is None else guided_eps(out, self.guidance_scale)

    def distillation_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": total, "global": …, "local/<name>": …}`` for one batch."""
        inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
        need_teacher = self.local_losses or "target" not in batch
        with torch.no_grad():
            target = self.teacher(**inputs).sample if need_teacher else batch["target"]
        out = self.student(**inputs).sample
        terms = {"global": F.mse_loss(self._compare(out), self._compare(target))}
        loss = self.global_weight * terms["global"]
        if self.local_losses:
            s_taps, t_taps = self._taps
            for ll in self.local_losses:
                names = self._local_names[ll.name]
                term = sum(F.mse_loss(s_taps.outputs[n], t_taps.outputs[n].detach())
                           for n in names) / len(names)
                terms[f"local/{ll.name}"] = term
                loss = loss + ll.weight * term
        terms["loss"] = loss
        return terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = int(batch["step"])
        if step != self.global_step:  # the data must follow the optimisation step exactly
            raise RuntimeError(f"batch of step {step} arrived at global step {self.global_step}")
        terms = self.distillation_loss(batch)
        bs = int(batch["sample"].shape[0])
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", batch_size=bs)
        self.loss_history.append(float(terms["loss"].detach()))
        return terms["loss"]


class _LinearDecay:
    """lr factor 1 → 0 over ``total`` steps (a picklable callable, for checkpoints)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.total)


# ------------------------------------------------------------------------------------------------
# data: one batch per optimisation step, a pure function of the step
# ------------------------------------------------------------------------------------------------
class _StepDataset(Dataset):
    def __init__(self, batch_fn: Callable[[int], dict[str, Tensor]]) -> None:
        self.batch_fn = batch_fn

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        batch = dict(self.batch_fn(step))
        batch["step"] = torch.tensor(step)
        return batch

    def __len__(self) -> int:  # indices come from _StepSampler
        return 2**62


class _StepSampler(Sampler[int]):
    """Yields the next ``epoch_steps`` step indices starting at the trainer's global step (read
    when an epoch's iterator is created — after a checkpoint has been restored)."""

    def __init__(self, start: Callable[[], int], epoch_steps: int, max_steps: int) -> None:
        self.start, self.epoch_steps, self.max_steps = start, epoch_steps, max_steps

    def __iter__(self) -> Iterator[int]:
        s = self.start()
        return iter(range(s, min(s + self.epoch_steps, self.max_steps)))

    def __len__(self) -> int:
        return self.epoch_steps


class StepDataModule(L.LightningDataModule):
    """Base of the distillation data modules: ``batch(step)`` defines the data; an epoch is
    ``epoch_steps`` steps (the checkpoint interval)."""

    epoch_steps: int = 25
    max_steps: int = 0

    def batch(self, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = _StepSampler(lambda: int(trainer.global_step), self.epoch_steps,
                               self.max_steps or trainer.max_steps)
        return DataLoader(_StepDataset(self.batch), sampler=sampler, batch_size=None,
                          num_workers=0)


class CachedTrajectoryData(StepDataModule):
    """Batches from cached FP trajectories (QuEST): each epoch of the data visits every
    (kept step, sample) pair once, in ``batch_size`` chunks of one timestep each, in an order fixed
    by ``seed`` and the data epoch — so step ``n``'s batch never depends on what ran before."""

    def __init__(self, traj: TrajectorySet, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.traj, self.batch_size, self.seed = traj, int(batch_size), int(seed)
        n = traj.xt.shape[1]
        self.chunks = math.ceil(n / self.batch_size)
        self.per_epoch = traj.xt.shape[0] * self.chunks
        self._cache: tuple[int, list[tuple[int, Tensor]]] | None = None

    def _epoch_plan(self, epoch: int) -> list[tuple[int, Tensor]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.traj.xt.shape[1]
        plan = []
        for s in range(self.traj.xt.shape[0]):
            perm = torch.randperm(n, generator=g)
            plan += [(s, perm[i : i + self.batch_size]) for i in range(0, n, self.batch_size)]
        order = torch.randperm(len(plan), generator=g).tolist()
        plan = [plan[i] for i in order]
        self._cache = (epoch, plan)
        return plan

    def batch(self, step: int) -> dict[str, Tensor]:
        s, idx = self._epoch_plan(step // self.per_epoch)[step % self.per_epoch]
        return self.traj.model_inputs(s, idx)


class FPTrajectoryStream:
    """x_t along FP sampling trajectories from pure noise, for data-free distillation
    (EfficientDM): step ``n`` is denoising step ``n mod S`` of trajectory ``n // S`` (S = sampler
    steps). Trajectory ``j`` starts from noise drawn with seed ``(seed, j)`` and labels drawn from
    the same generator; it advances with the FP model's (guided) prediction, never the student's.

    ``__call__(n)`` returns the denoiser kwargs (cond + uncond halves with guidance) and
    ``target``, the teacher's raw output on them. Calls in step order cost one teacher forward
    each; a jump (a resumed run) replays the trajectory from its noise, so the result depends on
    ``n`` only.
    """

    def __init__(self, teacher: nn.Module, loaded: LoadedModel, sampler: SamplerConfig,
                 batch_size: int, seed: int = 0) -> None:
        self.teacher, self.loaded, self.sampler = teacher, loaded, sampler
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.conditional = loaded.conditioning == "class"
        self.steps = len(build_scheduler(loaded.noise_schedule, sampler.kind, sampler.steps)
                         .timesteps)
        self._state: dict[str, Any] | None = None  # trajectory j at denoising step i

    def _start(self, j: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        n_cls = max(self.loaded.num_classes, 1)
        labels = torch.randint(n_cls, (self.batch_size,), generator=g)
        sched = build_scheduler(self.loaded.noise_schedule, self.sampler.kind, self.sampler.steps)
        x = torch.randn((self.batch_size, *self.loaded.sample_shape), generator=g)
        return {"j": j, "i": 0, "x": x * sched.init_noise_sigma, "labels": labels,
                "sched": sched, "gen": g}

    @torch.no_grad()
    def _inputs_and_target(self, st: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        device = next(self.teacher.parameters()).device
        t = st["sched"].timesteps[st["i"]]
        x_in = st["sched"].scale_model_input(st["x"], t)
        one = TrajectorySet(x_in[None], t.reshape(1), st["labels"], self.sampler.guidance_scale,
                            self.loaded.null_class, self.conditional)
        inputs = {k: v.to(device) for k, v in one.model_inputs(0, torch.arange(len(x_in))).items()}
        return inputs, self.teacher(**inputs).sample

    @torch.no_grad()
    def _advance(self, st: dict[str, Any], out: Tensor) -> None:
        """One sampler step with the FP (guided) ε — the trajectory never sees the student."""
        guided = (self.conditional and self.loaded.null_class is not None
                  and self.sampler.guidance_scale != 1.0)
        eps = guided_eps(out, self.sampler.guidance_scale) if guided else out
        sched, t = st["sched"], st["sched"].timesteps[st["i"]]
        kw: dict[str, Any] = {}
        if self.sampler.kind in ("ddim", "ddpm"):
            kw["generator"] = st["gen"]
            if self.sampler.kind == "ddim":
                kw["eta"] = self.sampler.eta
        st["x"] = sched.step(eps.cpu(), t, st["x"], **kw).prev_sample
        st["i"] += 1

    def __call__(self, n: int) -> dict[str, Tensor]:
        j, i = divmod(int(n), self.steps)
        st = self._state
        if st is None or st["j"] != j or st["i"] > i:
            st = self._start(j)
        while True:
            inputs, target = self._inputs_and_target(st)
            if st["i"] == i:
                break
            self._advance(st, target)
        batch = {**inputs, "target": target}
        self._advance(st, target)  # ready for step n + 1
        self._state = st
        return batch


class FPTrajectoryData(StepDataModule):
    """On-the-fly FP trajectories (:class:`FPTrajectoryStream`) as a Lightning data module."""

    def __init__(self, stream: FPTrajectoryStream) -> None:
        super().__init__()
        self.stream = stream

    def batch(self, step: int) -> dict[str, Tensor]:
        return self.stream(step)


# ------------------------------------------------------------------------------------------------
# the fit
# ------------------------------------------------------------------------------------------------
@dataclass
class FitStats:
    """What one :func:`fit_distillation` did (JSON-able via ``to_dict``)."""

    steps: int
    seconds: float
    trainable_params: int
    resumed_from: str | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    groups: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class EpochEndCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt`` (model, optimiser, scheduler, loop state) at every epoch
    end, atomically. (Lightning's ``ModelCheckpoint`` only writes ``last`` next to a top-k file.)"""

    def __init__(self, dirpath: Path) -> None:
        self.path = Path(dirpath) / CKPT_NAME

    def save(self, trainer: L.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(str(tmp))
        tmp.replace(self.path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


def build_trainer(trainer_cfg: Any, ckpt_dir: Path, max_steps: int, log_dir: Path | None = None,
                  callbacks: Sequence[L.Callback] = (), **overrides: Any) -> L.Trainer:
    """A ``lightning.Trainer`` from the ``trainer`` config group with the distillation settings:
    ``max_steps``, ``last.ckpt`` in ``ckpt_dir`` at every epoch end, no validation, a CSV log in
    ``log_dir`` (none if ``None``)."""
    from lightning.pytorch.loggers import CSVLogger

    kw: dict[str, Any] = dict(
        max_steps=int(max_steps), max_epochs=-1,
        callbacks=[EpochEndCheckpoint(ckpt_dir), *callbacks],
        logger=CSVLogger(str(log_dir), name="", version="") if log_dir is not None else False,
        default_root_dir=str(ckpt_dir), num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, enable_checkpointing=False,
    )
    kw.update(overrides)
    return instantiate(trainer_cfg, **kw)


def _load_finished(module: DistillationModule, path: Path, max_steps: int) -> bool:
    """Load ``path`` into ``module`` if it is the checkpoint of a finished fit."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if int(state.get("global_step", -1)) < max_steps:
        return False
    module.load_state_dict(state["state_dict"])
    return True


def fit_distillation(module: DistillationModule, data: StepDataModule, trainer_cfg: Any,
                     ckpt_dir: Path, max_steps: int, resume: bool = False, epoch_steps: int = 25,
                     log_dir: Path | None = None, **trainer_overrides: Any) -> FitStats:
    """Train ``module`` for ``max_steps`` optimiser steps on ``data``; ``<ckpt_dir>/last.ckpt``
    is written every ``epoch_steps`` steps and at the end. ``resume``: continue from that file if
    it is there (a finished fit is loaded, not re-run). Returns :class:`FitStats`."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / CKPT_NAME
    resume_from = str(last) if resume and last.is_file() else None
    groups = {g.name: g.numel for g in module.groups}
    if max_steps <= 0:
        return FitStats(0, 0.0, module.trainable_params, groups=groups)
    t0 = time.perf_counter()
    if resume_from and _load_finished(module, last, max_steps):
        log.info("fit already finished in %s: loaded", last)
        module.apply_trainable()
        return FitStats(max_steps, 0.0, module.trainable_params, resume_from, groups=groups)
    data.epoch_steps, data.max_steps = int(epoch_steps), int(max_steps)
    trainer = build_trainer(trainer_cfg, ckpt_dir, max_steps, log_dir, **trainer_overrides)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    if trainer.global_step < max_steps:
        raise RuntimeError(f"fit stopped at step {trainer.global_step} of {max_steps}")
    EpochEndCheckpoint(ckpt_dir).save(trainer)  # the finished state, whatever the epoch ends
    hist = module.loss_history
    return FitStats(max_steps, time.perf_counter() - t0, module.trainable_params, resume_from,
                    hist[0] if hist else None, hist[-1] if hist else None, groups)


def trainable_share(trainable: int, reference: nn.Module) -> float:
    """Trainable parameters as a share of ``reference``'s parameters (the FP model)."""
    total = sum(p.numel() for p in reference.parameters())
    return trainable / max(total, 1)
