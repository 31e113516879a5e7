"""Every method end to end (prepare → sample → metrics → results.json → export → reload) on the
real model families besides digits, as random-weight pipelines written by the test: the SD v1.x
U-Net (shrunk; tiny random CLIP text encoder and VAE), a class-conditional DiT with a VAE, and
DDPM-CIFAR10 (unconditional, pixel space). Budgets are tiny: these tests prove that the run path
works for each family, not what the methods achieve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.cli import compose_config
from lowbit.models.presets import write_preset_pipeline
from lowbit.pipeline import run_experiment

PRESET_ARGS = {"ddpm_cifar10": {"block_out_channels": (32, 32, 32, 32)}, "sd_v1": {}, "dit": {}}
RESOLUTION = {"ddpm_cifar10": 32, "sd_v1": 32, "dit": 16}
BASE = ["metrics=fidelity", "metrics.num_samples=4", "metrics.grid_size=4", "sampler=ddim20",
        "sampler.steps=3", "sampler.batch_size=4", "logger=none", "threads=2", "device=cpu"]


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    """Per preset: the pipeline folder and its dataset overrides (random images / prompts)."""
    root = tmp_path_factory.mktemp("families")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\ntwo cats on a sofa\na lighthouse at night\n")
    out = {}
    for preset, kw in PRESET_ARGS.items():
        folder = write_preset_pipeline(root / preset, preset, **kw)
        model = ["model=diffusers", f"model.path={folder}", f"model.name={preset}",
                 f"model.resolution={RESOLUTION[preset]}"]
        data = ([f"dataset=prompts", f"dataset.path={prompts}"] if preset == "sd_v1" else
                [f"dataset=image_folder", f"dataset.path={images}"])
        out[preset] = model + data
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
    assert 0 < res["metrics"]["mse"] and np.isfinite(res["metrics"]["psnr"])
    assert res["cost"]["bops"] > 0  # integer GEMMs counted as BOPs
    from lowbit.export import load_student

    student = load_student(tmp_path / "run")
    assert any(p.numel() for p in student.parameters())
    assert torch.isfinite(next(iter(student.parameters()))).all()


FINETUNE = {
    "quest": ["method=quest", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
              "method.batch_size=4", "method.checkpoint_every=2", "method.tla.steps=2",
              "method.cma.steps=2"],
    "efficientdm": ["method=efficientdm", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
                    "method.steps=3", "method.batch_size=2", "method.checkpoint_every=3",
                    "method.rank=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(FINETUNE))
@pytest.mark.parametrize("preset", list(PRESET_ARGS))
def test_finetune_run_export_reload(tmp_path, family_data, preset, method):
    res = run(tmp_path, [*family_data[preset], *FINETUNE[method], "export=true"])
    assert res["status"] == "done" and np.isfinite(res["metrics"]["mse"])
    from lowbit.export import load_student

    assert load_student(tmp_path / "run") is not None
