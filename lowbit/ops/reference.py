"""Torch reference implementations of lowbit's integer GEMMs and activation quantizers.

These run on any device, use exact integer arithmetic for the accumulators, and are the oracle the
CUDA kernels are tested against. Shapes follow ``nn.Linear``: activations ``[M, K]`` (one row per
token), weights ``[N, K]``, outputs ``[M, N]``; packed layouts are described in
:mod:`lowbit.ops.pack`.

Epilogue (identical in every GEMM and in the kernels, so float32 outputs match bit for bit)::

    out[m, n] = (float32(acc[m, n]) * x_scale[m]) * w_scale[n]  (+ bias[n])   then cast to out_dtype

with each product rounded separately (no fused multiply-add). ``out_dtype=torch.int32`` returns
the exact integer accumulator instead (scales are not applied, ``bias`` must be ``None``); the
tests use it to compare kernels with references exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.ops.pack import (
    DEFAULT_ROW_ALIGN,
    pack_binary,
    pack_bitplanes,
    pack_int4,
    packed_row_len,
    popcount32,
    row_popcount,
    unpack_int4,
)

__all__ = [
    "SCALE_EPS",
    "OUT_DTYPES",
    "int_matmul",
    "scale_epilogue",
    "and_popcount",
    "binary_dot",
    "bitserial_dot",
    "gemm_w8a8",
    "gemm_w4a8",
    "gemm_w4a4",
    "gemm_w1a1",
    "gemm_w1a4",
    "qrange",
    "quantize_per_row",
    "symmetric_scale",
    "asymmetric_qparams",
    "QuantizedAct",
    "quantize_act",
    "im2col",
    "conv_output_to_nchw",
]

#: Lower bound of every range statistic (amax, max-min, mean|x|) before it becomes a scale, so
#: all-zero tokens give scale > 0 and q = 0 instead of NaN (DESIGN: degenerate tensors never NaN).
SCALE_EPS = 1e-8

#: Output dtypes every GEMM supports; int32 means "raw accumulator, no epilogue".
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)

# K at which an int8·int8 sum can leave int32: 128·128·K < 2**31.
_MAX_K_INT8 = 2**31 // (128 * 128)


# ------------------------------------------------------------------------------- integer GEMMs


def _int_mm_ok(m: int, k: int, n: int) -> bool:
    # torch._int_mm's documented CUDA constraints; CPU accepts more but we keep one rule.
    return m > 16 and k % 8 == 0 and n % 8 == 0 and k > 0


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``int32 [M, N] = a @ b.T`` for ``int8`` ``a [M, K]`` and ``b [N, K]``.

    Uses ``torch._int_mm`` where its shape constraints hold, otherwise an int64 matmul on CPU or a
    float64 matmul on other devices (exact: every partial sum is an integer below 2**31 < 2**53).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_matmul: expected int8 operands, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"int_matmul: K mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    if k > _MAX_K_INT8:
        raise ValueError(
            f"int_matmul: K={k} may overflow the int32 accumulator (max {_MAX_K_INT8})"
        )
    if _int_mm_ok(m, k, n):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    if a.device.type == "cpu":
        return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)
    return (a.to(torch.float64) @ b.to(torch.float64).t()).round().to(torch.int32)


def _check_out_dtype(out_dtype: torch.dtype, bias: Tensor | None) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if out_dtype == torch.int32 and bias is not None:
        raise ValueError("out_dtype=torch.int32 returns the raw accumulator; bias must be None")


def scale_epilogue(
    acc: Tensor,
    x_scale: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(float32(acc) * x_scale[:, None]) * w_scale[None, :] (+ bias)`` cast to ``out_dtype``."""
    _check_out_dtype(out_dtype, bias)
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.to(torch.float32) * x_scale.to(torch.float32)[:, None]
    out = out * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)[None, :]
    return out.to(out_dtype)


def _zero_extend(t: Tensor, k: int) -> Tensor:
    return t if t.shape[-1] == k else F.pad(t, (0, k - t.shape[-1]))


