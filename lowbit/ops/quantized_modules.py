"""Packed counterparts of lowbit's fake-quant layers (``QuantLinear`` / ``QuantConv2d``).

:class:`~lowbit.ops.library.PackedLinear` runs the kernels' own recipe (symmetric weights, dynamic
symmetric per-token activations). A model quantized by :func:`lowbit.quant.quantize_` uses other
grids: per-output-channel *asymmetric* weights with a zero point, *static* (calibrated, possibly
timestep-aware) activation scales with a zero point, and split-shortcut layers whose two input
halves have their own quantizers. The modules here implement exactly that arithmetic.

Integer path (``mode="int"``). With ``x̂ = (x_q − z_x)·s_x`` and ``ŵ = (w_q − z_w)·s_w`` the
fake-quant layer computes ``Σ_k x̂ ŵ``; the packed layer computes the integer accumulator
``acc = Σ_k (x_q − z_x)(w_q − z_w)`` exactly and applies ``s_x·s_w`` once. Asymmetric codes
``[0, 2^b − 1]`` minus a zero point need ``b + 1`` bits, more than the signed kernels take, so both
operands are re-centred to signed ``b``-bit values ``x_s = x_u − c_x``, ``w_s = w_u − c_w``
(``c = 2^(b−1) − z`` for asymmetric grids, 0 for symmetric ones) and::

    acc = Σ x_s w_s  +  c_w Σ_k x_s  +  c_x Σ_k w_s  +  K c_x c_w

The first term is the kernel's raw int32 accumulator (``out_dtype=torch.int32``); ``Σ_k w_s`` is
precomputed, ``Σ_k x_s`` is one row sum. Split layers run one GEMM per half (each half has its own
scales) and add the scaled results. The integer accumulator equals the fake-quant layer's exactly;
the float output differs only by float32 rounding (the fake-quant layer rounds every product).

Weight-only path (``mode="weight_only"``). Where no integer GEMM can apply the scales exactly —
activation scales that vary along K (per input channel or group, or per-position scales inside an
im2col row), group-wise weight scales, FP activations, grouped convolutions — the packed weights
are unpacked and dequantized with the fake-quant formula and the layer runs ``F.linear`` /
``F.conv2d`` on the activations quantized by the *same* quantizer module. This path is bit-exact.

Storage (``PackedWeight``): the re-centred signed values ``w_s = w_q − o`` (``o = 2^(b−1)`` for
asymmetric grids, 0 for symmetric) in the kernels' layout — ``int8 [N, K]`` for 5–8 bits, two per
byte for 3–4 bits (``pack_int4``), four per byte for 2 bits (``pack_int2``), 32 per ``int32`` word
for 1 bit (``pack_bits01`` of the code ``w_q``) — plus the float32 scale and the integer zero point
exactly as the fake-quant weight quantizer uses them. 8- and 4-bit rows are padded to 16 bytes
(the kernels' ``cp.async`` unit) so the GEMMs read the stored tensor as it is; 2- and 1-bit rows
are minimal (whole bytes / words) and expanded to int4 at load for the GEMM (there is no 2-bit or
asymmetric 1-bit kernel), so the file keeps their true width.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.ops import library
from lowbit.ops.pack import (
    pack_bits01,
    pack_int2,
    pack_int4,
    packed_row_len,
    unpack_bits01,
    unpack_int2,
    unpack_int4,
)
from lowbit.quant.quantizers import MIN_SCALE, UniformQuantizer, qparams_from_range

__all__ = [
    "PackedWeight",
    "PackedQuantLinear",
    "PackedQuantConv2d",
    "LayerPlan",
    "plan_layer",
    "pack_quant_module",
    "build_packed_module",
    "storage_bits",
]

Mode = Literal["int", "weight_only"]


def storage_bits(bits: int) -> int:
    """Width of the storage cell of a ``bits``-bit weight: 8, 4, 2 or 1."""
    if bits > 4:
        return 8
    return 4 if bits > 2 else bits


def _offset(bits: int, symmetric: bool) -> int:
    # the re-centring offset o: asymmetric codes [0, 2^b − 1] − o = [−2^(b−1), 2^(b−1) − 1]
    return 0 if symmetric else 2 ** (bits - 1)


def _pack_signed(ws: Tensor, bits: int) -> Tensor:
    """Signed re-centred values ``[N, K]`` → the storage layout of :func:`storage_bits`."""
    cell = storage_bits(bits)
    k = ws.shape[-1]
    if cell == 8:
        out = torch.zeros(ws.shape[0], packed_row_len(k, 8), dtype=torch.int8, device=ws.device)
        out[:, :k] = ws.to(torch.int8)
        return out
    if cell == 4:
        return pack_int4(ws.to(torch.int16))
    # 2/1 bit are expanded to int4 at load, never read by a kernel: minimal rows, no 16-byte pad
    if cell == 2:
        return pack_int2(ws.to(torch.int16), row_align=1)
    return pack_bits01(ws.to(torch.int16) + 1, row_align=4)  # 1 bit: the code w_q = w_s + 1


def _unpack_signed(packed: Tensor, k: int, bits: int) -> Tensor:
    """Inverse of :func:`_pack_signed`: ``int16 [N, K]`` of ``w_s``."""
    cell = storage_bits(bits)
    if cell == 8:
        return packed[:, :k].to(torch.int16)
    if cell == 4:
        return unpack_int4(packed, k, signed=True).to(torch.int16)
    if cell == 2:
        return unpack_int2(packed, k, signed=True).to(torch.int16)
    return unpack_bits01(packed, k).to(torch.int16) - 1


class PackedWeight(nn.Module):
    """One quantized weight matrix ``[N, K]`` (or one half of a split weight) as stored.

    Buffers: ``codes`` (re-centred signed values in the storage layout), ``scale`` (float32, the
    weight quantizer's Δ after its ``MIN_SCALE`` clamp; shape ``[]``, ``[N]`` or ``[N, K/g]``) and
    ``zero_point`` (integer, same shape; absent for symmetric grids). Non-persistent: ``codes_int4``
    (2/1-bit weights expanded for the int4 GEMM), ``w_sum`` = Σ_k w_s and ``c_w`` (int64 ``[N]``).
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor | None, *, bits: int,
                 symmetric: bool, k: int, group: int | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.k, self.group = int(bits), bool(symmetric), int(k), group
        self.out_features = codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point)
        self._build_gemm_operands()

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_quantizer(cls, quantizer: UniformQuantizer, w_hat: Tensor) -> PackedWeight:
        """Pack the fake-quantized weight ``w_hat`` (``quantizer``'s output, any shape ``[N, …]``).

        The codes are recovered from ``w_hat`` itself (``round(ŵ/Δ) + z``), so whatever produced
        the grid values (round-to-nearest, AdaRound's learnt rounding, a LoRA-merged weight) is
        packed as it is; the dequantized codes are checked to reproduce ``w_hat`` bit for bit.
        """
        if quantizer.passthrough or quantizer.dynamic:
            raise ValueError(f"{quantizer.name}: an FP or dynamic weight quantizer has no codes")
        w2 = w_hat.detach().float().reshape(w_hat.shape[0], -1)
        scale, zero = quantizer.current_qparams()
        # exactly what UniformQuantizer.quantize_with uses: Δ clamped, zero point rounded
        scale = scale.detach().float().clamp_min(MIN_SCALE)
        zero = None if zero is None else torch.round(zero.detach().float())
        n, k = w2.shape
        group = quantizer.group if quantizer.kind == "group" else None
        s_b, z_b = _weight_broadcast(scale, n, k, group), None
        if zero is not None:
            z_b = _weight_broadcast(zero, n, k, group)
        qz = torch.round(w2 / s_b)  # = w_q − z exactly: |w_q − z| < 2^8 ≪ 1/float32 eps
        q = qz if z_b is None else qz + z_b
        qmin, qmax = quantizer.qmin, quantizer.qmax
        if q.numel() and (q.min() < qmin or q.max() > qmax):
            raise ValueError(f"{quantizer.name}: weight codes leave the grid [{qmin}, {qmax}]; "
                             f"the weight is not fake-quantized by this quantizer.")
        bits, symmetric = quantizer.bits, quantizer.spec.symmetric
        ws = q - _offset(bits, symmetric)
        zp = None
        if zero is not None:
            # uint8 holds every in-grid zero point of ≤ 8 bits; a learnt one may leave the grid
            in_u8 = zero.numel() == 0 or (zero.min() >= 0 and zero.max() <= 255)
            zp = zero.to(torch.uint8 if in_u8 else torch.int32)
        packed = cls(_pack_signed(ws.to(torch.int16), bits), scale, zp, bits=bits,
                     symmetric=symmetric, k=k, group=group)
        if not torch.equal(packed.dequantize(), w2):
            raise ValueError(f"{quantizer.name}: packed weight does not reproduce the fake-quant "
                             f"weight bit for bit (export bug, please report).")
        return packed

    @classmethod
    def from_stored(cls, tensors: dict[str, Tensor], prefix: str, *, bits: int,
                          symmetric: bool, k: int, group: int | None) -> PackedWeight:
        """Build from stored tensors ``{prefix}codes/scale/zero_point`` (the loader's path)."""
        return cls(tensors[prefix + "codes"], tensors[prefix + "scale"],
                   tensors.get(prefix + "zero_point"), bits=bits, symmetric=symmetric, k=k,
                   group=group)

    def _build_gemm_operands(self) -> None:
        ws = _unpack_signed(self.codes, self.k, self.bits)
        cell = storage_bits(self.bits)
        self.gemm_bits = 8 if cell == 8 else 4
        # 8/4-bit: the stored layout is the kernels' layout (no second copy); 2/1 bit: w_s fits
        # int4, and no kernel reads 2-bit or asymmetric 1-bit weights
        expanded = pack_int4(ws) if cell in (2, 1) else None
        self.register_buffer("codes_int4", expanded, persistent=False)
        self.register_buffer("w_sum", ws.sum(dim=1, dtype=torch.int64), persistent=False)
        o = _offset(self.bits, self.symmetric)
        c_w = torch.full((self.out_features,), o, dtype=torch.int64, device=self.codes.device)
        if self.zero_point is not None and self.group is None:
            c_w = c_w - self.zero_point.to(torch.int64).expand(self.out_features)
        self.register_buffer("c_w", c_w, persistent=False)

    @property
    def gemm_codes(self) -> Tensor:
        """The weight operand of the GEMM (int8 ``[N, K]`` or int4-packed ``[N, K/2]``)."""
        return self.codes if self.codes_int4 is None else self.codes_int4

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._build_gemm_operands()  # derived operands follow the loaded codes

    # -- views ------------------------------------------------------------------------------------
    def int_codes(self) -> Tensor:
        """The grid codes ``w_q`` (``int16 [N, K]``)."""
        return _unpack_signed(self.codes, self.k, self.bits) + _offset(self.bits, self.symmetric)

    def dequantize(self) -> Tensor:
        """``(w_q − z)·Δ`` in float32 ``[N, K]``: bit-identical to the fake-quant weight."""
        n, k = self.out_features, self.k
        q = self.int_codes().to(torch.float32)
        if self.zero_point is not None:
            q = q - _weight_broadcast(self.zero_point.to(torch.float32), n, k, self.group)
        return q * _weight_broadcast(self.scale, n, k, self.group)

    def channel_scale(self) -> Tensor:
        """Δ per output channel ``[N]`` (per-tensor Δ broadcast); group scales have none."""
        if self.group is not None:
            raise ValueError("group-wise weight scales have no per-channel scale")
        return self.scale.reshape(-1).expand(self.out_features)

    def extra_repr(self) -> str:
        g = f", group={self.group}" if self.group else ""
        return (f"out={self.out_features}, k={self.k}, bits={self.bits}, "
                f"{'sym' if self.symmetric else 'asym'}{g}")


