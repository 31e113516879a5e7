"""Binarizers (1-bit quantizers), binary Conv/Linear layers, and the registries methods extend.

Maths (functions):

- ``sign_clip_ste``: ``sign(x)`` forward (``sign(0) = +1`` so every code is ±1), straight-through
  gradient clipped to ``|x| ≤ 1`` (BNN/XNOR-Net).
- ``sign_quad_ste``: ``sign(x)`` forward, the piecewise-quadratic ApproxSign gradient of Bi-Real Net
  (``2 − 2|x|`` on ``|x| < 1``, 0 elsewhere), used by ReActNet's RSign.

State (modules). Binarizers follow the protocol of :class:`~lowbit.quant.UniformQuantizer` that the
whole-model passes rely on (``bits``, ``enabled``, ``passthrough``, ``dynamic``, ``is_initialized``,
``params_by_role``, ``set_learnable``, ``init_from_tensor``), so ``quant_disabled``,
``calibrate_`` (which skips them: they need no calibration), ``quant_params`` and ``model_size``
treat them like any quantizer:

- :class:`SignWeightBinarizer` — ``α·sign(w)`` per output channel; ``α`` learnable, or recomputed
  as mean|w| every forward (XNOR-Net: gradient through α; ``detach=True``: α a constant).
- :class:`ActBinarizer` — ``sign(x + t_c)``, ``t_c`` an optional learnable per-channel threshold
  (ReActNet RSign), clipped or quadratic STE.
- :class:`XNORScaling` — XNOR-Net's activation scaling ``K = k ∗ mean_c|x|`` (k a k×k box filter
  1/k², fixed, or learnable from that init).

Layers. :class:`BinaryConv2d` / :class:`BinaryLinear` are :class:`QuantConv2d` / :class:`QuantLinear`
(same parameter names) with binarizers in place of the weight (and optionally input) quantizers:
``conv(x̂, ŵ) [⊙ K(x)] + b [+ shortcut(x)]``. :func:`binarize_` swaps every 1-bit layer of a
``quantize_``-d model for one of them, as a :class:`BinarySpec` says.

Registries. Weight binarizer kinds (``sign``, ``xnor`` here) and real-valued shortcut kinds
(``none`` here) are looked up by name: a method registers its own with
:func:`register_weight_binarizer` / :func:`register_shortcut` next to its definition, so this
module knows no method. A quantization map records which module registered the kinds a layer
uses and imports it before rebuilding the layer.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import QuantConv2d, QuantLinear, QuantModuleMixin
from .qmap import build_quant_layer, describe_quant_layer, register_module_class

ACT_KINDS = ("keep", "sign", "rsign")
SCALINGS = ("none", "xnor", "learned")


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
def _sign(x: Tensor) -> Tensor:
    # ±1 codes: sign(0) = sign(−0) = +1 (torch.sign alone would give 0, a third level), as
    # where(x < 0, −1, 1): sign(x) + ½ is −½, ½ or 3/2, whose sign is the code. Elementwise
    # arithmetic only: on CPU several times faster than the comparison and where.
    return torch.sign(x).add_(0.5).sign_()


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


def per_channel_mean_abs(w: Tensor) -> Tensor:
    """mean|w| per output channel (dim 0), detached: the initial α of ``α·sign(w)``."""
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

    ``learnable=True``: α is a parameter initialised to mean|w|. ``learnable=False``: α = mean|w|
    recomputed from the current weight every forward — with the gradient through α as in XNOR-Net,
    or, with ``detach=True``, as a constant (only the STE carries the weight's gradient).
    """

    def __init__(self, weight: Tensor, learnable: bool = True, name: str = "",
                 detach: bool = False) -> None:
        super().__init__(name)
        self.learnable = learnable
        self.detach = bool(detach) and not learnable
        if learnable:
            self.alpha = nn.Parameter(per_channel_mean_abs(weight))

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.alpha] if self.learnable else [], "zero_point": []}

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        if self.learnable:
            self.alpha.copy_(per_channel_mean_abs(x))

    def binarize(self, w: Tensor) -> Tensor:
        if self.learnable:
            alpha = self.alpha
        else:
            alpha = (w.detach() if self.detach else w).abs().reshape(w.shape[0], -1).mean(dim=1)
        return _channel_view(alpha, w.dim()) * sign_clip_ste(w)

    def extra_repr(self) -> str:
        if self.learnable:
            return "alpha=learnable"
        return "alpha=mean|w| (detached)" if self.detach else "alpha=mean|w| (xnor)"


