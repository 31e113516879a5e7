"""Export a quantized run to packed weights, and load the packed model back.

A run saves its student as two files (:func:`save_student_files`)::

    <run dir>/student.safetensors    every tensor of the fake-quant student
    <run dir>/quant_map.json         module → registered class + constructor spec
                                     (:mod:`lowbit.quant.qmap`)

:func:`load_student` rebuilds the student of **any** method from the FP model its config loads,
the map and the tensors (strict). ``lowbit-export <run dir>`` (or ``export=true`` on a run) then
replaces every quantized Linear/Conv2d that has a packed form by a packed module
(:mod:`lowbit.ops.quantized_modules`) — a layer without one (binarized layers, NF/blockwise grids,
LoRA side branches …) stays the fake-quant layer it is, float tensors, and the manifest says why —
and writes::

    <run dir>/packed/model.safetensors   codes (int8 / two 4-bit per byte / four 2-bit per byte /
                                         32 1-bit per int32 word), float32 scales, integer zero
                                         points, activation quantizer state, everything kept FP
    <run dir>/packed/manifest.json       per layer: path (int GEMM / weight-only), bits, shapes;
                                         what stayed FP or fake-quant; sizes; sha256 of the file

:func:`load_packed` rebuilds the model from those two files (the manifest carries the quantization
map): every tensor of the returned model
comes from the packed file (the FP checkpoint the model loader reads is only the skeleton and is
overwritten entirely; a strict load proves it). Quantized layers run lowbit's integer GEMMs (CuPy
kernels on CUDA tensors, the exact torch references elsewhere) with zero-point corrections, or the
bit-exact weight-only path where the scales cannot be applied to an integer accumulator (see the
manifest's ``why``). Attention's activation×activation matmuls (Q·Kᵀ, softmax·V) keep their
fake-quant quantizers: the kernels are weight×activation GEMMs.

Sizes are reported against FP16 (every model parameter at 2 bytes), for the whole file and for the
quantized layers' weights alone (packed codes + weight scales + weight zero points, against the
weight at FP16; their biases and activation quantizer state are FP tensors, in the file total). Tensors kept FP are stored in their own dtype (float32 for lowbit's models)
so that the packed model computes what the fake-quant model computes.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.rundir import RESULTS, STUDENT, STUDENT_FINGERPRINT_KEY, folder_fingerprint

FORMAT = "lowbit-packed/1"
PACKED_DIR = "packed"
PACKED_WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
MB = 2**20  # as lowbit.quant.size

__all__ = ["export_run", "load_packed", "load_student", "pack_model_", "format_sizes", "main",
           "packable", "save_quant_map", "save_student_files"]

# methods whose student has no packed form for its low-bit layers (export=true is refused by
# lowbit.config.validate; lowbit-export still writes what it can, reported in the manifest)
_UNPACKABLE_METHODS = {
    "binarydm": "its 1-bit layers are binarized (σ₁·sign(w), EBB) and lowbit-packed/1 stores "
                "uniform affine codes only, so nothing but the 8-bit first/last/time-embedding "
                "layers would pack",
    "bidm": "its W1A1 layers (sign(x + t) activations, α·sign(W), learnable scaling, real-valued "
            "shortcuts, cross-timestep connections) have no packed form in lowbit-packed/1",
    "binary_baseline": "its XNOR/ReAct layers (α·sign(w) weights) have no packed form in "
                       "lowbit-packed/1",
    "irqlora": "its base weights use NF/blockwise-centred grids (ICQ) and its LoRA is a side "
               "branch that cannot merge into them: no packed form in lowbit-packed/1",
}
# fake-quant layers: why their weights/activations have no packed form
_NO_PACKED_FORM = {
    "EBBWeightBinarizer": "EBB weights (σ₁·sign(w) [+ σ₂·sign(r) in stage 1]): binarized "
                          "per-channel scales, no uniform-grid codes",
    "SignWeightBinarizer": "binarized weights α·sign(w): ±α per channel is not a zero-point grid",
    "BlockwiseGridQuantizer": "NF/blockwise-centred weight grid (IR-QLoRA ICQ): non-uniform "
                              "levels, no integer GEMM",
    "ActBinarizer": "binarized activations sign(x + t): no packed path",
}


# ------------------------------------------------------------------------------------------------
# reading a run
# ------------------------------------------------------------------------------------------------
def _results_file() -> str:
    return RESULTS


def _student_file() -> str:
    return STUDENT


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of a finished quantized run (``results.json``'s ``config``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run dir {run_dir} does not exist: pass the folder of a finished lowbit run (it "
            f"holds {_results_file()} and {_student_file()}).")
    path = run_dir / _results_file()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a finished lowbit run. Run one first, e.g. "
            f"`lowbit method=ptq bits=w4a8 hydra.run.dir={run_dir}`, then export it.")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); re-run the job with force=true."
                         ) from e
    config = results.get("config")
    if not isinstance(config, dict) or "bits" not in config or "model" not in config:
        raise ValueError(
            f"{path} has no resolved config (status={results.get('status')!r}): the run did not "
            f"finish. Re-run it with force=true, then export.")
    bits = config["bits"]
    from lowbit.quant import QuantConfig

    if QuantConfig.from_dict(bits).is_fp:
        raise ValueError(
            f"{run_dir} is a full-precision run (bits={bits.get('name')}): nothing to pack. "
            f"Export a quantized run (bits=w8a8, w4a8, w4a4 …).")
    return config


def _load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}). {fix}") from e


def _fp_net(config: dict[str, Any]) -> nn.Module:
    """The FP network the run's model loader returns (``.net``, or ``.denoiser`` of older
    loaders), on CPU in eval mode."""
    from hydra.utils import instantiate

    loaded = instantiate(config["model"]["loader"])
    net = getattr(loaded, "net", None)
    if net is None:
        net = getattr(loaded, "denoiser", None)
    if not isinstance(net, nn.Module):
        raise ValueError(f"model.loader {config['model']['loader'].get('_target_')} returned "
                         f"{type(loaded).__name__} without a network (.net / .denoiser).")
    return net.cpu().eval()


def _build_fake_quant(config: dict[str, Any]) -> nn.Module:
    """Legacy skeleton: the run's model with ``quantize_`` replayed (exports written before the
    manifest carried a quantization map were ptq runs, for which this is exact)."""
    from lowbit.quant import QuantConfig, quantize_, run_bits

    model = _fp_net(config)
    quantize_(model, QuantConfig.from_dict(run_bits(config)), init_weights=False)
    return model


def _rebuild(config: dict[str, Any], qmap: dict[str, Any], where: str, fix: str) -> nn.Module:
    from lowbit.quant.qmap import rebuild_from_map

    model = _fp_net(config)
    try:
        return rebuild_from_map(model, qmap, where)
    except ValueError as e:
        raise ValueError(f"{e} {fix}") from e


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).replace("\n", " ")
        raise ValueError(f"{path} does not match the model its config builds: {msg[:600]} "
                         f"{fix}") from e


def save_quant_map(student: nn.Module, out: str | Path) -> Path:
    """Write ``<out>/quant_map.json``, the student's quantization map (call it beside the
    ``student.safetensors`` the pipeline writes)."""
    from lowbit.quant.qmap import QMAP_FILE
    from lowbit.quant.qmap import save_quant_map as _save

    return _save(student, Path(out) / QMAP_FILE)


def save_student_files(student: nn.Module, out: str | Path, fingerprint: str | None = None
                       ) -> tuple[Path, Path]:
    """Write ``<out>/student.safetensors`` and ``<out>/quant_map.json``: everything
    :func:`load_student` needs besides the run's config. The map is written first (it fails on
    a module it could not rebuild), then the tensors, whose metadata carries ``fingerprint``
    (default: that of the attempt writing ``out``, :func:`lowbit.rundir.folder_fingerprint`),
    so export can check that the student belongs to the results beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    qmap = save_quant_map(student, out)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    path = out / _student_file()
    fingerprint = fingerprint or folder_fingerprint(out)
    meta = {STUDENT_FINGERPRINT_KEY: fingerprint} if fingerprint else None
    _write_atomic(path, lambda p: save_file(state, str(p), metadata=meta))
    return path, qmap