def _weight_broadcast(p: Tensor, n: int, k: int, group: int | None) -> Tensor:
    """A weight quantizer's Δ / zero point ([], [N] or [N, K/g]) broadcast to ``[N, K]``."""
    if p.dim() == 0:
        return p
    if group is not None:
        return p.reshape(n, k // group, 1).expand(n, k // group, group).reshape(n, k)
    return p.reshape(n, 1)


# ------------------------------------------------------------------------------------------------
# planning: which path a fake-quant layer can take
# ------------------------------------------------------------------------------------------------
class LayerPlan(TypedDict):
    """How one layer runs packed: ``mode``, the GEMM (``"w4a8"`` …, None for weight-only) and why
    a layer takes the weight-only path."""

    mode: Mode
    kernel: str | None
    why: str


def plan_layer(module: nn.Module) -> LayerPlan | None:
    """The packed path for a ``QuantLinear``/``QuantConv2d``; ``None`` keeps it fake-quant (FP
    weights). Pure function of the module's quantizers and conv settings."""
    wqs, aqs = module.weight_quantizers(), module.act_quantizers()
    if any(q.passthrough for q in wqs):
        return None
    is_conv = isinstance(module, nn.Conv2d)

    def weight_only(why: str) -> LayerPlan:
        return LayerPlan(mode="weight_only", kernel=None, why=why)

    if any(q.kind == "group" for q in wqs):
        return weight_only("group-wise weight scales vary along K; the GEMMs take one scale per "
                           "output channel")
    if is_conv and (module.groups != 1 or module.padding_mode != "zeros"
                    or isinstance(module.padding, str)):
        return weight_only("grouped conv or non-zero padding mode: im2col GEMM not applicable")
    if any(q.passthrough for q in aqs):
        return weight_only("activations stay FP (a16/a32): weight-only packed path")
    kinds = {q.kind for q in aqs}
    if kinds & {"channel", "group"}:
        return weight_only("per-input-channel activation scales vary along K: no integer GEMM "
                           "applies them exactly")
    if "token" in kinds and is_conv:
        return weight_only("per-position activation scales mix inside one im2col row")
    for q in aqs:
        z = None if q.dynamic else q.zero_point  # every bucket of a timestep-aware quantizer
        if z is not None and z.numel() and (torch.round(z).min() < q.qmin
                                            or torch.round(z).max() > q.qmax):
            return weight_only("an activation zero point lies outside its grid: zero padding "
                               "cannot be re-centred into the signed kernel range")
    w_bits = max(q.bits for q in wqs)
    a_bits = max(q.bits for q in aqs)
    wc = 8 if storage_bits(w_bits) == 8 else 4
    ac = 8 if (a_bits > 4 or wc == 8) else 4  # no W8A4 GEMM: 4-bit activations ride as int8
    return LayerPlan(mode="int", kernel=f"w{wc}a{ac}", why="")


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
class _PackedQuantMixin:
    """Shared by :class:`PackedQuantLinear` and :class:`PackedQuantConv2d`.

    Submodules: ``packed_weight`` (and ``packed_weight_skip`` when split), ``input_quantizer``
    (and ``input_quantizer_skip``) — the fake-quant model's own activation quantizers, so the
    timestep hook of :func:`lowbit.quant.register_timestep_hook` and its bucket selection work
    unchanged. Buffer ``bias`` (float32, optional).
    """

    mode: Mode
    kernel: str | None
    split: int
    channel_axis: int
    bias: Tensor | None

    def _init_common(self, parts: list[PackedWeight], act_quantizers: list[UniformQuantizer],
                     bias: Tensor | None, split: int, mode: Mode, kernel: str | None) -> None:
        if mode not in ("int", "weight_only"):
            raise ValueError(f"mode={mode!r}: expected 'int' or 'weight_only'")
        if len(parts) != (2 if split else 1) or len(act_quantizers) != len(parts):
            raise ValueError("one packed weight and one activation quantizer per input part")
        self.mode, self.kernel, self.split = mode, kernel, int(split)
        self.packed_weight = parts[0]
        self.input_quantizer = act_quantizers[0]
        if split:
            self.packed_weight_skip = parts[1]
            self.input_quantizer_skip = act_quantizers[1]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features = parts[0].out_features

    def parts(self) -> list[tuple[PackedWeight, UniformQuantizer]]:
        out = [(self.packed_weight, self.input_quantizer)]
        if self.split:
            out.append((self.packed_weight_skip, self.input_quantizer_skip))
        return out

    def _input_parts(self, x: Tensor) -> list[Tensor]:
        if not self.split:
            return [x]
        axis = self.channel_axis % x.dim()
        return [x.narrow(axis, 0, self.split), x.narrow(axis, self.split, x.shape[axis] - self.split)]

    # -- weight-only path ---------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """The fake-quant input (same quantizer modules, same arithmetic as QuantModuleMixin)."""
        xs = [q(p) for (_, q), p in zip(self.parts(), self._input_parts(x), strict=True)]
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.channel_axis % x.dim())

    def dequantized_weight(self) -> Tensor:
        """``[N, K]`` float32: the fake-quant weight, rebuilt from the packed codes."""
        ws = [pw.dequantize() for pw, _ in self.parts()]
        return ws[0] if len(ws) == 1 else torch.cat(ws, dim=1)

    # -- integer path -------------------------------------------------------------------------
    def _act_codes(self, x: Tensor, q: UniformQuantizer) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_u, Δ_x, c_x)``: x_u = x_q − z_x as exact integers in float32 (shape of ``x``),
        Δ_x and c_x as 0-d tensors (static) or ``[M, 1]`` (dynamic per token, Linear only).

        Same operations as ``UniformQuantizer.quantize_with`` / ``_quant_dynamic`` up to the
        dequantization, so the codes are the fake-quant layer's codes bit for bit."""
        x = x.float()
        if q.dynamic:
            xmin = x.amin(dim=-1, keepdim=True)
            xmax = x.amax(dim=-1, keepdim=True)
            scale, zero = qparams_from_range(xmin, xmax, q.bits, q.spec.symmetric)
        else:
            scale, zero = q.current_qparams()
            scale = scale.float().clamp_min(MIN_SCALE)
            zero = None if zero is None else torch.round(zero.float())
        xq = torch.round(x * torch.reciprocal(scale))
        if zero is not None:
            xq = xq + zero
        xq = torch.clamp(xq, q.qmin, q.qmax)
        xu = xq if zero is None else xq - zero
        o = _offset(q.bits, q.spec.symmetric)
        c_x = torch.full_like(scale, float(o)) if zero is None else o - zero
        return xu, scale, c_x

    def _gemm_acc(self, xu2d: Tensor, c_x: Tensor, pw: PackedWeight) -> Tensor:
        """``int64 [M, N]`` = Σ_k (x_u)(w_u) via the signed kernel and the re-centring terms."""
        m, k = xu2d.shape
        c_x = c_x.reshape(-1, 1) if c_x.dim() else c_x
        xs = (xu2d - c_x).to(torch.int8)  # |x_s| ≤ 2^(b−1): exact in int8 (checked by plan_layer)
        ones_m = torch.ones(m, dtype=torch.float32, device=xs.device)
        ones_n = torch.ones(pw.out_features, dtype=torch.float32, device=xs.device)
        if self.kernel == "w4a4":
            raw = library.gemm_w4a4(pack_int4(xs), ones_m, pw.gemm_codes, ones_n, None, torch.int32)
        else:
            kp = packed_row_len(k, 8)
            xa = F.pad(xs, (0, kp - k)) if kp != k else xs.contiguous()
            gemm = library.gemm_w8a8 if pw.gemm_bits == 8 else library.gemm_w4a8
            raw = gemm(xa, ones_m, pw.gemm_codes, ones_n, None, torch.int32)
        c_x64 = torch.round(c_x).to(torch.int64)
        x_sum = xs.sum(dim=1, dtype=torch.int64)[:, None]
        return (raw.to(torch.int64) + pw.c_w[None, :] * x_sum + c_x64 * pw.w_sum[None, :]
                + k * c_x64 * pw.c_w[None, :])

    def _gemm_rows(self, x_part: Tensor, q: UniformQuantizer) -> tuple[Tensor, Tensor, Tensor]:
        """One input part → (x_u as GEMM rows ``[M, K]``, Δ_x, c_x)."""
        raise NotImplementedError

    @torch.no_grad()
    def int_accumulators(self, x: Tensor) -> list[Tensor]:
        """The exact integer accumulators Σ_k (x_q − z_x)(w_q − z_w), ``int64 [M, N]`` per part."""
        if self.mode != "int":
            raise ValueError("int_accumulators: this layer runs the weight-only path")
        out = []
        for (pw, q), xp in zip(self.parts(), self._input_parts(x), strict=True):
            rows, _, c_x = self._gemm_rows(xp, q)
            out.append(self._gemm_acc(rows, c_x, pw))
        return out

    def _int_forward_2d(self, x: Tensor) -> Tensor:
        """``[M, N]`` float32: Σ over parts of (acc · Δ_x) · Δ_w, plus bias."""
        y = None
        for (pw, q), xp in zip(self.parts(), self._input_parts(x), strict=True):
            rows, scale, c_x = self._gemm_rows(xp, q)
            acc = self._gemm_acc(rows, c_x, pw).to(torch.float32)
            scale = scale.reshape(-1, 1) if scale.dim() else scale
            part = (acc * scale) * pw.channel_scale()[None, :]
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias[None, :]
        return y


