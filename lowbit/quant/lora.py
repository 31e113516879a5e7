"""LoRA adapters for the adapter slot of quantized layers (:meth:`QuantModuleMixin.set_adapter`).

- :class:`LoRAWeights` — a *weight* adapter: ``delta() = scaling · B·A`` shaped like the weight,
  so the weight quantizer sees ``W₀ + B·A`` (:meth:`QuantModuleMixin.effective_weight`) and the
  update merges into W₀ exactly (EfficientDM's QALoRA, Eq. 5).
- :class:`IECLoRA` — an *output* adapter: a LoRA side branch added to the layer's output,
  optionally with IR-QLoRA's Information Elastic Connection (parameter-free paths around A and B
  with learnable β₁, β₂); it cannot merge into a non-uniform base grid.

Both are registered for quantization maps here; which layers get one, at which rank and learning
rate, is the method's choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .channels import channel_map
from .qmap import register_module_class

__all__ = ["IECLoRA", "LoRAWeights"]


class LoRAWeights(nn.Module):
    """The low-rank update ``scaling · B·A`` of one layer's weight, as a tensor shaped like it: a
    *weight* adapter for the quantized layers' adapter slot (``layer.set_adapter``; parameters
    ``<layer>.lora.A`` / ``.B``), so the weight quantizer sees ``W₀ + B·A`` (EfficientDM Eq. 5).

    Linear ``[out, in]``: A ``[r, in]``, B ``[out, r]``. Conv ``[out, in, kh, kw]``: A is a k×k
    conv kernel ``[r, in, kh, kw]``, B a 1×1 conv ``[out, r, 1, 1]``; conv(conv(x, A), B) =
    conv(x, B·A) for a 1×1 B, so the update merges exactly. A: Kaiming-uniform, B: zero (the
    student starts as the PTQ model)."""

    adapts = "weight"

    def __init__(self, weight_shape: Sequence[int], rank: int, scaling: float = 1.0) -> None:
        super().__init__()
        out_f, in_f, *kernel = weight_shape
        self.rank, self.scaling = int(rank), float(scaling)
        a = torch.empty(self.rank, in_f, *kernel)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA / PEFT
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_f, self.rank, *([1] * len(kernel))))
        self.weight_shape = tuple(weight_shape)

    def delta(self) -> Tensor:
        return (self.B.flatten(1) @ self.A.flatten(1)).reshape(self.weight_shape) * self.scaling


class IECLoRA(nn.Module):
    """LoRA side branch with IR-QLoRA's Information Elastic Connection: an *output* adapter for
    the quantized layers' adapter slot (``layer.set_adapter``; parameters ``<layer>.lora.*``),
    added to the layer's output.

    ``z = A(x) + β₁·groupmean_r(x)``; ``out = B(z) + β₂·repeat(z)``; β₁ = β₂ = 0 and B = 0 at
    init (the student starts as the quantized base). Conv: A a k×k conv (stride/padding of the
    layer), B a 1×1 conv; the parameter-free paths are pooled to A's output grid."""

    adapts = "output"

    def __init__(self, layer: nn.Module, rank: int, scaling: float = 1.0, iec: bool = True
                 ) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        dev = layer.weight.device
        if self.is_conv:
            self.A = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride,
                               layer.padding, layer.dilation, bias=False, device=dev)
            self.B = nn.Conv2d(rank, layer.out_channels, 1, bias=False, device=dev)
            self.out_dim = layer.out_channels
        else:
            self.A = nn.Linear(layer.in_features, rank, bias=False, device=dev)
            self.B = nn.Linear(rank, layer.out_features, bias=False, device=dev)
            self.out_dim = layer.out_features
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.rank, self.scaling, self.iec = rank, scaling, iec
        self.beta1 = nn.Parameter(torch.zeros((), device=dev)) if iec else None
        self.beta2 = nn.Parameter(torch.zeros((), device=dev)) if iec else None

    def forward(self, x: Tensor) -> Tensor:
        axis = 1 if self.is_conv else -1
        z = self.A(x)
        if self.iec:  # IR-QLoRA IEC: parameter-free elastic paths around A and B
            g = channel_map(x, self.rank, axis)
            if self.is_conv and g.shape[-2:] != z.shape[-2:]:
                g = F.adaptive_avg_pool2d(g, z.shape[-2:])
            z = z + self.beta1 * g
        out = self.B(z)
        if self.iec:
            out = out + self.beta2 * channel_map(z, self.out_dim, axis)
        return self.scaling * out


# quantization map (lowbit.quant.qmap)
register_module_class(
    LoRAWeights,
    describe=lambda m: {"weight_shape": list(m.weight_shape), "rank": m.rank,
                        "scaling": m.scaling},
    build=lambda _e, s, _c: LoRAWeights(s["weight_shape"], int(s["rank"]), float(s["scaling"])))
register_module_class(
    IECLoRA,
    describe=lambda m: {"rank": m.rank, "scaling": m.scaling, "iec": m.iec},
    build=lambda _e, s, ctx: IECLoRA(ctx.parent, int(s["rank"]), float(s["scaling"]),
                                     bool(s["iec"])))
