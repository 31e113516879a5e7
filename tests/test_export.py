"""Export of quantized runs to packed weights, and the packed model against the fake-quant one.

Oracle for the integer path: the fake-quant layer's *own* outputs. ``x̂ = (x_q − z_x)·Δ_x`` and
``ŵ = (w_q − z_w)·Δ_w`` give back the integer operands as ``round(x̂/Δ_x)`` and ``round(ŵ/Δ_w)``;
their float64 matmul (exact below 2^53) is the accumulator the packed layer must reproduce
exactly. Weight-only layers must reproduce the fake-quant layer's output bit for bit.

Per-layer tolerance, derived rather than tuned: the packed layer rounds once per output
(int accumulator → float32, × Δ_x, × Δ_w, + bias), the fake-quant layer once per dequantized
operand and once per addition of its K-term float32 sum. With u = 2⁻²⁴ and S = Σ_k |ŵ_k|·|x̂_k|,
both stay within γ_{K+2}·S (+ u·|b| for the bias) of the exact real sum, so
|packed − fake-quant| ≤ γ_{K+6}·(S + |b|), γ_n = n·u / (1 − n·u), whatever the summation order a
BLAS picks on any CPU.

Whole model: rounding once per output instead of once per product lets an activation that lies
within float32 rounding of a quantization boundary land on the other code in the next layer, so
the whole-model difference has no worst-case bound; it is held to absolute acceptance bounds on ε
(unit variance): max |Δε| ≤ 0.1, mean |Δε| ≤ 0.01.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lowbit.cli import compose_config
from lowbit.export import (
    MANIFEST,
    PACKED_DIR,
    PACKED_WEIGHTS,
    export_run,
    load_packed,
    load_student,
    main,
    pack_model_,
    save_student_files,
)
from lowbit.ops.quantized_modules import PackedQuantConv2d, PackedQuantLinear
from lowbit.pipeline import STUDENT, run_experiment
from lowbit.quant import QuantConfig, QuantModuleMixin, calibrate_, quantize_, set_timestep
from lowbit.quant.quantizers import MIN_SCALE
from lowbit.tracking import write_json_atomic

CALIB_T = (999, 600, 250, 20)

# name → overrides of the real config (conf/bits/*.yaml, min-max ranges; w4a8 with the MSE
# search and 8-bit input/output layers); w4a4_pchan keeps its per-input-channel activation
# scales (→ weight-only path), the others take the integer GEMMs
CASES = {
    "w8a8": ["bits=w8a8"],
    "w4a8": ["bits=w4a8", "bits.weight.init=mse", "bits.act.init=mse", "bits.first_last_bits=8"],
    "w4a4": ["bits=w4a4"],
    "w4a4_pchan": ["bits=w4a4_pchan"],
    "w4a8_timestep": ["bits=w4a8", "bits.act.timestep_aware=true", "bits.name=w4a8_ts"],
    # 1-bit weights on quantize_'s asymmetric grid (binary methods are not needed for packing)
    "w1a8": ["bits=w8a8", "bits.weight.bits=1", "bits.name=w1a8"],
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _batches(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for t in CALIB_T:  # one timestep per batch, as calibrate_ requires for timestep buckets
        yield {"sample": torch.randn(n, 1, 16, 16, generator=g),
               "timestep": torch.full((n,), t),
               "class_labels": torch.arange(n) % 11}


def make_quantized_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run dir as ``lowbit method=ptq`` leaves it (student.safetensors + results.json), made
    without sampling or metrics: quantize_ + calibrate_ on a few random batches."""
    cfg = compose_config(["method=ptq", *overrides], output_dir=run_dir)
    loaded = instantiate(cfg.model.loader)
    student = loaded.net if hasattr(loaded, "net") else loaded.denoiser
    quantize_(student, QuantConfig.from_dict(OmegaConf.to_container(cfg.bits, resolve=True)))
    calibrate_(student, _batches())
    run_dir.mkdir(parents=True, exist_ok=True)
    save_student_files(student, run_dir)  # student.safetensors + quant_map.json
    write_json_atomic(run_dir / "results.json",
                      {"status": "done", "config": OmegaConf.to_container(cfg, resolve=True)})
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported once: (summary, fake-quant student, packed model)."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            run = make_quantized_run(tmp_path_factory.mktemp(case), CASES[case])
            cache[case] = (export_run(run), load_student(run), load_packed(run, device="cpu"), run)
        return cache[case]

    return get


