"""``lowbit-bench``: time lowbit's packed GEMMs at real diffusion-model shapes.

Each GEMM shape ``(M, K, N)`` comes from a real layer — SD v1.5 U-Net attention projections,
feed-forward and 3×3 convolutions (as im2col GEMMs) at 64², 32², 16² and 8² latents, and DiT-XL/2
linears — with ``M = batch × tokens``. Every lowbit op is timed against ``F.linear`` in fp16/bf16,
``torch._int_mm`` (int8) and FP8 ``torch._scaled_mm`` where the GPU has it, with CUDA events after
a warm-up; the median of the repeats is reported with TOPS and GB/s against the H100 SXM roofline
(989 TFLOP/s bf16 dense, 1979 TOP/s int8/fp8, 3.35 TB/s). The lowbit GEMMs are timed on
pre-quantized activations (``op``) and with the fused activation quantizer in front (``op+q``,
what a ``PackedLinear`` costs). The result is a markdown table (default
``experiments/kernels/bench_<device>.md``).

Without CUDA it stops with a message; ``--cpu`` times the torch references at small shapes only
to show the table's format (CPU reference timings say nothing about the kernels).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# H100 SXM5 dense peaks (NVIDIA datasheet): the roofline the table is measured against.
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "int8": 1979.0, "fp8": 1979.0}
PEAK_BW_GBS = 3350.0
LOWBIT_OPS = ("w8a8", "w4a8", "w4a4", "w1a1", "w1a4")
BASELINES = ("fp16", "bf16", "int8", "fp8")

# bits per element of (activation, weight) for the GB/s column; outputs are fp16
_OPERAND_BITS = {
    "fp16": (16, 16),
    "bf16": (16, 16),
    "int8": (8, 8),
    "fp8": (8, 8),
    "w8a8": (8, 8),
    "w4a8": (8, 4),
    "w4a4": (4, 4),
    "w1a1": (1, 1),
    "w1a4": (4, 1),
}
# the peak each method is held against: lowbit's integer and binary GEMMs run on int8 tensor
# cores (binary: the b1 MMA, reported against the int8 peak for want of a published b1 peak)
_PEAK_CLASS = {"fp16": "fp16", "bf16": "bf16", "int8": "int8", "fp8": "fp8"} | {
    op: "int8" for op in LOWBIT_OPS
}


@dataclass(frozen=True)
class Shape:
    """One GEMM ``[M, K] × [N, K]ᵀ`` of a real layer."""

    model: str
    layer: str
    m: int
    k: int
    n: int


@dataclass
class Result:
    shape: Shape
    method: str
    median_us: float

    @property
    def tops(self) -> float:
        return 2.0 * self.shape.m * self.shape.n * self.shape.k / (self.median_us * 1e-6) / 1e12

    @property
    def gbs(self) -> float:
        a_bits, w_bits = _OPERAND_BITS[self.method.removesuffix("+q")]
        s = self.shape
        moved = s.m * s.k * a_bits / 8 + s.n * s.k * w_bits / 8 + s.m * s.n * 2
        if self.method.endswith("+q"):
            moved += s.m * s.k * 2  # the fp16 activations the quantizer reads
        return moved / (self.median_us * 1e-6) / 1e9

    @property
    def peak_fraction(self) -> float:
        return self.tops / PEAK_TFLOPS[_PEAK_CLASS[self.method.removesuffix("+q")]]


def sd15_shapes(batch: int) -> list[Shape]:
    """SD v1.5 U-Net GEMMs: (latent side, channels) per level, tokens = side², text length 77."""
    shapes = []
    for side, c in ((64, 320), (32, 640), (16, 1280), (8, 1280)):
        m = batch * side * side
        tag = f"{side}x{side}"
        shapes += [
            Shape("sd15", f"attn q/k/v/out {tag}", m, c, c),
            Shape("sd15", f"cross-attn k/v {tag}", batch * 77, 768, c),
            Shape("sd15", f"ff GEGLU in {tag}", m, c, 8 * c),
            Shape("sd15", f"ff out {tag}", m, 4 * c, c),
            Shape("sd15", f"resnet conv3x3 {tag}", m, 9 * c, c),
        ]
    return shapes


def dit_shapes(batch: int) -> list[Shape]:
    """DiT-XL/2 at 256×256 (32×32 latent, patch 2 → 256 tokens), hidden 1152, MLP ratio 4."""
    m = batch * 256
    return [
        Shape("dit_xl_2", "attn qkv", m, 1152, 3 * 1152),
        Shape("dit_xl_2", "attn proj", m, 1152, 1152),
        Shape("dit_xl_2", "mlp fc1", m, 1152, 4608),
        Shape("dit_xl_2", "mlp fc2", m, 4608, 1152),
    ]


def cpu_shapes() -> list[Shape]:
    return [
        Shape("cpu-demo", "small linear", 64, 320, 320),
        Shape("cpu-demo", "small ff", 64, 320, 640),
    ]


# ---------------------------------------------------------------------------- timing helpers


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median microseconds of ``fn`` over ``repeats`` CUDA-event-timed calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def time_cpu(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


# ---------------------------------------------------------------------------- the methods


def build_methods(
    shape: Shape, device: torch.device, methods: Sequence[str], with_quant: bool
) -> dict[str, Callable[[], object]]:
    """Closures computing one GEMM of ``shape`` per method (operands prepared once, outside)."""
    from lowbit import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    m, k, n = shape.m, shape.k, shape.n
    x = torch.randn(m, k, generator=g).to(device)
    w = torch.randn(n, k, generator=g).to(device) / k**0.5
    fns: dict[str, Callable[[], object]] = {}
    half = torch.float16 if device.type == "cuda" else torch.float32
    xh, wh = x.to(half), w.to(half)
    if "fp16" in methods and device.type == "cuda":
        fns["fp16"] = lambda: F.linear(xh, wh)
    if "bf16" in methods and device.type == "cuda":
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        fns["bf16"] = lambda: F.linear(xb, wb)
    if "int8" in methods and device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        xi = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).to(device)
        wi_t = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).to(device).t()
        fns["int8"] = lambda: torch._int_mm(xi, wi_t)
    if "fp8" in methods and _fp8_ok(device, k, n):
        x8, w8t = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        fns["fp8"] = lambda: torch._scaled_mm(
            x8, w8t, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        )
    for op in LOWBIT_OPS:
        if op not in methods:
            continue
        w_bits, a_bits = int(op[1]), int(op[3])
        layer = ops.PackedLinear.from_float(w, None, w_bits, a_bits).to(device)
        planes = w_bits == 1 and a_bits == 4
        act = ops.quantize_pack_act(xh, a_bits, planes=planes)
        fns[op] = _gemm_closure(layer, act, half)
        if with_quant:
            fns[f"{op}+q"] = lambda layer=layer: layer(xh)
    return fns


def _gemm_closure(layer, act, out_dtype: torch.dtype) -> Callable[[], object]:
    """The packed GEMM alone on pre-quantized activations (PackedLinear.gemm minus quantization)."""
    from lowbit import ops

    w, ws, k = layer.weight_packed, layer.weight_scale, layer.in_features
    pair = (layer.w_bits, layer.a_bits)
    if pair == (8, 8):
        return lambda: ops.gemm_w8a8(act.data, act.scale, w, ws, None, out_dtype)
    if pair == (4, 8):
        return lambda: ops.gemm_w4a8(act.data, act.scale, w, ws, None, out_dtype)
    if pair == (4, 4):
        return lambda: ops.gemm_w4a4(act.data, act.scale, w, ws, None, out_dtype)
    if pair == (1, 1):
        return lambda: ops.gemm_w1a1(
            act.data, act.popc, act.scale, w, layer.weight_popc, ws, k, None, out_dtype
        )
    return lambda: ops.gemm_w1a4(
        act.data, act.popc, act.scale, act.zero, w, layer.weight_popc, ws, k, None, out_dtype
    )


def _fp8_ok(device: torch.device, k: int, n: int) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and k % 16 == 0 and n % 16 == 0


# ---------------------------------------------------------------------------- report


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu_reference"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def markdown_table(results: Sequence[Result]) -> str:
    rows = [
        "| model | layer | M | K | N | method | median µs | TOPS | % peak | GB/s | % BW | × bf16 | × int8 |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_shape: dict[Shape, dict[str, Result]] = {}
    for r in results:
        by_shape.setdefault(r.shape, {})[r.method] = r
    for shape, per in by_shape.items():
        bf16, int8 = per.get("bf16"), per.get("int8")
        for method, r in per.items():
            x_bf16 = f"{bf16.median_us / r.median_us:.2f}" if bf16 else "–"
            x_int8 = f"{int8.median_us / r.median_us:.2f}" if int8 else "–"
            rows.append(
                f"| {shape.model} | {shape.layer} | {shape.m} | {shape.k} | {shape.n} | {method} "
                f"| {r.median_us:.1f} | {r.tops:.1f} | {100 * r.peak_fraction:.1f} | {r.gbs:.0f} "
                f"| {100 * r.gbs / PEAK_BW_GBS:.1f} | {x_bf16} | {x_int8} |"
            )
    return "\n".join(rows) + "\n"


def write_report(
    path: Path, results: Sequence[Result], device: torch.device, argv: Sequence[str]
) -> None:
    env = [f"- device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"]
    env.append(f"- torch {torch.__version__}")
    try:
        import cupy

        env.append(f"- cupy {cupy.__version__}")
    except ImportError:
        env.append("- cupy: not installed")
    env.append(f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}")
    env.append(f"- command: `lowbit-bench {' '.join(argv)}`")
    note = (
        "**CPU reference timings**: the torch references at small shapes, only to show the table's "
        "format. They say nothing about the CUDA kernels.\n\n"
        if device.type != "cuda"
        else "Roofline: H100 SXM 989 TFLOP/s bf16/fp16 dense, 1979 TOP/s int8/fp8, 3.35 TB/s. "
        "lowbit ops are held against the int8 peak (binary MMAs included). `op+q` includes the "
        "fused activation quantizer; GB/s counts operands and the fp16 output once.\n\n"
    )
    text = "# lowbit-bench\n\n" + "\n".join(env) + "\n\n" + note + markdown_table(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lowbit-bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["sd15", "dit_xl_2"], choices=["sd15", "dit_xl_2"]
    )
    p.add_argument(
        "--batch", nargs="+", type=int, default=[2], help="batch sizes (M = batch × tokens)"
    )
    p.add_argument(
        "--methods", nargs="+", default=[*BASELINES, *LOWBIT_OPS], choices=[*BASELINES, *LOWBIT_OPS]
    )
    p.add_argument(
        "--with-quant",
        action="store_true",
        help="also time op+q (fused activation quantizer + GEMM)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--layers", default="", help="regex: only layers whose name matches")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default experiments/kernels/bench_<device>.md)",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="time the torch references on CPU at small shapes (format check)",
    )
    return p.parse_args(argv)


def select_shapes(args: argparse.Namespace) -> list[Shape]:
    if args.cpu:
        return cpu_shapes()
    shapes: list[Shape] = []
    for b in args.batch:
        if "sd15" in args.models:
            shapes += sd15_shapes(b)
        if "dit_xl_2" in args.models:
            shapes += dit_shapes(b)
    if args.layers:
        shapes = [s for s in shapes if re.search(args.layers, s.layer)]
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.cpu:
        device = torch.device("cpu")
        timer = time_cpu
    else:
        if not torch.cuda.is_available():
            print(
                "lowbit-bench: no CUDA device is visible to torch. Run it on a GPU machine with the "
                "CUDA extra installed (pip install 'lowbit[cuda]'), or pass --cpu to time the torch "
                "references at small shapes (a format check, not a kernel measurement).",
                file=sys.stderr,
            )
            return 2
        from lowbit.ops import cuda as kernels

        if not kernels.is_available() and any(m in LOWBIT_OPS for m in args.methods):
            print(
                "lowbit-bench: CuPy is not installed; pip install 'lowbit[cuda]' (CuPy for CUDA 13).",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
        timer = time_cuda
    results: list[Result] = []
    for shape in select_shapes(args):
        fns = build_methods(shape, device, args.methods, args.with_quant)
        for method, fn in fns.items():
            us = timer(fn, args.warmup, args.repeats)
            results.append(Result(shape, method, us))
            print(
                f"{shape.model:9s} {shape.layer:26s} M={shape.m:6d} K={shape.k:5d} N={shape.n:5d} "
                f"{method:7s} {us:10.1f} µs",
                flush=True,
            )
    out = args.out or Path("experiments/kernels") / f"bench_{device_slug(device)}.md"
    write_report(out, results, device, argv)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
