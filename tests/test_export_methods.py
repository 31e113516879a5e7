"""Every method's student saves, reloads without its method (quantization map + safetensors) and
exports where it can be packed.

Students are built the way each method builds them — ``quantize_`` with the method's quantizer
settings, its module swaps (binarizers, QALoRA / IEC-LoRA adapters, cross-timestep wrappers) and
calibration — on the digits U-Net with tiny budgets; "training" is replaced by perturbing exactly
the parameters the method trains, so the reload has something to restore. The reloaded student
must compute the original's outputs bit for bit on the same inputs (for BiDM's cross-timestep
wrapper over a two-step sequence, whose second step reads the first step's features).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from lowbit.cli import compose_config
from lowbit.config import ConfigError, validate
from lowbit.export import export_run, load_packed, load_student, packable, save_student_files
from lowbit.models.digits import load_digits_model
from lowbit.quant import QuantConfig, TimestepActQuantizer, calibrate_, quantize_, run_bits
from lowbit.quant.qmap import QMAP_FILE, quantization_map
from lowbit.tracking import write_json_atomic

CALIB_T = (999, 600, 250, 20)
FAST = {"weight": {"init": "minmax"}, "act": {"init": "minmax"}}


pytestmark = pytest.mark.usefixtures("single_thread")


def _net() -> nn.Module:
    loaded = load_digits_model()
    net = getattr(loaded, "net", None)
    return (net if net is not None else loaded.denoiser).eval()


def _batches(n: int = 8, seed: int = 0, ts=CALIB_T):
    g = torch.Generator().manual_seed(seed)
    for t in ts:  # one timestep per batch (timestep buckets), decreasing like a sampler
        yield {"sample": torch.randn(n, 1, 16, 16, generator=g), "timestep": torch.full((n,), t),
               "class_labels": torch.arange(n) % 11}


def _qcfg(cfg, **over) -> QuantConfig:
    return QuantConfig.from_dict(run_bits(cfg)).with_overrides({**FAST, **over})


@torch.no_grad()
def _perturb(model: nn.Module, pattern: str, scale: float = 0.02, seed: int = 0) -> int:
    """As if trained: add noise to the parameters whose names contain ``pattern``."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if pattern in name and p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 1e-3))
            n += 1
    assert n, pattern
    return n


def _reset(model: nn.Module) -> None:
    from lowbit.methods.bidm import reset_cross_timestep

    reset_cross_timestep(model)


@torch.no_grad()
def _outputs(model: nn.Module, steps=(999, 600)) -> list[torch.Tensor]:
    """ε over a decreasing timestep sequence (one trajectory: the carried features are used)."""
    _reset(model)
    outs = [model(**b).sample for b in _batches(4, seed=7, ts=steps)]
    _reset(model)
    return outs


def _save_run(tmp: Path, method: str, bits: str, student: nn.Module, *over: str) -> Path:
    run = tmp / method
    cfg = compose_config([f"method={method}", f"bits={bits}", *over], output_dir=run)
    save_student_files(student, run)
    write_json_atomic(run / "results.json",
                      {"status": "done", "config": OmegaConf.to_container(cfg, resolve=True)})
    return run


def _check_reload(run: Path, student: nn.Module, steps=(999, 600)) -> nn.Module:
    reloaded = load_student(run)
    assert type(reloaded) is type(student)
    assert [type(m).__name__ for m in reloaded.modules()] == \
        [type(m).__name__ for m in student.modules()]
    for a, b in zip(_outputs(student, steps), _outputs(reloaded, steps), strict=True):
        assert torch.equal(a, b)
    return reloaded


def _check_packed(run: Path, student: nn.Module, expect_int: bool) -> dict:
    summary = export_run(run)
    assert (summary["layers"]["int"] > 0) == expect_int, summary["layers"]
    assert summary["not_packable"] is None
    packed = load_packed(run, device="cpu")
    for want, got in zip(_outputs(student), _outputs(packed), strict=True):
        diff = (got - want).abs()
        if not expect_int:  # weight-only / fake-quant everywhere: the same arithmetic
            assert torch.equal(got, want)
        assert diff.max() <= 0.1 and diff.mean() <= 0.01, (float(diff.max()), float(diff.mean()))
    return summary