def _oracle_accumulators(layer: QuantModuleMixin, x: torch.Tensor) -> list[torch.Tensor]:
    """Σ_k (x_q − z_x)(w_q − z_w) per input part, from the fake-quant layer's own outputs."""
    out = []
    xs = [x] if not layer.split else [x.narrow(layer.channel_axis % x.dim(), 0, layer.split),
                                      x.narrow(layer.channel_axis % x.dim(), layer.split,
                                               x.shape[layer.channel_axis] - layer.split)]
    for wq, w, aq, xp in zip(layer.weight_quantizers(), layer.weight_parts(),
                             layer.act_quantizers(), xs, strict=True):
        w_hat = wq(w).reshape(w.shape[0], -1).double()
        s_w = wq.current_qparams()[0].double().clamp_min(MIN_SCALE).reshape(-1, 1)
        w_int = torch.round(w_hat / s_w)
        s_x = aq.current_qparams()[0].double().clamp_min(MIN_SCALE)
        x_int = torch.round(aq(xp).double() / s_x)
        if isinstance(layer, nn.Conv2d):
            cols = F.unfold(x_int, layer.kernel_size, dilation=layer.dilation,
                            padding=layer.padding, stride=layer.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            rows = x_int.reshape(-1, x_int.shape[-1])
        out.append((rows @ w_int.T).to(torch.int64))
    return out


U32 = 2.0**-24  # unit roundoff of float32


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _rounding_bound(layer: QuantModuleMixin, x: torch.Tensor) -> torch.Tensor:
    """γ_{K+6}·(Σ_k |ŵ_k|·|x̂_k| + |b|) per output, in the layer's output layout (module doc)."""
    ch = layer.channel_axis % x.dim()
    xs = [x] if not layer.split else [x.narrow(ch, 0, layer.split),
                                      x.narrow(ch, layer.split, x.shape[ch] - layer.split)]
    total, k = None, 0
    for wq, w, aq, xp in zip(layer.weight_quantizers(), layer.weight_parts(),
                             layer.act_quantizers(), xs, strict=True):
        w_abs, x_abs = wq(w).double().abs(), aq(xp).double().abs()
        k += w[0].numel()
        if isinstance(layer, nn.Conv2d):
            s = F.conv2d(x_abs, w_abs, None, layer.stride, layer.padding, layer.dilation,
                         layer.groups)
        else:
            s = x_abs @ w_abs.T
        total = s if total is None else total + s
    if layer.bias is not None:
        b = layer.bias.detach().double().abs()
        total = total + (b.reshape(-1, 1, 1) if isinstance(layer, nn.Conv2d) else b)
    return (_gamma(k + 6) * total).float()


def _layer_inputs(model: nn.Module, t: int) -> dict[str, torch.Tensor]:
    """Input of every quantized layer in one forward of the fake-quant model at timestep t."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args, _out):
            seen.setdefault(name, args[0].detach())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, QuantModuleMixin)]
    try:
        with torch.no_grad():
            model(**next(_batches(4, seed=t)) | {"timestep": torch.full((4,), t)})
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("case", ["w8a8", "w4a8", "w4a4", "w4a4_pchan", "w4a8_timestep", "w1a8"])
def test_packed_layers_reproduce_fake_quant_arithmetic(exported, case):
    summary, fq, pk, _ = exported(case)
    expect_int = case != "w4a4_pchan"
    assert (summary["layers"]["int"] > 0) == expect_int, summary["layers"]
    assert summary["layers"]["int"] + summary["layers"]["weight_only"] == 76  # every conv/linear
    if case == "w4a8_timestep":  # one Δ per calibration timestep, picked by the packed model
        buckets = {q.num_buckets for q in pk.modules() if getattr(q, "timestep_aware", False)}
        assert buckets == {len(CALIB_T)}, buckets
    for t in (999, 20) if case == "w4a8_timestep" else (600,):
        inputs = _layer_inputs(fq, t)
        set_timestep(pk, t)  # what the top-level hook does when the packed model is called
        checked = 0
        for name, x in inputs.items():
            f_layer, p_layer = fq.get_submodule(name), pk.get_submodule(name)
            assert isinstance(p_layer, PackedQuantLinear | PackedQuantConv2d), name
            with torch.no_grad():
                want, got = f_layer(x), p_layer(x)
            if p_layer.mode == "weight_only":
                assert torch.equal(got, want), name  # same quantizer, same weight bits, same op
                continue
            for acc, ref in zip(p_layer.int_accumulators(x), _oracle_accumulators(f_layer, x),
                                strict=True):
                assert torch.equal(acc, ref), name
            bound = _rounding_bound(f_layer, x)
            excess = ((got - want).abs() - bound).max()
            assert excess <= 0, (name, float(excess))
            checked += 1
        assert checked == summary["layers"]["int"]


def _eps(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).sample


# Whole-model outputs: the packed model rounds once per output, fake quant once per product, so a
# layer's output can differ by float rounding and flip a code of the next quantizer. At plain
# W4A4 the 4-bit output conv turns one flipped code into a jump of a whole step (measured: max
# 0.40, mean 0.022; with MSE steps and 8-bit input/output layers and time embedding max 0.16):
# test_packed_layers_reproduce_fake_quant_arithmetic checks W4A4 layer by layer, exactly.
@pytest.mark.parametrize("case", ["w8a8", "w4a8", "w4a4_pchan", "w4a8_timestep"])
def test_packed_model_output_matches_fake_quant(exported, case):
    _, fq, pk, _ = exported(case)
    for batch in list(_batches(8, seed=1))[::3]:  # t = 999 and t = 20
        want, got = _eps(fq, batch), _eps(pk, batch)
        if case == "w4a4_pchan":  # weight-only everywhere: bit-exact
            assert torch.equal(got, want)
            continue
        diff = (got - want).abs()
        assert diff.max() <= 0.1 and diff.mean() <= 0.01, (float(diff.max()), float(diff.mean()))


def test_export_files_sizes_and_manifest(exported):
    summary, _, _, run = exported("w4a8")
    packed = run / PACKED_DIR
    assert (packed / PACKED_WEIGHTS).is_file() and (packed / MANIFEST).is_file()
    sizes = summary["sizes"]
    assert sizes["by_weight_bits"]["4"]["ratio"] <= 0.27, sizes
    assert sizes["total"]["packed_bytes"] == (packed / PACKED_WEIGHTS).stat().st_size
    assert sizes["total"]["ratio"] < 0.35  # biases, norms, embeddings and qparams kept float32
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["attention"]["mode"] == "fake_quant" and len(manifest["attention"]["modules"]) == 7
    rec = manifest["layers"]["up_blocks.0.resnets.0.conv_shortcut"]  # a split shortcut layer
    assert rec["split"] > 0 and len(rec["parts"]) == 2 and rec["kernel"] == "w4a8"
    assert manifest["layers"]["conv_in"]["weight_bits"] == 8  # first layer kept at 8 bits
    assert any(k.endswith("norm1.weight") for k in manifest["fp_tensors"])
    # the file holds 4-bit codes two per byte: the 4-bit layers' codes are uint8 [N, K/2]
    from safetensors import safe_open

    with safe_open(str(packed / PACKED_WEIGHTS), "pt") as f:
        codes = f.get_tensor("down_blocks.1.resnets.0.conv2.packed_weight.codes")
    assert codes.dtype == torch.uint8 and codes.shape == (64, 64 * 9 // 2)


def test_one_bit_weights_pack_32_per_word(exported):
    summary, _, _, run = exported("w1a8")
    assert summary["sizes"]["by_weight_bits"]["1"]["ratio"] <= 0.08, summary["sizes"]
    from safetensors import safe_open

    with safe_open(str(run / PACKED_DIR / PACKED_WEIGHTS), "pt") as f:
        codes = f.get_tensor("down_blocks.1.resnets.0.conv2.packed_weight.codes")
    assert codes.dtype == torch.int32 and codes.shape == (64, 64 * 9 // 32)


def test_more_grids_on_a_toy_model():
    """Symmetric grids, dynamic per-token activations, 2-bit and group-wise weights."""
    torch.manual_seed(0)
    cases = [
        ({"weight": {"bits": 4, "symmetric": True, "granularity": "channel"},
          "act": {"bits": 8, "symmetric": True, "granularity": "tensor"}}, "int"),
        ({"weight": {"bits": 8, "granularity": "channel"},
          "act": {"bits": 8, "granularity": "token"}}, "int"),  # Linear: per-row scale/zero
        ({"weight": {"bits": 2, "granularity": "channel"},
          "act": {"bits": 4, "granularity": "tensor"}}, "int"),
        ({"weight": {"bits": 4, "granularity": "group:8"},
          "act": {"bits": 8, "granularity": "tensor"}}, "weight_only"),
        ({"weight": {"bits": 4, "granularity": "channel"}, "act": {"bits": None}}, "weight_only"),
    ]
    for spec, mode in cases:
        model = nn.Sequential(nn.Linear(24, 40), nn.SiLU(), nn.Linear(40, 16))
        quantize_(model, QuantConfig.from_dict({**spec, "quantize_attention": False,
                                                 "first_last_bits": None}))
        calibrate_(model, [{"input": torch.randn(64, 24)} for _ in range(2)])
        x = torch.randn(20, 24)
        with torch.no_grad():
            want = model(x)
            layers = pack_model_(model)
            got = model(x)
        assert {r["mode"] for r in layers.values()} == {mode}, (spec, layers)
        if mode == "weight_only":
            assert torch.equal(got, want), spec
        else:
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), spec


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_run_dirs_and_files(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"results\.json not found.*lowbit method=ptq"):
        export_run(tmp_path / "empty")

    # a finished run without its student file
    run = tmp_path / "nostudent"
    run.mkdir()
    cfg = compose_config(["method=ptq", "bits=w4a8"], output_dir=run)
    write_json_atomic(run / "results.json",
                      {"status": "done", "config": OmegaConf.to_container(cfg, resolve=True)})
    with pytest.raises(FileNotFoundError, match=rf"{STUDENT} not found.*force=true"):
        export_run(run)
    (run / STUDENT).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"{STUDENT} is not a valid safetensors file"):
        export_run(run)

    # an FP run has nothing to pack
    fp = tmp_path / "fp"
    fp.mkdir()
    cfg = compose_config(["method=fp"], output_dir=fp)
    write_json_atomic(fp / "results.json",
                      {"status": "done", "config": OmegaConf.to_container(cfg, resolve=True)})
    with pytest.raises(ValueError, match="full-precision run.*nothing to pack"):
        export_run(fp)

    # not exported yet / corrupt packed file
    with pytest.raises(FileNotFoundError, match=rf"{MANIFEST} not found.*lowbit-export"):
        load_packed(run)
    _, _, _, good = exported("w8a8")
    weights = good / PACKED_DIR / PACKED_WEIGHTS
    blob = weights.read_bytes()
    try:
        weights.write_bytes(blob[: len(blob) // 2])
        with pytest.raises(ValueError, match=rf"{PACKED_WEIGHTS} is corrupt.*lowbit-export"):
            load_packed(good)
        with pytest.raises(ValueError, match=rf"{PACKED_WEIGHTS} is not a valid safetensors"):
            load_packed(good, verify_checksum=False)
        weights.unlink()
        with pytest.raises(FileNotFoundError, match=rf"{PACKED_WEIGHTS} not found.*lowbit-export"):
            load_packed(good)
    finally:
        weights.write_bytes(blob)


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def test_export_true_through_run_experiment(make_cfg, monkeypatch):
    import lowbit.pipeline as pipeline

    if hasattr(pipeline, "save_student"):  # the run saves its student with its quantization map
        monkeypatch.setattr(pipeline, "save_student",
                            lambda student, out: save_student_files(student, out)[0])
    cfg = make_cfg("method=ptq", "bits=w4a8", "export=true", "metrics.num_samples=10",
                   "sampler.steps=3", "sampler.batch_size=10", "method.calib_n=4",
                   "method.calib_steps=2", "logger=none")
    res = run_experiment(cfg)
    exp = res["export"]
    assert exp["sizes"]["by_weight_bits"]["4"]["ratio"] <= 0.27
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["export"]["weights"] == exp["weights"] and Path(exp["weights"]).is_file()


def test_cli_prints_size_table(exported, tmp_path):
    _, _, _, run = exported("w8a8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("lowbit-export")  # the installed console script
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "lowbit.export"]
    done = subprocess.run([*cli, str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "quantized layer weights (76)" in done.stdout and "W8 layers" in done.stdout
    assert "FP16 MB" in done.stdout and "integer GEMM (w8a8: 76)" in done.stdout



def test_cli_error_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1  # in-process: a second interpreter costs ~8 s
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
def test_packed_model_on_cuda_kernels(exported):
    """On a GPU the integer layers run the CuPy kernels: same accumulators as the CPU reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy", reason="needs CuPy (pip install 'lowbit[cuda]')")
    for case in ("w8a8", "w4a8", "w4a4", "w1a8"):
        _, fq, pk, run = exported(case)
        gpu = load_packed(run, device="cuda")
        inputs = _layer_inputs(fq, 600)
        set_timestep(pk, 600)
        set_timestep(gpu, 600)
        for name, x in inputs.items():
            p_cpu, p_gpu = pk.get_submodule(name), gpu.get_submodule(name)
            if p_cpu.mode != "int":
                continue
            for a, b in zip(p_cpu.int_accumulators(x), p_gpu.int_accumulators(x.cuda()),
                            strict=True):
                assert torch.equal(a, b.cpu()), (case, name)
        batch = next(_batches(8))
        want = _eps(fq, batch)
        got = _eps(gpu, {k: v.cuda() for k, v in batch.items()}).cpu()
        diff = (got - want).abs()
        assert diff.max() <= 0.1 and diff.mean() <= 0.01, (case, float(diff.mean()))
