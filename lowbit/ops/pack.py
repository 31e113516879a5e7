"""Bit packing of low-bit integer tensors along K, the reduction (last) dimension.

Layouts (one rule per width; the CUDA kernels in ``kernels/`` read exactly these):

* **int8** — one value per byte, ``[..., K]`` (no packing, only row padding).
* **4-bit** — two values per ``uint8``: the LOW nibble holds the even ``k``, the HIGH nibble the
  odd ``k``. Signed values are stored as 4-bit two's complement (``-1 -> 0xF``).
* **2-bit** — four values per ``uint8``: the lowest two bits hold the lowest ``k``.
* **1-bit** — 32 values per ``int32`` word, the lowest bit holds the lowest ``k``. For binary
  (±1) tensors bit 1 means +1 and bit 0 means -1; ``pack_binary`` maps ``x >= 0`` to +1, so
  ``sign(0) = +1`` as in most binary networks.
* **bit-planes** (W1A4 activations) — a 4-bit tensor split into its four bit-planes, each packed
  like 1-bit: ``[..., 4, words]`` with plane ``b`` holding bit ``b`` of every value.

Padding. Every packed row is padded with zeros to a whole number of ``row_align`` bytes (16 by
default: the ``cp.async`` chunk the kernels copy). Zero padding is *value neutral* in every format,
which is why both operands of a GEMM can be padded identically without corrections:

* int8 / 4-bit / 2-bit / bit-planes: a padded value is 0 and adds 0 to every dot product;
* binary ±1: a padded bit is 0, i.e. -1 on *both* operands, so the ±1 dot over the padded length
  counts ``+1`` per pad position. The popcount identity used by the GEMMs,
  ``dot = 4·popc(a&b) - 2·popc(a) - 2·popc(b) + K``, is therefore evaluated with the TRUE ``K``
  (not the padded one): pad bits are 0 in both operands, so all three popcounts are unchanged
  by padding and the pad's ``+1`` contributions never enter. See ``reference.binary_dot``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ROW_ALIGN",
    "packed_row_len",
    "pad_k",
    "pack_int4",
    "unpack_int4",
    "pack_int2",
    "unpack_int2",
    "pack_binary",
    "unpack_binary",
    "pack_bits01",
    "unpack_bits01",
    "pack_bitplanes",
    "unpack_bitplanes",
    "popcount32",
    "row_popcount",
]

#: Packed rows are padded to this many bytes: the 16-byte ``cp.async`` chunk of the kernels.
DEFAULT_ROW_ALIGN = 16

# values per storage element and the storage element's size in bytes, per bit width
_PER_ELEM = {8: 1, 4: 2, 2: 4, 1: 32}
_ELEM_BYTES = {8: 1, 4: 1, 2: 1, 1: 4}


def _check_bits(bits: int) -> None:
    if bits not in _PER_ELEM:
        raise ValueError(f"unsupported bit width {bits}; expected one of {sorted(_PER_ELEM)}")


def packed_row_len(k: int, bits: int, row_align: int = DEFAULT_ROW_ALIGN) -> int:
    """Number of storage elements (bytes, or int32 words for 1-bit) of one packed row of ``k``.

    The row holds ``ceil(k / values_per_element)`` elements rounded up so that the row is a whole
    number of ``row_align`` bytes (``row_align=1`` gives the minimal packing).
    """
    _check_bits(bits)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    per, nbytes = _PER_ELEM[bits], _ELEM_BYTES[bits]
    elems = -(-k // per)
    align_elems = max(1, row_align // nbytes)  # row_align below one element: minimal packing
    if row_align > nbytes and row_align % nbytes:
        raise ValueError(f"row_align={row_align} is not a multiple of the {nbytes}-byte element")
    return -(-elems // align_elems) * align_elems


def pad_k(k: int, bits: int, row_align: int = DEFAULT_ROW_ALIGN) -> int:
    """The padded K a packed row of ``k`` values holds (``packed_row_len × values per element``)."""
    return packed_row_len(k, bits, row_align) * _PER_ELEM[bits]


def _pad_last(t: Tensor, k_padded: int, value: int = 0) -> Tensor:
    k = t.shape[-1]
    if k == k_padded:
        return t
    return torch.nn.functional.pad(t, (0, k_padded - k), value=value)


def _check_range(q: Tensor, lo: int, hi: int, what: str) -> None:
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"{what}: values must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]"
        )


def _check_int(q: Tensor, what: str) -> None:
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"{what}: expected an integer tensor, got {q.dtype}")


# ----------------------------------------------------------------------------------------- 4-bit


def pack_int4(q: Tensor, row_align: int = DEFAULT_ROW_ALIGN) -> Tensor:
    """Pack 4-bit integers (signed ``[-8, 7]`` or unsigned ``[0, 15]``) two per byte along K.

    Returns ``uint8 [..., packed_row_len(K, 4, row_align)]``; byte ``j`` holds ``k = 2j`` in its low
    nibble and ``k = 2j + 1`` in its high nibble.
    """
    _check_int(q, "pack_int4")
    _check_range(q, -8, 15, "pack_int4")
    k = q.shape[-1]
    q = _pad_last(q.to(torch.int16), pad_k(k, 4, row_align))
    nib = q & 0xF  # two's complement nibble for negatives
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, k: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int4`: ``int8 [..., k]`` (signed values sign-extended from 4 bits)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8, got {packed.dtype}")
    if 2 * packed.shape[-1] < k:
        raise ValueError(f"unpack_int4: {packed.shape[-1]} bytes hold fewer than k={k} values")
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)[..., :k]
    if signed:
        nib = nib - ((nib & 0x8) << 1)  # sign-extend: v - 16 where bit 3 is set
    return nib.to(torch.int8)


# ----------------------------------------------------------------------------------------- 2-bit


def pack_int2(q: Tensor, row_align: int = DEFAULT_ROW_ALIGN) -> Tensor:
    """Pack 2-bit integers (signed ``[-2, 1]`` or unsigned ``[0, 3]``) four per byte along K.

    Byte ``j`` holds ``k = 4j + i`` in bits ``2i .. 2i+1`` (lowest bits = lowest k).
    """
    _check_int(q, "pack_int2")
    _check_range(q, -2, 3, "pack_int2")
    k = q.shape[-1]
    q = _pad_last(q.to(torch.int16), pad_k(k, 2, row_align)) & 0x3
    packed = q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)
    return packed.to(torch.uint8)


def unpack_int2(packed: Tensor, k: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int2`: ``int8 [..., k]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int2: expected uint8, got {packed.dtype}")
    if 4 * packed.shape[-1] < k:
        raise ValueError(f"unpack_int2: {packed.shape[-1]} bytes hold fewer than k={k} values")
    p = packed.to(torch.int16)
    vals = torch.stack([(p >> (2 * i)) & 0x3 for i in range(4)], dim=-1).flatten(-2)[..., :k]
    if signed:
        vals = vals - ((vals & 0x2) << 1)
    return vals.to(torch.int8)


# ----------------------------------------------------------------------------------------- 1-bit


def _bit_weights(device: torch.device) -> Tensor:
    return torch.ones(32, dtype=torch.int64, device=device).bitwise_left_shift(
        torch.arange(32, dtype=torch.int64, device=device)
    )


def pack_bits01(bits01: Tensor, row_align: int = DEFAULT_ROW_ALIGN) -> Tensor:
    """Pack a {0, 1} tensor 32 per ``int32`` word along K; the lowest bit is the lowest k."""
    k = bits01.shape[-1]
    b = _pad_last(bits01.to(torch.int64), pad_k(k, 1, row_align))
    b = b.unflatten(-1, (-1, 32))
    words = (b * _bit_weights(b.device)).sum(-1)  # < 2**32, exact in int64
    # reinterpret the unsigned 32-bit value as two's complement int32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits01(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_bits01`: ``uint8 [..., k]`` of 0/1."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_bits01: expected int32 words, got {packed.dtype}")
    if 32 * packed.shape[-1] < k:
        raise ValueError(f"unpack_bits01: {packed.shape[-1]} words hold fewer than k={k} bits")
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # arithmetic shift is fine: we keep bit 0 only
    return bits.flatten(-2)[..., :k].to(torch.uint8)


def pack_binary(x: Tensor, row_align: int = DEFAULT_ROW_ALIGN) -> Tensor:
    """Pack the signs of ``x`` (±1 values or any real tensor) 32 per ``int32`` word along K.

    Bit 1 means +1 (``x >= 0``), bit 0 means -1; pad bits are 0 (see the module docstring for why
    that is exact).
    """
    return pack_bits01(x >= 0, row_align)


def unpack_binary(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_binary`: ``int8 [..., k]`` of ±1."""
    return unpack_bits01(packed, k).to(torch.int8) * 2 - 1


