"""Quantization map: rebuild a quantized student from its FP model, without its method.

optimum-quanto's pattern (``quantization_map(model)`` + ``requantize(model, state_dict, qmap)``),
generalised to every module a method puts into a model:

- :func:`quantization_map` walks the student and records, for every module whose class is
  registered here, ``name → {"class": registered name, "module": python module, "spec": JSON-able
  constructor spec}`` in forward (pre-)order: quantized layers, quantizers (with their timestep
  buckets' count implied by the state), attention quantizers, adapters, wrappers …
- :func:`rebuild_from_map` replays the map on a fresh FP copy: each entry's ``build`` receives the
  module now at that path (the FP module it replaced, a default the parent's rebuild created, or
  None), its spec and a :class:`RebuildContext`, and returns the module to put there; parents are
  rebuilt before their children, so a child entry replaces what its parent's rebuild created.
  Registered ``finalize`` hooks then run once per class (e.g. a model-level forward pre-hook),
  and the timestep hook is installed when the model has timestep-aware quantizers.
- :func:`requantize` = rebuild + strict ``load_state_dict``.

Registration lives next to each class (:func:`register_module_class`); this module registers the
quant core's classes only, so ``quant/`` keeps no method logic. A module class defined under
``lowbit.quant`` or ``lowbit.methods`` that is not registered makes :func:`quantization_map` fail
(it could not be rebuilt), naming the class and the fix.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import AttentionQuantizers, attach_attention_quantizers
from .config import QuantSpec
from .modules import QuantConv2d, QuantLinear
from .quantize import register_timestep_hook, timestep_aware_quantizers
from .quantizers import TimestepActQuantizer, UniformQuantizer

FORMAT = "lowbit-qmap/1"
QMAP_FILE = "quant_map.json"
_CHECKED_PACKAGES = ("lowbit.quant", "lowbit.methods")

__all__ = ["FORMAT", "QMAP_FILE", "ModuleClass", "RebuildContext", "register_module_class",
           "registered", "quantization_map", "rebuild_from_map", "requantize", "spec_from_dict",
           "save_quant_map", "read_quant_map"]


@dataclass
class RebuildContext:
    """Where an entry is rebuilt: the whole model, the entry's qualified name, its parent."""

    model: nn.Module
    name: str

    @property
    def parent(self) -> nn.Module:
        parent, _, _ = self.name.rpartition(".")
        return self.model.get_submodule(parent) if parent else self.model


Describe = Callable[[nn.Module], dict[str, Any]]
Build = Callable[[nn.Module | None, dict[str, Any], RebuildContext], nn.Module]
Finalize = Callable[[nn.Module, list[tuple[str, nn.Module]]], None]


@dataclass(frozen=True)
class ModuleClass:
    """One registered class: how to describe an instance and how to build it back."""

    name: str
    cls: type
    describe: Describe
    build: Build
    finalize: Finalize | None = None


_REGISTRY: dict[str, ModuleClass] = {}
_BY_TYPE: dict[type, ModuleClass] = {}


def register_module_class(cls: type, *, describe: Describe, build: Build,
                          finalize: Finalize | None = None, name: str | None = None) -> type:
    """Register ``cls`` (exact type) for quantization maps; returns ``cls``.

    ``describe(module) -> dict``: a JSON-able spec from which ``build(existing, spec, ctx)``
    re-creates the module with the same parameter/buffer names and shapes (values come from the
    state_dict). ``finalize(model, [(name, module), …])`` runs once after all entries are rebuilt.
    """
    entry = ModuleClass(name or cls.__name__, cls, describe, build, finalize)
    old = _REGISTRY.get(entry.name)
    if old is not None and old.cls is not cls and old.cls.__qualname__ != cls.__qualname__:
        raise ValueError(f"quantization map: class name {entry.name!r} is already registered for "
                         f"{old.cls.__module__}.{old.cls.__qualname__}; pass name=...")
    _REGISTRY[entry.name] = entry
    _BY_TYPE[cls] = entry
    return cls


def registered(module: nn.Module) -> ModuleClass | None:
    return _BY_TYPE.get(type(module))


def spec_from_dict(d: Mapping[str, Any] | None) -> QuantSpec:
    return QuantSpec(**dict(d or {}))


# ------------------------------------------------------------------------------------------------
# map
# ------------------------------------------------------------------------------------------------
def quantization_map(model: nn.Module) -> dict[str, Any]:
    """``{"format", "modules": {name: {"class", "module", "spec"}}}`` of ``model`` (JSON-able)."""
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        entry = registered(m)
        if entry is None:
            mod = type(m).__module__
            if mod.startswith(_CHECKED_PACKAGES):
                raise ValueError(
                    f"quantization map: {name or '<model>'} is a {mod}.{type(m).__qualname__}, "
                    f"a class no rebuild function is registered for, so the student could not "
                    f"be rebuilt from its map. Fix: register it next to its definition with "
                    f"lowbit.quant.qmap.register_module_class({type(m).__name__}, describe=..., "
                    f"build=...).")
            continue
        if not name:
            raise ValueError("quantization map: the top-level model itself is a registered "
                             "quantized module; map a model that contains it.")
        spec = entry.describe(m)
        modules[name] = {"class": entry.name, "module": entry.cls.__module__, "spec": spec}
    json.dumps(modules)  # fail here, not when writing, if a describe() is not JSON-able
    return {"format": FORMAT, "modules": modules}


