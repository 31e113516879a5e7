"""Binarizers (1-bit quantizers) and binary Conv/Linear layers for BinaryDM, BiDM and baselines.

Maths (functions):

- ``sign_clip_ste``: ``sign(x)`` forward (``sign(0) = +1`` so every code is ±1), straight-through
  gradient clipped to ``|x| ≤ 1`` (BNN/XNOR-Net; BinaryDM's weight STE).
- ``sign_quad_ste``: ``sign(x)`` forward, the piecewise-quadratic ApproxSign gradient of Bi-Real Net
  (``2 − 2|x|`` on ``|x| < 1``, 0 elsewhere), used by ReActNet's RSign and BiDM's activations.

State (modules). Binarizers follow the protocol of :class:`~lowbit.quant.UniformQuantizer` that the
whole-model passes rely on (``bits``, ``enabled``, ``passthrough``, ``dynamic``, ``is_initialized``,
``params_by_role``, ``set_learnable``, ``init_from_tensor``), so ``quant_disabled``,
``calibrate_`` (which skips them: they need no calibration), ``quant_params`` and ``model_size``
treat them like any quantizer:

- :class:`SignWeightBinarizer` — ``α·sign(w)`` per output channel; ``α`` learnable (BinaryDM's plain
  binarizer σ₁·sign(w)) or recomputed as mean|w| every forward (XNOR-Net).
- :class:`EBBWeightBinarizer` — BinaryDM's Evolvable-Basis Binarizer with its σ₂ regulariser and
  stage switch.
- :class:`ActBinarizer` — ``sign(x + t_c)``, ``t_c`` an optional learnable per-channel threshold
  (ReActNet RSign / BiDM), clipped or quadratic STE.

Layers. :class:`BinaryConv2d` / :class:`BinaryLinear` are :class:`QuantConv2d` / :class:`QuantLinear`
(same parameter names) with binarizers in place of the weight (and optionally input) quantizers,
plus BiDM's optional learnable scaling ``K = k ∗ mean_c|x|`` and a real-valued shortcut.
:func:`binarize_` swaps every 1-bit layer of a ``quantize_``-d model for one of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantModuleMixin
from .qmap import build_quant_layer, describe_quant_layer, register_module_class

WEIGHT_KINDS = ("xnor", "sign", "ebb")
ACT_KINDS = ("keep", "sign", "rsign")
SHORTCUTS = ("none", "identity", "conv")


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
def _sign(x: Tensor) -> Tensor:
    # ±1 codes: sign(0) = +1 (torch.sign would give 0, a third level)
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


class _SignClipSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _SignQuadSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        # Bi-Real Net ApproxSign: F(x) = 2x + x² (x<0), 2x − x² (x≥0) on [−1, 1] → F' = 2 − 2|x|
        return g * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


def sign_clip_ste(x: Tensor) -> Tensor:
    """sign(x) with the clipped straight-through gradient 1{|x| ≤ 1}."""
    return _SignClipSTE.apply(x)


def sign_quad_ste(x: Tensor) -> Tensor:
    """sign(x) with the piecewise-quadratic (ApproxSign) gradient max(0, 2 − 2|x|)."""
    return _SignQuadSTE.apply(x)


def _per_channel_mean_abs(w: Tensor) -> Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).mean(dim=1)


def _channel_view(p: Tensor, ndim: int, axis: int = 0) -> Tensor:
    shape = [1] * ndim
    shape[axis] = p.numel()
    return p.reshape(shape)


# ------------------------------------------------------------------------------------------------
# binarizers
# ------------------------------------------------------------------------------------------------
class Binarizer(nn.Module):
    """Base: the quantizer protocol of ``UniformQuantizer`` for 1-bit codes.

    ``dynamic`` is True because nothing needs calibration (``calibrate_`` skips dynamic
    quantizers); ``enabled = False`` passes the input through (FP mode of ``quant_disabled``).
    """

    timestep_aware = False
    passthrough = False
    dynamic = True
    kind = "channel"
    note = ""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.enabled = True

    @property
    def bits(self) -> int:
        return 1

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def num_scales(self) -> int:
        return sum(p.numel() for ps in self.params_by_role().values() for p in ps)

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [], "zero_point": []}

    def set_learnable(self, scale: bool = True, zero_point: bool | None = None) -> None:
        for p in self.params_by_role()["scale"]:
            p.requires_grad_(scale)
        for p in self.params_by_role()["zero_point"]:
            p.requires_grad_(scale if zero_point is None else zero_point)

    def init_from_tensor(self, x: Tensor) -> None:  # noqa: B027 - stateless by default
        """Re-derive scales from a weight tensor (no-op for stateless binarizers)."""

    def forward(self, x: Tensor) -> Tensor:
        return x if not self.enabled else self.binarize(x)

    def binarize(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class SignWeightBinarizer(Binarizer):
    """``α·sign(w)`` per output channel, clipped STE.

    ``learnable=True``: α is a parameter initialised to mean|w| (BinaryDM's σ₁·sign(w) for the
    central blocks). ``learnable=False``: α = mean|w| recomputed from the current weight every
    forward (XNOR-Net; BiDM's α), with the gradient through α as in XNOR-Net.
    """

    def __init__(self, weight: Tensor, learnable: bool = True, name: str = "") -> None:
        super().__init__(name)
        self.learnable = learnable
        if learnable:
            self.alpha = nn.Parameter(_per_channel_mean_abs(weight))

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.alpha] if self.learnable else [], "zero_point": []}

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        if self.learnable:
            self.alpha.copy_(_per_channel_mean_abs(x))

    def binarize(self, w: Tensor) -> Tensor:
        alpha = self.alpha if self.learnable else w.abs().reshape(w.shape[0], -1).mean(dim=1)
        return _channel_view(alpha, w.dim()) * sign_clip_ste(w)

    def extra_repr(self) -> str:
        return "alpha=learnable" if self.learnable else "alpha=mean|w| (xnor)"


class EBBWeightBinarizer(Binarizer):
    """BinaryDM's Evolvable-Basis Binarizer (EBB), per output channel.

    Stage 1: ``w_b = σ₁·sign(w) + σ₂·sign(w − σ₁·sign(w))`` (two bases); stage 2 (after
    :meth:`switch_stage`): ``w_b = σ₁·sign(w)``. σ₁ = mean|w|, σ₂ = mean|w − σ₁ sign w| at init,
    both learnable. :meth:`regularizer` is ``mean|σ₂|`` — BinaryDM's τ·mean(σ₂) (τ applied by the
    method) written with |·| so that it drives σ₂ to 0 from either side, making the switch to one
    basis smooth. The stage is a buffer, so a checkpoint restores it.
    """

    def __init__(self, weight: Tensor, name: str = "") -> None:
        super().__init__(name)
        s1 = _per_channel_mean_abs(weight)
        self.sigma1 = nn.Parameter(s1)
        self.sigma2 = nn.Parameter(self._residual_scale(weight.detach(), s1))
        self.register_buffer("stage", torch.ones((), dtype=torch.long))

    @staticmethod
    def _residual_scale(w: Tensor, s1: Tensor) -> Tensor:
        r = w - _channel_view(s1, w.dim()) * _sign(w)
        return r.abs().reshape(w.shape[0], -1).mean(dim=1)

    @property
    def bits(self) -> int:
        return 2 if int(self.stage) == 1 else 1

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.sigma1, self.sigma2], "zero_point": []}

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        s1 = _per_channel_mean_abs(x)
        self.sigma1.copy_(s1)
        self.sigma2.copy_(self._residual_scale(x.detach(), s1))

    def regularizer(self) -> Tensor:
        if int(self.stage) != 1:
            return self.sigma2.new_zeros(())
        return self.sigma2.abs().mean()

    @torch.no_grad()
    def switch_stage(self) -> None:
        """Stage 2: one basis σ₁·sign(w) from now on (BinaryDM's evolution to pure binary)."""
        self.stage.fill_(2)
        self.sigma2.requires_grad_(False)

    def binarize(self, w: Tensor) -> Tensor:
        s1 = _channel_view(self.sigma1, w.dim())
        b1 = s1 * sign_clip_ste(w)  # BinaryDM Eq. (EBB), first basis
        if int(self.stage) != 1:
            return b1
        s2 = _channel_view(self.sigma2, w.dim())
        return b1 + s2 * sign_clip_ste(w - b1)  # second basis on the residual

    def extra_repr(self) -> str:
        return f"stage={int(self.stage)}"


class ActBinarizer(Binarizer):
    """``sign(x + t_c)`` for activations; ``t_c`` a learnable per-channel threshold (ReActNet
    RSign, BiDM) when ``threshold=True`` (init 0); ``ste``: ``clip`` (XNOR/BNN) or ``quad``
    (ApproxSign, ReActNet/BiDM). The threshold is applied in the forward pass (BiDM's reference
    ``BNNLinear`` ignored it — not copied)."""

    def __init__(self, channels: int, channel_axis: int, threshold: bool = False,
                 ste: str = "clip", name: str = "") -> None:
        super().__init__(name)
        if ste not in ("clip", "quad"):
            raise ValueError(f"ActBinarizer ste={ste!r}: choose clip or quad")
        self.channels, self.channel_axis = int(channels), channel_axis
        self.ste = ste
        self.threshold = nn.Parameter(torch.zeros(channels)) if threshold else None

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [], "zero_point": [] if self.threshold is None else [self.threshold]}

    def binarize(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x + _channel_view(self.threshold, x.dim(), self.channel_axis % x.dim())
        return sign_quad_ste(x) if self.ste == "quad" else sign_clip_ste(x)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold is not None}, ste={self.ste}"


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinarySpec:
    """How one 1-bit layer is binarized.

    weight: ``xnor`` (α = mean|w| recomputed), ``sign`` (learnable α), ``ebb`` (BinaryDM EBB).
    act: ``keep`` (the bits config's quantizer, e.g. 4-bit LSQ), ``sign`` (XNOR), ``rsign``
    (learnable threshold + quadratic STE). ``scaling``: BiDM/XNOR-Net ``K = k ∗ mean_c|x|`` with a
    learnable k×k filter (init 1/k²). ``shortcut``: real-valued ``s ⊙ P(x)`` added to the output,
    ``identity`` (P = parameter-free channel/stride map; s per channel, init ``shortcut_init``) or
    ``conv`` (P = a real 1×1 conv when the shapes differ, as in BiDM's description).
    """

    weight: str = "sign"
    act: str = "keep"
    scaling: bool = False
    shortcut: str = "none"
    shortcut_init: float = 0.3

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_KINDS:
            raise ValueError(f"weight binarizer {self.weight!r}: choose one of {WEIGHT_KINDS}")
        if self.act not in ACT_KINDS:
            raise ValueError(f"activation binarizer {self.act!r}: choose one of {ACT_KINDS}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut {self.shortcut!r}: choose one of {SHORTCUTS}")


