"""lowbit.ops — packed low-bit GEMMs: bit packing, torch references, CUDA kernels, custom ops.

Importing this package needs neither CuPy nor CUDA. The public entry points::

    from lowbit.ops import gemm_w4a4, quantize_pack_act, PackedLinear

    act = quantize_pack_act(x, bits=4)                          # per-token int4, packed
    y = gemm_w4a4(act.data, act.scale, w_packed, w_scale, bias, out_dtype=torch.float16)
    layer = PackedLinear.from_float(linear.weight, linear.bias, w_bits=4, a_bits=4)

Modules: :mod:`~lowbit.ops.pack` (layouts), :mod:`~lowbit.ops.reference` (torch oracles),
:mod:`~lowbit.ops.cuda` (CuPy launchers), :mod:`~lowbit.ops.library` (``lowbit::`` custom ops and
packed modules).
"""

from lowbit.ops.library import (
    BACKEND_ENV,
    SUPPORTED_BITS,
    PackedConv2d,
    PackedLinear,
    gemm_w1a1,
    gemm_w1a4,
    gemm_w4a4,
    gemm_w4a8,
    gemm_w8a8,
    quantize_pack_act,
    quantize_weight,
)
from lowbit.ops.pack import (
    DEFAULT_ROW_ALIGN,
    pack_binary,
    pack_bitplanes,
    pack_int2,
    pack_int4,
    packed_row_len,
    popcount32,
    row_popcount,
    unpack_binary,
    unpack_bitplanes,
    unpack_int2,
    unpack_int4,
)
from lowbit.ops.reference import QuantizedAct

__all__ = [
    "BACKEND_ENV",
    "DEFAULT_ROW_ALIGN",
    "SUPPORTED_BITS",
    "PackedConv2d",
    "PackedLinear",
    "QuantizedAct",
    "gemm_w1a1",
    "gemm_w1a4",
    "gemm_w4a4",
    "gemm_w4a8",
    "gemm_w8a8",
    "pack_binary",
    "pack_bitplanes",
    "pack_int2",
    "pack_int4",
    "packed_row_len",
    "popcount32",
    "quantize_pack_act",
    "quantize_weight",
    "row_popcount",
    "unpack_binary",
    "unpack_bitplanes",
    "unpack_int2",
    "unpack_int4",
]