def pack_bitplanes(q: Tensor, nbits: int = 4, row_align: int = DEFAULT_ROW_ALIGN) -> Tensor:
    """Split ``nbits``-bit integers into bit-planes, each packed like 1-bit.

    ``q`` holds unsigned ``[0, 2**nbits)`` or signed two's complement ``[-2**(nbits-1), ...)``
    values; plane ``b`` holds bit ``b`` of the ``nbits``-bit two's complement pattern. Returns
    ``int32 [..., nbits, words]``. For signed values plane ``nbits-1`` carries weight
    ``-2**(nbits-1)``, the others ``2**b``; for unsigned all carry ``2**b``.
    """
    _check_int(q, "pack_bitplanes")
    _check_range(q, -(2 ** (nbits - 1)), 2**nbits - 1, "pack_bitplanes")
    u = q.to(torch.int16) & (2**nbits - 1)
    planes = torch.stack([(u >> b) & 1 for b in range(nbits)], dim=-2)
    return pack_bits01(planes, row_align)


def unpack_bitplanes(packed: Tensor, k: int, signed: bool) -> Tensor:
    """Inverse of :func:`pack_bitplanes`: ``int8 [..., k]`` from ``int32 [..., nbits, words]``."""
    nbits = packed.shape[-2]
    bits = unpack_bits01(packed, k).to(torch.int16)  # [..., nbits, k]
    weights = [2**b for b in range(nbits)]
    if signed:
        weights[-1] = -(2 ** (nbits - 1))
    out = sum(bits[..., b, :] * w for b, w in enumerate(weights))
    return out.to(torch.int8)


# -------------------------------------------------------------------------------------- popcount


def popcount32(words: Tensor) -> Tensor:
    """Population count of every ``int32`` word (as its unsigned 32-bit pattern), in torch.

    SWAR popcount (Hacker's Delight, Fig. 5-2) on int64 so no step overflows or sign-extends:
    pairs, nibbles, bytes, then one multiply sums the four byte counts into the top byte.
    """
    if words.dtype != torch.int32:
        raise TypeError(f"popcount32: expected int32, got {words.dtype}")
    v = words.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = ((v * 0x01010101) & 0xFFFFFFFF) >> 24
    return v.to(torch.int32)


def row_popcount(packed: Tensor) -> Tensor:
    """Number of set bits in every packed row: ``int32 [...]`` from ``int32 [..., words]``."""
    return popcount32(packed).sum(-1, dtype=torch.int32)
