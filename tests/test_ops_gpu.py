"""CUDA kernels against their torch references (run on a GPU machine: ``pytest -m gpu``).

Integers are compared bit for bit (``out_dtype=torch.int32`` returns the raw accumulator after
the popcount / bit-serial identities); float outputs use the same epilogue operation order as the
reference and are expected to match exactly, checked with a tolerance of one rounding step so a
flush-to-zero difference on subnormals (CuPy compiles with -ftz=true) cannot fail them.
"""

from __future__ import annotations

import pytest
import torch

import lowbit.ops as ops
from lowbit.ops import pack as P
from lowbit.ops import reference as R

pytestmark = pytest.mark.gpu

# (M, K, N): odd edges (M, N not multiples of the tiles, K with partial stages, odd N for the
# unpaired stores) and real layer shapes (SD v1.5 attention/FF at batch 2, DiT-XL/2 at batch 4).
ODD_SHAPES = [(1, 32, 8), (17, 48, 33), (129, 300, 130), (200, 2880, 77)]
REAL_SHAPES = [
    (8192, 320, 320),
    (2048, 640, 640),
    (512, 1280, 5120),
    (128, 5120, 1280),
    (1024, 1152, 4608),
]
SHAPES = ODD_SHAPES + REAL_SHAPES


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy", reason="needs CuPy (pip install 'lowbit[cuda]')")
    return torch.device("cuda")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _operands(
    gen: torch.Generator, m: int, k: int, n: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random activations and weights in every packed format (packed on the CPU, then moved)."""
    x = torch.randn(m, k, generator=gen)
    x[0, : min(k, 4)] = 0.0
    w = torch.randn(n, k, generator=gen)
    a8, a4 = R.quantize_act(x, 8), R.quantize_act(x, 4)
    a1 = R.quantize_act(x, 1)
    aps, apu = R.quantize_act(x, 4, planes=True), R.quantize_act(x, 4, planes=True, signed=False)
    w8, s8 = ops.quantize_weight(w, 8)
    w4, s4 = ops.quantize_weight(w, 4)
    w1, s1 = ops.quantize_weight(w, 1)
    w8 = torch.nn.functional.pad(w8, (0, P.pad_k(k, 8) - k))
    w1p = P.pack_binary(w1)
    t = {
        "x": x,
        "a8": a8.data,
        "a8s": a8.scale,
        "a4": a4.data,
        "a4s": a4.scale,
        "a1": a1.data,
        "a1s": a1.scale,
        "a1p": a1.popc,
        "aps": aps.data,
        "apss": aps.scale,
        "apsp": aps.popc,
        "apu": apu.data,
        "apus": apu.scale,
        "apup": apu.popc,
        "apuz": apu.zero,
        "w8": w8,
        "s8": s8,
        "w4": P.pack_int4(w4),
        "s4": s4,
        "w1": w1p,
        "w1p": P.row_popcount(w1p),
        "s1": s1,
        "bias": torch.randn(n, generator=gen),
    }
    return {key: v.to(device) for key, v in t.items()}


def _calls(t: dict[str, torch.Tensor], k: int, out_dtype: torch.dtype, bias: bool):
    b = t["bias"] if bias else None
    return {
        "w8a8": lambda f: f.gemm_w8a8(t["a8"], t["a8s"], t["w8"], t["s8"], b, out_dtype),
        "w4a8": lambda f: f.gemm_w4a8(t["a8"], t["a8s"], t["w4"], t["s4"], b, out_dtype),
        "w4a4": lambda f: f.gemm_w4a4(t["a4"], t["a4s"], t["w4"], t["s4"], b, out_dtype),
        "w1a1": lambda f: f.gemm_w1a1(
            t["a1"], t["a1p"], t["a1s"], t["w1"], t["w1p"], t["s1"], k, b, out_dtype
        ),
        "w1a4s": lambda f: f.gemm_w1a4(
            t["aps"], t["apsp"], t["apss"], None, t["w1"], t["w1p"], t["s1"], k, b, out_dtype
        ),
        "w1a4u": lambda f: f.gemm_w1a4(
            t["apu"], t["apup"], t["apus"], t["apuz"], t["w1"], t["w1p"], t["s1"], k, b, out_dtype
        ),
    }


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_gemm_accumulators_bitexact(cuda, gen, m, k, n):
    from lowbit.ops import cuda as kernels

    t = _operands(gen, m, k, n, cuda)
    for name, call in _calls(t, k, torch.int32, bias=False).items():
        got, want = call(kernels), call(R)
        assert torch.equal(got, want), f"{name} int32 accumulators differ at M={m} K={k} N={n}"


@pytest.mark.parametrize("m, k, n", ODD_SHAPES + REAL_SHAPES[:2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm_scaled_outputs(cuda, gen, m, k, n, out_dtype):
    from lowbit.ops import cuda as kernels

    t = _operands(gen, m, k, n, cuda)
    for name, call in _calls(t, k, out_dtype, bias=True).items():
        got, want = call(kernels), call(R)
        assert got.dtype == out_dtype, name
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6, msg=f"{name} {out_dtype}")
        if out_dtype == torch.float32:
            mismatch = (got != want).float().mean().item()
            assert mismatch < 1e-3, f"{name}: {mismatch:.2%} of float32 outputs not bit-exact"


@pytest.mark.parametrize("m, k", [(1, 7), (33, 300), (4096, 320), (256, 11520)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_act_bitexact(cuda, gen, m, k, dtype):
    from lowbit.ops import cuda as kernels

    x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]).to(dtype)
    x[0] = 0.0
    for bits, planes, signed in [
        (8, False, True),
        (4, False, True),
        (1, False, True),
        (4, True, True),
        (4, True, False),
    ]:
        data, scale, zero, popc = kernels.quantize_act(
            x.to(cuda), bits, planes=planes, signed=signed
        )
        ref = R.quantize_act(x, bits, planes=planes, signed=signed)  # on the CPU: torch's IEEE ops
        tag = f"bits={bits} planes={planes} signed={signed} {dtype}"
        assert torch.equal(data.cpu(), ref.data), tag
        if bits == 1:  # mean|x| is a float sum in another order: close, not equal
            torch.testing.assert_close(scale.cpu(), ref.scale, rtol=1e-5, atol=0, msg=tag)
        else:
            assert torch.equal(scale.cpu(), ref.scale), tag
        if ref.zero is not None:
            assert torch.equal(zero.cpu(), ref.zero), tag
        if ref.popc is not None:
            assert torch.equal(popc.cpu(), ref.popc), tag


def test_runs_on_torch_current_stream(cuda, gen):
    t = _operands(gen, 512, 640, 640, cuda)
    want = R.gemm_w4a4(t["a4"], t["a4s"], t["w4"], t["s4"], None, torch.int32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the operands were made on the default stream
    with torch.cuda.stream(side):
        got = ops.gemm_w4a4(t["a4"], t["a4s"], t["w4"], t["s4"], None, torch.int32)
        got = got + 0  # a torch op queued behind the kernel on the same stream
    side.synchronize()
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "w_bits, a_bits, signed",
    [(8, 8, True), (4, 8, True), (4, 4, True), (1, 1, True), (1, 4, True), (1, 4, False)],
)
def test_packed_linear_cuda_matches_cpu(cuda, gen, w_bits, a_bits, signed):
    lin = torch.nn.Linear(640, 320)
    layer = ops.PackedLinear.from_linear(lin, w_bits, a_bits, act_signed=signed)
    x = torch.randn(2, 1024, 640, generator=gen)
    want = layer(x)
    got = layer.to(cuda)(x.to(cuda)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_modules_compile_on_cuda(cuda, gen):
    layer = ops.PackedLinear.from_float(
        torch.randn(640, 320, generator=gen), torch.randn(640), 4, 4
    ).to(cuda)
    x = torch.randn(2, 256, 320, device=cuda, dtype=torch.float16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    pconv = ops.PackedConv2d.from_conv(conv, 8, 8).to(cuda)
    xc = torch.randn(2, 320, 16, 16, device=cuda)
    ref = ops.PackedConv2d.from_conv(conv, 8, 8)(xc.cpu())
    torch.testing.assert_close(pconv(xc).cpu(), ref, rtol=1e-5, atol=1e-5)


def test_unaligned_operands_are_copied_not_misread(cuda, gen):
    from lowbit.ops import cuda as kernels

    x = torch.randint(-128, 128, (40, 37), generator=gen, dtype=torch.int8)  # rows not 16-byte
    w = torch.randint(-128, 128, (24, 37), generator=gen, dtype=torch.int8)
    got = kernels.gemm_w8a8(
        x.to(cuda),
        torch.ones(40, device=cuda),
        w.to(cuda),
        torch.ones(24, device=cuda),
        out_dtype=torch.int32,
    )
    assert torch.equal(got.cpu(), R.int_matmul(x, w))


def test_dlpack_view(cuda):
    from lowbit.ops import cuda as kernels

    t = torch.arange(10, device=cuda, dtype=torch.int32)
    view = kernels.to_cupy(t)
    view[0] = 42
    torch.cuda.synchronize()
    assert t[0].item() == 42
