"""One LightningModule for teacher–student distillation and QAT on real data."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lowbit.models.adapter import Denoiser
from lowbit.train.features import tapped
from lowbit.train.losses import LossTerm, StepOutputs, total_loss
from lowbit.train.params import ParamGroup

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def default_optimizer() -> OptimizerFactory:
    return functools.partial(torch.optim.Adam, foreach=False)


class StudentModule(L.LightningModule):
    """Trains selected parameters of a quantized ``student`` with pluggable loss ``terms``.

    - ``teacher``: the frozen FP network; never a submodule, so never in a checkpoint. It runs
      only when a term needs it and the batch has no ``target`` (or a term needs its features).
    - ``denoiser``: the model family's adapter (the teacher's); every network call goes through
      ``denoiser.call(net, x, t, cond)``.
    - ``groups``: what trains (everything else in the student is frozen).
    - ``optimizer``: a factory called with the parameter groups (a Hydra ``_partial_: true``
      object such as ``torch.optim.AdamW``); ``scheduler``: a factory called with the optimiser
      (``torch.optim.lr_scheduler.LambdaLR`` …), stepped every optimisation step, or ``None``.
    - ``grad_clip``: max gradient norm or ``None``.

    Batches: ``x``, ``t``, ``cond`` (+ ``target``, ``noise``, ``x0``) and ``step``, which must
    equal the trainer's global step (the data follows the optimisation step exactly).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, denoiser: Denoiser,
                 groups: Sequence[ParamGroup], terms: Sequence[LossTerm], *, max_steps: int,
                 optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None,
                 grad_clip: float | None = None) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never checkpointed
        object.__setattr__(self, "denoiser", denoiser)
        teacher.requires_grad_(False).eval()
        self.terms = nn.ModuleList(terms)
        if not self.terms:
            raise ValueError("StudentModule: no loss terms")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be distinct: {names}")
        self.groups = [g for g in groups if g.params]
        if not self.groups:
            raise ValueError("StudentModule: nothing to train (all parameter groups empty)")
        seen: set[int] = set()
        for g in self.groups:
            for n, p in g.params:
                if id(p) in seen:
                    raise ValueError(f"parameter {n} is in two groups; give each one group")
                seen.add(id(p))
        self.max_steps = int(max_steps)
        self.optimizer_factory = optimizer or default_optimizer()
        self.scheduler_factory = scheduler
        self.grad_clip = grad_clip
        self.feature_names = tuple(sorted({n for t in self.terms for n in t.feature_names}))
        self.loss_history: list[float] = []

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

    # -- calling the networks ----------------------------------------------------------------------
    def call_student(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.denoiser.call(self.student, x, t, cond)

    def call_teacher(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.denoiser.call(self.teacher, x, t, cond)

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    # -- loss --------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Every active term of one batch (unweighted) and ``loss``, the weighted total."""
        for term in self.terms:
            term.before_student(self, batch)
        x, t, cond = batch["x"], batch["t"], batch.get("cond")
        names = self.feature_names
        with tapped(self.student, names) as s_tap:
            eps = self.call_student(x, t, cond)
        out = StepOutputs(batch, eps, dict(s_tap.features), combine=self.denoiser.combine)
        if self.needs_teacher:
            teacher_features = [t for t in self.terms if t.needs_teacher and t.feature_names]
            if teacher_features or "target" not in batch:
                with tapped(self.teacher, names) as t_tap, torch.no_grad():
                    out.teacher_eps = self.call_teacher(x, t, cond)
                out.teacher_features = dict(t_tap.features)
            else:
                out.teacher_eps = batch["target"]
        values: dict[str, Tensor] = {}
        for term in self.terms:
            v = term(out)
            if v is not None:
                values[term.name] = v
        values["loss"] = total_loss(list(self.terms), values)
        return values

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # before the strategy wraps the module: DDP syncs the gradients of the parameters that
        # require them when it is built
        self.apply_trainable()
        # each rank sees 1/world of every batch, in `micro` passes (lowbit.train.data.
        # rank_slice): LSQ's gradient scale counts the whole batch
        from lowbit.quant.quantizers import UniformQuantizer
        from lowbit.train.data import micro_batches

        split = 1
        if self._trainer is not None:
            split = int(self.trainer.world_size) * micro_batches(self.trainer)
        for m in self.student.modules():
            if isinstance(m, UniformQuantizer):
                m.batch_split = split

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # a resumed fit loads its checkpoint before the strategy wraps the module: loading may
        # reset quantizer trainability to the quant spec's default, and DDP only syncs what
        # requires a gradient when it is built
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.apply_trainable()
        return out

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()
        self.student.train()  # no dropout in these U-Nets; train mode only silences Lightning

    def on_train_start(self) -> None:
        self.apply_trainable()

    def configure_optimizers(self) -> Any:
        self.apply_trainable()
        opt = self.optimizer_factory([g.to_optimizer_group() for g in self.groups])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        clip = self.grad_clip if self.grad_clip is not None else gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        step = int(batch["step"])
        if step != self.global_step:  # the data must follow the optimisation step exactly
            raise RuntimeError(f"batch of step {step} arrived at global step {self.global_step}")
        for term in self.terms:
            term.on_step(step, self.max_steps)
        values = self.losses(batch)
        loss = values["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {step}")
        bs = int(batch["x"].shape[0])
        for k, v in values.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", batch_size=bs)
        self.loss_history.append(float(loss.detach()))
        return loss