class PackedQuantLinear(_PackedQuantMixin, nn.Module):
    """Packed replacement of a ``QuantLinear`` (input channel axis −1)."""

    channel_axis = -1

    def __init__(self, in_features: int, parts: list[PackedWeight],
                 act_quantizers: list[UniformQuantizer], bias: Tensor | None, *, split: int = 0,
                 mode: Mode = "int", kernel: str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self._init_common(parts, act_quantizers, bias, split, mode, kernel)

    def _gemm_rows(self, x_part: Tensor, q: UniformQuantizer) -> tuple[Tensor, Tensor, Tensor]:
        rows = x_part.reshape(-1, x_part.shape[-1])
        xu, scale, c_x = self._act_codes(rows, q)
        return xu, scale, c_x

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "weight_only":
            return F.linear(self.quantize_input(x), self.dequantized_weight().to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        y = self._int_forward_2d(x)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode}, kernel={self.kernel}, split={self.split}")


class PackedQuantConv2d(_PackedQuantMixin, nn.Module):
    """Packed replacement of a ``QuantConv2d`` (input channel axis 1); the integer path is
    im2col + GEMM. Activations are quantized on the NCHW input *before* padding, so padded
    positions are x_u = 0 — exactly the fake-quant conv's zero padding of x̂."""

    channel_axis = 1

    def __init__(self, in_channels: int, kernel_size: tuple[int, int], parts: list[PackedWeight],
                 act_quantizers: list[UniformQuantizer], bias: Tensor | None, *,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, padding_mode: str = "zeros",
                 split: int = 0, mode: Mode = "int", kernel: str | None = None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        if not isinstance(padding, str):
            self.padding = tuple(padding)
        self.groups, self.padding_mode = int(groups), padding_mode
        self._init_common(parts, act_quantizers, bias, split, mode, kernel)
        self.out_channels = self.out_features

    def _gemm_rows(self, x_part: Tensor, q: UniformQuantizer) -> tuple[Tensor, Tensor, Tensor]:
        xu, scale, c_x = self._act_codes(x_part, q)
        cols = F.unfold(xu, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # [B, C·kh·kw, L]: (c, i, j) = weight.reshape order
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), scale, c_x

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # nn.Conv2d._conv_forward, so the weight-only path is the fake-quant conv call
        if self.padding_mode != "zeros":
            pad = self._reversed_padding_repeated_twice
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), weight, bias, self.stride,
                            (0, 0), self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @property
    def _reversed_padding_repeated_twice(self) -> list[int]:
        ph, pw = self.padding
        return [pw, pw, ph, ph]

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "weight_only":
            w = self.dequantized_weight().reshape(self.weight_shape()).to(x.dtype)
            return self._conv(self.quantize_input(x), w,
                              None if self.bias is None else self.bias.to(x.dtype))
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        y = self._int_forward_2d(x)
        return y.reshape(b, ho, wo, -1).permute(0, 3, 1, 2).contiguous().to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, mode={self.mode}, "
                f"kernel={self.kernel}, split={self.split}")