# ------------------------------------------------------------------------------------------------
# students of the uniform-grid methods (packable)
# ------------------------------------------------------------------------------------------------
def _ptq_like(cfg, timestep_aware: bool, **over) -> nn.Module:
    s = copy.deepcopy(_net())
    act = {**FAST["act"], **({"timestep_aware": True, "interp": "linear"} if timestep_aware
                             else {})}
    quantize_(s, _qcfg(cfg, act=act, **over))
    calibrate_(s, _batches())
    return s


def test_ptq_student_reloads_and_packs(tmp_path):
    cfg = compose_config(["method=ptq", "bits=w4a8"])
    s = _ptq_like(cfg, False)
    run = _save_run(tmp_path, "ptq", "w4a8", s)
    _check_reload(run, s)
    _check_packed(run, s, expect_int=True)


def test_quest_student_with_trained_layers_and_timestep_buckets(tmp_path):
    """QuEST: timestep-aware activation Δ (one per calibration step; per-channel at A4) and
    trained time-embedding projections / attention weights / activation Δ."""
    cfg = compose_config(["method=quest", "bits=w4a4_pchan"])
    s = _ptq_like(cfg, True)
    _perturb(s, "time_emb_proj.weight")
    _perturb(s, "input_quantizer.scale", seed=1)
    qs = [m for m in s.modules() if isinstance(m, TimestepActQuantizer) and not m.passthrough]
    assert qs and {q.num_buckets for q in qs} == {len(CALIB_T)}
    run = _save_run(tmp_path, "quest", "w4a4_pchan", s)
    reloaded = _check_reload(run, s, steps=(999, 420))  # 420: interpolated between buckets
    assert {q.num_buckets for q in reloaded.modules()
            if isinstance(q, TimestepActQuantizer) and not q.passthrough} == {len(CALIB_T)}
    # A4 activations per input channel: weight-only packed path, reported as such
    summary = _check_packed(run, s, expect_int=False)
    assert summary["layers"]["weight_only"] > 0


def test_qat_student_with_learnt_weight_steps(tmp_path):
    cfg = compose_config(["method=qat", "bits=w4a8"])
    s = _ptq_like(cfg, True)
    _perturb(s, ".weight")
    _perturb(s, "weight_quantizer.scale", seed=2)
    run = _save_run(tmp_path, "qat", "w4a8", s)
    _check_reload(run, s)


def test_efficientdm_lora_in_the_adapter_slot_reloads_merged_or_not(tmp_path):
    from lowbit.methods.efficientdm import add_lora_, has_qalora, merge_lora_
    from lowbit.quant import QuantConv2d
    from lowbit.quant.lora import LoRAWeights

    cfg = compose_config(["method=efficientdm", "bits=w4a8"])
    s = _ptq_like(cfg, True)
    names = add_lora_(s, rank=4, exclude=list(cfg.method.lora_exclude))
    _perturb(s, "lora.B", scale=1.0)
    conv = s.get_submodule(names[0])
    assert type(conv) is QuantConv2d and has_qalora(conv)  # no class rewriting
    assert isinstance(conv.adapter, LoRAWeights) and f"{names[0]}.lora.A" in s.state_dict()
    run = _save_run(tmp_path / "unmerged", "efficientdm", "w4a8", s)
    assert json.loads((run / QMAP_FILE).read_text())["modules"][f"{names[0]}.lora"]["class"] \
        == "LoRAWeights"
    _check_reload(run, s)
    # packing reads Q(W₀ + B·A): the LoRA needs no merge to be exported
    _check_packed(run, s, expect_int=True)

    merged = copy.deepcopy(s)
    assert merge_lora_(merged) == len(names)
    run = _save_run(tmp_path / "merged", "efficientdm", "w4a8", merged)
    assert not any(".lora" in k for k in load_file(str(run / "student.safetensors")))
    _check_reload(run, merged)