class ActBinarizer(Binarizer):
    """``sign(x + t_c)`` for activations; ``t_c`` a learnable per-channel threshold (ReActNet
    RSign) when ``threshold=True`` (init 0); ``ste``: ``clip`` (XNOR/BNN) or ``quad``
    (ApproxSign, ReActNet). The threshold is applied in the forward pass."""

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
            if not torch.is_grad_enabled():  # sampling: the codes in place of the new sum
                return x.sign_().add_(0.5).sign_()
        return sign_quad_ste(x) if self.ste == "quad" else sign_clip_ste(x)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold is not None}, ste={self.ste}"


# ------------------------------------------------------------------------------------------------
# registries of kinds
# ------------------------------------------------------------------------------------------------
WeightBuild = Callable[[Tensor, str], Binarizer]
ShortcutBuild = Callable[["BinaryConv2d | BinaryLinear", "BinarySpec"], nn.Module]


@dataclass(frozen=True)
class _Kind:
    build: Callable
    module: str  # the python module that registered the kind (imported before a rebuild)


_WEIGHT_KINDS: dict[str, _Kind] = {}
_SHORTCUT_KINDS: dict[str, _Kind] = {}


def _register(table: dict[str, _Kind], what: str, kind: str, build: Callable) -> None:
    entry = _Kind(build, getattr(build, "__module__", "") or "")
    old = table.get(kind)
    if old is not None and old.module != entry.module:
        raise ValueError(f"{what} kind {kind!r} is already registered by {old.module}")
    table[kind] = entry


def register_weight_binarizer(kind: str, build: WeightBuild) -> None:
    """A weight binarizer kind for :class:`BinarySpec` ``weight=``: ``build(weight_part, name)``
    returns the :class:`Binarizer` of one weight (part)."""
    _register(_WEIGHT_KINDS, "weight binarizer", kind, build)


def register_shortcut(kind: str, build: ShortcutBuild) -> None:
    """A real-valued shortcut kind for :class:`BinarySpec` ``shortcut=``: ``build(layer, spec)``
    returns a module whose ``forward(x, y)`` is the term added to the binary layer's output
    ``y`` (and ``extra_macs(x, y)`` its real-valued MACs per sample)."""
    _register(_SHORTCUT_KINDS, "shortcut", kind, build)


def weight_kinds() -> tuple[str, ...]:
    return tuple(_WEIGHT_KINDS)


def shortcut_kinds() -> tuple[str, ...]:
    return ("none", *_SHORTCUT_KINDS)


register_weight_binarizer("sign", lambda w, name: SignWeightBinarizer(w, True, name))
register_weight_binarizer("xnor", lambda w, name: SignWeightBinarizer(w, False, name))


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinarySpec:
    """How one 1-bit layer is binarized.

    weight: a registered weight binarizer kind (``sign``: learnable α; ``xnor``: α = mean|w|
    recomputed; methods add theirs). act: ``keep`` (the bits config's quantizer, e.g. 4-bit LSQ),
    ``sign`` (XNOR), ``rsign`` (learnable threshold + quadratic STE). scaling: XNOR-Net's
    ``K = k ∗ mean_c|x|`` — ``none``, ``xnor`` (k the fixed k×k box filter 1/k²) or ``learned``
    (k learnable, init 1/k²). shortcut: a registered real-valued shortcut kind (``none`` here),
    ``shortcut_init`` its initial scale.
    """

    weight: str = "sign"
    act: str = "keep"
    scaling: str = "none"
    shortcut: str = "none"
    shortcut_init: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.scaling, bool):  # maps written before scaling had kinds
            object.__setattr__(self, "scaling", "learned" if self.scaling else "none")
        if self.weight not in _WEIGHT_KINDS:
            raise ValueError(f"weight binarizer {self.weight!r}: choose one of "
                             f"{weight_kinds()}, or import the method module that registers it "
                             f"(lowbit.quant.binary.register_weight_binarizer)")
        if self.act not in ACT_KINDS:
            raise ValueError(f"activation binarizer {self.act!r}: choose one of {ACT_KINDS}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling {self.scaling!r}: choose one of {SCALINGS}")
        if self.shortcut not in shortcut_kinds():
            raise ValueError(f"shortcut {self.shortcut!r}: choose one of {shortcut_kinds()}, or "
                             f"import the method module that registers it "
                             f"(lowbit.quant.binary.register_shortcut)")

    def providers(self) -> list[str]:
        """Python modules that registered this spec's kinds (a rebuild imports them first)."""
        mods = {_WEIGHT_KINDS[self.weight].module}
        if self.shortcut != "none":
            mods.add(_SHORTCUT_KINDS[self.shortcut].module)
        return sorted(m for m in mods if m and m != __name__)