def _check_student_belongs(run_dir: Path, path: Path, fix: str) -> None:
    """The student's fingerprint must be the one its results.json records (a student of another
    attempt — an older lowbit's failed re-run — packs the wrong model)."""
    from lowbit.rundir import read_json, student_fingerprint

    try:
        expected = read_json(run_dir / _results_file()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return  # read_run_config reported the file already
    if not expected:
        return  # results written before runs carried a fingerprint: nothing to compare
    try:
        got = student_fingerprint(path)
    except Exception as e:  # noqa: BLE001 - _load_safetensors names a corrupt file
        raise ValueError(f"{path} is not a valid safetensors file ({e}). {fix}") from e
    if got != expected:
        raise ValueError(
            f"{path} does not belong to {run_dir / _results_file()}: its fingerprint is {got!r}, "
            f"the results' is {expected!r} (the student of another attempt or config). {fix}")


def _read_qmap(run_dir: Path, fix: str) -> dict[str, Any]:
    from lowbit.quant.qmap import QMAP_FILE, read_quant_map

    path = run_dir / QMAP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the run's {_student_file()} cannot be rebuilt without its "
            f"quantization map (a run saved before students carried one, or the file was "
            f"deleted). {fix}")
    try:
        return read_quant_map(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid quantization map ({e}). {fix}") from e


def load_student(run_dir: str | Path) -> nn.Module:
    """The run's fake-quant student, restored exactly (CPU, eval) from the FP model its config
    loads, ``quant_map.json`` and ``student.safetensors`` — for every method; every tensor is
    checked against the rebuilt skeleton (strict load)."""
    return _load_student(Path(run_dir))[0]


def _load_student(run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The student, the run's config and its quantization map."""
    config = read_run_config(run_dir)
    path = run_dir / _student_file()
    bits = config["bits"].get("name", "<bits>")
    fix = (f"Re-run the job to save a loadable student: `lowbit "
           f"method={config.get('method', {}).get('name', 'ptq')} bits={bits} "
           f"hydra.run.dir={run_dir} force=true`; method=fp runs have nothing to export.")
    state = _load_safetensors(path, fix)
    _check_student_belongs(run_dir, path, fix)
    qmap = _read_qmap(run_dir, fix)
    from lowbit.quant.qmap import QMAP_FILE

    model = _rebuild(config, qmap, str(run_dir / QMAP_FILE), fix)
    _load_strict(model, state, path, fix)
    return model.eval(), config, qmap


def packable(method_name: str | None, bits_name: str | None) -> str | None:
    """Why a run of ``method_name`` at ``bits_name`` cannot be packed (``None``: it can).
    ``lowbit.config.validate`` refuses ``export=true`` for these before any compute."""
    if method_name == "fp" or bits_name == "fp":
        return "a full-precision run has no quantized model to pack"
    why = _UNPACKABLE_METHODS.get(str(method_name))
    return None if why is None else f"method={method_name} cannot be packed: {why}"


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def pack_model_(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Replace every quantized Linear/Conv2d of a fake-quant ``model`` by its packed module, in
    place. Returns the manifest's per-layer records."""
    from lowbit.ops.quantized_modules import pack_quant_module, plan_layer
    from lowbit.quant import QuantModuleMixin

    layers: dict[str, dict[str, Any]] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantModuleMixin):
            continue
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        acts = [q for q in m.act_quantizers() if not q.passthrough]
        rec: dict[str, Any] = {
            "kind": kind,
            "weight_shape": list(m.weight.shape),
            "bias": m.bias is not None,
            "split": m.split,
            "weight_bits": None if m.weight_quantizer.passthrough else m.weight_quantizer.bits,
            "act_bits": max((q.bits for q in acts), default=None),
            "act_granularity": m.input_quantizer.kind if acts else None,
            "timestep_aware": any(q.timestep_aware for q in acts),
        }
        why = _no_packed_form(m)
        plan = None if why else plan_layer(m)
        if plan is None:
            why = why or "weights stay FP: nothing to pack"
            rec.update(mode="fake_quant", kernel=None,
                       why=f"{why}; kept as the fake-quant layer (float tensors)")
            layers[name] = rec
            continue
        packed, parts = pack_quant_module(m, plan)
        _set_submodule(model, name, packed)
        rec.update(mode=plan["mode"], kernel=plan["kernel"], why=plan["why"], parts=parts)
        layers[name] = rec
    return layers


def _no_packed_form(m: nn.Module) -> str | None:
    """Why the quantized layer ``m`` has no packed form (``None``: plan_layer decides)."""
    from lowbit.quant import QuantConv2d, QuantLinear
    from lowbit.quant.quantizers import UniformQuantizer

    for q in [*m.weight_quantizers(), *m.act_quantizers()]:
        if not isinstance(q, UniformQuantizer):
            name = type(q).__name__
            return _NO_PACKED_FORM.get(name, f"{name} has no packed form in {FORMAT}")
    adapter = getattr(m, "adapter", None)
    if adapter is not None and adapter.adapts != "weight":
        return (f"{type(adapter).__name__} is a side branch on the layer output (LoRA that "
                f"cannot merge into the quantized weight)")
    if type(m) not in (QuantLinear, QuantConv2d):
        return f"{type(m).__name__} computes more than a quantized GEMM"
    return None


def _is_quantizer(m: nn.Module) -> bool:
    from lowbit.quant.quantizers import UniformQuantizer

    # UniformQuantizer and every class that follows its protocol (binarizers, blockwise grids)
    return isinstance(m, UniformQuantizer) or callable(getattr(m, "params_by_role", None))


def _quantizer_param_ids(model: nn.Module) -> set[int]:
    return {id(t) for m in model.modules() if _is_quantizer(m)
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}


def _fp_layer_reasons(model: nn.Module, bits: dict[str, Any],
                      quantized: list[str]) -> dict[str, str]:
    """Plain Linear/Conv2d outside the quantized layers, with the bits rules' reason."""
    from lowbit.quant import QuantConfig, QuantModuleMixin

    qcfg = QuantConfig.from_dict(bits)
    inside = tuple(n + "." for n in quantized)
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear | nn.Conv2d) or isinstance(m, QuantModuleMixin):
            continue
        if n.startswith(inside):
            continue  # part of a quantized layer (LoRA branch, binary shortcut projection)
        plan = qcfg.plan(n, "conv" if isinstance(m, nn.Conv2d) else "linear")
        out[n] = plan.fp_reason or "plain layer (not quantized)"
    return out


def _fp16_bytes(model: nn.Module) -> int:
    """Every model parameter at 2 bytes (quantizer state is not part of an FP16 model)."""
    skip = _quantizer_param_ids(model)
    return 2 * sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def _size_entry(packed: int, fp16: int, **extra: Any) -> dict[str, Any]:
    return {"packed_bytes": packed, "fp16_bytes": fp16, "ratio": _ratio(packed, fp16), **extra}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, writer) -> None:
    from lowbit.tracking import FILE_MODE

    tmp = path.with_name(path.name + ".tmp")
    try:
        writer(tmp)
        tmp.chmod(FILE_MODE)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_WRITE_ERRORS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EACCES,
                 errno.EROFS, errno.EPERM)