# ------------------------------------------------------------------------------------------------
# binary methods and IR-QLoRA (reload; export refused before compute)
# ------------------------------------------------------------------------------------------------
def _binary(cfg, spec_for) -> nn.Module:
    from lowbit.quant.binary import binarize_

    s = copy.deepcopy(_net())
    quantize_(s, _qcfg(cfg), init_weights=False)
    assert binarize_(s, spec_for)
    calibrate_(s, _batches(ts=CALIB_T[:2]))
    return s


def test_binarydm_student_with_ebb_in_both_stages(tmp_path):
    from lowbit.methods.binarydm import EBBWeightBinarizer, ebb_binarizers
    from lowbit.quant.binary import BinarySpec

    cfg = compose_config(["method=binarydm", "bits=w1a4"])
    s = _binary(cfg, lambda n, _m: BinarySpec(weight="ebb" if n.startswith(("down_blocks.0",
                                                                            "up_blocks.1"))
                                              else "sign"))
    ebbs = ebb_binarizers(s)
    for b in ebbs[: len(ebbs) // 2]:
        b.switch_stage()
    _perturb(s, "sigma", seed=3)
    _perturb(s, "alpha", seed=4)
    run = _save_run(tmp_path, "binarydm", "w1a4", s)
    r = _check_reload(run, s)
    assert sorted(int(b.stage) for b in ebb_binarizers(r)) == sorted(int(b.stage) for b in ebbs)
    assert any(isinstance(q, EBBWeightBinarizer) for q in r.modules())


def test_binary_baseline_react_student(tmp_path):
    from lowbit.quant.binary import BinarySpec

    cfg = compose_config(["method=binary_baseline", "bits=w1a1"])
    s = _binary(cfg, BinarySpec(weight="xnor", act="rsign"))
    _perturb(s, "threshold", scale=1.0)
    run = _save_run(tmp_path, "binary_baseline", "w1a1", s)
    _check_reload(run, s)


def test_bidm_student_carries_its_cross_timestep_connection(tmp_path):
    from lowbit.methods.bidm import CrossTimestepBlock, attach_cross_timestep, cross_timestep_blocks
    from lowbit.quant.binary import BinarySpec

    cfg = compose_config(["method=bidm", "bits=w1a1"])
    s = _binary(cfg, BinarySpec(weight="xnor", act="rsign", scaling="learned", shortcut="conv"))
    attach_cross_timestep(s, 4, num_buckets=10, alpha_init=0.3)
    _perturb(s, "alpha", scale=5.0)
    _perturb(s, "shortcut", seed=5)
    run = _save_run(tmp_path, "bidm", "w1a1", s)
    r = _check_reload(run, s)
    assert len(cross_timestep_blocks(r)) == 4
    # the second step of the sequence really reads the carried features
    one = _outputs(r, steps=(600,))[0]
    two = _outputs(r, steps=(999, 600))[1]
    assert not torch.equal(one, two)
    assert all(isinstance(w, CrossTimestepBlock) for w in cross_timestep_blocks(r))


def test_irqlora_student_with_nf_grid_and_side_branch(tmp_path):
    from lowbit.methods.irqlora import apply_irqlora_
    from lowbit.quant.blockwise import BlockwiseGridQuantizer
    from lowbit.quant.lora import IECLoRA

    cfg = compose_config(["method=irqlora", "bits=w4a16"])
    s = copy.deepcopy(_net())
    quantize_(s, _qcfg(cfg, split_shortcut=False))
    layers = apply_irqlora_(s, 4, "nf", rank=4, candidates=5)
    _perturb(s, "lora.B", scale=1.0)
    _perturb(s, "lora.beta", scale=1.0, seed=6)
    m = s.get_submodule(layers[0])
    assert isinstance(m.adapter, IECLoRA) and isinstance(m.weight_quantizer, BlockwiseGridQuantizer)
    run = _save_run(tmp_path, "irqlora", "w4a16", s)
    _check_reload(run, s)
    # lowbit-export still writes what it can: IR-QLoRA layers stay fake-quant, and say why
    summary = export_run(run)
    assert summary["not_packable"] and summary["layers"]["fake_quant"] >= len(layers)
    assert any("NF" in why for why in summary["fake_quant_why"])
    packed = load_packed(run, device="cpu")
    for a, b in zip(_outputs(s), _outputs(packed), strict=True):
        assert torch.equal(a, b)  # packed 8-bit layers are weight-only (a16): bit-exact


@pytest.mark.parametrize("method,bits", [("binarydm", "w1a4"), ("bidm", "w1a1"),
                                         ("binary_baseline", "w1a8"), ("irqlora", "w4a16")])
def test_export_of_unpackable_methods_is_refused_before_compute(method, bits):
    assert packable(method, bits)
    with pytest.raises(ConfigError, match=rf"export.*method={method} cannot be packed.*load_student"):
        validate(compose_config([f"method={method}", f"bits={bits}", "export=true"]))
    for ok in ("ptq", "quest", "efficientdm", "qat"):
        assert packable(ok, "w4a8") is None


# ------------------------------------------------------------------------------------------------
# errors and the map's guard
# ------------------------------------------------------------------------------------------------
def test_missing_or_corrupt_map_and_mismatching_student(tmp_path):
    cfg = compose_config(["method=ptq", "bits=w8a8"])
    s = _ptq_like(cfg, False)
    run = _save_run(tmp_path, "ptq", "w8a8", s)
    qmap = run / QMAP_FILE
    text = qmap.read_text()
    qmap.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{QMAP_FILE} not found.*force=true"):
        load_student(run)
    qmap.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{QMAP_FILE} is not a valid quantization map"):
        load_student(run)
    bad = json.loads(text)
    bad["modules"]["conv_in"]["class"] = "NoSuchQuantLayer"
    qmap.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="conv_in: class 'NoSuchQuantLayer' is not registered"):
        load_student(run)
    # a map of another student (one layer left FP) no longer matches the tensors: strict load
    other = json.loads(text)
    del other["modules"]["conv_in"], other["modules"]["conv_in.weight_quantizer"]
    del other["modules"]["conv_in.input_quantizer"]
    qmap.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"student\.safetensors does not match.*Unexpected"):
        load_student(run)