def _entry_for(name: str, rec: Mapping[str, Any], where: str) -> ModuleClass:
    cls_name = rec.get("class")
    entry = _REGISTRY.get(cls_name)
    if entry is None:
        mod = str(rec.get("module", ""))
        if mod.startswith("lowbit."):  # the method module registers its classes on import
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ValueError(f"{where}: {name}: module {mod} of class {cls_name!r} cannot be "
                                 f"imported ({e}).") from e
            entry = _REGISTRY.get(cls_name)
    if entry is None:
        raise ValueError(f"{where}: {name}: class {cls_name!r} is not registered for quantization "
                         f"maps (known: {', '.join(sorted(_REGISTRY))}).")
    return entry


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _get_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def rebuild_from_map(model: nn.Module, qmap: Mapping[str, Any], where: str = "quant map"
                     ) -> nn.Module:
    """Turn the FP ``model`` into the mapped student's skeleton, in place (values unset: load
    the student's state_dict next). RNG-neutral: random initialisers inside constructors do not
    move torch's global generator."""
    if not isinstance(qmap, Mapping) or qmap.get("format") != FORMAT:
        got = qmap.get("format") if isinstance(qmap, Mapping) else type(qmap).__name__
        raise ValueError(f"{where}: format {got!r}, expected {FORMAT!r}.")
    records = qmap.get("modules")
    if not isinstance(records, Mapping):
        raise ValueError(f"{where}: no 'modules' mapping.")
    done: dict[str, list[tuple[str, nn.Module]]] = {}
    with torch.random.fork_rng(devices=[]):
        for name, rec in records.items():
            entry = _entry_for(name, rec, where)
            parent = name.rpartition(".")[0]
            if parent and _get_or_none(model, parent) is None:
                raise ValueError(f"{where}: {name}: the model has no module {parent!r}; the map "
                                 f"belongs to another model.")
            try:
                new = entry.build(_get_or_none(model, name), dict(rec.get("spec") or {}),
                                  RebuildContext(model, name))
            except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
                raise ValueError(f"{where}: {name}: cannot rebuild {entry.name} ({e}).") from e
            _set_submodule(model, name, new)
            done.setdefault(entry.name, []).append((name, new))
    for cls_name, mods in done.items():
        fin = _REGISTRY[cls_name].finalize
        if fin is not None:
            fin(model, mods)
    if timestep_aware_quantizers(model):
        register_timestep_hook(model)
    return model


def requantize(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
               qmap: Mapping[str, Any], where: str = "quant map") -> nn.Module:
    """Rebuild ``model`` from ``qmap`` and load ``state_dict`` strictly (in place)."""
    rebuild_from_map(model, qmap, where)
    model.load_state_dict(state_dict, strict=True)
    return model


def save_quant_map(model: nn.Module, path: str | Path) -> Path:
    """Write :func:`quantization_map` of ``model`` to ``path`` (atomically)."""
    path = Path(path)
    text = json.dumps(quantization_map(model), indent=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_quant_map(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    qmap = json.loads(path.read_text())
    if not isinstance(qmap, dict) or qmap.get("format") != FORMAT:
        raise ValueError(f"format {qmap.get('format') if isinstance(qmap, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return qmap


# ------------------------------------------------------------------------------------------------
# the quant core's classes
# ------------------------------------------------------------------------------------------------
def _describe_quantizer(q: UniformQuantizer) -> dict[str, Any]:
    return {"spec": q.spec.to_dict(), "is_weight": q.is_weight, "shape": list(q.tensor_shape),
            "channel_axis": q.channel_axis, "name": q.name, "enabled": q.enabled}


def _quantizer_builder(cls: type) -> Build:
    def build(_existing, spec, _ctx) -> nn.Module:
        q = cls(spec_from_dict(spec["spec"]), is_weight=bool(spec["is_weight"]),
                shape=tuple(spec["shape"]), channel_axis=int(spec["channel_axis"]),
                name=str(spec.get("name", "")))
        q.enabled = bool(spec.get("enabled", True))
        return q
    return build


def describe_quant_layer(m: QuantLinear | QuantConv2d) -> dict[str, Any]:
    """Spec of a quantized Linear/Conv2d (also the base of subclasses' specs)."""
    return {"weight_spec": m.weight_spec.to_dict(), "act_spec": m.act_spec.to_dict(),
            "split": m.split, "name": m.qualname}


def build_quant_layer(cls: type, existing: nn.Module | None, spec: Mapping[str, Any]
                      ) -> QuantLinear | QuantConv2d:
    """``cls.from_module`` on the FP layer at that path (quantizers uninitialised)."""
    fp_type = nn.Conv2d if issubclass(cls, nn.Conv2d) else nn.Linear
    if not isinstance(existing, fp_type):
        raise ValueError(f"expected the FP {fp_type.__name__} there, found "
                         f"{type(existing).__name__}")
    return cls.from_module(existing, spec_from_dict(spec["weight_spec"]),
                           spec_from_dict(spec["act_spec"]), split=int(spec["split"]),
                           name=str(spec.get("name", "")), init_weights=False)


def _describe_attention(m: AttentionQuantizers) -> dict[str, Any]:
    return {"qkv": m.q.spec.to_dict(), "sm_bits": m.softmax.bits, "name": m.qualname}


def _build_attention(_existing, spec, ctx: RebuildContext) -> nn.Module:
    mq = attach_attention_quantizers(ctx.parent, spec_from_dict(spec["qkv"]), spec["sm_bits"],
                                     str(spec.get("name", "")))
    if isinstance(mq, str):
        raise ValueError(mq)
    return mq


for _cls in (UniformQuantizer, TimestepActQuantizer):
    register_module_class(_cls, describe=_describe_quantizer, build=_quantizer_builder(_cls))
for _cls in (QuantLinear, QuantConv2d):
    register_module_class(_cls, describe=describe_quant_layer,
                          build=lambda e, s, _c, _k=_cls: build_quant_layer(_k, e, s))
register_module_class(AttentionQuantizers, describe=_describe_attention, build=_build_attention)