class XNORScaling(nn.Module):
    """XNOR-Net's activation scaling of a binary layer, ``K = k ∗ mean_c|x|`` on the output grid
    (conv: the layer's stride/padding/dilation; linear: per token, k one factor). ``learned``: k
    is a parameter (BiDM's learnable filter), else the fixed box filter 1/k² (XNOR-Net)."""

    def __init__(self, layer: nn.Module, learned: bool) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.learned = bool(learned)
        dev = layer.weight.device
        if self.is_conv:
            kh, kw = layer.kernel_size
            k = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), device=dev)
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        else:
            k = torch.ones((), device=dev)
        if self.learned:
            self.filter = nn.Parameter(k)
        else:
            self.register_buffer("filter", k)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_conv:
            a = x.abs().mean(dim=1, keepdim=True)  # A = mean_c |I|
            return F.conv2d(a, self.filter, None, self.stride, self.padding, self.dilation)
        return self.filter * x.abs().mean(dim=-1, keepdim=True)

    def extra_macs(self, x: Tensor, y: Tensor) -> float:
        if not self.is_conv:
            return 0.0
        return float(y.shape[-1] * y.shape[-2] * self.filter.numel())

    def extra_repr(self) -> str:
        return "k=learned" if self.learned else "k=box (xnor)"


def _make_weight_binarizer(kind: str, part: Tensor, name: str) -> Binarizer:
    return _WEIGHT_KINDS[kind].build(part, name)


class _BinaryMixin:
    """Shared by :class:`BinaryConv2d` and :class:`BinaryLinear`."""

    binary_spec: BinarySpec

    @classmethod
    def from_quant(cls, m: QuantModuleMixin, spec: BinarySpec):
        """The binary layer of a quantized layer ``m`` (same Parameters; with ``act=keep`` its
        possibly calibrated activation quantizers are kept)."""
        new = cls.from_module(m, m.weight_spec, m.act_spec, split=m.split, name=m.qualname,
                              init_weights=False)
        if spec.act == "keep":
            new.input_quantizer = m.input_quantizer
            if m.split:
                new.input_quantizer_skip = m.input_quantizer_skip
        new._binarize(spec, m.qualname)
        return new

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
        self.scaling = None if spec.scaling == "none" else \
            XNORScaling(self, learned=spec.scaling == "learned")
        self.shortcut = None if spec.shortcut == "none" else \
            _SHORTCUT_KINDS[spec.shortcut].build(self, spec)
        self.to(self.weight.device)

    @property
    def binary_active(self) -> bool:
        """The real-valued extras (scaling, shortcut) belong to the binary layer: with the
        quantizers disabled (``quant_disabled``) the layer is exactly its FP original."""
        return self.weight_quantizer.enabled

    def extra_macs(self, x: Tensor, y: Tensor) -> float:
        """Real-valued MACs beyond the binary product (per sample): the scaling filter and the
        shortcut's — the conv-like extras the OPs count includes."""
        macs = 0.0
        for extra in (self.scaling, self.shortcut):
            if extra is not None:
                macs += float(extra.extra_macs(x, y))
        return macs

    def _gemm_bias(self) -> Tensor | None:
        """The bias when the GEMM adds it itself (no scaling factor multiplies the GEMM's
        output): one pass over the output fewer."""
        return self.bias if self.scaling is None or not self.binary_active else None

    def _binary_output(self, x: Tensor, y: Tensor, bias_shape: tuple[int, ...],
                       bias_added: bool) -> Tensor:
        active = self.binary_active
        # y is this call's own GEMM output: without an autograd graph (sampling) it is updated
        # in place — the same operations, no new tensor of its size per term
        inplace = not torch.is_grad_enabled()
        if self.scaling is not None and active:
            k = self.scaling(x)
            y = y.mul_(k) if inplace and k.dim() == y.dim() else y * k
        if self.bias is not None and not bias_added:
            b = self.bias.reshape(bias_shape)
            y = y.add_(b) if inplace else y + b
        if self.shortcut is not None and active:
            sc = self.shortcut(x, y)
            y = y.add_(sc) if inplace and sc.shape == y.shape else y + sc
        return y