def _make_weight_binarizer(kind: str, part: Tensor, name: str) -> Binarizer:
    if kind == "ebb":
        return EBBWeightBinarizer(part, name)
    return SignWeightBinarizer(part, learnable=kind == "sign", name=name)


def channel_map(x: Tensor, c_out: int, axis: int) -> Tensor:
    """Parameter-free map of ``x``'s channels to ``c_out``: mean over groups of channels when
    shrinking, repeat when growing (via the gcd when neither divides the other)."""
    c_in = x.shape[axis]
    if c_in == c_out:
        return x
    g = math.gcd(c_in, c_out)
    if g != c_in:  # shrink to g channels: mean of consecutive groups of c_in/g
        xm = x.movedim(axis, -1)
        x = xm.reshape(*xm.shape[:-1], g, c_in // g).mean(dim=-1).movedim(-1, axis)
    if g != c_out:
        x = x.repeat_interleave(c_out // g, dim=axis)
    return x


class _BinaryMixin:
    """Shared by :class:`BinaryConv2d` and :class:`BinaryLinear`."""

    binary_spec: BinarySpec

    def _binarize(self, spec: BinarySpec, name: str) -> None:
        self.binary_spec = spec
        parts = self.weight_parts()
        self.weight_quantizer = _make_weight_binarizer(spec.weight, parts[0], f"{name}.weight")
        if self.split:
            self.weight_quantizer_skip = _make_weight_binarizer(spec.weight, parts[1],
                                                                f"{name}.weight[skip]")
        if spec.act != "keep":
            threshold, ste = spec.act == "rsign", "quad" if spec.act == "rsign" else "clip"
            c_in = self.weight.shape[1] * getattr(self, "groups", 1)
            head = self.split or c_in
            self.input_quantizer = ActBinarizer(head, self.channel_axis, threshold, ste,
                                                f"{name}.input")
            if self.split:
                self.input_quantizer_skip = ActBinarizer(c_in - self.split, self.channel_axis,
                                                         threshold, ste, f"{name}.input[skip]")
        self.shortcut_scale = None
        self.shortcut_proj = None
        if spec.shortcut != "none":
            self.shortcut_scale = nn.Parameter(torch.full((self._out_dim(),), spec.shortcut_init,
                                                          device=self.weight.device))
            if spec.shortcut == "conv" and self._in_dim() != self._out_dim():
                self.shortcut_proj = self._make_proj()
        self.to(self.weight.device)

    def ebb_binarizers(self) -> list[EBBWeightBinarizer]:
        return [q for q in self.weight_quantizers() if isinstance(q, EBBWeightBinarizer)]

    @property
    def binary_active(self) -> bool:
        """The real-valued extras (scaling, shortcut) belong to the binary layer: with the
        quantizers disabled (``quant_disabled``) the layer is exactly its FP original."""
        return self.weight_quantizer.enabled


class BinaryConv2d(_BinaryMixin, QuantConv2d):
    """1-bit Conv2d: ``conv(x̂, ŵ) [⊙ K(x)] + b [+ s ⊙ P(x)]``."""

    @classmethod
    def from_quant(cls, m: QuantConv2d, spec: BinarySpec) -> BinaryConv2d:
        new = cls.from_module(m, m.weight_spec, m.act_spec, split=m.split, name=m.qualname,
                              init_weights=False)
        if spec.act == "keep":  # keep the (possibly calibrated) activation quantizers
            new.input_quantizer = m.input_quantizer
            if m.split:
                new.input_quantizer_skip = m.input_quantizer_skip
        new._binarize(spec, m.qualname)
        if spec.scaling:  # XNOR-Net K = A ∗ k, k learnable, init 1/k² (BiDM)
            kh, kw = new.kernel_size
            new.scale_filter = nn.Parameter(torch.full((1, 1, kh, kw), 1.0 / (kh * kw),
                                                       device=new.weight.device))
        else:
            new.scale_filter = None
        return new

    def _in_dim(self) -> int:
        return self.in_channels

    def _out_dim(self) -> int:
        return self.out_channels

    def _make_proj(self) -> nn.Conv2d:
        proj = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=False,
                         device=self.weight.device)
        with torch.no_grad():  # start as the parameter-free map, scaled by shortcut_init
            eye = torch.eye(self.in_channels, device=self.weight.device)[:, :, None, None]
            proj.weight.copy_(channel_map(eye, self.out_channels, 1).transpose(0, 1))
        return proj

    def scaling_map(self, x: Tensor) -> Tensor:
        """K = k ∗ mean_c|x| on the conv's output grid, [B, 1, H', W']."""
        a = x.abs().mean(dim=1, keepdim=True)
        return F.conv2d(a, self.scale_filter, None, self.stride, self.padding, self.dilation)

    def shortcut(self, x: Tensor, like: Tensor) -> Tensor:
        y = self.shortcut_proj(x) if self.shortcut_proj is not None else \
            channel_map(x, self.out_channels, 1)
        if y.shape[-2:] != like.shape[-2:]:  # strided conv: average over the stride window
            y = F.adaptive_avg_pool2d(y, like.shape[-2:])
        return _channel_view(self.shortcut_scale, y.dim(), 1) * y

    def extra_macs(self, x: Tensor, y: Tensor) -> float:
        """Real-valued MACs beyond the binary conv (per sample): the k×k scaling filter and a
        1×1 shortcut conv — the conv-like extras the OPs count includes."""
        hw = y.shape[-1] * y.shape[-2]
        macs = hw * self.scale_filter.numel() if self.scale_filter is not None else 0
        if self.shortcut_proj is not None:
            macs += x.shape[-1] * x.shape[-2] * self.in_channels * self.out_channels
        return float(macs)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), None)
        if self.scale_filter is not None and self.binary_active:
            y = y * self.scaling_map(x)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        if self.shortcut_scale is not None and self.binary_active:
            y = y + self.shortcut(x, y)
        return y


