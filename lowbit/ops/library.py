"""lowbit's ops as ``torch.library`` custom ops, and the packed modules built on them.

Every op is registered as ``lowbit::<name>`` with a fake (meta) implementation, so
``torch.compile`` traces through it without a graph break. Dispatch: CUDA tensors run the CuPy
kernel (:mod:`lowbit.ops.cuda`), every other device the torch reference
(:mod:`lowbit.ops.reference`). ``LOWBIT_OPS_BACKEND=reference`` forces the reference on CUDA too
(e.g. on a GPU machine without CuPy).

:class:`PackedLinear` and :class:`PackedConv2d` hold real packed weights (plain ``uint8`` /
``int8`` / ``int32`` / ``float32`` buffers, safetensors-ready) and quantize their input per token
on the fly; ``lowbit.export`` builds them from a fake-quantized model.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lowbit.ops import reference
from lowbit.ops.pack import (
    DEFAULT_ROW_ALIGN,
    pack_binary,
    pack_int4,
    packed_row_len,
    row_popcount,
    unpack_binary,
    unpack_int4,
)
from lowbit.ops.reference import QuantizedAct

__all__ = [
    "BACKEND_ENV",
    "SUPPORTED_BITS",
    "gemm_w8a8",
    "gemm_w4a8",
    "gemm_w4a4",
    "gemm_w1a1",
    "gemm_w1a4",
    "quantize_pack_act",
    "PackedLinear",
    "PackedConv2d",
    "quantize_weight",
]

#: Environment variable: "auto" (default: CUDA kernels on CUDA tensors) or "reference".
BACKEND_ENV = "LOWBIT_OPS_BACKEND"

#: (weight bits, activation bits) pairs with a GEMM.
SUPPORTED_BITS = ((8, 8), (4, 8), (4, 4), (1, 1), (1, 4))


def _use_cuda_kernels() -> bool:
    backend = os.environ.get(BACKEND_ENV, "auto").lower()
    if backend not in ("auto", "reference"):
        raise ValueError(f"{BACKEND_ENV}={backend!r}: expected 'auto' or 'reference'")
    return backend == "auto"


def _cuda():  # imported lazily: lowbit.ops.cuda needs no CuPy to import, but keep import light
    from lowbit.ops import cuda

    return cuda


def _fake_gemm(m: int, n: int, like: Tensor, out_dtype: torch.dtype) -> Tensor:
    return like.new_empty((m, n), dtype=out_dtype)


# --------------------------------------------------------------------------------- W8A8


@torch.library.custom_op("lowbit::gemm_w8a8", mutates_args=())
def _gemm_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return reference.gemm_w8a8(x_q, x_scale, w_q, w_scale, bias, out_dtype)


@_gemm_w8a8.register_kernel("cuda")
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    if not _use_cuda_kernels():
        return reference.gemm_w8a8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return _cuda().gemm_w8a8(x_q, x_scale, w_q, w_scale, bias, out_dtype)


@_gemm_w8a8.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return _fake_gemm(x_q.shape[0], w_q.shape[0], x_q, out_dtype)


def gemm_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W8A8: ``int8 [M, K]`` activations (per-token ``x_scale [M]``) × ``int8 [N, K]`` weights
    (per-channel ``w_scale [N]``) → ``[M, N]`` in ``out_dtype`` (int32: raw accumulator)."""
    return torch.ops.lowbit.gemm_w8a8(x_q, x_scale, w_q, w_scale, bias, out_dtype)


# --------------------------------------------------------------------------------- W4A8


@torch.library.custom_op("lowbit::gemm_w4a8", mutates_args=())
def _gemm_w4a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return reference.gemm_w4a8(x_q, x_scale, w_packed, w_scale, bias, out_dtype)