class BinaryConv2d(_BinaryMixin, QuantConv2d):
    """1-bit Conv2d: ``conv(x̂, ŵ) [⊙ K(x)] + b [+ shortcut(x)]``."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self._gemm_bias()
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), bias)
        return self._binary_output(x, y, (1, -1, 1, 1), bias is not None)


class BinaryLinear(_BinaryMixin, QuantLinear):
    """1-bit Linear: ``x̂ ŵᵀ [· K(x)] + b [+ shortcut(x)]``."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self._gemm_bias()
        y = F.linear(self.quantize_input(x), self.quantized_weight(), bias)
        return self._binary_output(x, y, (-1,), bias is not None)


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


def binarizers(model: nn.Module, cls: type[Binarizer] = Binarizer) -> list[Binarizer]:
    """The binarizers of type ``cls`` in ``model`` (forward order)."""
    return [m for m in model.modules() if isinstance(m, cls)]


# ------------------------------------------------------------------------------------------------
# quantization map (lowbit.quant.qmap): how each class is described and rebuilt
# ------------------------------------------------------------------------------------------------
def _enabled(q: Binarizer, spec: dict) -> Binarizer:
    q.enabled = bool(spec.get("enabled", True))
    return q


register_module_class(
    SignWeightBinarizer,
    describe=lambda q: {"out_channels": int(q.alpha.numel()) if q.learnable else 0,
                        "learnable": q.learnable, "detach": q.detach, "name": q.name,
                        "enabled": q.enabled},
    build=lambda _e, s, _c: _enabled(SignWeightBinarizer(
        torch.zeros(max(1, int(s["out_channels"])), 1), bool(s["learnable"]), str(s["name"]),
        detach=bool(s.get("detach", False))), s))
register_module_class(
    ActBinarizer,
    describe=lambda q: {"channels": q.channels, "channel_axis": q.channel_axis,
                        "threshold": q.threshold is not None, "ste": q.ste, "name": q.name,
                        "enabled": q.enabled},
    build=lambda _e, s, _c: _enabled(ActBinarizer(
        int(s["channels"]), int(s["channel_axis"]), bool(s["threshold"]), str(s["ste"]),
        str(s["name"])), s))
register_module_class(
    XNORScaling,
    describe=lambda m: {"learned": m.learned},
    build=lambda _e, s, ctx: XNORScaling(ctx.parent, bool(s["learned"])).to(
        ctx.parent.weight.device))


def _describe_binary_layer(m: BinaryConv2d | BinaryLinear) -> dict:
    return {**describe_quant_layer(m), "binary": dataclasses.asdict(m.binary_spec),
            "providers": m.binary_spec.providers()}


def _binary_builder(cls: type, base: type):
    def build(existing, spec, _ctx):
        for mod in spec.get("providers", ()):  # the modules that register the spec's kinds
            importlib.import_module(str(mod))
        q = build_quant_layer(base, existing, spec)
        new = cls.from_quant(q, BinarySpec(**spec["binary"]))
        new.train(q.training)
        return new
    return build


register_module_class(BinaryConv2d, describe=_describe_binary_layer,
                      build=_binary_builder(BinaryConv2d, QuantConv2d))
register_module_class(BinaryLinear, describe=_describe_binary_layer,
                      build=_binary_builder(BinaryLinear, QuantLinear))
