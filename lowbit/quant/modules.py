"""Quantized Linear/Conv2d that *are* their float modules (optimum-quanto style).

``QuantLinear(QuantModuleMixin, nn.Linear)`` keeps ``weight``/``bias`` under their original names
(so ``state_dict`` keys are unchanged) and adds quantizer submodules:

- ``weight_quantizer`` and ``input_quantizer`` (input activation);
- with a split point (Q-Diffusion shortcut splitting, layers that consume ``cat([h, skip])``):
  ``weight_quantizer_skip`` and ``input_quantizer_skip`` for the second (skip) half of the input
  channels, so each half gets its own activation range and weight grid.

Methods ask for parameters by role with :meth:`QuantModuleMixin.quant_params` instead of reaching
into quantizers.

Adapter slot. A method may attach one adapter module to a quantized layer with
:meth:`QuantModuleMixin.set_adapter` (a registered submodule named ``lora``, so its parameters are
``<layer>.lora.*`` in the ``state_dict``) instead of changing the layer's class. The adapter says
what it adapts with its class attribute ``adapts``:

- ``"weight"``: ``delta()`` returns an update shaped like the weight; the weight quantizer sees
  ``W₀ + delta()`` (:meth:`effective_weight`; EfficientDM's QALoRA, mergeable into W₀);
- ``"output"``: ``adapter(x)`` is added to the layer's output (a side branch, IR-QLoRA's LoRA).

Weight cache. In eval mode, when no gradient is needed, :meth:`QuantModuleMixin.quantized_weight`
quantizes the weight once and reuses it while nothing it depends on has changed: sampling runs the
same quantized weight at every step of every sample. The cache is keyed on a stamp of that state:
the identity, ``_version`` counter and storage of every tensor involved (the weight, the weight
quantizers' and the weight adapter's parameters and buffers — in-place optimizer updates,
``load_state_dict``, calibration and ``copy_`` under ``no_grad`` all bump ``_version``; ``.to()``
and assignment replace the tensor), the plain attributes of the quantizers and the adapter
(``enabled``, bits, stage …), and whether inference mode is on. ``train()``, ``load_state_dict``,
``.to()`` and ``set_adapter`` also drop it explicitly. A quantizer whose output may change with equal
state is never cached: one with an observer, a custom rounding (AdaRound), a timestep, forward
hooks, or ``cacheable = False``. Writes through ``.data`` bypass ``_version``: after one, call
:meth:`QuantModuleMixin.clear_weight_cache` (or write with ``torch.no_grad()`` and ``copy_``).
:func:`set_weight_cache_` switches the cache off (e.g. to compare against the uncached path).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantSpec
from .quantizers import UniformQuantizer

ROLES = ("weight", "bias", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point")
ADAPTER_ATTR = "lora"  # submodule name of the adapter slot: state_dict keys <layer>.lora.*
ADAPTS = ("weight", "output")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; allowed: {', '.join(ROLES)}.")


# ------------------------------------------------------------------------------------------------
# weight cache
# ------------------------------------------------------------------------------------------------
_PLAIN = (bool, int, float, str, type(None))


def _plain_state(module: nn.Module) -> tuple:
    """``module``'s attributes that are plain values (bools, numbers, strings, tuples of them,
    frozen dataclasses such as a ``QuantSpec``): the state of a quantizer or an adapter that is not
    a tensor (``enabled``, bits, grid, a LoRA's scaling)."""
    out = []
    for k, v in vars(module).items():
        if isinstance(v, _PLAIN) or (
                isinstance(v, tuple) and all(isinstance(e, _PLAIN) for e in v)) or (
                dataclasses.is_dataclass(v) and not isinstance(v, type)
                and type(v).__dataclass_params__.frozen):
            out.append((k, v))
    return tuple(out)


def _uncacheable(q: nn.Module) -> bool:
    """Whether ``q``'s output may differ between calls with equal tensors and attributes."""
    return (getattr(q, "observer", None) is not None  # calibration sees every call
            or getattr(q, "_rounding", None) is not None  # AdaRound: state outside the module
            or getattr(q, "timestep_aware", False)  # changes with the denoising step
            or not getattr(q, "cacheable", True)
            or bool(q._forward_hooks) or bool(q._forward_pre_hooks))


def _tensors(module: nn.Module, out: list[Tensor]) -> None:
    """Parameters and buffers of ``module`` and its submodules, appended to ``out``."""
    out.extend(t for t in module._parameters.values() if t is not None)
    out.extend(t for t in module._buffers.values() if t is not None)
    for child in module._modules.values():
        if child is not None:
            _tensors(child, out)


class WeightCache:
    """One layer's quantized weight and the stamp of the state it was computed from.

    ``refs`` hold weak references to the objects it was computed from, so a replaced weight or
    quantizer never matches even if Python reuses its id; a copy (``deepcopy``) or a pickle of a
    layer starts with an empty cache.
    """

    __slots__ = ("refs", "stamp", "value", "hits")

    def __init__(self) -> None:
        self.hits = 0
        self.clear()

    def clear(self) -> None:
        self.refs: tuple = ()
        self.stamp: tuple | None = None
        self.value: Tensor | None = None

    def lookup(self, objs: list, stamp: tuple) -> Tensor | None:
        if self.value is None or stamp != self.stamp or len(objs) != len(self.refs):
            return None
        if any(r() is not o for r, o in zip(self.refs, objs, strict=True)):
            return None
        self.hits += 1
        return self.value

    def store(self, objs: list, stamp: tuple, value: Tensor) -> None:
        self.refs = tuple(weakref.ref(o) for o in objs)
        self.stamp, self.value = stamp, value

    def __deepcopy__(self, memo: dict) -> WeightCache:
        return WeightCache()

    def __reduce__(self) -> tuple:
        return WeightCache, ()


def set_weight_cache_(model: nn.Module, enabled: bool) -> int:
    """Switch the eval-mode weight cache of every quantized layer of ``model`` on or off (off also
    frees the cached weights); returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantModuleMixin):
            m.weight_cache = bool(enabled)
            m.clear_weight_cache()
            n += 1
    return n


class QuantModuleMixin:
    """Shared quantization logic of :class:`QuantLinear` and :class:`QuantConv2d`."""

    channel_axis: int  # of the input activation
    split: int
    weight_spec: QuantSpec
    act_spec: QuantSpec
    weight_cache: bool = True  # reuse the quantized weight in eval mode (module doc)

    def _setup_quantizers(self, weight_spec: QuantSpec, act_spec: QuantSpec, split: int,
                          name: str, init_weights: bool = True) -> None:
        w = self.weight
        self.split = int(split)
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.qualname = name
        c_in = w.shape[1] * getattr(self, "groups", 1)
        if self.split:
            if not 0 < self.split < w.shape[1] or getattr(self, "groups", 1) != 1:
                raise ValueError(f"{name}: split point {split} invalid for weight {tuple(w.shape)}.")
            head, tail = w[:, : self.split], w[:, self.split :]
            self.weight_quantizer = UniformQuantizer.for_weight(weight_spec, head.shape,
                                                                f"{name}.weight")
            self.weight_quantizer_skip = UniformQuantizer.for_weight(weight_spec, tail.shape,
                                                                     f"{name}.weight[skip]")
            self.input_quantizer = UniformQuantizer.for_act(act_spec, self.split, self.channel_axis,
                                                            f"{name}.input")
            self.input_quantizer_skip = UniformQuantizer.for_act(
                act_spec, c_in - self.split, self.channel_axis, f"{name}.input[skip]")
        else:
            self.weight_quantizer = UniformQuantizer.for_weight(weight_spec, w.shape,
                                                                f"{name}.weight")
            self.input_quantizer = UniformQuantizer.for_act(act_spec, c_in, self.channel_axis,
                                                            f"{name}.input")
        self.to(w.device)  # quantizer state lives with the weight
        if init_weights:
            self.init_weight_quantizers()

    # -- quantizers --------------------------------------------------------------------------------
    def weight_quantizers(self) -> list[UniformQuantizer]:
        qs = [self.weight_quantizer]
        return qs + [self.weight_quantizer_skip] if self.split else qs

    def act_quantizers(self) -> list[UniformQuantizer]:
        qs = [self.input_quantizer]
        return qs + [self.input_quantizer_skip] if self.split else qs

    def quantizers(self) -> Iterator[UniformQuantizer]:
        yield from self.weight_quantizers()
        yield from self.act_quantizers()

    def weight_parts(self) -> list[Tensor]:
        """The weight as the pieces the weight quantizers see (two halves when split)."""
        w = self.effective_weight()
        return [w[:, : self.split], w[:, self.split :]] if self.split else [w]

    @torch.no_grad()
    def init_weight_quantizers(self) -> None:
        for q, part in zip(self.weight_quantizers(), self.weight_parts(), strict=True):
            q.init_from_tensor(part)

    # -- roles -------------------------------------------------------------------------------------
    def quant_params(self, role: str) -> list[nn.Parameter]:
        """Parameters by role: weight, bias, weight_scale, weight_zero_point, act_scale,
        act_zero_point."""
        check_role(role)
        if role == "weight":
            return [self.weight]
        if role == "bias":
            return [] if self.bias is None else [self.bias]
        qs = self.weight_quantizers() if role.startswith("weight_") else self.act_quantizers()
        key = "scale" if role.endswith("scale") else "zero_point"
        return [p for q in qs for p in q.params_by_role()[key]]

    # -- adapter slot ------------------------------------------------------------------------------
    @property
    def adapter(self) -> nn.Module | None:
        """The attached adapter (``<layer>.lora``), or None."""
        return self._modules.get(ADAPTER_ATTR)

    def set_adapter(self, adapter: nn.Module | None) -> None:
        """Attach ``adapter`` (its ``adapts``: ``"weight"`` or ``"output"``), or remove it."""
        self.clear_weight_cache()
        if adapter is None:
            self._modules.pop(ADAPTER_ATTR, None)
            return
        adapts = getattr(adapter, "adapts", None)
        if adapts not in ADAPTS:
            raise ValueError(f"{getattr(self, 'qualname', '') or type(self).__name__}: adapter "
                             f"{type(adapter).__name__} must say what it adapts with a class "
                             f"attribute adapts = 'weight' or 'output', got {adapts!r}.")
        setattr(self, ADAPTER_ATTR, adapter)

    def _adapter_for(self, target: str) -> nn.Module | None:
        a = self._modules.get(ADAPTER_ATTR)
        return a if a is not None and a.adapts == target else None

    def add_output_adapter(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` plus the output adapter's side branch on the layer input ``x`` (if any)."""
        a = self._adapter_for("output")
        return y if a is None else y + a(x)

    # -- forward -----------------------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        """The float weight the weight quantizer sees: ``W₀``, or ``W₀ + delta()`` with a weight
        adapter attached (EfficientDM's QALoRA merges B·A before quantization)."""
        a = self._adapter_for("weight")
        if a is None:
            return self.weight
        return self.weight + a.delta().to(self.weight.dtype)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight; reused from the weight cache when that is valid (module
        doc), computed otherwise."""
        if not self.weight_cache or self.training or self.weight.device.type == "meta" \
                or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._quantize_weight()
        objs, stamp = self._weight_stamp()
        if stamp is None:
            return self._quantize_weight()
        cache = self.__dict__.get("_weight_cache")
        if cache is None:
            cache = self.__dict__["_weight_cache"] = WeightCache()
        w = cache.lookup(objs, stamp)
        if w is None:
            w = self._quantize_weight()
            cache.store(objs, stamp, w)
        return w

    def _quantize_weight(self) -> Tensor:
        parts = [q(p) for q, p in zip(self.weight_quantizers(), self.weight_parts(), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _weight_stamp(self) -> tuple[list, tuple | None]:
        """The objects the quantized weight depends on and a stamp of their state; stamp None
        when the result must not be cached (a gradient is needed, or a quantizer is not
        cacheable)."""
        qs = self.weight_quantizers()
        adapter = self._adapter_for("weight")
        mods = qs if adapter is None else [*qs, adapter]
        if any(_uncacheable(m) for m in mods):
            return [], None
        tensors = [self.weight]
        for m in mods:
            _tensors(m, tensors)
        grad = torch.is_grad_enabled()
        versions = []
        for t in tensors:
            if (grad and t.requires_grad) or t.is_inference():
                # the weight's autograd graph is needed, or the tensor has no version counter
                return [], None
            versions.append((t._version, t.data_ptr()))
        stamp = (torch.is_inference_mode_enabled(), adapter is None, tuple(versions),
                 tuple(_plain_state(m) for m in mods))
        return [*mods, *tensors], stamp

    def clear_weight_cache(self) -> None:
        """Drop the cached quantized weight (needed only after writes through ``.data``)."""
        cache = self.__dict__.get("_weight_cache")
        if cache is not None:
            cache.clear()

    def train(self, mode: bool = True):
        if mode:
            self.clear_weight_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.clear_weight_cache()  # a cached weight would stay on the old device / dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_weight_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def quantize_input(self, x: Tensor) -> Tensor:
        if not self.split:
            return self.input_quantizer(x)
        axis = self.channel_axis % x.dim()
        head = self.input_quantizer(x.narrow(axis, 0, self.split))
        tail = self.input_quantizer_skip(x.narrow(axis, self.split, x.shape[axis] - self.split))
        return torch.cat([head, tail], dim=axis)


class QuantLinear(QuantModuleMixin, nn.Linear):
    """``nn.Linear`` with weight and input-activation quantizers (input channel axis = -1)."""

    channel_axis = -1

    @classmethod
    def from_module(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec,
                    split: int = 0, name: str = "", init_weights: bool = True) -> QuantLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device="meta", dtype=module.weight.dtype)
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        new._setup_quantizers(weight_spec, act_spec, split, name, init_weights)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        return self.add_output_adapter(x, y)


class QuantConv2d(QuantModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` with weight and input-activation quantizers (input channel axis = 1)."""

    channel_axis = 1

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec,
                    split: int = 0, name: str = "", init_weights: bool = True) -> QuantConv2d:
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=module.bias is not None,
                  padding_mode=module.padding_mode, device="meta", dtype=module.weight.dtype)
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        new._setup_quantizers(weight_spec, act_spec, split, name, init_weights)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        return self.add_output_adapter(x, y)


def _lora_compatible_types() -> dict[type, type]:
    """diffusers' deprecated LoRACompatible{Linear,Conv} (still present in 0.42), if any."""
    try:
        from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear
    except ImportError:  # removed in a later diffusers
        return {}
    return {LoRACompatibleLinear: QuantLinear, LoRACompatibleConv: QuantConv2d}


QUANT_MODULE_TYPES: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d,
                                        **_lora_compatible_types()}
# Conv/linear-like layers lowbit does not quantize (reported as kept FP)
UNSUPPORTED_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d,
                                       nn.ConvTranspose2d, nn.ConvTranspose3d)


def quant_class_for(module: nn.Module) -> tuple[type | None, str]:
    """The quantized class for ``module`` (exact type match) or ``None`` and the reason."""
    klass = QUANT_MODULE_TYPES.get(type(module))
    if klass is None:
        return None, f"unsupported layer type {type(module).__name__}"
    if getattr(module, "lora_layer", None) is not None:
        return None, "LoRACompatible layer with a LoRA attached: fuse the LoRA first"
    return klass, ""