@_gemm_w4a8.register_kernel("cuda")
def _(x_q, x_scale, w_packed, w_scale, bias, out_dtype):
    if not _use_cuda_kernels():
        return reference.gemm_w4a8(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
    return _cuda().gemm_w4a8(x_q, x_scale, w_packed, w_scale, bias, out_dtype)


@_gemm_w4a8.register_fake
def _(x_q, x_scale, w_packed, w_scale, bias, out_dtype):
    return _fake_gemm(x_q.shape[0], w_packed.shape[0], x_q, out_dtype)


def gemm_w4a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W4A8: ``int8 [M, K]`` activations × signed 4-bit weights packed ``uint8 [N, K/2]``."""
    return torch.ops.lowbit.gemm_w4a8(x_q, x_scale, w_packed, w_scale, bias, out_dtype)


# --------------------------------------------------------------------------------- W4A4


@torch.library.custom_op("lowbit::gemm_w4a4", mutates_args=())
def _gemm_w4a4(
    x_packed: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return reference.gemm_w4a4(x_packed, x_scale, w_packed, w_scale, bias, out_dtype)


@_gemm_w4a4.register_kernel("cuda")
def _(x_packed, x_scale, w_packed, w_scale, bias, out_dtype):
    if not _use_cuda_kernels():
        return reference.gemm_w4a4(x_packed, x_scale, w_packed, w_scale, bias, out_dtype)
    return _cuda().gemm_w4a4(x_packed, x_scale, w_packed, w_scale, bias, out_dtype)


@_gemm_w4a4.register_fake
def _(x_packed, x_scale, w_packed, w_scale, bias, out_dtype):
    return _fake_gemm(x_packed.shape[0], w_packed.shape[0], x_packed, out_dtype)


def gemm_w4a4(
    x_packed: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W4A4: signed 4-bit activations ``uint8 [M, K/2]`` × signed 4-bit weights ``uint8 [N, K/2]``."""
    return torch.ops.lowbit.gemm_w4a4(x_packed, x_scale, w_packed, w_scale, bias, out_dtype)


# --------------------------------------------------------------------------------- W1A1


@torch.library.custom_op("lowbit::gemm_w1a1", mutates_args=())
def _gemm_w1a1(
    x_packed: Tensor,
    x_popc: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_popc: Tensor,
    w_scale: Tensor,
    k: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return reference.gemm_w1a1(
        x_packed, x_popc, x_scale, w_packed, w_popc, w_scale, k, bias, out_dtype
    )


@_gemm_w1a1.register_kernel("cuda")
def _(x_packed, x_popc, x_scale, w_packed, w_popc, w_scale, k, bias, out_dtype):
    impl = _cuda().gemm_w1a1 if _use_cuda_kernels() else reference.gemm_w1a1
    return impl(x_packed, x_popc, x_scale, w_packed, w_popc, w_scale, k, bias, out_dtype)


@_gemm_w1a1.register_fake
def _(x_packed, x_popc, x_scale, w_packed, w_popc, w_scale, k, bias, out_dtype):
    return _fake_gemm(x_packed.shape[0], w_packed.shape[0], x_packed, out_dtype)


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
    """W1A1: ±1 activations ``int32 [M, W]`` × ±1 weights ``int32 [N, W]`` (32 per word), with
    row popcounts ``x_popc [M]`` / ``w_popc [N]`` and the true reduction length ``k``."""
    return torch.ops.lowbit.gemm_w1a1(
        x_packed, x_popc, x_scale, w_packed, w_popc, w_scale, k, bias, out_dtype
    )


# --------------------------------------------------------------------------------- W1A4


@torch.library.custom_op("lowbit::gemm_w1a4", mutates_args=())
def _gemm_w1a4(
    x_planes: Tensor,
    x_plane_popc: Tensor,
    x_scale: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_popc: Tensor,
    w_scale: Tensor,
    k: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return reference.gemm_w1a4(
        x_planes, x_plane_popc, x_scale, x_zero, w_packed, w_popc, w_scale, k, bias, out_dtype
    )


@_gemm_w1a4.register_kernel("cuda")
def _(x_planes, x_plane_popc, x_scale, x_zero, w_packed, w_popc, w_scale, k, bias, out_dtype):
    impl = _cuda().gemm_w1a4 if _use_cuda_kernels() else reference.gemm_w1a4
    return impl(
        x_planes, x_plane_popc, x_scale, x_zero, w_packed, w_popc, w_scale, k, bias, out_dtype
    )


@_gemm_w1a4.register_fake
def _(x_planes, x_plane_popc, x_scale, x_zero, w_packed, w_popc, w_scale, k, bias, out_dtype):
    return _fake_gemm(x_planes.shape[0], w_packed.shape[0], x_planes, out_dtype)


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
    """W1A4: 4-bit activations as bit-planes ``int32 [M, 4, W]`` (plane popcounts ``[M, 4]``;
    ``x_zero=None`` for signed two's complement, else unsigned with ``int32 [M]`` zero points)
    × ±1 weights ``int32 [N, W]``."""
    return torch.ops.lowbit.gemm_w1a4(
        x_planes, x_plane_popc, x_scale, x_zero, w_packed, w_popc, w_scale, k, bias, out_dtype
    )


# ------------------------------------------------------------------ activation quantization


def _act_shapes(m: int, k: int, bits: int, planes: bool) -> tuple[tuple[int, ...], torch.dtype]:
    if planes:
        return (m, 4, packed_row_len(k, 1, DEFAULT_ROW_ALIGN)), torch.int32
    dtype = {8: torch.int8, 4: torch.uint8, 1: torch.int32}[bits]
    return (m, packed_row_len(k, bits, DEFAULT_ROW_ALIGN)), dtype


def _validate_act_args(bits: int, planes: bool, signed: bool) -> None:
    ok = (bits in (8, 4, 1) and not planes and signed) or (bits == 4 and planes)
    if not ok:
        raise ValueError(
            f"quantize_pack_act: unsupported bits={bits}, planes={planes}, signed={signed}; "
            "use bits 8/4/1 (signed), or bits=4 with planes=True (signed or unsigned)"
        )


def _as_op_outputs(act: QuantizedAct, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # custom ops return tensors only: absent parts become (distinct) empty int32 tensors
    return (
        act.data,
        act.scale,
        like.new_empty((0,), dtype=torch.int32) if act.zero is None else act.zero,
        like.new_empty((0,), dtype=torch.int32) if act.popc is None else act.popc,
    )


@torch.library.custom_op("lowbit::quantize_act", mutates_args=())
def _quantize_act(
    x: Tensor, bits: int, planes: bool, signed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _validate_act_args(bits, planes, signed)
    return _as_op_outputs(reference.quantize_act(x, bits, planes=planes, signed=signed), x)


@_quantize_act.register_kernel("cuda")
def _(x, bits, planes, signed):
    _validate_act_args(bits, planes, signed)
    if not _use_cuda_kernels():
        return _as_op_outputs(reference.quantize_act(x, bits, planes=planes, signed=signed), x)
    data, scale, zero, popc = _cuda().quantize_act(x, bits, planes=planes, signed=signed)
    return _as_op_outputs(QuantizedAct(data, scale, zero, popc), x)


@_quantize_act.register_fake
def _(x, bits, planes, signed):
    _validate_act_args(bits, planes, signed)
    m, k = x.shape
    shape, dtype = _act_shapes(m, k, bits, planes)
    zero = x.new_empty((m,) if (planes and not signed) else (0,), dtype=torch.int32)
    popc_shape = (m, 4) if planes else ((m,) if bits == 1 else (0,))
    return (
        x.new_empty(shape, dtype=dtype),
        x.new_empty((m,), dtype=torch.float32),
        zero,
        x.new_empty(popc_shape, dtype=torch.int32),
    )


def quantize_pack_act(
    x: Tensor, bits: int, planes: bool = False, signed: bool = True
) -> QuantizedAct:
    """Quantize activations ``[M, K]`` per token and pack them for the GEMMs (fused on CUDA).

    ``bits=8``/``4``: symmetric int (scale = amax/qmax, round-half-to-even of ``x·(1/scale)``);
    ``bits=1``: signs with scale mean|x|; ``bits=4, planes=True``: bit-planes for W1A4, signed or
    unsigned with a zero point. See :class:`lowbit.ops.reference.QuantizedAct` for the layouts.
    """
    data, scale, zero, popc = torch.ops.lowbit.quantize_act(x, bits, planes, signed)
    return QuantizedAct(
        data,
        scale,
        zero if zero.numel() or (planes and not signed) else None,
        popc if popc.numel() or planes or bits == 1 else None,
    )


# ----------------------------------------------------------------------------- packed modules


def _weight_storage(n: int, k: int, w_bits: int, device: torch.device | None) -> Tensor:
    if w_bits == 8:
        return torch.zeros(n, packed_row_len(k, 8), dtype=torch.int8, device=device)
    if w_bits == 4:
        return torch.zeros(n, packed_row_len(k, 4), dtype=torch.uint8, device=device)
    return torch.zeros(n, packed_row_len(k, 1), dtype=torch.int32, device=device)


class PackedLinear(nn.Module):
    """A linear layer with packed low-bit weights, running lowbit's integer GEMMs.

    Buffers (the whole ``state_dict``): ``weight_packed`` (int8 ``[N, K]``, uint8 ``[N, K/2]`` or
    int32 ``[N, words]`` by ``w_bits``), ``weight_scale`` (float32 ``[N]``), ``weight_popc`` (int32
    ``[N]``, 1-bit weights only) and ``bias`` (float32 ``[N]``, optional). ``forward`` quantizes the
    input per token to ``a_bits`` and returns ``x.dtype`` (float32 for non-float inputs).
    """

    weight_packed: Tensor
    weight_scale: Tensor
    weight_popc: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_bits: int,
        a_bits: int,
        bias: bool = True,
        act_signed: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (w_bits, a_bits) not in SUPPORTED_BITS:
            raise ValueError(
                f"w_bits={w_bits}, a_bits={a_bits}: supported pairs are {SUPPORTED_BITS}"
            )
        if not act_signed and (w_bits, a_bits) != (1, 4):
            raise ValueError("act_signed=False (zero-point activations) is only supported for W1A4")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.act_signed = w_bits, a_bits, act_signed
        self.register_buffer(
            "weight_packed", _weight_storage(out_features, in_features, w_bits, device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        popc = torch.zeros(out_features, dtype=torch.int32, device=device) if w_bits == 1 else None
        self.register_buffer("weight_popc", popc)
        b = torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        self.register_buffer("bias", b)

    # -- construction

    @torch.no_grad()
    def set_quantized_weight(
        self, w_int: Tensor, w_scale: Tensor, bias: Tensor | None = None
    ) -> None:
        """Pack integer weights ``[N, K]`` (``[-2**(b-1), 2**(b-1))``, or ±1 for 1-bit) into the buffers."""
        n, k = self.out_features, self.in_features
        if tuple(w_int.shape) != (n, k):
            raise ValueError(f"w_int has shape {tuple(w_int.shape)}, expected {(n, k)}")
        device = self.weight_packed.device
        w_int = w_int.to(device)
        if self.w_bits == 8:
            lo, hi = reference.qrange(8, True)
            if w_int.numel() and (int(w_int.min()) < lo or int(w_int.max()) > hi):
                raise ValueError("8-bit weights must lie in [-128, 127]")
            packed = torch.zeros_like(self.weight_packed)
            packed[:, :k] = w_int.to(torch.int8)
        elif self.w_bits == 4:
            packed = pack_int4(w_int)
        else:
            if w_int.numel() and not bool(((w_int == 1) | (w_int == -1)).all()):
                raise ValueError("1-bit weights must be ±1")
            packed = pack_binary(w_int)
            self.weight_popc.copy_(row_popcount(packed))
        self.weight_packed.copy_(packed)
        self.weight_scale.copy_(w_scale.reshape(-1).to(torch.float32))
        if bias is not None:
            if self.bias is None:
                raise ValueError("this layer was built without bias")
            self.bias.copy_(bias.reshape(-1).to(torch.float32))

    @classmethod
    def from_quantized(
        cls,
        w_int: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        w_bits: int,
        a_bits: int,
        act_signed: bool = True,
    ) -> PackedLinear:
        """Build from integer weights ``[N, K]`` and per-channel scales (the exporter's path)."""
        n, k = w_int.shape
        layer = cls(k, n, w_bits, a_bits, bias is not None, act_signed, device=w_int.device)
        layer.set_quantized_weight(w_int, w_scale, bias)
        return layer

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        w_bits: int = 4,
        a_bits: int = 4,
        w_scale: Tensor | None = None,
        act_signed: bool = True,
    ) -> PackedLinear:
        """Quantize a float weight ``[N, K]`` per output channel and pack it.

        Without ``w_scale``: symmetric min-max (``amax/qmax``) for 8/4-bit, XNOR-Net's
        ``α = mean|W|`` with ``sign(W)`` for 1-bit.
        """
        w_int, scale = quantize_weight(weight, w_bits, w_scale)
        return cls.from_quantized(w_int, scale, bias, w_bits, a_bits, act_signed)

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int, a_bits: int, **kwargs) -> PackedLinear:
        return cls.from_float(linear.weight, linear.bias, w_bits, a_bits, **kwargs)

    # -- inspection

    def weight_int(self) -> Tensor:
        """The integer weights ``int8 [N, K]`` (±1 for 1-bit)."""
        k = self.in_features
        if self.w_bits == 8:
            return self.weight_packed[:, :k].clone()
        if self.w_bits == 4:
            return unpack_int4(self.weight_packed, k, signed=True)
        return unpack_binary(self.weight_packed, k)

    def dequantized_weight(self) -> Tensor:
        """``weight_int × weight_scale`` in float32 — what the GEMM effectively multiplies by."""
        return self.weight_int().to(torch.float32) * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w_bits={self.w_bits}, a_bits={self.a_bits}, bias={self.bias is not None}"
            + ("" if self.act_signed else ", act_signed=False")
        )

    # -- compute

    def gemm(self, x2d: Tensor, out_dtype: torch.dtype) -> Tensor:
        """Quantize ``[M, K]`` activations per token and run the packed GEMM."""
        planes = self.w_bits == 1 and self.a_bits == 4
        act = quantize_pack_act(x2d, self.a_bits, planes=planes, signed=self.act_signed)
        w, ws, b = self.weight_packed, self.weight_scale, self.bias
        pair = (self.w_bits, self.a_bits)
        if pair == (8, 8):
            return gemm_w8a8(act.data, act.scale, w, ws, b, out_dtype)
        if pair == (4, 8):
            return gemm_w4a8(act.data, act.scale, w, ws, b, out_dtype)
        if pair == (4, 4):
            return gemm_w4a4(act.data, act.scale, w, ws, b, out_dtype)
        k = self.in_features
        if pair == (1, 1):
            return gemm_w1a1(
                act.data, act.popc, act.scale, w, self.weight_popc, ws, k, b, out_dtype
            )
        return gemm_w1a4(
            act.data, act.popc, act.scale, act.zero, w, self.weight_popc, ws, k, b, out_dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        out_dtype = (
            x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        )
        if x.dtype != out_dtype:
            x = x.to(out_dtype)
        y = self.gemm(x.reshape(-1, self.in_features), out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedConv2d(PackedLinear):
    """A 2-D convolution (groups=1, zero padding) as im2col + :class:`PackedLinear`'s GEMM.

    The weight ``[C_out, C_in, kh, kw]`` is stored flattened to ``[C_out, C_in·kh·kw]`` (the order
    of ``F.unfold``'s columns); activations are quantized per output position (one token per
    im2col row). The im2col matrix is materialised (kh·kw times the input): an implicit-GEMM
    kernel would avoid that and is future work.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        w_bits: int,
        a_bits: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        act_signed: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        kh, kw = _pair(kernel_size)
        super().__init__(
            in_channels * kh * kw, out_channels, w_bits, a_bits, bias, act_signed, device
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    @classmethod
    def from_float(  # type: ignore[override]
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        w_bits: int = 4,
        a_bits: int = 4,
        w_scale: Tensor | None = None,
        act_signed: bool = True,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> PackedConv2d:
        """Quantize a float conv weight ``[C_out, C_in, kh, kw]`` per output channel and pack it."""
        c_out, c_in, kh, kw = weight.shape
        w_int, scale = quantize_weight(weight.reshape(c_out, -1), w_bits, w_scale)
        layer = cls(
            c_in,
            c_out,
            (kh, kw),
            w_bits,
            a_bits,
            stride,
            padding,
            dilation,
            bias is not None,
            act_signed,
            device=weight.device,
        )
        layer.set_quantized_weight(w_int, scale, bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, **kwargs) -> PackedConv2d:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("PackedConv2d supports groups=1 with numeric zero padding only")
        return cls.from_float(
            conv.weight,
            conv.bias,
            w_bits,
            a_bits,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            **kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, w_bits={self.w_bits}, a_bits={self.a_bits}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        out_dtype = (
            x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        )
        cols, out_hw = reference.im2col(
            x.to(out_dtype), self.kernel_size, self.stride, self.padding, self.dilation
        )
        y = self.gemm(cols, out_dtype)
        return reference.conv_output_to_nchw(y, x.shape[0], out_hw)


def quantize_weight(
    weight: Tensor, w_bits: int, w_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-output-channel weight quantization ``[N, K]`` → (integers, float32 scales ``[N]``).

    8/4-bit: symmetric, ``scale = amax/qmax`` unless given, rounding as
    ``torch.fake_quantize_per_channel_affine``. 1-bit: ``sign(W)`` (``sign(0) = +1``) with
    ``α = mean|W|`` unless given (XNOR-Net, Rastegari et al. 2016, Eq. 4).
    """
    w = weight.detach().to(torch.float32)
    if w_bits == 1:
        scale = w.abs().mean(dim=1).clamp_min(reference.SCALE_EPS) if w_scale is None else w_scale
        return torch.where(w >= 0, 1, -1).to(torch.int8), scale.reshape(-1).to(torch.float32)
    if w_bits not in (8, 4):
        raise ValueError(f"w_bits={w_bits}: expected 8, 4 or 1")
    scale = (
        reference.symmetric_scale(w, w_bits)
        if w_scale is None
        else w_scale.reshape(-1).to(torch.float32)
    )
    q = reference.quantize_per_row(w, scale, *reference.qrange(w_bits, True))
    return q.to(torch.int8), scale
