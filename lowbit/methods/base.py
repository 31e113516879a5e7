"""The interface every method implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from lowbit.config import ConfigError
from lowbit.models.adapter import FAMILIES, Denoiser


@dataclass
class MethodContext:
    """What a method may use besides the teacher network: the resolved run config, the run
    directory, the shared cache directory, the teacher's denoiser adapter (``model``: how the
    network is called, its schedule, VAE, conditioning), the dataset (``dataset``: real images,
    conditions) and a place to record costs and reports for results.json."""

    cfg: DictConfig
    output_dir: Path
    cache_dir: Path
    model: Denoiser
    dataset: Any = None
    cost: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class Method:
    """``prepare`` returns the student to sample from. Calibration-only methods do all their work
    there; fine-tuning methods run a Lightning fit inside it."""

    name: str = "base"
    #: the model families (:data:`lowbit.models.adapter.FAMILIES`) the method is defined for
    families: tuple[str, ...] = FAMILIES
    #: why the other families are refused (part of the error)
    family_reason: str = ""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def check_model(self, model: Denoiser) -> None:
        """Refuse, before any compute, a model of a family this method is not defined for."""
        if model.family not in self.families:
            raise ConfigError("method", self.name, f"not defined for model {model.name!r} (a "
                              f"{model.family} network): {self.family_reason}",
                              f"choose a model of family {' or '.join(self.families)}, or "
                              f"another method")

    @property
    def label(self) -> str:
        """How results and tables name this method with its options (e.g. ``ptq+adaround``)."""
        return self.name

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError


def build_method(cfg: DictConfig) -> Method:
    """Instantiate the class named by ``method._target_`` with the method config."""
    cls = get_class(cfg._target_)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method._target_={cfg._target_} is not a lowbit Method subclass")
    return cls(cfg)