class BinaryLinear(_BinaryMixin, QuantLinear):
    """1-bit Linear: ``x̂ ŵᵀ [· k·mean|x|] + b [+ s ⊙ P(x)]``."""

    @classmethod
    def from_quant(cls, m: QuantLinear, spec: BinarySpec) -> BinaryLinear:
        new = cls.from_module(m, m.weight_spec, m.act_spec, split=m.split, name=m.qualname,
                              init_weights=False)
        if spec.act == "keep":
            new.input_quantizer = m.input_quantizer
            if m.split:
                new.input_quantizer_skip = m.input_quantizer_skip
        new._binarize(spec, m.qualname)
        # for a linear layer the k×k filter degenerates to one learnable factor (init 1)
        new.scale_filter = nn.Parameter(torch.ones((), device=new.weight.device)) \
            if spec.scaling else None
        return new

    def _in_dim(self) -> int:
        return self.in_features

    def _out_dim(self) -> int:
        return self.out_features

    def _make_proj(self) -> nn.Linear:
        proj = nn.Linear(self.in_features, self.out_features, bias=False,
                         device=self.weight.device)
        with torch.no_grad():
            eye = torch.eye(self.in_features, device=self.weight.device)
            proj.weight.copy_(channel_map(eye, self.out_features, -1).T)
        return proj

    def extra_macs(self, x: Tensor, y: Tensor) -> float:
        tokens = y.numel() / y.shape[-1] / y.shape[0]
        return float(tokens * self.in_features * self.out_features) \
            if self.shortcut_proj is not None else 0.0

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.quantize_input(x), self.quantized_weight(), None)
        if self.scale_filter is not None and self.binary_active:
            y = y * (self.scale_filter * x.abs().mean(dim=-1, keepdim=True))
        if self.bias is not None:
            y = y + self.bias
        if self.shortcut_scale is not None and self.binary_active:
            sc = self.shortcut_proj(x) if self.shortcut_proj is not None else \
                channel_map(x, self.out_features, -1)
            y = y + self.shortcut_scale * sc
        return y


