"""Every method end to end (prepare → sample → metrics → results.json → export → reload) on the
real model families besides digits, as random-weight pipelines written by the test: the SD v1.x
U-Net (shrunk; tiny random CLIP text encoder and VAE), a class-conditional DiT with a VAE, and
DDPM-CIFAR10 (unconditional, pixel space). Budgets are tiny: these tests prove that the run path
works for each family, not what the methods achieve.

The data are written by the test too: random images with captions (a Hugging Face imagefolder
``metadata.jsonl``) for SD, one folder per class for DiT, plain images for DDPM. The methods that
train on real images (binary QAT) condition on them: SD on the caption embeddings, DiT on the
class labels, and both latent models train on the VAE latents of the images.

One case per method runs by default, on the cheapest family the method is defined for; the rest
are ``slow``. A method that is not defined for a family (BinaryDM and BiDM on a DiT) is refused
before any compute, and that refusal is what its test checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowbit.pipeline
from lowbit.cli import compose_config
from lowbit.config import ConfigError
from lowbit.export import load_student, packable
from lowbit.models.presets import example_inputs, write_preset_pipeline
from lowbit.pipeline import run_experiment

PRESET_ARGS = {"ddpm_cifar10": {"block_out_channels": (32, 32, 32, 32)}, "sd_v1": {}, "dit": {}}
RESOLUTION = {"ddpm_cifar10": 32, "sd_v1": 32, "dit": 16}
BASE = ["metrics=fidelity", "metrics.num_samples=4", "metrics.grid_size=4", "sampler=ddim20",
        "sampler.steps=2", "sampler.batch_size=4", "logger=none", "threads=2", "device=cpu"]
N_IMAGES = 12  # per dataset: 2 batches of 2 train images remain after the 20 % held out


def _write_images(folder: Path, n: int, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    """Per preset: the pipeline folder and the dataset overrides of its family."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(0)
    plain = root / "images"
    _write_images(plain, N_IMAGES, rng)
    captioned = root / "captioned"
    names = _write_images(captioned, N_IMAGES, rng)
    subjects = ["a red square", "two cats on a sofa", "a lighthouse at night"]
    (captioned / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "text": f"{subjects[i % 3]}, photo {i}"}) + "\n"
        for i, n in enumerate(names)))
    classes = root / "classes"
    for c in ("cat", "dog"):
        _write_images(classes / c, N_IMAGES // 2, rng)
    data = {"ddpm_cifar10": ["dataset=image_folder", f"dataset.path={plain}"],
            "sd_v1": ["dataset=image_folder", f"dataset.path={captioned}",
                      "dataset.captions=metadata.jsonl"],
            "dit": ["dataset=image_folder", f"dataset.path={classes}"]}
    out = {}
    for preset, kw in PRESET_ARGS.items():
        folder = write_preset_pipeline(root / preset, preset, **kw)
        out[preset] = ["model=diffusers", f"model.path={folder}", f"model.name={preset}",
                       f"model.resolution={RESOLUTION[preset]}", *data[preset]]
    return out


def run(tmp_path: Path, overrides: list[str]) -> dict:
    cfg = compose_config([*BASE, *overrides], output_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(tmp_path / "cache")
    return run_experiment(cfg)


@pytest.mark.parametrize("preset", list(PRESET_ARGS))
def test_fp_run(tmp_path, family_data, preset):
    res = run(tmp_path, family_data[preset])
    assert res["status"] == "done"
    m = res["metrics"]
    assert m["mse"] == 0.0  # the FP model against itself on the same seeds
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["cost"]["ops"] > 0 and saved["cost"]["size_mb"] > 0
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 4


@pytest.mark.parametrize("preset", list(PRESET_ARGS))
def test_ptq_run_export_reload(tmp_path, family_data, preset):
    res = run(tmp_path, [*family_data[preset], "method=ptq", "bits=w8a8", "method.calib_n=4",
                         "method.calib_steps=2", "export=true"])
    assert res["status"] == "done"
    assert res["metrics"]["mse"] > 0 and np.isfinite(res["metrics"]["psnr"])
    assert res["cost"]["bops"] > 0  # integer GEMMs counted as BOPs
    student = load_student(tmp_path / "run")
    assert any(p.numel() for p in student.parameters())
    assert torch.isfinite(next(iter(student.parameters()))).all()


# ------------------------------------------------------------------------------------------------
# every fine-tuning method on every family
# ------------------------------------------------------------------------------------------------
# tiny budgets; min-max ranges instead of the methods' MSE search (the search is what costs
# minutes on a CPU, and these tests check the run path, not the ranges)
_BINARY = ["method.steps=2", "method.batch_size=2", "method.checkpoint_every=2",
           "method.calib_n=4", "method.calib_batch_size=2", "bits.weight.init=minmax",
           "bits.act.init=minmax"]
METHODS = {
    "quest": ["method=quest", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
              "method.batch_size=4", "method.checkpoint_every=2", "method.tla.steps=2",
              "method.cma.steps=2", "method.adaround.iters=2"],
    "efficientdm": ["method=efficientdm", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
                    "method.steps=3", "method.batch_size=2", "method.checkpoint_every=3",
                    "method.rank=4"],
    "qat": ["method=qat", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
            "method.calib_batch_size=4", "method.steps=2", "method.batch_size=2",
            "method.checkpoint_every=2", "method.bits_rules.weight.init=minmax",
            "method.bits_rules.act.init=minmax"],
    "irqlora": ["method=irqlora", "bits=w4a16", "method.steps=2", "method.batch_size=2",
                "method.checkpoint_every=2", "method.rank=4", "method.icq_candidates=11"],
    "binary_baseline": ["method=binary_baseline", "bits=w1a4", *_BINARY],
    "binarydm": ["method=binarydm", "bits=w1a4", *_BINARY, "method.lrm_samples=4"],
    "bidm": ["method=bidm", "bits=w1a1", *_BINARY],
}
# the cheapest family each method is defined for runs by default (DiT: 8×8 latents, 2 blocks)
FAST = {"qat": "dit", "irqlora": "dit", "binary_baseline": "dit", "binarydm": "ddpm_cifar10",
        "bidm": "ddpm_cifar10"}
# families a method is not defined for: refused before any compute
REFUSED = {("binarydm", "dit"), ("bidm", "dit")}


def _cases():
    for method in METHODS:
        for preset in PRESET_ARGS:
            if (method, preset) in REFUSED:
                continue
            slow = FAST.get(method) != preset
            yield pytest.param(method, preset, id=f"{method}-{preset}",
                               marks=[pytest.mark.slow] if slow else [])


@torch.no_grad()
def _outputs(net: torch.nn.Module, steps=(999, 500)) -> list[torch.Tensor]:
    """The network's outputs over a decreasing timestep sequence, one batch of fixed random
    inputs (a BiDM student's second step reads the first step's carried features)."""
    outs = []
    for t in steps:
        inputs = example_inputs(net, batch_size=2, timestep=t, seq_len=16,
                                generator=torch.Generator().manual_seed(7))
        out = net(**inputs)
        outs.append(out.sample if hasattr(out, "sample") else out[0])
    return outs


@pytest.mark.parametrize(("method", "preset"), list(_cases()))
def test_method_run_export_reload(tmp_path, family_data, monkeypatch, method, preset):
    saved = []
    save = lowbit.pipeline.save_student

    def keep(student, out):  # the run's own student, to compare the reload with
        saved.append(student)
        return save(student, out)

    monkeypatch.setattr(lowbit.pipeline, "save_student", keep)
    bits = next(o.split("=", 1)[1] for o in METHODS[method] if o.startswith("bits="))
    export = packable(method, bits) is None
    t0 = time.perf_counter()
    res = run(tmp_path, [*family_data[preset], *METHODS[method], f"export={str(export).lower()}"])
    print(f"{method} on {preset}: {time.perf_counter() - t0:.1f} s")
    assert res["status"] == "done"
    assert res["metrics"]["mse"] > 0 and np.isfinite(res["metrics"]["psnr"])
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 4
    if export:
        assert res["export"]["layers"]["int"] > 0, res["export"]
    (student,) = saved
    reloaded = load_student(tmp_path / "run")
    assert [type(m).__name__ for m in reloaded.modules()] == \
        [type(m).__name__ for m in student.modules()]
    for want, got in zip(_outputs(student), _outputs(reloaded), strict=True):
        assert torch.isfinite(want).all()
        assert torch.equal(want, got)  # the same arithmetic on the same tensors: bit for bit


@pytest.mark.parametrize(("method", "preset"), sorted(REFUSED))
def test_method_refused_for_family_before_compute(tmp_path, family_data, monkeypatch, method,
                                                  preset):
    from lowbit.methods import build_method

    def no_compute(*_a, **_k):
        raise AssertionError("the method started computing")

    cls = type(build_method(compose_config(METHODS[method][:2]).method))
    monkeypatch.setattr(cls, "prepare", no_compute)
    with pytest.raises(ConfigError, match=rf"method={method!r}: not defined for model "
                                          rf"'{preset}' \(a dit network\).*U-Net"):
        run(tmp_path, [*family_data[preset], *METHODS[method]])
    assert not (tmp_path / "run" / "results.json").exists()
