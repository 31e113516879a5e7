"""CUDA path of lowbit's ops: the kernels in ``kernels/*.cu`` compiled by CuPy's NVRTC and
launched on torch tensors.

* Importing this module needs neither CuPy nor CUDA; both are looked up on the first launch and a
  clear error names the op and the fix when either is missing or a tensor is on the CPU.
* Modules are compiled lazily, once per (file, op, device), and kept by CuPy's on-disk cache
  (``~/.cupy/kernel_cache``). ``lowbit_common.cuh`` is inlined into the source text so the cache
  key covers it. CuPy adds ``-arch=sm_XX`` itself (plain sm_90 on H100: ``mma.sync``, no ``wgmma``).
* Launches go on torch's current stream (``cupy.cuda.ExternalStream``), outputs are allocated by
  torch, inputs must be contiguous CUDA tensors, scalars are passed as ``np.int32``.
* Tensor arguments are passed as raw device pointers (``np.uint64(t.data_ptr())``) of validated,
  contiguous tensors rather than through ``cupy.from_dlpack``: one DLPack exchange costs
  microseconds per tensor, and the GEMMs take nine tensors, which would outweigh the kernel at
  small shapes. :func:`to_cupy` gives a zero-copy DLPack view when a CuPy array is wanted.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.ops.pack import DEFAULT_ROW_ALIGN, packed_row_len

__all__ = [
    "CudaOpError",
    "kernel_dir",
    "kernel_source",
    "NVRTC_OPTIONS",
    "is_available",
    "to_cupy",
    "gemm_w8a8",
    "gemm_w4a8",
    "gemm_w4a4",
    "gemm_w1a1",
    "gemm_w1a4",
    "quantize_act",
    "TILE_CONFIGS",
]

#: NVRTC options; CuPy appends the architecture (-arch=sm_XX) and its own defaults.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_INCLUDE_RE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


class CudaOpError(RuntimeError):
    """A lowbit CUDA op cannot run here (no CuPy, no CUDA, tensors on the wrong device …)."""


@dataclass(frozen=True)
class TileConfig:
    """One instantiation of ``Gemm<..., BM, BN, WARPS_M, WARPS_N, STAGES>`` in gemm_lowbit.cu."""

    name: str
    bm: int
    bn: int
    threads: int
    stages: int


#: Must match LOWBIT_CFG_L / LOWBIT_CFG_S in kernels/gemm_lowbit.cu.
TILE_CONFIGS = {
    "l": TileConfig("l", 128, 128, 256, 4),
    "s": TileConfig("s", 64, 128, 256, 4),
}

# bytes of one K stage (64 int8-equivalent values) per operand format, as FmtTraits in the .cu
_STAGE_BYTES = {"s8": 64, "s4": 32, "b1": 64}
_MAX_K_INT = 2**31 // (128 * 128)  # int32 accumulator bound of an int8 (or widened int4) GEMM

# output element type, a kernel argument: must match enum OutKind in kernels/gemm_lowbit.cu
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3}
_IN_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ------------------------------------------------------------------------------ sources, CuPy


def kernel_dir() -> Path:
    """Folder of the ``.cu`` sources: ``$LOWBIT_KERNEL_DIR`` or ``lowbit/kernels`` (package data)."""
    env = os.environ.get("LOWBIT_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "kernels"


def kernel_source(filename: str, defines: tuple[str, ...] = ()) -> str:
    """The full source of ``kernels/<filename>`` with local ``#include "…"`` files inlined and
    ``#define`` lines for ``defines`` prepended — exactly the text handed to NVRTC."""
    folder = kernel_dir()
    path = folder / filename
    if not path.is_file():
        raise CudaOpError(
            f"kernel source {path} not found; set LOWBIT_KERNEL_DIR to lowbit's kernels/ folder"
        )

    def inline(text: str, seen: set[str]) -> str:
        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in seen:  # headers use #pragma once; inline each once
                return ""
            seen.add(name)
            return inline((folder / name).read_text(), seen)

        return _INCLUDE_RE.sub(repl, text)

    head = "".join(f"#define {d}\n" for d in defines)
    return head + inline(path.read_text(), set())


