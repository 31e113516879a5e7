"""The interface every metric shares, and the suite that a ``metrics`` config builds.

A metric is built by Hydra from its config (``_target_`` + keys) and called once per run with a
:class:`MetricInputs`; it returns a flat ``{name: value}``: a float, or a string where a number
cannot say it (``psnr: "inf"`` of identical images, the name of FID's reference set). A ``metrics`` config is a
:class:`MetricSuite` whose ``items`` are metrics (each with its own ``_target_``), so a new metric
(Inception FID/sFID/IS, CLIP score, precision/recall) slots in as one more item::

    _target_: lowbit.metrics.MetricSuite
    name: digits
    num_samples: 500          # read by the pipeline: images to sample
    grid_size: 100            # read by the pipeline: images in the logged grid
    items:
      digits: {_target_: lowbit.metrics.DigitsMetrics, classifier_checkpoint: null, ...}
      fidelity: {_target_: lowbit.metrics.PairedFidelity}

An item set to ``null`` (``metrics.items.fidelity=null``) is left out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from lowbit.data.datasets import Dataset
    from lowbit.models.adapter import Denoiser
    from lowbit.sampling import SamplerConfig


@dataclass
class MetricInputs:
    """Everything a metric may read about one run's samples."""

    #: the run's samples as PNG files (what clean-fid reads)
    sample_dir: Path
    #: the same samples, uint8 ``[N, C, H, W]``
    images: Tensor
    #: what they were sampled with: labels ``[N]`` (int64), N prompts, or None
    conditions: Tensor | list[str] | None = None
    #: the run's dataset (its :meth:`~lowbit.data.datasets.Dataset.reference`)
    dataset: Dataset | None = None
    #: where reference folders are cached
    cache_dir: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the FP model's samples on the same seeds and conditions (uint8, like ``images``), or None
    fp_images: Tensor | None = None
    #: the FP model (its ``net`` is the teacher), the run's network (the teacher itself in an FP
    #: run), its sampler and seed: what metrics on the networks rather than the samples read
    model: Denoiser | None = None
    student: nn.Module | None = None
    sampler: SamplerConfig | None = None
    seed: int = 0
    _reference: Path | None = field(default=None, repr=False)

    @property
    def labels(self) -> Tensor | None:
        """The class labels, when the samples were class-conditioned."""
        return self.conditions if isinstance(self.conditions, Tensor) else None

    @property
    def prompts(self) -> list[str] | None:
        return list(self.conditions) if isinstance(self.conditions, list | tuple) else None

    def reference(self) -> Path:
        """The dataset's reference (image folder or statistics file); built once per inputs."""
        if self._reference is None:
            if self.dataset is None or self.cache_dir is None:
                raise ValueError("this metric needs a reference set: give MetricInputs a dataset "
                                 "and a cache_dir")
            self._reference = Path(self.dataset.reference(self.cache_dir))
        return self._reference


class Metric(ABC):
    """One measurement of a run's samples. Subclasses take their settings as constructor
    keywords (the keys of their config) and return ``{name: value}`` from :meth:`__call__`."""

    #: True when the metric needs ``MetricInputs.fp_images`` (the FP model sampled on the same
    #: seeds), so the pipeline knows to produce them
    needs_fp_images: bool = False
    #: True when the metric reads the networks (``MetricInputs.model``, ``.student``, ``.sampler``)
    needs_models: bool = False

    @abstractmethod
    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        ...

    def check(self, dataset: Dataset | None = None, key: str = "metrics") -> None:
        """Raise :class:`lowbit.config.ConfigError` (naming ``key``'s sub-key) when the metric
        cannot run with its settings or with ``dataset``; called before any compute."""
        return None


class MetricSuite(Metric):
    """The metrics of a ``metrics`` config: every item's results, merged (a name reported by
    two items is an error, so one number never silently replaces another)."""

    def __init__(self, items: Mapping[str, Metric | None] | None = None, name: str | None = None,
                 num_samples: int = 500, grid_size: int = 100) -> None:
        self.items: dict[str, Metric] = {k: m for k, m in (items or {}).items() if m is not None}
        for k, m in self.items.items():
            if not isinstance(m, Metric):
                raise TypeError(f"metrics.items.{k} is a {type(m).__name__}, not a Metric; "
                                f"give it a _target_ of a lowbit.metrics.Metric subclass")
        self.name = name
        self.num_samples = num_samples
        self.grid_size = grid_size

    @property
    def needs_fp_images(self) -> bool:  # type: ignore[override]
        return any(m.needs_fp_images for m in self.items.values())

    @property
    def needs_models(self) -> bool:  # type: ignore[override]
        return any(m.needs_models for m in self.items.values())

    def check(self, dataset: Dataset | None = None, key: str = "metrics") -> None:
        for k, m in self.items.items():
            m.check(dataset, f"{key}.items.{k}")

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        if ctx.fp_images is None:  # fail before the first metric spends its time
            missing = [k for k, m in self.items.items() if m.needs_fp_images]
            if missing:
                raise ValueError(f"metrics.items.{missing[0]} needs the FP model's samples on the "
                                 f"same seeds (MetricInputs.fp_images)")
        if ctx.model is None or ctx.student is None or ctx.sampler is None:
            missing = [k for k, m in self.items.items() if m.needs_models]
            if missing:
                raise ValueError(f"metrics.items.{missing[0]} needs the networks: give "
                                 f"MetricInputs the FP model, the student and the sampler")
        out: dict[str, float | str] = {}
        for k, m in self.items.items():
            for name, value in m(ctx).items():
                if name in out:
                    raise ValueError(f"metric {name!r} is reported by two items of the metrics "
                                     f"config (the second is metrics.items.{k}); drop one")
                out[name] = value
        return out

    def __repr__(self) -> str:
        return f"MetricSuite(name={self.name!r}, items={list(self.items)})"


def build_metrics(metrics_cfg) -> MetricSuite:
    """The suite of a ``metrics`` group config (``cfg.metrics``), built by ``instantiate`` with
    every key (the items recursively)."""
    from hydra.utils import instantiate

    built = instantiate(metrics_cfg)
    if not isinstance(built, MetricSuite):
        raise TypeError(f"metrics._target_ builds a {type(built).__name__}; a metrics config is a "
                        f"lowbit.metrics.MetricSuite whose items are the metrics")
    return built
