"""``quantize_``: swap a model's Linear/Conv2d and attention matmuls for quantized ones, in place.

One verb (torchao style). The same code handles diffusers ``UNet2DModel``,
``UNet2DConditionModel`` and ``DiTTransformer2DModel``: what differs between them is expressed by
the name rules of :class:`QuantConfig`, plus one structural fact read from diffusers' U-Net layout
(which up-block convs consume ``cat([h, skip])``, for shortcut splitting).

Timestep awareness: a forward pre-hook on the top-level model reads its ``timestep`` argument and
hands it to every :class:`TimestepActQuantizer` — no sampler edits and no call counters, so it
works unchanged inside diffusers pipelines and scheduler loops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from .attention import AttentionQuantizers, attach_attention_quantizers
from .config import QuantConfig, QuantSpec
from .modules import UNSUPPORTED_TYPES, QuantModuleMixin, check_role, quant_class_for
from .quantizers import TimestepActQuantizer, UniformQuantizer
from .size import model_size

FilterFn = Callable[[nn.Module, str], bool]
HOOK_ATTR = "_lowbit_timestep_hook"


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """One quantized module."""

    name: str
    kind: str  # linear | conv | attention
    weight_bits: int | None
    act_bits: int | None
    weight_granularity: str | None = None
    act_granularity: str | None = None
    sm_bits: int | None = None  # attention only
    split: int = 0  # channel index of the [h | skip] split (0 = none)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class FPRecord:
    """One module left in floating point, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class QuantReport:
    """What :func:`quantize_` did. ``to_dict()`` is JSON-able."""

    config: dict[str, Any]
    model: str = ""
    quantized: list[LayerRecord] = field(default_factory=list)
    kept_fp: list[FPRecord] = field(default_factory=list)
    size: dict[str, Any] = field(default_factory=dict)
    timestep_hook: bool = False

    @property
    def counts(self) -> dict[str, int]:
        by_kind = {k: sum(r.kind == k for r in self.quantized) for k in ("linear", "conv", "attention")}
        qk = sum(r.kind == "attention" and r.act_bits is not None for r in self.quantized)
        pv = sum(r.kind == "attention" and r.act_bits is not None and r.sm_bits is not None
                 for r in self.quantized)
        return {**by_kind, "attention_qk": qk, "attention_pv": pv, "attention_matmul": qk + pv,
                "split": sum(r.split > 0 for r in self.quantized), "kept_fp": len(self.kept_fp)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config": self.config, "counts": self.counts,
                "size": self.size, "timestep_hook": self.timestep_hook,
                "quantized": [dataclasses.asdict(r) for r in self.quantized],
                "kept_fp": [dataclasses.asdict(r) for r in self.kept_fp]}

    def summary(self) -> str:
        c = self.counts
        lines = [f"{self.model}: {c['linear']} linear, {c['conv']} conv, "
                 f"{c['attention_matmul']} attention matmuls quantized; {c['kept_fp']} kept FP"]
        lines += [f"  FP  {r.name} ({r.kind}): {r.reason}" for r in self.kept_fp]
        if self.size:
            lines.append(f"  size {self.size['total_mb']:.2f} MB (FP {self.size['fp_mb']:.2f} MB, "
                         f"{self.size['compression']:.2f}x)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# timestep hook
# ------------------------------------------------------------------------------------------------
def timestep_aware_quantizers(model: nn.Module) -> list[TimestepActQuantizer]:
    return [m for m in model.modules() if isinstance(m, TimestepActQuantizer) and not m.passthrough]


def single_timestep(t: Any) -> Tensor | None:
    """The one timestep of a forward call (shape [] or [B] with equal entries)."""
    if t is None:
        return None
    t = torch.as_tensor(t)
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return None
    if flat.numel() > 1 and not bool((flat == flat[0]).all()):
        raise ValueError(
            f"this batch holds different timesteps ({flat.unique().tolist()[:8]} …) but the model "
            f"has timestep-aware activation quantizers, which need one timestep per forward call: "
            f"split the batch by timestep (calibration batches must each hold one timestep)."
        )
    return flat[0]


class TimestepHook:
    """Forward pre-hook (``with_kwargs=True``) for the top-level denoiser: reads ``timestep``
    (keyword, or positional argument 1) and sets it on every timestep-aware quantizer."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        qs = timestep_aware_quantizers(module)
        if not qs:
            return None
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        t = single_timestep(t)
        if t is None:
            raise ValueError(
                f"{type(module).__name__} was called without a `timestep` (keyword or second "
                f"positional argument) but has {len(qs)} timestep-aware activation quantizers; "
                f"pass the timestep (each calibration batch needs one)."
            )
        for q in qs:
            q.set_timestep(t)
        return None


def register_timestep_hook(model: nn.Module) -> None:
    """Install the timestep pre-hook on ``model`` (idempotent)."""
    if getattr(model, HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(TimestepHook(), with_kwargs=True)
        object.__setattr__(model, HOOK_ATTR, handle)


def remove_timestep_hook(model: nn.Module) -> None:
    handle = getattr(model, HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        object.__setattr__(model, HOOK_ATTR, None)


def set_timestep(model: nn.Module, t: Tensor | float | None) -> None:
    """Set the timestep by hand (for calling submodules directly, e.g. block reconstruction)."""
    t = single_timestep(t)
    for q in timestep_aware_quantizers(model):
        q.set_timestep(t)


# ------------------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------------------
def concat_split_points(model: nn.Module) -> dict[str, int]:
    """Shortcut splitting: ``{conv name: channels of h}`` for the up-block resnet convs
    (``conv1``, ``conv_shortcut``) whose input is ``cat([h, skip], dim=1)`` in a diffusers U-Net.
    Q-Diffusion splits the skip conv's input only; :func:`quantize_` splits ``conv1`` too under
    ``split_conv1``.

    h comes from the mid block (first up block) or the previous resnet, so its width is that
    module's ``out_channels``; the rest of ``in_channels`` is the skip.
    """
    out: dict[str, int] = {}
    for prefix, unet in model.named_modules():
        up = getattr(unet, "up_blocks", None)
        if not isinstance(up, nn.ModuleList):
            continue
        mid = getattr(unet, "mid_block", None)
        if mid is not None and getattr(mid, "resnets", None):
            prev = mid.resnets[-1].out_channels
        else:  # no mid block: the up path starts from the last down block's width
            widths = getattr(getattr(unet, "config", None), "block_out_channels", None)
            if not widths:
                continue
            prev = widths[-1]
        pre = f"{prefix}." if prefix else ""
        for i, block in enumerate(up):
            resnets = getattr(block, "resnets", None)
            if not resnets:
                continue
            for j, resnet in enumerate(resnets):
                h = prev if j == 0 else resnets[j - 1].out_channels
                if getattr(resnet, "in_channels", 0) > h:
                    for child in ("conv1", "conv_shortcut"):
                        if isinstance(getattr(resnet, child, None), nn.Conv2d):
                            out[f"{pre}up_blocks.{i}.resnets.{j}.{child}"] = h
            prev = resnets[-1].out_channels
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _granularity(spec: QuantSpec) -> str | None:
    return spec.granularity if spec.enabled else None


# ------------------------------------------------------------------------------------------------
# quantize_
# ------------------------------------------------------------------------------------------------
def as_config(config: QuantConfig | Mapping[str, Any]) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(dict(config))
    raise TypeError(f"config must be a QuantConfig or a dict (a `bits` config), got {type(config)}")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantModuleMixin | AttentionQuantizers) for m in model.modules())


def quantize_(model: nn.Module, config: QuantConfig | Mapping[str, Any], *,
              filter_fn: FilterFn | None = None, init_weights: bool = True, fp_bits: int = 32,
              scale_bits: int = 32) -> QuantReport:
    """Quantize ``model`` in place; returns what was wrapped with which bits and what stayed FP.

    Linear/Conv2d become :class:`QuantLinear`/:class:`QuantConv2d` (same parameters and state_dict
    keys plus quantizer state); attention modules with a stock processor get Q/K/V/softmax
    quantizers and :class:`QuantAttnProcessor`. Weight quantizers are initialised from the weights
    now (``init_weights=False`` skips that when a quantized checkpoint will be loaded next);
    static activation quantizers need :func:`calibrate_`. ``filter_fn(module, name)`` → False
    keeps a layer FP. ``fp_bits``/``scale_bits`` are for the size report. ``bits=fp`` (nothing to
    quantize) leaves the model untouched.
    """
    config = as_config(config)
    report = QuantReport(config=config.to_dict(), model=type(model).__name__)
    if config.is_fp:
        report.size = model_size(model, fp_bits, scale_bits).to_dict()
        return report
    if is_quantized(model):
        raise ValueError(f"{type(model).__name__} is already quantized; quantize a fresh FP copy.")
    splits = {n: h for n, h in concat_split_points(model).items()
              if (config.split_shortcut and n.endswith(".conv_shortcut"))
              or (config.split_conv1 and n.endswith(".conv1"))}
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            _quantize_attention(module, name, config, filter_fn, report)
        elif isinstance(module, (nn.Linear, nn.Conv2d, *UNSUPPORTED_TYPES)):
            new = _quantize_layer(module, name, config, filter_fn, splits.get(name, 0), report,
                                  init_weights)
            if new is not None:
                _set_submodule(model, name, new)
    if timestep_aware_quantizers(model):
        register_timestep_hook(model)
        report.timestep_hook = True
    report.size = model_size(model, fp_bits, scale_bits).to_dict()
    return report


def _quantize_layer(module: nn.Module, name: str, config: QuantConfig, filter_fn: FilterFn | None,
                    split: int, report: QuantReport, init_weights: bool = True
                    ) -> nn.Module | None:
    kind = "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"
    klass, why = quant_class_for(module)
    if klass is None:
        report.kept_fp.append(FPRecord(name, kind, why))
        return None
    if filter_fn is not None and not filter_fn(module, name):
        report.kept_fp.append(FPRecord(name, kind, "filter_fn"))
        return None
    plan = config.plan(name, kind)
    if not plan.quantized:
        report.kept_fp.append(FPRecord(name, kind, plan.fp_reason))
        return None
    new = klass.from_module(module, plan.weight, plan.act, split=split, name=name,
                            init_weights=init_weights)
    notes = sorted({q.note for q in new.quantizers() if q.note})
    report.quantized.append(LayerRecord(
        name, kind, plan.weight.bits if plan.weight.enabled else None,
        plan.act.bits if plan.act.enabled else None, _granularity(plan.weight),
        _granularity(plan.act), split=split, reasons=list(plan.reasons), notes=notes))
    return new


def _quantize_attention(attn: Attention, name: str, config: QuantConfig,
                        filter_fn: FilterFn | None, report: QuantReport) -> None:
    if filter_fn is not None and not filter_fn(attn, name):
        report.kept_fp.append(FPRecord(name, "attention", "filter_fn"))
        return
    plan = config.plan(name, "attention")
    if not plan.quantized:
        report.kept_fp.append(FPRecord(name, "attention", plan.fp_reason))
        return
    sm_bits = plan.sm_bits if plan.sm_bits not in (None, 16, 32) else None
    mq = attach_attention_quantizers(attn, plan.act, sm_bits, name)
    if isinstance(mq, str):
        report.kept_fp.append(FPRecord(name, "attention", mq))
        return
    report.quantized.append(LayerRecord(name, "attention", None, plan.act.bits,
                                        act_granularity=plan.act.granularity, sm_bits=sm_bits,
                                        reasons=list(plan.reasons)))


# ------------------------------------------------------------------------------------------------
# helpers for calibration and methods
# ------------------------------------------------------------------------------------------------
def named_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantizer):
            yield name, m


def weight_quantizers(model: nn.Module) -> list[UniformQuantizer]:
    return [q for m in model.modules() if isinstance(m, QuantModuleMixin)
            for q in m.weight_quantizers()]


def act_quantizers(model: nn.Module) -> list[UniformQuantizer]:
    out: list[UniformQuantizer] = []
    for m in model.modules():
        if isinstance(m, QuantModuleMixin):
            out += m.act_quantizers()
        elif isinstance(m, AttentionQuantizers):
            out += m.quantizers()
    return out


def set_quant_state_(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Switch weight and/or activation quantization on or off (``None`` leaves it as it is)."""
    if weight is not None:
        for q in weight_quantizers(model):
            q.enabled = weight
    if act is not None:
        for q in act_quantizers(model):
            q.enabled = act


@contextlib.contextmanager
def quant_disabled(model: nn.Module, weight: bool = True, act: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` in FP (or with only one kind disabled) inside the block, then restore."""
    qs = (weight_quantizers(model) if weight else []) + (act_quantizers(model) if act else [])
    before = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield model
    finally:
        for q, e in zip(qs, before, strict=True):
            q.enabled = e


def quant_params(model: nn.Module, role: str, pattern: str = "*") -> list[tuple[str, nn.Parameter]]:
    """``(module name, parameter)`` for every quantized module matching ``pattern`` (fnmatch),
    by role: weight, bias, weight_scale, weight_zero_point, act_scale, act_zero_point."""
    check_role(role)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantModuleMixin | AttentionQuantizers) and fnmatch.fnmatchcase(name, pattern):
            out += [(name, p) for p in m.quant_params(role)]
    return out