# ------------------------------------------------------------------------------------------------
# conversion from a fake-quant module
# ------------------------------------------------------------------------------------------------
def _part_info(pw: PackedWeight) -> dict:
    return {"bits": pw.bits, "symmetric": pw.symmetric, "k": pw.k, "group": pw.group}


@torch.no_grad()
def pack_quant_module(module: nn.Module, plan: LayerPlan) -> tuple[nn.Module, list[dict]]:
    """A packed module for a ``QuantLinear``/``QuantConv2d`` and the per-part storage info.

    The module's activation quantizers are *moved* into the packed module (same objects), so
    their state, timestep buckets and the model's timestep hook carry over.
    """
    for q in module.act_quantizers():
        if not q.is_initialized:
            raise ValueError(f"{q.name}: activation quantizer is not calibrated; export a "
                             f"calibrated model (run calibrate_ first).")
    parts = [PackedWeight.from_quantizer(q, q(w))
             for q, w in zip(module.weight_quantizers(), module.weight_parts(), strict=True)]
    return _assemble(module, parts, plan), [_part_info(p) for p in parts]


def build_packed_module(module: nn.Module, plan: LayerPlan, parts_info: list[dict],
                        tensors: dict[str, Tensor], prefix: str) -> nn.Module:
    """The packed module for the fake-quant skeleton ``module`` from stored ``tensors`` (keys
    ``{prefix}packed_weight.codes`` …); the caller loads the rest of the state."""
    names = ["packed_weight.", "packed_weight_skip."][: len(parts_info)]
    parts = [PackedWeight.from_stored(tensors, prefix + n, **info)
             for n, info in zip(names, parts_info, strict=True)]
    return _assemble(module, parts, plan)


def _assemble(module: nn.Module, parts: list[PackedWeight], plan: LayerPlan) -> nn.Module:
    common = dict(split=module.split, mode=plan["mode"], kernel=plan["kernel"])
    acts = module.act_quantizers()
    if isinstance(module, nn.Conv2d):
        return PackedQuantConv2d(module.in_channels, module.kernel_size, parts, acts, module.bias,
                                 stride=module.stride, padding=module.padding,
                                 dilation=module.dilation, groups=module.groups,
                                 padding_mode=module.padding_mode, **common)
    return PackedQuantLinear(module.in_features, parts, acts, module.bias, **common)
