"""Reference GEMMs and quantizers: exact integer results, bit-exact rounding, custom ops, modules.

Oracles nobody here wrote: float64 matmuls of the integer values (exact below 2**53), the ±1 float
matmul, ``torch.fake_quantize_per_channel_affine`` and ``F.conv2d``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowbit.ops as ops
from lowbit.ops import pack as P
from lowbit.ops import reference as R
from lowbit.ops.cuda import CudaOpError

ODD_K = [1, 7, 33, 257]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _f64_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.to(torch.float64) @ b.to(torch.float64).T


# ------------------------------------------------------------------------ integer accumulators


@pytest.mark.parametrize("m, k, n", [(3, 5, 7), (17, 8, 8), (32, 64, 24), (20, 33, 9)])
def test_int_matmul_exact(gen, m, k, n):
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    acc = R.int_matmul(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.float64), _f64_mm(a, b))


def test_int_matmul_extremes_do_not_overflow():
    k = 4096
    a = torch.full((17, k), -128, dtype=torch.int8)
    b = torch.full((8, k), -128, dtype=torch.int8)
    assert R.int_matmul(a, b)[0, 0].item() == 128 * 128 * k


@pytest.mark.parametrize("k", ODD_K)
def test_w8a8_accumulator_exact(gen, k):
    x = torch.randint(-128, 128, (19, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (11, k), generator=gen, dtype=torch.int8)
    one_m, one_n = torch.ones(19), torch.ones(11)
    acc = ops.gemm_w8a8(x, one_m, w, one_n, out_dtype=torch.int32)
    assert torch.equal(acc.to(torch.float64), _f64_mm(x, w))


@pytest.mark.parametrize("k", ODD_K)
def test_w4a8_and_w4a4_accumulators_exact(gen, k):
    x8 = torch.randint(-128, 128, (18, k), generator=gen, dtype=torch.int8)
    x4 = torch.randint(-8, 8, (18, k), generator=gen)
    w4 = torch.randint(-8, 8, (13, k), generator=gen)
    one_m, one_n = torch.ones(18), torch.ones(13)
    x8p = F.pad(x8, (0, P.pad_k(k, 8) - k))  # kernel-ready rows; the shorter row is zero-extended
    acc = ops.gemm_w4a8(x8p, one_m, P.pack_int4(w4), one_n, out_dtype=torch.int32)
    assert torch.equal(acc.to(torch.float64), _f64_mm(x8, w4))
    acc = ops.gemm_w4a4(P.pack_int4(x4), one_m, P.pack_int4(w4), one_n, out_dtype=torch.int32)
    assert torch.equal(acc.to(torch.float64), _f64_mm(x4, w4))


def test_k_mismatch_beyond_padding_raises(gen):
    x = torch.zeros(4, 64, dtype=torch.int8)
    w = torch.zeros(4, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="differ beyond padding"):
        R.gemm_w8a8(x, torch.ones(4), w, torch.ones(4))


@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 257, 300])
def test_w1a1_popcount_identity_equals_pm1_matmul(gen, k):
    xs = torch.randint(0, 2, (9, k), generator=gen) * 2 - 1
    ws = torch.randint(0, 2, (14, k), generator=gen) * 2 - 1
    xp, wp = P.pack_binary(xs), P.pack_binary(ws)
    acc = ops.gemm_w1a1(
        xp,
        P.row_popcount(xp),
        torch.ones(9),
        wp,
        P.row_popcount(wp),
        torch.ones(14),
        k,
        out_dtype=torch.int32,
    )
    assert torch.equal(acc.to(torch.float64), _f64_mm(xs, ws))


@pytest.mark.parametrize("k", [1, 7, 33, 257])
@pytest.mark.parametrize("signed", [True, False])
def test_w1a4_bitserial_equals_direct(gen, k, signed):
    m, n = 10, 12
    if signed:
        q, zero = torch.randint(-8, 8, (m, k), generator=gen), None
    else:
        q, zero = (
            torch.randint(0, 16, (m, k), generator=gen),
            torch.randint(0, 16, (m,), generator=gen),
        )
    ws = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
    planes, wp = P.pack_bitplanes(q), P.pack_binary(ws)
    acc = ops.gemm_w1a4(
        planes,
        P.row_popcount(planes),
        torch.ones(m),
        zero,
        wp,
        P.row_popcount(wp),
        torch.ones(n),
        k,
        out_dtype=torch.int32,
    )
    xv = q if zero is None else q - zero[:, None]
    assert torch.equal(acc.to(torch.float64), _f64_mm(xv, ws))


# ------------------------------------------------------------------------------- epilogue


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_epilogue_is_scale_then_scale_then_bias(gen, out_dtype):
    x = torch.randint(-128, 128, (20, 48), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (16, 48), generator=gen, dtype=torch.int8)
    xs, ws = torch.rand(20, generator=gen) / 100, torch.rand(16, generator=gen) / 100
    bias = torch.randn(16, generator=gen)
    out = ops.gemm_w8a8(x, xs, w, ws, bias, out_dtype=out_dtype)
    acc = _f64_mm(x, w).to(torch.int32)
    expected = ((acc.float() * xs[:, None]) * ws[None, :] + bias).to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, expected)


def test_int32_output_rejects_bias():
    x = torch.zeros(2, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="bias must be None"):
        R.gemm_w8a8(x, torch.ones(2), x, torch.ones(2), torch.ones(2), torch.int32)


# ---------------------------------------------------------------------- activation quantizer


def _fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int
):
    zp = torch.zeros(x.shape[0], dtype=torch.int32) if zero is None else zero.to(torch.int32)
    return torch.fake_quantize_per_channel_affine(x.float(), scale, zp, 0, qmin, qmax)


def _rows_with_ties_and_degenerates(gen: torch.Generator, k: int) -> torch.Tensor:
    x = torch.randn(12, k, generator=gen) * torch.logspace(-3, 2, 12)[:, None]
    # row 0: amax = 127·2^-4, so scale = 2^-4 exactly and (j + 0.5)·2^-4 are exact ties
    ties = (torch.arange(k) % 9 - 4).float() + 0.5
    x[0] = ties * 2.0**-4
    x[0, 0] = 127 * 2.0**-4
    x[1] = 0.0  # all-zero token: scale eps, q = 0, no NaN
    x[2] = 3.0  # constant token
    return x


@pytest.mark.parametrize("k", [33, 257])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_symmetric_act_quant_bitexact_vs_fake_quantize(gen, k, bits, dtype):
    x = _rows_with_ties_and_degenerates(gen, k).to(dtype)
    act = ops.quantize_pack_act(x, bits)
    assert torch.isfinite(act.scale).all() and (act.scale > 0).all()
    q = act.data[:, :k].to(torch.int64) if bits == 8 else P.unpack_int4(act.data, k).to(torch.int64)
    qmin, qmax = R.qrange(bits, True)
    expected = _fake_quant(x, act.scale, None, qmin, qmax)
    assert torch.equal(q.float() * act.scale[:, None], expected)
    assert torch.equal(act.scale, R.symmetric_scale(x, bits))


def test_ties_round_half_to_even(gen):
    x = _rows_with_ties_and_degenerates(gen, 33)
    q = ops.quantize_pack_act(x, 8).data[0, :33].to(torch.int64)
    exact = x[0] * 16  # the pre-rounding values, exact in float32
    assert torch.equal(q, torch.round(exact).to(torch.int64))  # torch.round: half to even
    assert set(q[1:].abs().tolist()) <= {0, 2, 4}  # ±0.5 → 0, ±1.5 → ±2, ... ±3.5 → ±4


@pytest.mark.parametrize("k", [33, 257])
def test_unsigned_planes_bitexact_vs_fake_quantize(gen, k):
    x = _rows_with_ties_and_degenerates(gen, k) + 0.3
    act = ops.quantize_pack_act(x, 4, planes=True, signed=False)
    q = P.unpack_bitplanes(act.data, k, signed=False).to(torch.int64) & 0xF
    expected = _fake_quant(x, act.scale, act.zero, 0, 15)
    assert torch.equal((q - act.zero[:, None]).float() * act.scale[:, None], expected)
    assert torch.equal(act.popc, P.row_popcount(act.data))


def test_signed_planes_and_binary_acts(gen):
    x = _rows_with_ties_and_degenerates(gen, 70)
    planes = ops.quantize_pack_act(x, 4, planes=True)
    packed4 = ops.quantize_pack_act(x, 4)
    assert planes.zero is None
    assert torch.equal(P.unpack_bitplanes(planes.data, 70, True), P.unpack_int4(packed4.data, 70))
    binary = ops.quantize_pack_act(x, 1)
    assert torch.equal(P.unpack_binary(binary.data, 70), torch.where(x >= 0, 1, -1).to(torch.int8))
    assert torch.allclose(binary.scale, x.abs().mean(1).clamp_min(R.SCALE_EPS))
    assert torch.equal(binary.popc, (x >= 0).sum(1).to(torch.int32))


def test_quantize_act_rejects_unsupported():
    with pytest.raises(ValueError, match="unsupported"):
        ops.quantize_pack_act(torch.zeros(2, 8), 2)
    with pytest.raises(ValueError, match="unsupported"):
        ops.quantize_pack_act(torch.zeros(2, 8), 8, signed=False)


# ------------------------------------------------------------------------- custom ops


def _op_cases(gen: torch.Generator):
    m, n, k = 5, 6, 40
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    a8, a4 = R.quantize_act(x, 8), R.quantize_act(x, 4)
    a1, ap = R.quantize_act(x, 1), R.quantize_act(x, 4, planes=True, signed=False)
    w8, s8 = ops.quantize_weight(w, 8)
    w4, s4 = ops.quantize_weight(w, 4)
    w1, s1 = ops.quantize_weight(w, 1)
    w8p = F.pad(w8, (0, P.pad_k(k, 8) - k))
    w4p, w1p = P.pack_int4(w4), P.pack_binary(w1)
    bias = torch.randn(n, generator=gen)
    lib = torch.ops.lowbit
    return [
        (lib.gemm_w8a8, (a8.data, a8.scale, w8p, s8, bias, torch.float32)),
        (lib.gemm_w4a8, (a8.data, a8.scale, w4p, s4, None, torch.bfloat16)),
        (lib.gemm_w4a4, (a4.data, a4.scale, w4p, s4, bias, torch.float16)),
        (
            lib.gemm_w1a1,
            (a1.data, a1.popc, a1.scale, w1p, P.row_popcount(w1p), s1, k, bias, torch.float32),
        ),
        (
            lib.gemm_w1a4,
            (
                ap.data,
                ap.popc,
                ap.scale,
                ap.zero,
                w1p,
                P.row_popcount(w1p),
                s1,
                k,
                None,
                torch.int32,
            ),
        ),
        (lib.quantize_act, (x, 4, True, False)),
        (lib.quantize_act, (x, 1, False, True)),
    ]


def test_custom_ops_pass_opcheck(gen):
    for op, args in _op_cases(gen):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_packed_linear_compiles_fullgraph(gen):
    layer = ops.PackedLinear.from_float(torch.randn(24, 40, generator=gen), torch.randn(24), 4, 4)
    x = torch.randn(3, 7, 40, generator=gen)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fails on a graph break
    assert torch.equal(compiled(x), layer(x))


# --------------------------------------------------------------------------- packed modules


def _fake_quant_acts(x2d: torch.Tensor, w_bits: int, a_bits: int, signed: bool) -> torch.Tensor:
    """What the GEMM multiplies the weights by, as floats: the dequantized activations."""
    if a_bits == 1:
        return torch.where(x2d >= 0, 1.0, -1.0) * x2d.abs().mean(1, keepdim=True).clamp_min(
            R.SCALE_EPS
        )
    if a_bits == 4 and w_bits == 1 and not signed:
        scale, zero = R.asymmetric_qparams(x2d, 4)
        return _fake_quant(x2d, scale, zero, 0, 15)
    scale = R.symmetric_scale(x2d, a_bits)
    return _fake_quant(x2d, scale, None, *R.qrange(a_bits, True))


CONFIGS = [(8, 8, True), (4, 8, True), (4, 4, True), (1, 1, True), (1, 4, True), (1, 4, False)]


@pytest.mark.parametrize("w_bits, a_bits, signed", CONFIGS)
def test_packed_linear_matches_fake_quant_float(gen, w_bits, a_bits, signed):
    lin = torch.nn.Linear(77, 19)
    layer = ops.PackedLinear.from_linear(lin, w_bits, a_bits, act_signed=signed)
    x = torch.randn(4, 6, 77, generator=gen)
    y = layer(x)
    assert y.shape == (4, 6, 19) and y.dtype == torch.float32
    xq = _fake_quant_acts(x.reshape(-1, 77), w_bits, a_bits, signed).double()
    expected = xq @ layer.dequantized_weight().double().T + lin.bias.detach().double()
    torch.testing.assert_close(y.reshape(-1, 19).double(), expected, rtol=1e-5, atol=1e-5)
    # and the quantized layer is close to the float one where the bits allow it
    if (w_bits, a_bits) == (8, 8):
        torch.testing.assert_close(y, lin(x), rtol=0.05, atol=0.05)


def test_packed_linear_keeps_half_dtypes(gen):
    layer = ops.PackedLinear.from_float(torch.randn(16, 32, generator=gen), None, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        assert layer(torch.randn(3, 32, generator=gen).to(dtype)).dtype == dtype


def test_packed_linear_state_dict_is_plain_tensors_and_round_trips(gen, tmp_path):
    from safetensors.torch import load_file, save_file

    layer = ops.PackedLinear.from_float(torch.randn(24, 40, generator=gen), torch.randn(24), 1, 1)
    sd = layer.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_popc", "bias"}
    assert {t.dtype for t in sd.values()} <= {torch.int32, torch.float32}
    save_file(sd, tmp_path / "layer.safetensors")
    fresh = ops.PackedLinear(40, 24, 1, 1)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(5, 40, generator=gen)
    assert torch.equal(fresh(x), layer(x))


def test_packed_linear_from_quantized_keeps_integers(gen):
    w_int = torch.randint(-8, 8, (10, 50), generator=gen)
    layer = ops.PackedLinear.from_quantized(w_int, torch.rand(10) + 0.1, None, 4, 8)
    assert torch.equal(layer.weight_int().to(torch.int64), w_int)
    with pytest.raises(ValueError, match="supported pairs"):
        ops.PackedLinear(8, 8, 2, 8)
    with pytest.raises(ValueError, match="only supported for W1A4"):
        ops.PackedLinear(8, 8, 4, 4, act_signed=False)


def test_im2col_layout_is_conv2d(gen):
    x = torch.randn(2, 3, 9, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 2, generator=gen, dtype=torch.float64)
    cols, out_hw = R.im2col(x, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    y = R.conv_output_to_nchw(cols @ w.reshape(5, -1).T, 2, out_hw)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=(2, 1), padding=(1, 1), dilation=(1, 2)))


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4), (1, 1)])
def test_packed_conv2d_matches_fake_quant_conv(gen, w_bits, a_bits):
    conv = torch.nn.Conv2d(6, 10, 3, stride=1, padding=1)
    layer = ops.PackedConv2d.from_conv(conv, w_bits, a_bits)
    x = torch.randn(2, 6, 8, 5, generator=gen)
    y = layer(x)
    assert y.shape == conv(x).shape
    cols, out_hw = R.im2col(x, (3, 3), padding=(1, 1))
    xq = _fake_quant_acts(cols, w_bits, a_bits, True).double()
    expected = xq @ layer.dequantized_weight().double().T + conv.bias.detach().double()
    torch.testing.assert_close(
        y.double(), R.conv_output_to_nchw(expected, 2, out_hw), rtol=1e-5, atol=1e-5
    )
    if (w_bits, a_bits) == (8, 8):
        torch.testing.assert_close(y, conv(x), rtol=0.05, atol=0.05)


def test_packed_conv2d_rejects_groups():
    with pytest.raises(ValueError, match="groups=1"):
        ops.PackedConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2), 8, 8)


# ---------------------------------------------------------------------------- CUDA errors


def test_cuda_op_on_cpu_tensors_names_op_and_fix():
    from lowbit.ops import cuda

    x = torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(CudaOpError, match=r"gemm_w8a8.*CUDA tensors.*\.cuda\(\).*reference"):
        cuda.gemm_w8a8(x, torch.ones(4), x, torch.ones(4))
    with pytest.raises(CudaOpError, match="quantize_act"):
        cuda.quantize_act(torch.zeros(4, 16), 8)


def test_backend_env_is_validated(monkeypatch):
    from lowbit.ops.library import _use_cuda_kernels

    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    assert not _use_cuda_kernels()
    monkeypatch.setenv(ops.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="LOWBIT_OPS_BACKEND"):
        _use_cuda_kernels()


# ------------------------------------------------------------------------------ lowbit-bench


def test_bench_cpu_reference_table(tmp_path):
    from lowbit.bench import main

    out = tmp_path / "bench.md"
    assert main(["--cpu", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "CPU reference timings" in text
    for op in ("w8a8", "w4a8", "w4a4", "w1a1", "w1a4"):
        assert f"| {op} |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_without_cuda_exits_with_a_clear_message(capsys):
    from lowbit.bench import main

    assert main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_shapes_are_real_layers():
    from lowbit.bench import dit_shapes, sd15_shapes

    sd = {(s.layer, s.m, s.k, s.n) for s in sd15_shapes(2)}
    assert ("attn q/k/v/out 64x64", 8192, 320, 320) in sd
    assert ("ff GEGLU in 16x16", 512, 1280, 10240) in sd
    assert ("resnet conv3x3 32x32", 2048, 5760, 640) in sd
    assert {(s.m, s.k, s.n) for s in dit_shapes(4)} >= {(1024, 1152, 4608), (1024, 4608, 1152)}


def test_ops_import_and_run_on_cpu_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import torch, lowbit.ops as ops\n"
        "from lowbit.ops import cuda\n"
        "assert not cuda.is_available()\n"
        "layer = ops.PackedLinear.from_float(torch.randn(8, 40), None, 4, 4)\n"
        "assert layer(torch.randn(3, 40)).shape == (3, 8)\n"
        "try:\n"
        "    cuda._import_cupy('gemm_w4a4')\n"
        "except cuda.CudaOpError as err:\n"
        "    assert \"install lowbit[cuda]\" in str(err) and 'gemm_w4a4' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no error without CuPy')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
