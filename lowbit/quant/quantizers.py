"""Uniform affine quantizers: the maths (functions) and the state (modules), brevitas style.

Maths. ``fake_quantize`` computes ``x̂ = (clamp(round(x · (1/Δ)) + z, q_min, q_max) − z) · Δ`` with
round-half-to-even and the float32 reciprocal of Δ, exactly like
``torch.fake_quantize_per_{tensor,channel}_affine`` (bit-exact; tested). Round has a straight-through
gradient and clamp a zero gradient outside the grid, which makes the gradient with respect to Δ
LSQ's (Esser et al. 2020, Eq. 3); LSQ's gradient scale g = 1/√(N·q_max) is applied to Δ.

State. ``UniformQuantizer`` owns Δ (``scale``) and, for asymmetric grids, the zero point as
parameters (frozen unless learnable) so that ``state_dict`` keys never depend on whether they are
trained. ``TimestepActQuantizer`` keeps one Δ/zero point per calibration timestep bucket.

Every quantizer views a tensor as rows ``[G, M]``: G scales, M elements per scale. Initialisation
(min–max, MSE, percentile) works on rows, so weights and observed activations share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import QuantSpec, parse_granularity

MIN_SCALE = 1e-8  # Δ never goes below this: all-zero channels give Δ = MIN_SCALE, not 0 or NaN
_FP32_MAX = torch.finfo(torch.float32).max
MSE_P = 2.4  # Q-Diffusion / BRECQ: Lp norm of the MSE search
MSE_STEPS = 80  # shrink the [min, max] range by 1 % per step, 80 candidates (BRECQ)


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """round-half-to-even forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        return g