def export_run(run_dir: str | Path, report_dir: str | Path | None = None) -> dict[str, Any]:
    """Pack a quantized run's student into ``<run dir>/packed/``; returns the size summary (also
    in the manifest), which the pipeline stores as ``results["export"]``. ``report_dir``: the
    folder the summary's paths name (the run dir a staging folder is swapped into)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    out_dir = run_dir / PACKED_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write {out_dir} ({e.strerror}). Fix: make {run_dir} writable, "
                         f"or copy the run folder somewhere writable and export the copy") from e
    try:
        return _export_run(run_dir, config, Path(report_dir) if report_dir else run_dir)
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        raise ValueError(f"writing {e.filename or out_dir} failed ({e.strerror}); the run's own "
                         f"files are untouched. Fix: free space / make {out_dir} writable and "
                         f"re-run lowbit-export") from e


def _export_run(run_dir: Path, config: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    from lowbit.quant.attention import MATMUL_ATTR

    student, config, qmap = _load_student(run_dir)
    fp16_total = _fp16_bytes(student)
    layers = pack_model_(student)
    method_name = config.get("method", {}).get("name")
    not_packable = packable(method_name, config["bits"].get("name"))

    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    out_dir = run_dir / PACKED_DIR
    weights = out_dir / PACKED_WEIGHTS
    _write_atomic(weights, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))

    # sizes of the quantized layers: packed weight (codes + scales + zero points) against the
    # FP16 weight; biases and activation qparams are FP state, counted in the file total
    by_bits: dict[int, list[int]] = {}
    packed_layers = {n: r for n, r in layers.items() if r["mode"] in ("int", "weight_only")}
    for name, rec in packed_layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
        rec["weight_bytes"] = sum(_nbytes(t) for k, t in own.items()
                                  if k.startswith("packed_weight"))
        rec["bias_bytes"] = _nbytes(own["bias"]) if "bias" in own else 0
        rec["act_qparam_bytes"] = sum(_nbytes(t) for k, t in own.items()
                                      if k.startswith("input_quantizer"))
        rec["fp16_weight_bytes"] = 2 * math.prod(rec["weight_shape"])
        acc = by_bits.setdefault(rec["weight_bits"], [0, 0, 0])
        acc[0] += rec["weight_bytes"]
        acc[1] += rec["fp16_weight_bytes"]
        acc[2] += 1
    q_packed = sum(v[0] for v in by_bits.values())
    q_fp16 = sum(v[1] for v in by_bits.values())

    layer_prefixes = tuple(n + "." for n in packed_layers)
    qstate = _quantizer_param_ids(student)
    named_q = {k for k, t in {**dict(student.named_parameters()),
                              **dict(student.named_buffers())}.items() if id(t) in qstate}
    fp_tensors = sorted(k for k, t in state.items()
                        if t.is_floating_point() and not k.startswith(layer_prefixes)
                        and k not in named_q)
    attention = sorted(n for n, m in student.named_modules() if hasattr(m, MATMUL_ATTR))
    from lowbit.quant import run_bits

    fp_layers = _fp_layer_reasons(student, run_bits(config), list(layers))
    fake_why = Counter(r["why"] for r in layers.values() if r["mode"] == "fake_quant")

    modes = Counter(r["mode"] for r in layers.values())
    kernels = Counter(r["kernel"] for r in layers.values() if r["kernel"])
    file_bytes = weights.stat().st_size
    student_file = run_dir / _student_file()
    shown = report_dir / PACKED_DIR
    summary: dict[str, Any] = {
        "format": FORMAT,
        "dir": str(shown),
        "weights": str(shown / PACKED_WEIGHTS),
        "manifest": str(shown / MANIFEST),
        "sizes": {
            "total": _size_entry(file_bytes, fp16_total,
                                 fake_quant_student_bytes=student_file.stat().st_size),
            "quantized_layers": _size_entry(q_packed, q_fp16, layers=len(packed_layers)),
            "by_weight_bits": {str(b): _size_entry(v[0], v[1], layers=v[2])
                               for b, v in sorted(by_bits.items(), reverse=True)},
        },
        "layers": {"int": modes.get("int", 0), "weight_only": modes.get("weight_only", 0),
                   "fake_quant": modes.get("fake_quant", 0), "fp": len(fp_layers)},
        "kernels": dict(sorted(kernels.items())),
        "attention_matmuls": {"mode": "fake_quant", "modules": len(attention)},
        "fake_quant_why": dict(fake_why),
        "not_packable": not_packable,
    }
    manifest = {
        **summary,
        "run_dir": str(report_dir),
        "sha256": _sha256(weights),
        "config": {"model": config["model"], "bits": config["bits"],
                   "method": config.get("method", {})},
        "layout": {
            "codes": "w_s = w_q - o (o = 2^(b-1) asymmetric, 0 symmetric): int8 [N, K16] for "
                     "5-8 bits; two per uint8 (low nibble = even k) for 3-4 bits; four per "
                     "uint8 for 2 bits; 1 bit: the code w_q, 32 per int32 word, lowest bit = "
                     "lowest k; rows padded to 16 bytes",
            "dequantize": "w = (w_s + o - zero_point) * scale  (float32, bit-exact)",
            "int_path": "acc = sum x_s w_s + c_w sum x_s + c_x sum w_s + K c_x c_w, "
                        "c = o - zero_point; y = (acc * act_scale) * weight_scale + bias",
        },
        "layers": layers,
        "fp_layers": fp_layers,
        "fp_tensors": fp_tensors,
        "quant_map": qmap,
        "attention": {
            "mode": "fake_quant", "modules": attention,
            "why": "Q·Kᵀ and softmax·V are activation×activation matmuls; their Q/K/V/softmax "
                   "quantizers run as fake-quant (state stored in the packed file)",
        },
    }
    _write_atomic(out_dir / MANIFEST,
                  lambda p: p.write_text(json.dumps(manifest, indent=1, default=str)))
    return summary


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PACKED_DIR / MANIFEST
    fix = f"Run `lowbit-export {run_dir}` to (re)create it."
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not been exported. {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}). {fix}") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}. {fix}")
    return manifest


def load_packed(run_dir: str | Path, device: str | torch.device | None = None,
                verify_checksum: bool = True) -> nn.Module:
    """The packed model of an exported run, in eval mode, on ``device`` (default: CUDA when
    available — the CuPy kernels run there — else CPU with the torch reference GEMMs)."""
    from lowbit.ops.quantized_modules import build_packed_module

    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    path = run_dir / PACKED_DIR / PACKED_WEIGHTS
    fix = f"Re-create it with `lowbit-export {run_dir}`."
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {fix}")
    if verify_checksum and _sha256(path) != manifest.get("sha256"):
        raise ValueError(f"{path} is corrupt (sha256 differs from {MANIFEST}). {fix}")
    tensors = _load_safetensors(path, fix)
    qmap = manifest.get("quant_map")
    if qmap is None:  # exported before manifests carried the map: a ptq run, quantize_ replays it
        model = _build_fake_quant(manifest["config"])
    else:
        model = _rebuild(manifest["config"], qmap, f"{run_dir / PACKED_DIR / MANIFEST}", fix)
    for name, rec in manifest["layers"].items():
        if rec["mode"] not in ("int", "weight_only"):
            continue
        plan = {"mode": rec["mode"], "kernel": rec["kernel"], "why": rec["why"]}
        try:
            skeleton = model.get_submodule(name)
            packed = build_packed_module(skeleton, plan, rec["parts"], tensors, name + ".")
        except (AttributeError, KeyError) as e:
            raise ValueError(f"{path} lacks layer {name} ({e}). {fix}") from e
        _set_submodule(model, name, packed)
    _load_strict(model, tensors, path, fix)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def format_sizes(summary: dict[str, Any]) -> str:
    """The size table ``lowbit-export`` prints."""
    s = summary["sizes"]

    def row(label: str, e: dict[str, Any]) -> str:
        return (f"  {label:<28}{e['packed_bytes'] / MB:>10.3f}{e['fp16_bytes'] / MB:>10.3f}"
                f"{e['ratio']:>9.3f}x")

    q = s["quantized_layers"]
    lines = [f"packed model: {summary['weights']}",
             f"  {'':<28}{'packed MB':>10}{'FP16 MB':>10}{'ratio':>10}",
             row("whole model (file)", s["total"]),
             row(f"quantized layer weights ({q['layers']})", q)]
    lines += [row(f"  W{b} layers ({e['layers']})", e) for b, e in s["by_weight_bits"].items()]
    n = summary["layers"]
    kern = ", ".join(f"{k}: {v}" for k, v in summary["kernels"].items()) or "none"
    lines.append(f"  layers: {n['int']} integer GEMM ({kern}), {n['weight_only']} weight-only, "
                 f"{n['fake_quant']} fake-quant, {n['fp']} FP; attention matmuls: "
                 f"{summary['attention_matmuls']['modules']} fake-quant")
    lines.append(f"  fake-quant student.safetensors: "
                 f"{s['total']['fake_quant_student_bytes'] / MB:.3f} MB")
    for why, count in summary.get("fake_quant_why", {}).items():
        lines.append(f"  fake-quant ({count}): {why}")
    if summary.get("not_packable"):
        lines.append(f"  note: {summary['not_packable']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lowbit-export",
        description="Pack a quantized lowbit run into <run dir>/packed/ and print its size.")
    parser.add_argument("run_dir", type=Path, help="folder of a finished quantized run")
    args = parser.parse_args(argv)
    try:
        summary = export_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit-export: error: {e}", file=sys.stderr)
        return 1
    print(format_sizes(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
