"""The CUDA sources compile for sm_80 and sm_90, and their index arithmetic is right.

No GPU is needed here:

* every ``kernels/*.cu`` is compiled to a cubin by ``nvcc`` for sm_80 and sm_90 (ptxas checks the
  inline PTX: mma shapes, cp.async, cvt), and through NVRTC with the options CuPy uses;
* a NumPy emulation of ``gemm_lowbit.cu`` — written line by line after the kernel: the grouped
  block rasterisation, the cp.async chunk mapping with zero fill, the per-thread k permutation,
  the 4-bit widening, the fragment assembly, the epilogues with their warp shuffles — and of the
  ``mma.sync`` fragment layouts as the PTX ISA defines them, is checked against exact integer
  matmuls on odd shapes. It cannot prove the compiled code right (that is tests/test_ops_gpu.py's
  job on a GPU), but it catches wrong layouts, permutations and bounds in the algorithm.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.ops import pack as P
from lowbit.ops.cuda import NVRTC_OPTIONS, TILE_CONFIGS, kernel_dir, kernel_source

KERNELS = sorted(p.name for p in kernel_dir().glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
)


# ------------------------------------------------------------------------------ compilation


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Compile every (file, arch) once, in parallel (the front end is slow, cores are few)."""
    if NVCC is None:
        pytest.skip("nvcc not found on PATH (install the CUDA toolkit to run the compile tests)")
    out = tmp_path_factory.mktemp("cubin")

    def build(job: tuple[str, str]) -> subprocess.CompletedProcess:
        name, arch = job
        cmd = [
            NVCC,
            "-std=c++17",
            f"-arch={arch}",
            "-cubin",
            "-Werror",
            "all-warnings",
            "-o",
            str(out / f"{name}.{arch}.cubin"),
            str(kernel_dir() / name),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    jobs = [(k, a) for k in KERNELS for a in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return dict(zip(jobs, pool.map(build, jobs)))


def test_kernel_sources_exist():
    assert {"gemm_lowbit.cu", "quantize_act.cu"} <= set(KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", KERNELS)
def test_nvcc_compiles(nvcc_results, name, arch):
    res = nvcc_results[(name, arch)]
    assert res.returncode == 0, f"nvcc -arch={arch} {name} failed:\n{res.stderr}"


def _nvrtc_compile(source: str, arch: str) -> tuple[bool, str]:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"lowbit.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    # the options cupy.RawModule passes: ours, then -arch=sm_XX and its defaults
    opts = [
        o.encode()
        for o in (
            *NVRTC_OPTIONS,
            f"-arch={arch}",
            "--device-as-default-execution-space",
            "-ftz=true",
        )
    ]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # a mutable buffer: NVRTC writes into it, and a 1-byte ``bytes`` would be CPython's shared
    # single-byte object (writing there corrupts every later b" " in the process)
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    return res == nvrtc.nvrtcResult.NVRTC_SUCCESS, bytes(log).rstrip(b"\0").decode(errors="replace")


@pytest.mark.parametrize(
    "name, defines", [("gemm_lowbit.cu", ("LOWBIT_OP_W1A4",)), ("quantize_act.cu", ())]
)
def test_nvrtc_compiles_as_cupy_would(name, defines):
    """NVRTC has no CUDA headers on its path: the sources must need none (and the loader's
    include inlining and per-op defines must produce valid code)."""
    ok, log = _nvrtc_compile(kernel_source(name, defines), "sm_90")
    assert ok, log


@pytest.mark.slow
@pytest.mark.parametrize("op", ["W8A8", "W4A8", "W4A4", "W1A1", "W1A4"])
def test_nvrtc_compiles_every_op(op):
    ok, log = _nvrtc_compile(kernel_source("gemm_lowbit.cu", (f"LOWBIT_OP_{op}",)), "sm_90")
    assert ok, log


def test_kernel_source_inlines_common_header():
    src = kernel_source("gemm_lowbit.cu", ("LOWBIT_OP_W8A8",))
    assert '#include "' not in src
    assert src.startswith("#define LOWBIT_OP_W8A8\n")
    assert "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc" in src


# ------------------------------------------------------------------------ kernel emulation
# Formats and tile constants as in gemm_lowbit.cu.

S8, S4, B1 = "s8", "s4", "b1"
STAGE_BYTES = {S8: 64, S4: 32, B1: 64}
M32 = 0xFFFFFFFF


def _u32(b: np.ndarray) -> int:
    return int.from_bytes(bytes(b.astype(np.uint8)), "little")


def _prmt(a: int, b: int, sel: int) -> int:
    src = a.to_bytes(4, "little") + b.to_bytes(4, "little")
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def load_slice(fmt: str, linear: bool, row_stage: np.ndarray, t: int) -> list[int]:
    """lowbit::load_slice: the four 32-bit words thread t takes from one row of a stage."""
    if fmt == S4:
        px, py = _u32(row_stage[8 * t : 8 * t + 4]), _u32(row_stage[8 * t + 4 : 8 * t + 8])
        lo0, hi0 = (px << 4) & 0xF0F0F0F0, px & 0xF0F0F0F0
        lo1, hi1 = (py << 4) & 0xF0F0F0F0, py & 0xF0F0F0F0
        if linear:
            return [
                _prmt(lo0, hi0, 0x5140),
                _prmt(lo0, hi0, 0x7362),
                _prmt(lo1, hi1, 0x5140),
                _prmt(lo1, hi1, 0x7362),
            ]
        return [lo0, hi0, lo1, hi1]
    return [_u32(row_stage[16 * t + 4 * r : 16 * t + 4 * r + 4]) for r in range(4)]


def _s8(word: int) -> list[int]:
    return [int(np.int8(np.uint8((word >> (8 * j)) & 0xFF))) for j in range(4)]


@functools.cache
def _fragment_maps(binary: bool) -> tuple[np.ndarray, ...]:
    """Row/column of every fragment element of every lane, per the PTX ISA.

    s8 m16n8k32: A element i of a lane is byte i%4 of register i//4, at row g (i<4 or 8<=i<12)
    else g+8 and column 4t + i%4 (+16 for i>=8); B element i at k = 4t + i%4 (+16 for i>=4),
    n = g. b1 m16n8k256: the same with 32 single bits per register (bit j of register r is
    element 32r + j) and 32/128 in place of 4/16. C element e at row g (+8 for e>=2), column
    2t + e%2.
    """
    kdim, per = (256, 32) if binary else (32, 4)
    lane = np.arange(32)[:, None, None]
    g, t = lane >> 2, lane & 3
    i = per * np.arange(4)[None, :, None] + np.arange(per)[None, None, :]  # [1, 4, per]
    a_row = np.where((i < per) | ((2 * per <= i) & (i < 3 * per)), g, g + 8) + 0 * i
    a_col = per * t + (i % per) + np.where(i >= 2 * per, kdim // 2, 0)
    ib = per * np.arange(2)[None, :, None] + np.arange(per)[None, None, :]  # [1, 2, per]
    b_k = per * t + (ib % per) + np.where(ib >= per, kdim // 2, 0)
    b_n = g + 0 * ib
    e = np.arange(4)[None, :]
    c_row = (np.arange(32)[:, None] >> 2) + 8 * (e >= 2)
    c_col = 2 * (np.arange(32)[:, None] & 3) + (e & 1)
    return a_row, a_col, b_k, b_n, c_row, c_col


def _elements(regs: np.ndarray, binary: bool) -> np.ndarray:
    """[lanes, regs] 32-bit words -> [lanes, regs, elements] (signed bytes or single bits)."""
    regs = regs.astype(np.int64)[..., None]
    if binary:
        return (regs >> np.arange(32)) & 1
    v = (regs >> (8 * np.arange(4))) & 0xFF
    return v - 256 * (v >= 128)


def mma_emulate(binary: bool, a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """One warp's mma.sync (s8 m16n8k32 or b1 m16n8k256 AND+popc) from per-lane registers
    ``a_regs [32, 4]`` and ``b_regs [32, 2]``; returns the per-lane C fragments ``[32, 4]``."""
    a_row, a_col, b_k, b_n, c_row, c_col = _fragment_maps(binary)
    kdim = 256 if binary else 32
    amat = np.zeros((16, kdim), dtype=np.int64)
    bmat = np.zeros((kdim, 8), dtype=np.int64)
    amat[a_row, a_col] = _elements(a_regs, binary)
    bmat[b_k, b_n] = _elements(b_regs, binary)
    c = amat @ bmat  # for bits: Σ_k a·b = popc(a AND b)
    return c[c_row, c_col]


def test_fragment_maps_cover_each_element_once():
    for binary in (False, True):
        a_row, a_col, b_k, b_n, c_row, c_col = _fragment_maps(binary)
        kdim = 256 if binary else 32
        assert len(set(zip(a_row.ravel(), a_col.ravel()))) == a_row.size == 16 * kdim
        assert len(set(zip(b_k.ravel(), b_n.ravel()))) == b_k.size == kdim * 8
        assert len(set(zip(c_row.ravel(), c_col.ravel()))) == c_row.size == 16 * 8


def emulate_gemm(
    fa: str,
    fb: str,
    epi: str,
    a: np.ndarray,
    b: np.ndarray,
    n: int,
    tile: str = "s",
    a_popc=None,
    b_popc=None,
    a_zero=None,
    k_true: int = 0,
    a_signed: bool = True,
) -> np.ndarray:
    """lowbit::Gemm<...>::run with the int32 output, for uint8 row matrices ``a`` and ``b``."""
    cfg = TILE_CONFIGS[tile]
    bm, bn, threads = cfg.bm, cfg.bn, cfg.threads
    warps_m, warps_n = 2, 4  # LOWBIT_CFG_L / LOWBIT_CFG_S
    warp_m, warp_n = bm // warps_m, bn // warps_n
    mt, nt = warp_m // 16, warp_n // 8
    asb, bsb = STAGE_BYTES[fa], STAGE_BYTES[fb]
    binary = fa == B1
    shift = (4 if fa == S4 else 0) + (4 if fb == S4 else 0)
    linear_a, linear_b = fb != S4, fa != S4
    a_rows, a_row_bytes = a.shape
    b_row_bytes = b.shape[1]
    kt_count = max(-(-a_row_bytes // asb), -(-b_row_bytes // bsb))
    out_rows = a_rows // 4 if epi == "w1a4" else a_rows
    out = np.zeros((out_rows, n), dtype=np.int64)
    writes = np.zeros((out_rows, n), dtype=np.int64)

    grid_m, grid_n = -(-a_rows // bm), -(-n // bn)
    group, per_group = 8, 8 * grid_n
    tiles_seen = set()
    for pid in range(grid_m * grid_n):
        gid = pid // per_group
        first_m = gid * group
        gsize = min(grid_m - first_m, group)
        pid_m = first_m + (pid % per_group) % gsize
        pid_n = (pid % per_group) // gsize
        tiles_seen.add((pid_m, pid_n))
        m0, n0 = pid_m * bm, pid_n * bn
        acc = np.zeros((8, mt, nt, 32, 4), dtype=np.int64)  # [warp][i][j][lane][e]
        for kt in range(kt_count):
            sa = np.zeros((bm, asb), dtype=np.uint8)
            sb = np.zeros((bn, bsb), dtype=np.uint8)
            for smem, src, rows, row_bytes, sbytes, brows in (
                (sa, a, a_rows, a_row_bytes, asb, bm),
                (sb, b, n, b_row_bytes, bsb, bn),
            ):
                per_row, total = sbytes // 16, brows * (sbytes // 16)
                for tid in range(threads):
                    for i in range(-(-total // threads)):
                        c = tid + i * threads
                        if total % threads and c >= total:
                            break
                        row, col = c // per_row, (c % per_row) * 16
                        kbyte = kt * sbytes + col
                        base = m0 if smem is sa else n0
                        if base + row < rows and kbyte < row_bytes:  # else zero fill
                            smem[row, col : col + 16] = src[base + row, kbyte : kbyte + 16]
            for warp in range(8):
                wm, wn = warp // warps_n, warp % warps_n
                for i in range(mt):
                    af = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r = wm * warp_m + i * 16 + g
                        af.append(
                            (
                                load_slice(fa, linear_a, sa[r], t),
                                load_slice(fa, linear_a, sa[r + 8], t),
                            )
                        )
                    for j in range(nt):
                        bf = [
                            load_slice(
                                fb, linear_b, sb[wn * warp_n + j * 8 + (lane >> 2)], lane & 3
                            )
                            for lane in range(32)
                        ]
                        for c in range(2):
                            a_regs = np.array(
                                [
                                    [
                                        af[ln][0][2 * c],
                                        af[ln][1][2 * c],
                                        af[ln][0][2 * c + 1],
                                        af[ln][1][2 * c + 1],
                                    ]
                                    for ln in range(32)
                                ],
                                dtype=np.uint64,
                            )
                            b_regs = np.array(
                                [[bf[ln][2 * c], bf[ln][2 * c + 1]] for ln in range(32)],
                                dtype=np.uint64,
                            )
                            acc[warp, i, j] += mma_emulate(binary, a_regs, b_regs)
        # epilogue phase 1: fragments (W1A4: combined over planes by the shuffles) -> tile
        out_rows_tile = bm // 4 if epi == "w1a4" else bm
        tile_mem = np.zeros((out_rows_tile, bn), dtype=np.int64)
        for warp in range(8):
            wm, wn = warp // warps_n, warp % warps_n
            for i in range(mt):
                for h in range(2):
                    for j in range(nt):
                        lanes = np.arange(32)
                        g, t = lanes >> 2, lanes & 3
                        r = wm * warp_m + i * 16 + g + 8 * h
                        c = wn * warp_n + j * 8 + 2 * t
                        v = acc[warp, i, j, :, 2 * h : 2 * h + 2].copy()
                        if epi == "w1a4":
                            bplane = g & 3
                            coeff = np.where(a_signed & (bplane == 3), -8, 1 << bplane)
                            row = m0 + r
                            pa = np.array([a_popc[x] if x < a_rows else 0 for x in row])
                            v = coeff[:, None] * (2 * v - pa[:, None])
                            v = v + v[lanes ^ 4]  # __shfl_xor_sync(v, 4)
                            v = v + v[lanes ^ 8]  # __shfl_xor_sync(v, 8)
                            for ln in lanes[bplane == 0]:
                                tile_mem[r[ln] >> 2, c[ln] : c[ln] + 2] = v[ln]
                        else:
                            for ln in lanes:
                                tile_mem[r[ln], c[ln] : c[ln] + 2] = v[ln]
        # phase 2: row-major pass over the tile
        out_row0 = m0 // 4 if epi == "w1a4" else m0
        for idx in range(out_rows_tile * bn):
            r, c = divmod(idx, bn)
            row, col = out_row0 + r, n0 + c
            if row >= out_rows or col >= n:
                continue
            v = int(tile_mem[r, c])
            if epi == "w1a1":
                v = 4 * v - 2 * int(a_popc[row]) - 2 * int(b_popc[col]) + k_true
            elif epi == "w1a4":
                if not a_signed:
                    v -= int(a_zero[row]) * (2 * int(b_popc[col]) - k_true)
            else:
                assert v % (1 << shift) == 0
                v >>= shift
            out[row, col] = v
            writes[row, col] += 1
    assert len(tiles_seen) == grid_m * grid_n, "rasterisation must visit every tile once"
    assert (writes == 1).all(), "every output element is written exactly once"
    assert np.abs(out).max(initial=0) < 2**31
    return out


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# Shapes: M and N not multiples of the tiles, K with partial stages, more than one block each way.
M, N, K = 70, 133, 200


def test_emulated_w8a8(gen):
    x = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    x = torch.nn.functional.pad(x, (0, P.pad_k(K, 8) - K))
    w = torch.nn.functional.pad(w, (0, P.pad_k(K, 8) - K))
    out = emulate_gemm(S8, S8, "scale", _bytes(x), _bytes(w), N)
    np.testing.assert_array_equal(out, x.long().numpy() @ w.long().numpy().T)


def test_emulated_w4a8_and_w4a4(gen):
    x8 = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    x4 = torch.randint(-8, 8, (M, K), generator=gen)
    w4 = torch.randint(-8, 8, (N, K), generator=gen)
    x8p = torch.nn.functional.pad(x8, (0, P.pad_k(K, 8) - K))
    out = emulate_gemm(S8, S4, "scale", _bytes(x8p), _bytes(P.pack_int4(w4)), N)
    np.testing.assert_array_equal(out, x8.long().numpy() @ w4.numpy().T)
    out = emulate_gemm(
        S4, S4, "scale", _bytes(P.pack_int4(x4)), _bytes(P.pack_int4(w4)), N, tile="l"
    )
    np.testing.assert_array_equal(out, x4.numpy() @ w4.numpy().T)


def test_emulated_w1a1(gen):
    k = 300  # 10 words, padded to 12: pad bits must not leak into the identity
    xs = torch.randint(0, 2, (M, k), generator=gen) * 2 - 1
    ws = torch.randint(0, 2, (N, k), generator=gen) * 2 - 1
    xp, wp = P.pack_binary(xs), P.pack_binary(ws)
    out = emulate_gemm(
        B1,
        B1,
        "w1a1",
        _bytes(xp),
        _bytes(wp),
        N,
        a_popc=P.row_popcount(xp).numpy(),
        b_popc=P.row_popcount(wp).numpy(),
        k_true=k,
    )
    np.testing.assert_array_equal(out, xs.numpy() @ ws.numpy().T)


@pytest.mark.parametrize("signed", [True, False])
def test_emulated_w1a4(gen, signed):
    m, k = 37, 300
    if signed:
        q = torch.randint(-8, 8, (m, k), generator=gen)
        zero = None
    else:
        q = torch.randint(0, 16, (m, k), generator=gen)
        zero = torch.randint(0, 16, (m,), generator=gen)
    ws = torch.randint(0, 2, (N, k), generator=gen) * 2 - 1
    planes, wp = P.pack_bitplanes(q), P.pack_binary(ws)
    out = emulate_gemm(
        B1,
        B1,
        "w1a4",
        _bytes(planes.reshape(4 * m, -1)),
        _bytes(wp),
        N,
        a_popc=P.row_popcount(planes).reshape(-1).numpy(),
        b_popc=P.row_popcount(wp).numpy(),
        a_zero=None if zero is None else zero.numpy(),
        k_true=k,
        a_signed=signed,
    )
    xv = q if zero is None else q - zero[:, None]
    np.testing.assert_array_equal(out, xv.numpy() @ ws.numpy().T)


def test_widening_is_sixteen_times_the_nibble():
    """(w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0 read as int8 bytes are 16·(signed nibble)."""
    nibbles = list(range(16))
    word = sum(n << (4 * i) for i, n in enumerate(nibbles[:8]))
    lo, hi = (word << 4) & 0xF0F0F0F0 & M32, word & 0xF0F0F0F0
    signed = [n - 16 if n >= 8 else n for n in nibbles[:8]]
    assert _s8(lo) == [16 * s for s in signed[0::2]]
    assert _s8(hi) == [16 * s for s in signed[1::2]]
    assert _s8(_prmt(lo, hi, 0x5140)) == [16 * s for s in signed[0:4]]
    assert _s8(_prmt(lo, hi, 0x7362)) == [16 * s for s in signed[4:8]]


# ------------------------------------------------- host launcher -> emulated kernel, end to end

_OPS = {
    "w8a8": (S8, S8, "scale"),
    "w4a8": (S8, S4, "scale"),
    "w4a4": (S4, S4, "scale"),
    "w1a1": (B1, B1, "w1a1"),
    "w1a4": (B1, B1, "w1a4"),
}


def _view(ptr: int, count: int, dtype: np.dtype) -> np.ndarray:
    """NumPy view of host memory at a raw pointer (the fake 'device' memory of CPU tensors)."""
    import ctypes

    if count == 0:
        return np.zeros(0, dtype=dtype)
    buf = (ctypes.c_uint8 * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype)


def _fake_launch(op, filename, defines, name, device, grid, block, smem, args):
    """Stands in for lowbit.ops.cuda._launch: decodes the kernel arguments exactly as the CUDA
    kernel's signature does and runs the emulation on the memory the pointers point to."""
    (
        pa,
        pb,
        pout,
        pxs,
        pws,
        pbias,
        papopc,
        pbpopc,
        pzero,
        a_rows,
        n,
        a_rb,
        b_rb,
        kt,
        k_true,
        a_signed,
        out_kind,
    ) = (int(v) for v in args)
    _, _, opname, tile = name.split("_")
    fa, fb, epi = _OPS[opname]
    assert filename == "gemm_lowbit.cu" and defines == (f"LOWBIT_OP_{opname.upper()}",)
    cfg = TILE_CONFIGS[tile]
    assert block == cfg.threads and grid == -(-a_rows // cfg.bm) * -(-n // cfg.bn)
    assert kt == max(-(-a_rb // STAGE_BYTES[fa]), -(-b_rb // STAGE_BYTES[fb]))
    out_rows = a_rows // 4 if epi == "w1a4" else a_rows
    pipeline = cfg.stages * (cfg.bm * STAGE_BYTES[fa] + cfg.bn * STAGE_BYTES[fb])
    assert smem == max(pipeline, (cfg.bm // 4 if epi == "w1a4" else cfg.bm) * (cfg.bn + 8) * 4)
    a = _view(pa, a_rows * a_rb, np.uint8).reshape(a_rows, a_rb)
    b = _view(pb, n * b_rb, np.uint8).reshape(n, b_rb)
    acc = emulate_gemm(
        fa,
        fb,
        epi,
        a,
        b,
        n,
        tile,
        a_popc=_view(papopc, a_rows, np.int32) if papopc else None,
        b_popc=_view(pbpopc, n, np.int32) if pbpopc else None,
        a_zero=_view(pzero, out_rows, np.int32) if pzero else None,
        k_true=k_true,
        a_signed=bool(a_signed),
    )
    if out_kind == 3:
        _view(pout, out_rows * n, np.int32)[:] = acc.reshape(-1)
        return
    assert out_kind == 0, "the end-to-end check uses float32 outputs"
    y = (acc.astype(np.float32) * _view(pxs, out_rows, np.float32)[:, None]) * _view(
        pws, n, np.float32
    )[None, :]
    if pbias:
        y = y + _view(pbias, n, np.float32)[None, :]
    _view(pout, out_rows * n, np.float32)[:] = y.reshape(-1)


@pytest.mark.parametrize("op", sorted(_OPS))
def test_host_launcher_drives_emulated_kernel(monkeypatch, gen, op):
    """lowbit.ops.cuda's argument marshalling, K-stage count, grid, shared memory and padding
    of unaligned rows, checked by running the emulated kernel on what it passes."""
    from lowbit.ops import cuda as kernels
    from lowbit.ops import reference as R

    def check_tensor(op_, name, t, dtype, device):  # CPU tensors stand in for CUDA ones
        assert t.dtype == dtype and t.is_contiguous() and t.device == device, name

    monkeypatch.setattr(kernels, "_check_tensor", check_tensor)
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    monkeypatch.setattr(kernels, "_launch", _fake_launch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    m, k, n = 37, 100, 70
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    from lowbit import ops

    w_bits, a_bits = int(op[1]), int(op[3])
    layer = ops.PackedLinear.from_float(w, bias, w_bits, a_bits, act_signed=(op != "w1a4"))
    act = R.quantize_act(x, a_bits, planes=op == "w1a4", signed=op != "w1a4")
    wp, ws, wpc = layer.weight_packed, layer.weight_scale, layer.weight_popc
    if op == "w8a8":
        args = (
            act.data[:, :k].contiguous(),
            act.scale,
            wp[:, :k].contiguous(),
            ws,
        )  # unaligned rows
    elif op in ("w4a8", "w4a4"):
        args = (act.data, act.scale, wp, ws)
    elif op == "w1a1":
        args = (act.data, act.popc, act.scale, wp, wpc, ws, k)
    else:
        args = (act.data, act.popc, act.scale, act.zero, wp, wpc, ws, k)
    fn_cuda, fn_ref = getattr(kernels, f"gemm_{op}"), getattr(R, f"gemm_{op}")
    assert torch.equal(fn_cuda(*args, None, torch.int32), fn_ref(*args, None, torch.int32))
    assert torch.equal(fn_cuda(*args, bias, torch.float32), fn_ref(*args, bias, torch.float32))