BINARY_TYPES: dict[type, type] = {QuantConv2d: BinaryConv2d, QuantLinear: BinaryLinear}
SpecFn = Callable[[str, QuantModuleMixin], BinarySpec | None]


def binarize_(model: nn.Module, spec_for: SpecFn | BinarySpec) -> list[str]:
    """Swap every ``quantize_``-d layer whose weight bits are 1 for a binary layer, in place.

    ``spec_for(name, module)`` returns the :class:`BinarySpec` of that layer (or None to leave it
    as it is); a single spec applies to all. Returns the names of the binarized layers. Run it
    right after ``quantize_`` and before ``calibrate_`` (activation quantizers kept with
    ``act=keep`` are calibrated as usual; binarizers need no calibration).
    """
    fn = spec_for if callable(spec_for) else (lambda _n, _m: spec_for)
    done = []
    for name, m in list(model.named_modules()):
        klass = BINARY_TYPES.get(type(m))
        if klass is None or m.weight_quantizer.passthrough or m.weight_quantizer.bits != 1:
            continue
        spec = fn(name, m)
        if spec is None:
            continue
        new = klass.from_quant(m, spec)
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done.append(name)
    return done


def ebb_binarizers(model: nn.Module) -> list[EBBWeightBinarizer]:
    return [m for m in model.modules() if isinstance(m, EBBWeightBinarizer)]