class _ClampSTE(torch.autograd.Function):
    """clamp forward; gradient 1 on [q_min, q_max] *inclusive* (torch's fake-quant mask — plain
    ``torch.clamp`` has zero gradient at the bounds themselves)."""

    @staticmethod
    def forward(ctx, q: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return torch.clamp(q, qmin, qmax)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return g * ctx.factor, None


def round_ste(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, factor: float) -> Tensor:
    return _GradScale.apply(x, factor)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: symmetric [-2^(b-1), 2^(b-1)-1], asymmetric [0, 2^b-1]."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def max_scale(bits: int) -> float:
    # (q - z) · Δ must stay finite: |q - z| < 2^bits
    return _FP32_MAX / 2.0**bits


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                  rounding: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Quantize–dequantize ``x`` (float32) with broadcastable ``scale``/``zero_point``.

    Bit-exact with ``torch.fake_quantize_per_channel_affine``: the reciprocal of Δ is taken in
    float32 and multiplied (not divided), rounding is half-to-even, the zero point is added after
    rounding. ``rounding`` replaces round() (AdaRound's floor + h(V)).
    """
    v = x * torch.reciprocal(scale)
    if rounding is None and not v.requires_grad:
        # no autograd graph (sampling, evaluation): the same operations in place on ``v``,
        # bit-identical and without four temporaries the size of ``x``
        v.round_()
        if zero_point is not None and zero_point.numel() == 1 and zero_point.device.type == "cpu":
            # one integer zero point: clamp(round(v) + z, qmin, qmax) - z is
            # clamp(round(v), qmin - z, qmax - z) exactly (integers in float32; where
            # round(v) + z would round, both sides clamp to the same bound): two passes fewer
            z = float(zero_point)
            return v.clamp_(qmin - z, qmax - z).mul_(scale)
        if zero_point is not None:
            v.add_(zero_point)
        v.clamp_(qmin, qmax)
        if zero_point is not None:
            v.sub_(zero_point)
        return v.mul_(scale)
    q = round_ste(v) if rounding is None else rounding(v)
    if zero_point is not None:
        q = q + zero_point
    q = _ClampSTE.apply(q, qmin, qmax) if q.requires_grad else torch.clamp(q, qmin, qmax)
    if zero_point is not None:
        q = q - zero_point
    return q * scale


def sanitize_scale(scale: Tensor, bits: int) -> Tensor:
    """Δ from statistics → finite and > 0 whatever the statistics were (NaN, inf, all zero)."""
    top = max_scale(bits)
    scale = torch.nan_to_num(scale, nan=1.0, posinf=top, neginf=MIN_SCALE)
    return scale.clamp(MIN_SCALE, top)


def qparams_from_range(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool
                       ) -> tuple[Tensor, Tensor | None]:
    """Δ and zero point that map [min(xmin, 0), max(xmax, 0)] onto the integer grid."""
    xmin = torch.clamp(torch.nan_to_num(xmin.float()), max=0.0)
    xmax = torch.clamp(torch.nan_to_num(xmax.float()), min=0.0)
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        # positive end exactly representable; the negative end has one spare level
        scale = sanitize_scale(torch.maximum(-xmin, xmax) / qmax, bits)
        return scale, None
    levels = float(qmax - qmin)
    scale = sanitize_scale(xmax / levels - xmin / levels, bits)  # no overflow for huge ranges
    zero_point = torch.clamp(torch.round(-xmin / scale), qmin, qmax)
    return scale, zero_point


def lp_error(x: Tensor, xq: Tensor, p: float = MSE_P) -> Tensor:
    """Mean |x - x̂|^p per row (Q-Diffusion's ``lp_loss``, reduction over each row)."""
    return (x - xq).abs().pow(p).mean(dim=1)


def mse_qparams(rows: Tensor, xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool,
                steps: int = MSE_STEPS, p: float = MSE_P) -> tuple[Tensor, Tensor | None]:
    """Shrink-grid search (BRECQ/Q-Diffusion): candidate ranges (1 − 0.01 i)·[min, max], keep the
    one with the smallest Lp error per row. ``rows`` may be a sample; ``xmin``/``xmax`` exact."""
    qmin, qmax = int_range(bits, symmetric)
    rows = rows.float()
    best_s, best_z = qparams_from_range(xmin, xmax, bits, symmetric)
    best_err = torch.full_like(best_s, float("inf"))
    xq = torch.empty_like(rows)
    for i in range(steps):
        f = 1.0 - 0.01 * i
        s, z = qparams_from_range(xmin * f, xmax * f, bits, symmetric)
        # fake_quantize fused: clamp(round(x/Δ), q_min − z, q_max − z)·Δ is the same number
        lo, hi = (qmin, qmax) if z is None else ((qmin - z)[:, None], (qmax - z)[:, None])
        torch.mul(rows, torch.reciprocal(s)[:, None], out=xq)
        xq.round_()
        torch.clamp(xq, lo, hi, out=xq)
        xq.mul_(s[:, None]).sub_(rows)
        # ‖e‖_p is monotone in mean |e|^p: same argmin as Q-Diffusion's lp_loss
        err = torch.nan_to_num(torch.linalg.vector_norm(xq, p, dim=1), nan=float("inf"))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def percentile_range(rows: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    """Per-row (100 − p, p) percentiles by ``kthvalue`` (no size limit, unlike ``quantile``)."""
    m = rows.shape[1]
    k_hi = min(m, max(1, math.ceil(percentile / 100.0 * m)))
    k_lo = m - k_hi + 1
    rows = rows.float()
    return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


def init_qparams(rows: Tensor, spec: QuantSpec, xmin: Tensor | None = None,
                 xmax: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Δ [G] and zero point [G] for rows [G, M] with the spec's init; ``xmin``/``xmax`` override
    the rows' own extremes (exact running stats when ``rows`` is only a sample)."""
    xmin = rows.amin(dim=1).float() if xmin is None else xmin.float()
    xmax = rows.amax(dim=1).float() if xmax is None else xmax.float()
    if spec.init == "minmax":
        return qparams_from_range(xmin, xmax, spec.bits, spec.symmetric)
    if spec.init == "percentile":
        lo, hi = percentile_range(rows, spec.percentile)
        return qparams_from_range(lo, hi, spec.bits, spec.symmetric)
    return mse_qparams(rows, xmin, xmax, spec.bits, spec.symmetric)


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------
class UniformQuantizer(nn.Module):
    """Fake-quantizes a weight or activation tensor with a :class:`QuantSpec`.

    Build with :meth:`for_weight` (rows = output channels or groups along the flattened reduction
    dim) or :meth:`for_act` (rows = channels along ``channel_axis`` or groups of them). Parameters:
    ``scale`` (Δ) and ``zero_point`` (asymmetric only), frozen unless learnable; buffer
    ``initialized``. FP bits make a stateless pass-through.
    """

    timestep_aware = False

    def __init__(self, spec: QuantSpec, *, is_weight: bool, shape: tuple[int, ...],
                 channel_axis: int = 0, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.tensor_shape = tuple(shape)  # weight shape, or (C,) for activations
        self.channel_axis = channel_axis
        self.name = name
        self.enabled = True  # False → pass-through (FP forward without touching state)
        # processes that split each training batch (DDP): LSQ's gradient scale counts the
        # elements of the whole batch, so N ranks train as one (activations only)
        self.batch_split = 1
        self.observer: Callable[[UniformQuantizer, Tensor], None] | None = None
        self.note = ""  # e.g. why group granularity fell back to channel
        self._rounding: Callable[[Tensor], Tensor] | None = None
        self._rounding_changes = 0  # part of a layer's weight-cache stamp (see set_rounding)
        self._ready = False
        kind, group = parse_granularity("granularity", spec.granularity)
        if kind == "group":
            k = math.prod(shape[1:]) if is_weight else shape[0]
            if k % group != 0:
                self.note = f"group:{group} does not divide {k}; per-channel instead"
                kind, group = "channel", None
        self.kind, self.group = kind, group
        if not spec.enabled:
            self.bits = None
            return
        self.bits = spec.bits
        self.qmin, self.qmax = int_range(spec.bits, spec.symmetric)
        if kind == "token":  # dynamic: Δ from each token at run time, no state
            return
        self.param_shape = self._param_shape()
        self._make_params(self._bucket_shape() + self.param_shape)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def for_weight(cls, spec: QuantSpec, weight_shape: tuple[int, ...], name: str = ""
                   ) -> UniformQuantizer:
        return cls(spec, is_weight=True, shape=tuple(weight_shape), channel_axis=0, name=name)

    @classmethod
    def for_act(cls, spec: QuantSpec, num_channels: int, channel_axis: int, name: str = ""
                ) -> UniformQuantizer:
        klass = TimestepActQuantizer if spec.timestep_aware and spec.enabled else cls
        return klass(spec, is_weight=False, shape=(num_channels,), channel_axis=channel_axis,
                     name=name)

    def _param_shape(self) -> tuple[int, ...]:
        c = self.tensor_shape[0]
        if self.kind == "tensor":
            return ()
        if self.kind == "channel":
            return (c,)
        if self.is_weight:  # groups along the flattened reduction dim K = in·kh·kw
            return (c, math.prod(self.tensor_shape[1:]) // self.group)
        return (c // self.group,)

    def _bucket_shape(self) -> tuple[int, ...]:
        return ()

    def _make_params(self, shape: tuple[int, ...]) -> None:
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.zero_point = (None if self.spec.symmetric
                           else nn.Parameter(torch.zeros(shape), requires_grad=False))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # -- properties -------------------------------------------------------------------------------
    @property
    def passthrough(self) -> bool:
        return self.bits is None

    @property
    def dynamic(self) -> bool:
        return not self.passthrough and self.kind == "token"

    @property
    def is_initialized(self) -> bool:
        return self.passthrough or self.dynamic or self._ready

    @property
    def num_scales(self) -> int:
        return 0 if self.passthrough or self.dynamic else self.scale.numel()

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        """``{"scale": [Δ], "zero_point": [z]}`` (empty lists when stateless)."""
        if self.passthrough or self.dynamic:
            return {"scale": [], "zero_point": []}
        return {"scale": [self.scale],
                "zero_point": [] if self.zero_point is None else [self.zero_point]}

    def set_learnable(self, scale: bool = True, zero_point: bool | None = None) -> None:
        """Make Δ (and the zero point, by default with Δ) trainable (LSQ) or frozen."""
        for p in self.params_by_role()["scale"]:
            p.requires_grad_(scale)
        for p in self.params_by_role()["zero_point"]:
            p.requires_grad_(scale if zero_point is None else zero_point)

    def set_rounding(self, rounding: Callable[[Tensor], Tensor] | None) -> None:
        """Replace round() for ``x/Δ`` (AdaRound); ``None`` restores round-half-to-even.

        Counted in ``_rounding_changes``: a quantized weight cached before a custom rounding was
        set is not reused after it is removed (the weight may have been rewritten meanwhile)."""
        object.__setattr__(self, "_rounding", rounding)
        self._rounding_changes += 1

    def extra_repr(self) -> str:
        if self.passthrough:
            return "fp"
        kind = f"group:{self.group}" if self.kind == "group" else self.kind
        return (f"bits={self.bits}, {'sym' if self.spec.symmetric else 'asym'}, {kind}, "
                f"init={self.spec.init}" + (", learnable" if self.spec.learnable else ""))

    # -- rows view ---------------------------------------------------------------------------------
    def rows(self, x: Tensor) -> Tensor:
        """``x`` as [G, M]: one row per scale entry (bucket dim excluded)."""
        if self.kind in ("tensor", "token"):
            return x.reshape(1, -1)
        if self.is_weight:
            c = x.shape[0]
            return x.reshape(c, -1) if self.kind == "channel" else x.reshape(-1, self.group)
        xc = x.movedim(self.channel_axis, 0)
        g = xc.shape[0] if self.kind == "channel" else xc.shape[0] // self.group
        return xc.reshape(g, -1)

    # -- initialisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        """Initialise Δ/zero point from a tensor (weights), with the spec's init."""
        if self.passthrough or self.dynamic:
            return
        s, z = init_qparams(self.rows(x.detach()), self.spec)
        self.set_qparams(s, z)

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor | None,
                    timesteps: Tensor | None = None) -> None:
        """Load Δ/zero point given as rows [G] (or [K, G] with ``timesteps`` for buckets)."""
        shape = self.param_shape if timesteps is None else (len(timesteps), *self.param_shape)
        self._replace("scale", scale.reshape(shape))
        if self.zero_point is not None:
            self._replace("zero_point", zero_point.reshape(shape))
        self.initialized.fill_(True)
        self._ready = True
        self.set_learnable(self.spec.learnable)

    def _replace(self, name: str, value: Tensor) -> None:
        cur = getattr(self, name)
        value = value.to(device=cur.device, dtype=cur.dtype)
        if value.shape == cur.shape:
            with torch.no_grad():  # in place on the tensor itself: its _version counts the change
                cur.copy_(value)
        elif isinstance(cur, nn.Parameter):
            setattr(self, name, nn.Parameter(value.clone(), requires_grad=cur.requires_grad))
        else:
            self._buffers[name] = value.clone()

    def _resizable(self, name: str) -> bool:
        return False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in ("scale", "zero_point", "timesteps"):
            key, cur = prefix + name, getattr(self, name, None)
            if (isinstance(cur, Tensor) and key in state_dict and self._resizable(name)
                    and state_dict[key].shape != cur.shape):
                self._replace(name, torch.empty(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "initialized" in state_dict:
            self._ready = bool(state_dict[prefix + "initialized"])
            if self._ready:  # trainability follows the spec, as after calibration
                self.set_learnable(self.spec.learnable)

    # -- forward -----------------------------------------------------------------------------------
    def current_qparams(self) -> tuple[Tensor, Tensor | None]:
        """Δ and zero point in use now, shaped ``param_shape``."""
        return self.scale, self.zero_point

    def forward(self, x: Tensor) -> Tensor:
        if self.passthrough or not self.enabled:
            return x
        if self.observer is not None:  # calibration: collect statistics, run FP
            self.observer(self, x)
            return x
        if self.dynamic:
            return self._quant_dynamic(x)
        if not self._ready:
            fix = ("quantize_ with init_weights=True, or load a quantized checkpoint" if
                   self.is_weight else "lowbit.quant.calibrate_(model, batches)")
            raise RuntimeError(f"quantizer {self.name or '(unnamed)'} is not calibrated: run "
                               f"{fix} before the quantized forward pass.")
        scale, zero_point = self.current_qparams()
        return self.quantize_with(x, scale, zero_point)

    def quantize_with(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """Fake-quantize ``x`` with explicit Δ/zero point shaped ``param_shape``."""
        dtype = x.dtype
        x = x.float()
        s = scale.float().clamp_min(MIN_SCALE)
        # LSQ: g = 1 / sqrt(N · q_max), N = elements per step size; LSQ+ scales the offset too
        n = x.numel() * (1 if self.is_weight else self.batch_split)
        g = 1.0 / math.sqrt(max(1, n // s.numel()) * max(1, self.qmax))
        if s.requires_grad:
            s = grad_scale(s, g)
        z = None
        if zero_point is not None:
            z = zero_point.float()
            if z.requires_grad and torch.is_grad_enabled():
                z = round_ste(grad_scale(z, g))
            else:  # no graph (sampling): the same rounding without the autograd Function
                z = torch.round(z)
        xv, restore = self._view(x)
        s, z = self._broadcast(s, xv), None if z is None else self._broadcast(z, xv)
        return restore(fake_quantize(xv, s, z, self.qmin, self.qmax, self._rounding)).to(dtype)

    def _view(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if self.kind != "group":
            return x, lambda y: y
        if self.is_weight:
            c = x.shape[0]
            return x.reshape(c, -1, self.group), lambda y: y.reshape(x.shape)
        xm = x.movedim(self.channel_axis, -1)
        xv = xm.reshape(*xm.shape[:-1], -1, self.group)
        return xv, lambda y: y.reshape(xm.shape).movedim(-1, self.channel_axis)

    def _broadcast(self, p: Tensor, xv: Tensor) -> Tensor:
        if self.kind == "tensor":
            return p
        if self.kind == "group":
            return p.unsqueeze(-1)
        shape = [1] * xv.dim()
        shape[0 if self.is_weight else self.channel_axis] = p.numel()
        return p.reshape(shape)

    def _quant_dynamic(self, x: Tensor) -> Tensor:
        """Per-token: Δ from each token's own range (over the channel axis), no state."""
        dtype, x = x.dtype, x.float()
        with torch.no_grad():
            xmin = x.amin(dim=self.channel_axis, keepdim=True)
            xmax = x.amax(dim=self.channel_axis, keepdim=True)
            s, z = qparams_from_range(xmin, xmax, self.bits, self.spec.symmetric)
        return fake_quantize(x, s, z, self.qmin, self.qmax).to(dtype)


class TimestepActQuantizer(UniformQuantizer):
    """Activation quantizer with one Δ/zero point per calibration timestep bucket.

    ``set_timestep(t)`` (called by the model's timestep hook) selects the bucket: the nearest
    calibration timestep, or linear interpolation of Δ and zero point between the two neighbouring
    buckets (``interp: linear``, EfficientDM's TALSQ mapped to another schedule). Buffers:
    ``timesteps`` [K] ascending; ``scale``/``zero_point`` [K, *param_shape].
    """

    timestep_aware = True

    def __init__(self, spec: QuantSpec, **kw) -> None:
        super().__init__(spec, **kw)
        self._t: Tensor | None = None
        if not self.passthrough and not self.dynamic:
            self.register_buffer("timesteps", torch.zeros(1))

    def _bucket_shape(self) -> tuple[int, ...]:
        return (1,)

    def _resizable(self, name: str) -> bool:
        return True  # the number of buckets comes from calibration

    @property
    def num_buckets(self) -> int:
        return 0 if self.passthrough or self.dynamic else self.timesteps.numel()

    def set_timestep(self, t: Tensor | float | None) -> None:
        self._t = None if t is None else torch.as_tensor(t).detach().reshape(())

    @property
    def timestep(self) -> Tensor | None:
        return self._t

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor | None,
                    timesteps: Tensor | None = None) -> None:
        if timesteps is None:  # a single bucket that serves every timestep
            timesteps, scale = torch.zeros(1), scale.reshape(1, -1)
            zero_point = None if zero_point is None else zero_point.reshape(1, -1)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
        order = torch.argsort(timesteps)
        self._replace("timesteps", timesteps[order])
        order = order.to(scale.device)
        super().set_qparams(scale[order], None if zero_point is None else zero_point[order],
                            timesteps=timesteps)

    def bucket_index(self) -> Tensor:
        """Index of the nearest calibration timestep (a 0-d tensor, no host sync)."""
        return (self.timesteps - self._current_t()).abs().argmin()

    def _current_t(self) -> Tensor:
        if self._t is None:
            raise RuntimeError(
                f"timestep-aware quantizer {self.name or '(unnamed)'} has no timestep: call the "
                f"quantized top-level model with its `timestep` argument (the hook sets it), or "
                f"call set_timestep(t)."
            )
        return self._t.to(self.timesteps.device, torch.float32)

    def current_qparams(self) -> tuple[Tensor, Tensor | None]:
        k = self.num_buckets
        if k == 1:
            return self.scale[0], None if self.zero_point is None else self.zero_point[0]
        if self.spec.interp == "nearest":
            i = self.bucket_index().reshape(1)
            return (self.scale.index_select(0, i)[0],
                    None if self.zero_point is None else self.zero_point.index_select(0, i)[0])
        ts = self.timesteps
        t = torch.clamp(self._current_t(), ts[0], ts[-1]).reshape(1)
        hi = torch.searchsorted(ts, t).clamp(1, k - 1)
        lo = hi - 1
        w = ((t - ts[lo]) / (ts[hi] - ts[lo])).reshape([1] * self.scale.dim())
        scale = torch.lerp(self.scale.index_select(0, lo), self.scale.index_select(0, hi), w)[0]
        if self.zero_point is None:
            return scale, None
        zp = torch.lerp(self.zero_point.index_select(0, lo), self.zero_point.index_select(0, hi), w)
        return scale, round_ste(zp[0])  # the grid needs an integer zero point
