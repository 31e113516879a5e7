"""U-Net structure the training terms look at: LDM-style timestep blocks and forward taps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class TimestepBlock:
    """One LDM-style timestep block of a diffusers U-Net: ``output`` is the module whose output is
    the block output (the attention after a resnet, else the resnet; the mid block as a whole),
    ``prefixes`` the module names that belong to it (resnet, attention, a following resampler)."""

    output: str
    prefixes: tuple[str, ...]
    stage: str  # down | mid | up

    def contains(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)


def timestep_blocks(unet: nn.Module) -> list[TimestepBlock]:
    """The U-Net's timestep blocks in forward order: down path, mid block, up path."""
    out: list[TimestepBlock] = []
    for stage in ("down", "up"):
        blocks = getattr(unet, f"{stage}_blocks", None) or []
        for b, block in enumerate(blocks):
            resnets = getattr(block, "resnets", None) or []
            attns = getattr(block, "attentions", None)
            for j in range(len(resnets)):
                base = f"{stage}_blocks.{b}"
                prefixes = [f"{base}.resnets.{j}"]
                output = f"{base}.resnets.{j}"
                if attns is not None and j < len(attns):
                    prefixes.append(f"{base}.attentions.{j}")
                    output = f"{base}.attentions.{j}"
                if j == len(resnets) - 1:  # LDM folds the resampler into the last block
                    for rs in ("downsamplers", "upsamplers"):
                        if getattr(block, rs, None) is not None:
                            prefixes.append(f"{base}.{rs}")
                out.append(TimestepBlock(output, tuple(prefixes), stage))
        if stage == "down" and getattr(unet, "mid_block", None) is not None:
            out.append(TimestepBlock("mid_block", ("mid_block",), "mid"))
    return out


def as_tensor(out: object) -> Tensor:
    """A module output as a tensor (diffusers blocks return tensors, tuples or BaseOutputs)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


class FeatureTap:
    """Forward hooks that keep the outputs of named modules while ``active``; ``remove()`` (or
    leaving :func:`tapped`) takes the hooks off again."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self.active = False
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                         for n in names]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            if self.active:
                self.features[name] = as_tensor(out)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def tapped(model: nn.Module, names: Sequence[str]) -> Iterator[FeatureTap]:
    """A :class:`FeatureTap` on ``names`` for the duration of the block (active, then removed)."""
    tap = FeatureTap(model, names)
    tap.active = True
    try:
        yield tap
    finally:
        tap.active = False
        tap.remove()
