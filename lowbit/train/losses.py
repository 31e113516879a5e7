"""Pluggable loss terms of :class:`~lowbit.train.module.StudentModule`.

A term is an ``nn.Module`` (so its buffers — LRM's PCA bases — are checkpointed with the
module) with a ``name`` (logged as ``train/<name>``), a ``weight`` (the total loss is
Σ weight · term) and:

- ``feature_names``: module names whose outputs it needs from the student and the teacher
  (forward taps during the step);
- ``needs_teacher``: whether the teacher must run on the batch (its ε and tapped features);
- ``on_step(step, max_steps)``: called at each step's start (BinaryDM's EBB stage switch);
- ``before_student(module, batch)``: called before the student's forward (BiDM's t+k pass);
- ``forward(out)``: the unweighted term from a :class:`StepOutputs`, or ``None`` (inactive).

Generic terms live here (ε-MSE to the teacher, diffusion loss, layer-local MSE); method-specific
ones (LRM, SPD, the EBB regulariser) live in their method files and plug in the same way.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lowbit.train.module import StudentModule


@dataclass
class StepOutputs:
    """What the terms of one step see: the batch, the student's ε and tapped features, and the
    teacher's (``teacher_eps``: the batch's ``target`` or a teacher forward)."""

    batch: dict[str, Any]
    student_eps: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_eps: Tensor | None = None
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    combine: Callable[[Tensor, float], Tensor] | None = None  # the adapter's guidance combine


class LossTerm(nn.Module):
    """Base of the loss terms (see the module doc)."""

    name: str = "term"
    feature_names: tuple[str, ...] = ()
    needs_teacher: bool = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def on_step(self, step: int, max_steps: int) -> None:  # noqa: B027 - optional hook
        """Called at the start of every training step."""

    def before_student(self, module: StudentModule, batch: dict[str, Any]) -> None:  # noqa: B027
        """Called before the student's forward pass."""

    def forward(self, out: StepOutputs) -> Tensor | None:
        raise NotImplementedError


class TeacherMSE(LossTerm):
    """MSE between the student's and the FP teacher's ε (data-free distillation's global loss).
    ``guidance_scale=None`` compares the raw outputs of the whole [cond | uncond] batch; a number
    compares the classifier-free-guided ε (EfficientDM's loss)."""

    needs_teacher = True

    def __init__(self, weight: float = 1.0, guidance_scale: float | None = None,
                 name: str = "global") -> None:
        super().__init__(weight)
        self.guidance_scale = guidance_scale
        self.name = name

    def _compare(self, eps: Tensor, out: StepOutputs) -> Tensor:
        if self.guidance_scale is None:
            return eps
        return out.combine(eps, float(self.guidance_scale))

    def forward(self, out: StepOutputs) -> Tensor:
        return F.mse_loss(self._compare(out.student_eps, out),
                          self._compare(out.teacher_eps, out))


class DiffusionLoss(LossTerm):
    """The standard ε-prediction loss ``‖ε − ε_θ(x_t, t, y)‖²`` on real images + noise (the batch
    carries the ``noise``)."""

    name = "task"

    def forward(self, out: StepOutputs) -> Tensor:
        return F.mse_loss(out.student_eps, out.batch["noise"])


class LayerMSE(LossTerm):
    """Layer-local MSE between the student's and the teacher's outputs of the modules whose names
    match ``patterns`` (QuEST's L_TLA / L_CMA), averaged over the layers. :meth:`resolve` fixes
    the module names on the teacher."""

    needs_teacher = True

    def __init__(self, name: str, patterns: Sequence[str], weight: float = 1.0) -> None:
        super().__init__(weight)
        self.name = name
        self.patterns = tuple(patterns)

    def resolve(self, student: nn.Module, teacher: nn.Module) -> LayerMSE:
        s_names = {n for n, _ in student.named_modules()}
        names = [n for n, _ in teacher.named_modules()
                 if n and n in s_names and any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]
        if not names:
            raise ValueError(f"local loss {self.name!r}: no module matches {list(self.patterns)}")
        self.feature_names = tuple(names)
        return self

    def forward(self, out: StepOutputs) -> Tensor:
        names = self.feature_names
        return sum(F.mse_loss(out.student_features[n], out.teacher_features[n].detach())
                   for n in names) / len(names)


def total_loss(terms: Sequence[LossTerm], values: dict[str, Tensor]) -> Tensor:
    """Σ weight · value over the active terms (in the terms' order)."""
    active = [t for t in terms if t.name in values]
    if not active:
        raise RuntimeError("no loss term is active at this step")
    return sum(t.weight * values[t.name] for t in active)