def test_unregistered_lowbit_module_class_fails_the_map():
    from lowbit.quant.quantizers import UniformQuantizer

    class Unregistered(UniformQuantizer):  # a method's new class, not registered
        pass

    Unregistered.__module__ = "lowbit.methods.example"
    s = _ptq_like(compose_config(["method=ptq", "bits=w8a8"]), False)
    q = s.conv_in.input_quantizer
    q.__class__ = Unregistered
    with pytest.raises(ValueError, match="conv_in.input_quantizer is a lowbit.methods.example"
                                         ".*register_module_class"):
        quantization_map(s)


# ------------------------------------------------------------------------------------------------
# the real run path
# ------------------------------------------------------------------------------------------------
def test_bidm_run_saves_a_student_that_reloads_bit_exactly(make_cfg, monkeypatch):
    """``run_experiment`` with tiny budgets: the student the run saved reloads without BiDM and
    computes what the run's own student computed."""
    import lowbit.pipeline as pipeline

    seen: list[nn.Module] = []

    def save(student, out):  # the pipeline's save, keeping a copy of what it saved
        seen.append(copy.deepcopy(student).cpu())
        return save_student_files(student, out)[0]

    if hasattr(pipeline, "save_student"):
        monkeypatch.setattr(pipeline, "save_student", save)
    cfg = make_cfg("method=bidm", "bits=w1a1", "method.steps=2", "method.batch_size=4",
                   "method.calib_n=8", "method.calib_batch_size=8", "metrics.num_samples=10",
                   "sampler.steps=3", "sampler.batch_size=10", "logger=none")
    pipeline.run_experiment(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / QMAP_FILE).is_file() and seen
    _check_reload(run, seen[-1].eval())
