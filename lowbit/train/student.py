"""The PTQ student every method starts from: deep copy → ``quantize_`` → (transform) → ``calibrate_``."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.quant import QuantConfig, calibrate_, quantize_

log = logging.getLogger(__name__)


@dataclass
class StudentInfo:
    """What :func:`build_student` did: the quantization report, what the transform returned, the
    calibration result and the seconds spent after ``quantize_`` (transform + calibration)."""

    quant: dict[str, Any]
    calibration: dict[str, Any] | None = None
    transform: Any = None
    calib_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The parts that go into results.json's ``report``."""
        out: dict[str, Any] = {"quant": self.quant}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


def build_student(teacher: nn.Module, qcfg: QuantConfig,
                  calib_batches: Iterable[Mapping[str, Any]] | None, *,
                  max_samples: int = 4096, init_weights: bool = True,
                  transform: Callable[[nn.Module], Any] | None = None,
                  calib_seed: int = 0) -> tuple[nn.Module, StudentInfo]:
    """A quantized, calibrated copy of ``teacher``.

    ``calib_batches``: network kwargs (one timestep per batch, e.g.
    :meth:`~lowbit.data.trajectories.TrajectorySet.batches`), or ``None`` when there is nothing
    to calibrate (weight-only quantization). ``transform(student)`` runs between ``quantize_`` and
    calibration (binarize the 1-bit layers, AdaRound, ICQ …); its return value is kept in
    :attr:`StudentInfo.transform`. ``init_weights=False`` leaves weight quantizers for
    ``calibrate_`` to initialise (those that a transform replaces never need a grid).
    Every parameter of the copy requires a gradient except what the quantizers freeze, so a
    frozen teacher still gives a trainable student.
    """
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    report = quantize_(student, qcfg, init_weights=init_weights)
    log.info("%s", report.summary())
    t0 = time.perf_counter()
    info = StudentInfo(quant=report.to_dict())
    if transform is not None:
        info.transform = transform(student)
    if calib_batches is not None:
        info.calibration = calibrate_(student, calib_batches, max_samples=max_samples,
                                      seed=calib_seed).to_dict()
    info.calib_s = time.perf_counter() - t0
    return student, info