# ------------------------------------------------------------------------------------------------
# quantization map (lowbit.quant.qmap): how each class is described and rebuilt
# ------------------------------------------------------------------------------------------------
def _enabled(q: Binarizer, spec: dict) -> Binarizer:
    q.enabled = bool(spec.get("enabled", True))
    return q


register_module_class(
    SignWeightBinarizer,
    describe=lambda q: {"out_channels": int(q.alpha.numel()) if q.learnable else 0,
                        "learnable": q.learnable, "name": q.name, "enabled": q.enabled},
    build=lambda _e, s, _c: _enabled(SignWeightBinarizer(
        torch.zeros(max(1, int(s["out_channels"])), 1), bool(s["learnable"]), str(s["name"])), s))
register_module_class(
    EBBWeightBinarizer,
    describe=lambda q: {"out_channels": int(q.sigma1.numel()), "name": q.name,
                        "enabled": q.enabled},
    build=lambda _e, s, _c: _enabled(EBBWeightBinarizer(
        torch.zeros(int(s["out_channels"]), 1), str(s["name"])), s))
register_module_class(
    ActBinarizer,
    describe=lambda q: {"channels": q.channels, "channel_axis": q.channel_axis,
                        "threshold": q.threshold is not None, "ste": q.ste, "name": q.name,
                        "enabled": q.enabled},
    build=lambda _e, s, _c: _enabled(ActBinarizer(
        int(s["channels"]), int(s["channel_axis"]), bool(s["threshold"]), str(s["ste"]),
        str(s["name"])), s))


def _describe_binary_layer(m: BinaryConv2d | BinaryLinear) -> dict:
    return {**describe_quant_layer(m), "binary": dataclasses.asdict(m.binary_spec)}


def _binary_builder(cls: type, base: type):
    def build(existing, spec, _ctx):
        q = build_quant_layer(base, existing, spec)
        new = cls.from_quant(q, BinarySpec(**spec["binary"]))
        new.train(q.training)
        return new
    return build


register_module_class(BinaryConv2d, describe=_describe_binary_layer,
                      build=_binary_builder(BinaryConv2d, QuantConv2d))
register_module_class(BinaryLinear, describe=_describe_binary_layer,
                      build=_binary_builder(BinaryLinear, QuantLinear))