def _import_cupy(op: str) -> Any:
    try:
        import cupy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CudaOpError(
            f"lowbit op '{op}' needs CuPy to run its CUDA kernel: install lowbit[cuda] "
            "(pip install 'lowbit[cuda]', CuPy for CUDA 13), or use the torch reference "
            f"(lowbit.ops.reference.{op}, or set LOWBIT_OPS_BACKEND=reference)"
        ) from err
    return cupy


def is_available() -> bool:
    """True when CUDA is usable by torch and CuPy can be imported."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def to_cupy(t: Tensor) -> Any:
    """Zero-copy CuPy view of a CUDA tensor through DLPack (on torch's current stream)."""
    cp = _import_cupy("to_cupy")
    with _torch_stream(cp, t.device.index or 0):
        return cp.from_dlpack(t)


@functools.cache
def _module(filename: str, defines: tuple[str, ...], device_index: int) -> Any:
    cp = _import_cupy(filename)
    with cp.cuda.Device(device_index):
        return cp.RawModule(code=kernel_source(filename, defines), options=NVRTC_OPTIONS)


@functools.cache
def _kernel(
    filename: str, defines: tuple[str, ...], name: str, device_index: int, smem: int
) -> Any:
    cp = _import_cupy(name)
    with cp.cuda.Device(device_index):
        kernel = _module(filename, defines, device_index).get_function(name)
        if smem > 48 * 1024:  # above 48 KB a kernel must opt in to dynamic shared memory
            kernel.max_dynamic_shared_size_bytes = smem
    return kernel


@contextmanager
def _torch_stream(cp: Any, device_index: int) -> Iterator[None]:
    ptr = torch.cuda.current_stream(device_index).cuda_stream
    with warnings.catch_warnings():
        # CuPy 14 deprecates ExternalStream in favour of Stream.from_external(obj); the pointer
        # form works on CuPy 13 and 14 alike.
        warnings.simplefilter("ignore", DeprecationWarning)
        stream = cp.cuda.ExternalStream(ptr, device_index)
    with cp.cuda.Device(device_index), stream:
        yield


def _launch(
    op: str,
    filename: str,
    defines: tuple[str, ...],
    name: str,
    device: torch.device,
    grid: int,
    block: int,
    smem: int,
    args: tuple[Any, ...],
) -> None:
    cp = _import_cupy(op)
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _kernel(filename, defines, name, index, smem)
    with _torch_stream(cp, index):
        kernel((grid,), (block,), args, shared_mem=smem)


# ------------------------------------------------------------------------------ argument checks


def _ptr(t: Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _check_tensor(op: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.device.type != "cuda":
        raise CudaOpError(
            f"lowbit op '{op}': {name} is on {t.device}, but the CUDA kernel needs CUDA tensors; "
            f"move the inputs with .cuda() or call lowbit.ops.reference.{op} on CPU"
        )
    if not torch.cuda.is_available():  # pragma: no cover - cannot have CUDA tensors without it
        raise CudaOpError(f"lowbit op '{op}' needs CUDA, which torch cannot use here")
    if t.device != device:
        raise CudaOpError(f"lowbit op '{op}': {name} is on {t.device}, expected {device}")
    if t.dtype != dtype:
        raise CudaOpError(f"lowbit op '{op}': {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise CudaOpError(f"lowbit op '{op}': {name} must be contiguous (call .contiguous())")


def _vector(
    op: str, name: str, t: Tensor, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A per-row / per-column vector as a contiguous ``dtype`` tensor of ``n`` elements."""
    if t.device != device:
        _check_tensor(op, name, t, t.dtype, device)  # raises with the device in the message
    t = t.reshape(-1).to(dtype=dtype).contiguous()
    if t.numel() != n:
        raise CudaOpError(f"lowbit op '{op}': {name} has {t.numel()} elements, expected {n}")
    return t


def _aligned_rows(t: Tensor) -> Tensor:
    """Rows padded with zeros to whole 16-byte chunks and a 16-byte aligned base (the kernels'
    cp.async contract). Tensors packed by lowbit.ops.pack already are; others pay one copy."""
    row_bytes = t.shape[-1] * t.element_size()
    if row_bytes % DEFAULT_ROW_ALIGN:
        per = DEFAULT_ROW_ALIGN // t.element_size()
        t = F.pad(t, (0, -(-t.shape[-1] // per) * per - t.shape[-1]))
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _out_kind(op: str, out_dtype: torch.dtype, bias: Tensor | None) -> int:
    if out_dtype not in _OUT_KIND:
        raise CudaOpError(
            f"lowbit op '{op}': out_dtype must be one of {list(_OUT_KIND)}, got {out_dtype}"
        )
    if out_dtype == torch.int32 and bias is not None:
        raise CudaOpError(
            f"lowbit op '{op}': out_dtype=torch.int32 returns the raw accumulator; bias must be None"
        )
    return _OUT_KIND[out_dtype]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_tile(rows: int, n: int, device: torch.device) -> TileConfig:
    """128x128 tiles when they fill every SM at least once, else 64x128 (more, smaller blocks).

    A first heuristic, not tuned on hardware yet (see experiments/kernels/README.md).
    """
    big = TILE_CONFIGS["l"]
    blocks = -(-rows // big.bm) * -(-n // big.bn)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return big if blocks >= _sm_count(index) else TILE_CONFIGS["s"]


# ---------------------------------------------------------------------------------- the GEMMs


def _smem_bytes(tile: TileConfig, fa: str, fb: str, w1a4: bool) -> int:
    """Dynamic shared memory of a GEMM kernel: Gemm::kSmemBytes in gemm_lowbit.cu, the larger of
    the cp.async ring and the int32 output tile of the epilogue (rows padded by 8 words)."""
    pipeline = tile.stages * (tile.bm * _STAGE_BYTES[fa] + tile.bn * _STAGE_BYTES[fb])
    out_rows = tile.bm // 4 if w1a4 else tile.bm
    return max(pipeline, out_rows * (tile.bn + 8) * 4)


def _gemm(
    op: str,
    fa: str,
    fb: str,
    a: Tensor,
    b: Tensor,
    a_rows: int,
    out_rows: int,
    out_dtype: torch.dtype,
    bias: Tensor | None,
    a_scale: Tensor,
    b_scale: Tensor,
    a_popc: Tensor | None = None,
    b_popc: Tensor | None = None,
    a_zero: Tensor | None = None,
    k_true: int = 0,
    a_signed: bool = True,
) -> Tensor:
    """Shared launcher of every ``lowbit_gemm_<op>_<tile>`` kernel."""
    device = a.device
    n = b.shape[0]
    out_kind = _out_kind(op, out_dtype, bias)
    out = torch.empty((out_rows, n), dtype=out_dtype, device=device)
    if out_rows == 0 or n == 0:
        return out
    a_row_bytes = a.shape[-1] * a.element_size()
    b_row_bytes = b.shape[-1] * b.element_size()
    # K stages: each covers 64 int8-equivalent values (512 bits for 1-bit) of BOTH operands; the
    # shorter row is zero-filled by the kernel (value-neutral padding).
    kt = max(-(-a_row_bytes // _STAGE_BYTES[fa]), -(-b_row_bytes // _STAGE_BYTES[fb]))
    if a_rows * a_row_bytes >= 2**31 or n * b_row_bytes >= 2**31:
        raise CudaOpError(
            f"lowbit op '{op}': operands of 2 GiB or more are not supported (32-bit offsets)"
        )
    tile = _pick_tile(a_rows, n, device)
    smem = _smem_bytes(tile, fa, fb, w1a4=op == "gemm_w1a4")
    grid = -(-a_rows // tile.bm) * -(-n // tile.bn)
    name = f"lowbit_gemm_{op.removeprefix('gemm_')}_{tile.name}"
    args = (
        _ptr(a),
        _ptr(b),
        _ptr(out),
        _ptr(a_scale),
        _ptr(b_scale),
        _ptr(bias),
        _ptr(a_popc),
        _ptr(b_popc),
        _ptr(a_zero),
        np.int32(a_rows),
        np.int32(n),
        np.int32(a_row_bytes),
        np.int32(b_row_bytes),
        np.int32(kt),
        np.int32(k_true),
        np.int32(1 if a_signed else 0),
        np.int32(out_kind),
    )
    define = f"LOWBIT_OP_{op.removeprefix('gemm_').upper()}"
    _launch(op, "gemm_lowbit.cu", (define,), name, device, grid, tile.threads, smem, args)
    return out


def _common(
    op: str,
    a: Tensor,
    a_dtype: torch.dtype,
    a_scale: Tensor,
    b: Tensor,
    b_dtype: torch.dtype,
    b_scale: Tensor,
    bias: Tensor | None,
    a_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    device = a.device
    _check_tensor(op, "activation", a, a_dtype, device)
    _check_tensor(op, "weight", b, b_dtype, device)
    a, b = _aligned_rows(a), _aligned_rows(b)
    a_scale = _vector(op, "x_scale", a_scale, a_rows, torch.float32, device)
    b_scale = _vector(op, "w_scale", b_scale, b.shape[0], torch.float32, device)
    if bias is not None:
        bias = _vector(op, "bias", bias, b.shape[0], torch.float32, device)
    return a, a_scale, b, b_scale, bias


def _check_int_k(op: str, a_values: int, b_values: int) -> None:
    if -(-a_values // 32) != -(-b_values // 32):
        raise CudaOpError(
            f"lowbit op '{op}': activation K={a_values} and weight K={b_values} differ beyond padding"
        )
    if max(a_values, b_values) > _MAX_K_INT:
        raise CudaOpError(
            f"lowbit op '{op}': K may overflow the int32 accumulator (max {_MAX_K_INT})"
        )


def gemm_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """CUDA W8A8: int8 ``[M, K]`` × int8 ``[N, K]`` (see lowbit.ops.reference.gemm_w8a8)."""
    op = "gemm_w8a8"
    a, xs, b, ws, bias = _common(
        op, x_q, torch.int8, x_scale, w_q, torch.int8, w_scale, bias, x_q.shape[0]
    )
    _check_int_k(op, x_q.shape[-1], w_q.shape[-1])
    return _gemm(op, "s8", "s8", a, b, a.shape[0], a.shape[0], out_dtype, bias, xs, ws)


def gemm_w4a8(
    x_q: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """CUDA W4A8: int8 ``[M, K]`` × packed signed 4-bit ``uint8 [N, K/2]``."""
    op = "gemm_w4a8"
    a, xs, b, ws, bias = _common(
        op, x_q, torch.int8, x_scale, w_packed, torch.uint8, w_scale, bias, x_q.shape[0]
    )
    _check_int_k(op, x_q.shape[-1], 2 * w_packed.shape[-1])
    return _gemm(op, "s8", "s4", a, b, a.shape[0], a.shape[0], out_dtype, bias, xs, ws)


def gemm_w4a4(
    x_packed: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """CUDA W4A4: packed signed 4-bit ``uint8 [M, K/2]`` × ``uint8 [N, K/2]``."""
    op = "gemm_w4a4"
    a, xs, b, ws, bias = _common(
        op, x_packed, torch.uint8, x_scale, w_packed, torch.uint8, w_scale, bias, x_packed.shape[0]
    )
    _check_int_k(op, 2 * x_packed.shape[-1], 2 * w_packed.shape[-1])
    return _gemm(op, "s4", "s4", a, b, a.shape[0], a.shape[0], out_dtype, bias, xs, ws)


def _check_binary(op: str, words_a: int, words_b: int, k: int) -> None:
    if words_a != words_b:
        raise CudaOpError(
            f"lowbit op '{op}': activation and weight rows hold {words_a} vs {words_b} words"
        )
    if not 0 < k <= 32 * words_b:
        raise CudaOpError(f"lowbit op '{op}': k={k} does not fit in {words_b} words")


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
    """CUDA W1A1: ±1 bits ``int32 [M, W]`` × ``int32 [N, W]`` with the popcount identity."""
    op = "gemm_w1a1"
    m = x_packed.shape[0]
    a, xs, b, ws, bias = _common(
        op, x_packed, torch.int32, x_scale, w_packed, torch.int32, w_scale, bias, m
    )
    _check_binary(op, a.shape[-1], b.shape[-1], k)
    device = a.device
    a_popc = _vector(op, "x_popc", x_popc, m, torch.int32, device)
    b_popc = _vector(op, "w_popc", w_popc, b.shape[0], torch.int32, device)
    return _gemm(op, "b1", "b1", a, b, m, m, out_dtype, bias, xs, ws, a_popc, b_popc, None, k)


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
    """CUDA W1A4: 4-bit activation bit-planes ``int32 [M, 4, W]`` × ±1 weights ``int32 [N, W]``."""
    op = "gemm_w1a4"
    if x_planes.dim() != 3 or x_planes.shape[1] != 4:
        raise CudaOpError(
            f"lowbit op '{op}': x_planes must be [M, 4, words], got {tuple(x_planes.shape)}"
        )
    m = x_planes.shape[0]
    # The kernel sees the planes as a [4M, W] binary matrix: row 4·m + b is plane b of token m.
    a2 = x_planes.reshape(4 * m, x_planes.shape[-1]) if x_planes.is_contiguous() else x_planes
    a, xs, b, ws, bias = _common(
        op, a2, torch.int32, x_scale, w_packed, torch.int32, w_scale, bias, m
    )
    _check_binary(op, a.shape[-1], b.shape[-1], k)
    device = a.device
    a_popc = _vector(op, "x_plane_popc", x_plane_popc, 4 * m, torch.int32, device)
    b_popc = _vector(op, "w_popc", w_popc, b.shape[0], torch.int32, device)
    zero = None if x_zero is None else _vector(op, "x_zero", x_zero, m, torch.int32, device)
    return _gemm(
        op,
        "b1",
        "b1",
        a,
        b,
        4 * m,
        m,
        out_dtype,
        bias,
        xs,
        ws,
        a_popc,
        b_popc,
        zero,
        k,
        a_signed=x_zero is None,
    )


# -------------------------------------------------------------------- activation quantization

_QUANT_MODES = {
    (8, False, True): "q8",
    (4, False, True): "q4",
    (1, False, True): "b1",
    (4, True, True): "planes_s",
    (4, True, False): "planes_u",
}


def _row_len(k: int, bits: int) -> int:
    return packed_row_len(k, bits, DEFAULT_ROW_ALIGN)


def quantize_act(
    x: Tensor, bits: int, planes: bool = False, signed: bool = True
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """CUDA fused per-token quantize-and-pack (see lowbit.ops.reference.quantize_act).

    Returns ``(data, scale, zero, popc)`` in the layouts of :class:`reference.QuantizedAct`.
    """
    op = "quantize_act"
    if x.dim() != 2:
        raise CudaOpError(f"lowbit op '{op}' expects [M, K] activations, got {tuple(x.shape)}")
    if x.device.type != "cuda":
        _check_tensor(op, "x", x, x.dtype, x.device)
    if x.dtype not in _IN_SUFFIX:
        raise CudaOpError(
            f"lowbit op '{op}': x must be float32, float16 or bfloat16, got {x.dtype}"
        )
    mode = _QUANT_MODES.get((bits, planes, signed if planes else True))
    if mode is None:
        raise CudaOpError(
            f"lowbit op '{op}': unsupported bits={bits} planes={planes} signed={signed}"
        )
    x = x.contiguous()
    m, k = x.shape
    if k == 0:
        raise CudaOpError(f"lowbit op '{op}': K must be > 0")
    device = x.device
    scale = torch.empty(m, dtype=torch.float32, device=device)
    zero = popc = None
    if mode == "q8":
        data = torch.empty((m, _row_len(k, 8)), dtype=torch.int8, device=device)
    elif mode == "q4":
        data = torch.empty((m, _row_len(k, 4)), dtype=torch.uint8, device=device)
    elif mode == "b1":
        data = torch.empty((m, _row_len(k, 1)), dtype=torch.int32, device=device)
        popc = torch.empty(m, dtype=torch.int32, device=device)
    else:
        data = torch.empty((m, 4, _row_len(k, 1)), dtype=torch.int32, device=device)
        popc = torch.empty((m, 4), dtype=torch.int32, device=device)
        if mode == "planes_u":
            zero = torch.empty(m, dtype=torch.int32, device=device)
    if m == 0:
        return data, scale, zero, popc
    args = (
        _ptr(x),
        np.int32(k),
        _ptr(data),
        np.int32(data.shape[-1]),
        _ptr(scale),
        _ptr(zero),
        _ptr(popc),
    )
    name = f"lowbit_quant_{mode}_{_IN_SUFFIX[x.dtype]}"
    _launch(op, "quantize_act.cu", (), name, device, m, 256, 0, args)
    return data, scale, zero, popc
