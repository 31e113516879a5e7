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
"""

from __future__ import annotations

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


class QuantModuleMixin:
    """Shared quantization logic of :class:`QuantLinear` and :class:`QuantConv2d`."""

    channel_axis: int  # of the input activation
    split: int
    weight_spec: QuantSpec
    act_spec: QuantSpec

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
        parts = [q(p) for q, p in zip(self.weight_quantizers(), self.weight_parts(), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

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