def _match_k(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Zero-extend the shorter operand (zero padding is value-neutral, see lowbit.ops.pack).

    Both rows must cover the same K up to the 32-value padding unit, so a genuine K mismatch is
    still an error rather than silently truncated.
    """
    ka, kb = a.shape[-1], b.shape[-1]
    if -(-ka // 32) != -(-kb // 32):
        raise ValueError(f"{what}: activation K={ka} and weight K={kb} differ beyond padding")
    k = max(ka, kb)
    return _zero_extend(a, k), _zero_extend(b, k)


def _check_2d(name: str, t: Tensor, dtype: torch.dtype) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def gemm_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """int8 activations ``[M, K]`` (per-token scale) × int8 weights ``[N, K]`` (per-channel scale)."""
    _check_2d("x_q", x_q, torch.int8)
    _check_2d("w_q", w_q, torch.int8)
    a, b = _match_k(x_q, w_q, "gemm_w8a8")
    return scale_epilogue(int_matmul(a, b), x_scale, w_scale, bias, out_dtype)


def gemm_w4a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """int8 activations ``[M, K]`` × signed 4-bit weights packed ``uint8 [N, K/2]``."""
    _check_2d("x_q", x_q, torch.int8)
    _check_2d("w_packed", w_packed, torch.uint8)
    w = unpack_int4(w_packed, 2 * w_packed.shape[-1], signed=True)
    a, b = _match_k(x_q, w, "gemm_w4a8")
    return scale_epilogue(int_matmul(a, b), x_scale, w_scale, bias, out_dtype)


def gemm_w4a4(
    x_packed: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Signed 4-bit activations ``uint8 [M, K/2]`` × signed 4-bit weights ``uint8 [N, K/2]``."""
    _check_2d("x_packed", x_packed, torch.uint8)
    _check_2d("w_packed", w_packed, torch.uint8)
    x = unpack_int4(x_packed, 2 * x_packed.shape[-1], signed=True)
    w = unpack_int4(w_packed, 2 * w_packed.shape[-1], signed=True)
    a, b = _match_k(x, w, "gemm_w4a4")
    return scale_epilogue(int_matmul(a, b), x_scale, w_scale, bias, out_dtype)


# ------------------------------------------------------------------------------ binary GEMMs


def and_popcount(a: Tensor, b: Tensor, rows_per_chunk: int = 256) -> Tensor:
    """``int32 [M, N]`` with ``popc(a[m] & b[n])`` summed over the words of each row.

    ``a`` is ``int32 [M, W]`` and ``b`` ``int32 [N, W]``; the ``[M, N, W]`` AND is built in chunks
    of rows so memory stays bounded.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"and_popcount: word counts differ: {a.shape[-1]} vs {b.shape[-1]}")
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[0], rows_per_chunk):
        chunk = a[start : start + rows_per_chunk, None, :] & b[None, :, :]
        out[start : start + rows_per_chunk] = popcount32(chunk).sum(-1, dtype=torch.int32)
    return out


def binary_dot(
    x_packed: Tensor, x_popc: Tensor, w_packed: Tensor, w_popc: Tensor, k: int
) -> Tensor:
    """Exact ±1 dot products from packed bits: ``int32 [M, N]``.

    With ``s = 2a - 1`` and ``t = 2b - 1`` for bits ``a, b``: ``s·t = 4ab - 2a - 2b + 1``; summed
    over the true ``k`` positions this is ``4·popc(a&b) - 2·popc(a) - 2·popc(b) + k`` (pad bits are
    0 in both operands so they change none of the popcounts; see lowbit.ops.pack).
    """
    c = and_popcount(x_packed, w_packed)
    return 4 * c - 2 * x_popc.to(torch.int32)[:, None] - 2 * w_popc.to(torch.int32)[None, :] + k


def gemm_w1a1(
    x_packed: Tensor,
    x_popc: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_popc: Tensor,
    w_scale: Tensor,
    k: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Binary (±1) activations × binary weights, both packed ``int32 [*, words]``.

    ``x_popc`` / ``w_popc`` are the row popcounts (``row_popcount``), ``k`` the true K. Scales: per
    token ``x_scale`` (e.g. mean|x|) and per output channel ``w_scale`` (XNOR-Net's α = mean|W|).
    """
    _check_2d("x_packed", x_packed, torch.int32)
    _check_2d("w_packed", w_packed, torch.int32)
    _check_binary_k(x_packed.shape[-1], w_packed.shape[-1], k, "gemm_w1a1")
    acc = binary_dot(x_packed, x_popc, w_packed, w_popc, k)
    return scale_epilogue(acc, x_scale, w_scale, bias, out_dtype)


def _check_binary_k(words_x: int, words_w: int, k: int, what: str) -> None:
    if words_x != words_w:
        raise ValueError(f"{what}: activation and weight rows hold {words_x} vs {words_w} words")
    if not 0 < k <= 32 * words_w:
        raise ValueError(f"{what}: k={k} does not fit in {words_w} words")


def bitserial_dot(
    x_planes: Tensor,
    x_plane_popc: Tensor,
    w_packed: Tensor,
    w_popc: Tensor,
    k: int,
    x_zero: Tensor | None = None,
) -> Tensor:
    """Exact dot products of 4-bit activations (as bit-planes) with ±1 weights: ``int32 [M, N]``.

    Bit-serial (the plane decomposition of BNN/"bit-serial" accelerators): with
    ``x = Σ_b c_b·x_b`` (``c_b = 2**b``, and ``c_3 = -8`` for two's complement signed values) and
    ``w = 2·w_bit - 1``::

        Σ_k x_k w_k = Σ_b c_b · (2·popc(x_b & w_bits) - popc(x_b))

    For unsigned activations with a per-token zero point ``z`` the integer value is ``x - z``, so
    ``z·Σ_k w_k = z·(2·popc(w_bits) - k)`` is subtracted (the true ``k``: pad bits are 0).
    """
    m, nbits, _ = x_planes.shape
    signed = x_zero is None
    acc = torch.zeros(m, w_packed.shape[0], dtype=torch.int32, device=x_planes.device)
    for b in range(nbits):
        coeff = -(2 ** (nbits - 1)) if (signed and b == nbits - 1) else 2**b
        c = and_popcount(x_planes[:, b, :].contiguous(), w_packed)
        acc += coeff * (2 * c - x_plane_popc[:, b].to(torch.int32)[:, None])
    if x_zero is not None:
        w_sum = 2 * w_popc.to(torch.int32) - k
        acc -= x_zero.to(torch.int32)[:, None] * w_sum[None, :]
    return acc


def gemm_w1a4(
    x_planes: Tensor,
    x_plane_popc: Tensor,
    x_scale: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_popc: Tensor,
    w_scale: Tensor,
    k: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """4-bit activations (bit-planes ``int32 [M, 4, words]``) × binary weights ``int32 [N, words]``.

    ``x_zero=None`` means signed two's complement activations; otherwise unsigned ``[0, 15]`` with
    an ``int32 [M]`` zero point per token.
    """
    if x_planes.dim() != 3 or x_planes.dtype != torch.int32 or x_planes.shape[1] != 4:
        raise ValueError(
            f"x_planes must be int32 [M, 4, words], got {x_planes.dtype} {tuple(x_planes.shape)}"
        )
    _check_2d("w_packed", w_packed, torch.int32)
    _check_binary_k(x_planes.shape[-1], w_packed.shape[-1], k, "gemm_w1a4")
    acc = bitserial_dot(x_planes, x_plane_popc, w_packed, w_popc, k, x_zero)
    return scale_epilogue(acc, x_scale, w_scale, bias, out_dtype)


# -------------------------------------------------------------------- activation quantization


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``[qmin, qmax]`` of a ``bits``-bit integer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize_per_row(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, zero: Tensor | None = None
) -> Tensor:
    """``clamp(nearbyint(x * (1/scale)) + zero, qmin, qmax)`` per row, as ``int16``.

    The float32 reciprocal and round-half-to-even match ``torch.fake_quantize_per_channel_affine``
    (axis 0) bit for bit; the CUDA quantizer computes the same ``__frcp_rn`` / ``__fmul_rn`` /
    ``rint`` sequence.
    """
    inv = torch.reciprocal(scale.to(torch.float32))[:, None]
    q = torch.round(x.to(torch.float32) * inv)  # torch.round is round-half-to-even
    if zero is not None:
        q = q + zero.to(torch.float32)[:, None]
    return q.clamp_(qmin, qmax).to(torch.int16)


def symmetric_scale(x: Tensor, bits: int) -> Tensor:
    """Per-row symmetric scale ``max(amax, eps) / qmax`` in float32 (``amax`` is exact)."""
    amax = x.to(torch.float32).abs().amax(dim=-1).clamp_min(SCALE_EPS)
    return _div(amax, 2 ** (bits - 1) - 1)


def _div(num: Tensor, den: float) -> Tensor:
    # Tensor / tensor is IEEE division on every device; torch's CUDA kernel for tensor / Python
    # scalar multiplies by the scalar's reciprocal instead, which can differ in the last bit.
    return num / torch.full_like(num, float(den))


def asymmetric_qparams(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row unsigned scale and integer zero point, with the range widened to include 0."""
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-1).clamp_max(0.0)
    hi = xf.amax(dim=-1).clamp_min(0.0)
    qmax = float(2**bits - 1)
    scale = _div((hi - lo).clamp_min(SCALE_EPS), qmax)
    # zero point = nearbyint(-lo / scale), computed with the same reciprocal as the quantizer
    zero = torch.round(-lo * torch.reciprocal(scale)).clamp_(0.0, qmax).to(torch.int32)
    return scale, zero


class QuantizedAct(NamedTuple):
    """A quantized, packed activation matrix and what the GEMMs need with it.

    ``data`` layout per ``bits``: 8 → ``int8 [M, Kp]``; 4 → ``uint8 [M, Kp/2]``; 1 → ``int32
    [M, words]``; 4 with ``planes=True`` → ``int32 [M, 4, words]``. ``popc`` is the row popcount
    (1-bit: ``[M]``; planes: ``[M, 4]``), ``zero`` the per-token zero point (unsigned planes only).
    """

    data: Tensor
    scale: Tensor
    zero: Tensor | None = None
    popc: Tensor | None = None


def quantize_act(
    x: Tensor,
    bits: int,
    planes: bool = False,
    signed: bool = True,
    row_align: int = DEFAULT_ROW_ALIGN,
) -> QuantizedAct:
    """Quantize float activations ``[M, K]`` per token and pack them for the GEMMs.

    * ``bits=8`` / ``bits=4``: symmetric, ``scale = amax/qmax``, ``q ∈ [-2**(b-1), 2**(b-1)-1]``.
    * ``bits=1``: signs (``x >= 0`` → +1) with ``scale = mean|x|`` (XNOR-Net), plus row popcounts.
    * ``bits=4, planes=True``: bit-planes for W1A4; ``signed=True`` symmetric two's complement,
      ``signed=False`` unsigned ``[0, 15]`` with an integer zero point per token.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_act expects [M, K] activations, got {tuple(x.shape)}")
    k = x.shape[-1]
    if bits == 8 and not planes:
        scale = symmetric_scale(x, 8)
        q = quantize_per_row(x, scale, *qrange(8, True)).to(torch.int8)
        return QuantizedAct(_zero_extend(q, packed_row_len(k, 8, row_align)), scale)
    if bits == 4 and not planes:
        scale = symmetric_scale(x, 4)
        q = quantize_per_row(x, scale, *qrange(4, True))
        return QuantizedAct(pack_int4(q, row_align), scale)
    if bits == 1:
        scale = x.to(torch.float32).abs().mean(dim=-1).clamp_min(SCALE_EPS)
        packed = pack_binary(x, row_align)
        return QuantizedAct(packed, scale, None, row_popcount(packed))
    if bits == 4 and planes:
        if signed:
            scale, zero = symmetric_scale(x, 4), None
            q = quantize_per_row(x, scale, *qrange(4, True))
        else:
            scale, zero = asymmetric_qparams(x, 4)
            q = quantize_per_row(x, scale, *qrange(4, False), zero=zero)
        data = pack_bitplanes(q, 4, row_align)
        return QuantizedAct(data, scale, zero, row_popcount(data))
    raise ValueError(
        f"quantize_act: unsupported bits={bits} planes={planes}; use 8, 4, 1 or 4 planes"
    )


# ------------------------------------------------------------------------ convolution layout


def im2col(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> tuple[Tensor, tuple[int, int]]:
    """``[B, C, H, W]`` → GEMM activations ``[B·Ho·Wo, C·kh·kw]`` and ``(Ho, Wo)``.

    Rows are output positions in ``(b, ho, wo)`` order; columns follow ``F.unfold``'s ``(c, i, j)``
    order, which is ``conv.weight.reshape(C_out, -1)``'s order, so the conv is ``rows @ W.T``.
    """
    b, _, h, w = x.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return cols.transpose(1, 2).reshape(b * ho * wo, -1), (ho, wo)


def conv_output_to_nchw(y: Tensor, batch: int, out_hw: tuple[int, int]) -> Tensor:
    """GEMM output ``[B·Ho·Wo, C_out]`` → ``[B, C_out, Ho, Wo]`` (inverse of im2col's row order)."""
    ho, wo = out_hw
    return y.reshape(batch, ho, wo, -1).permute(0, 3, 1, 2).contiguous()
