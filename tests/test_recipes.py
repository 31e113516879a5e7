"""The paper recipes (``conf/experiment/<paper>/<table>.yaml``) and the model configs they use.

Every recipe composes as shipped and states its paper's protocol; each of the recipes on real
models then runs for 2 samples on a random-weight pipeline of its architecture written here with
``save_pretrained`` (nothing is downloaded): the DDPM-CIFAR10 and SD v1 presets of
:mod:`lowbit.models.presets`, and small LDMs — a UNet2DModel with attention at the lower
resolutions on the latents of a VQ-f4 autoencoder (diffusers' ``LDMPipeline``, whose autoencoder
is the ``vqvae`` component), class-conditional for ImageNet, or of a KL-f8 ``AutoencoderKL``
(LSUN-Churches). Budgets are tiny and the paired-fidelity metrics replace Inception/CLIP: these
runs prove that each recipe's model × method × bits × sampler runs end to end, not its numbers.

``digits/`` recipes are exercised by the method tests (tests/test_efficientdm.py) and the digits
experiments; the DeepCache recipes run in tests/test_cache.py. Both are only composed here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lowbit.cli import CONF_DIR, compose_config
from lowbit.config import ConfigError, validate

EXPERIMENTS = CONF_DIR / "experiment"
RECIPES = sorted(str(p.relative_to(EXPERIMENTS).with_suffix(""))
                 for p in EXPERIMENTS.rglob("*.yaml") if p.parent.name != "digits")

# each paper recipe's protocol as shipped (METHODS.md §9 and the per-method settings of
# experiments/<paper>/README.md)
PAPER = {
    "qdiffusion/cifar10": {
        "model.name": "ddpm_cifar10", "method.name": "qdiffusion", "bits.name": "w4a8",
        "sampler.kind": "ddim", "sampler.steps": 100, "sampler.eta": 0.0,
        "metrics.num_samples": 50000, "method.calib_n": 256, "method.calib_steps": 20,
        "method.adaround.iters": 20000, "method.act_recon.iters": 5000},
    "qdiffusion/lsun_bedroom": {
        "model.name": "ldm4_bedroom", "method.name": "qdiffusion", "bits.name": "w4a8",
        "sampler.steps": 200, "sampler.eta": 1.0, "metrics.num_samples": 50000,
        "method.calib_n": 256, "method.calib_steps": 20, "method.adaround.iters": 20000},
    "qdiffusion/lsun_church": {
        "model.name": "ldm8_church", "method.name": "qdiffusion", "bits.name": "w4a8",
        "sampler.steps": 500, "sampler.eta": 0.0, "metrics.num_samples": 50000},
    "quest/lsun_bedroom": {
        "model.name": "ldm4_bedroom", "method.name": "quest", "bits.name": "w4a4",
        "sampler.steps": 200, "sampler.eta": 1.0, "metrics.num_samples": 50000,
        "method.calib_n": 256, "method.calib_steps": 20, "method.tla.lr": 1e-5,
        "method.cma.lr": 1e-5, "method.cma.act_lr": 1e-4},
    "quest/imagenet": {
        "model.name": "ldm4_imagenet", "method.name": "quest", "bits.name": "w4a4",
        "sampler.kind": "ddim", "sampler.steps": 20, "sampler.eta": 0.0,
        "sampler.guidance_scale": 3.0, "metrics.num_samples": 50000, "model.null_class": 1000},
    "quest/sd14_coco": {
        "model.name": "sd14", "method.name": "quest", "bits.name": "w4a4", "sampler.kind": "plms",
        "sampler.steps": 50, "sampler.guidance_scale": 7.5, "model.resolution": 512,
        "metrics.num_samples": 10000, "method.calib_n": 128, "method.calib_steps": 25,
        "method.bits_rules.sm_bits": 16, "model.quest_critical_layers": ["*ff.net.*"],
        "method.recon": "adaround", "method.adaround.store_device": "cpu",
        "method.calib_batch_size": 4, "trainer.accumulate_grad_batches": 2,
        "trainer.gradient_checkpointing": True},
    "efficientdm/imagenet": {
        "model.name": "ldm4_imagenet", "method.name": "efficientdm", "bits.name": "w4a4",
        "sampler.steps": 20, "sampler.eta": 0.0, "sampler.guidance_scale": 3.0,
        "metrics.num_samples": 50000, "method.steps": 16000, "method.trajectory_steps": 100,
        "method.rank": 32, "method.interp": "linear"},
    "binarydm/lsun_bedroom": {
        "model.name": "ldm4_bedroom", "method.name": "binarydm", "bits.name": "w1a4",
        "sampler.steps": 100, "metrics.num_samples": 50000, "method.ebb_tau": 0.09,
        "method.lrm_weight": 1e-4, "method.batch_size": 4},
    "bidm/lsun_bedroom": {
        "model.name": "ldm4_bedroom", "method.name": "bidm", "bits.name": "w1a1",
        "sampler.steps": 100, "metrics.num_samples": 50000, "method.spd_weight": 1e-2,
        "method.patch_size": 4, "method.ctc_blocks": 8, "method.batch_size": 4},
}
# the metrics group each paper recipe names (FID/sFID/IS tables; CLIP score on COCO)
PAPER_METRICS = {r: ("coco" if r.endswith("coco") else "inception") for r in PAPER}
# the models diffusers does not host: their configs need model.path (a converted folder)
CONVERTED = ("ldm4_bedroom", "ldm4_imagenet", "ldm8_church")
HUB = {"ddpm_bedroom": ("google/ddpm-bedroom-256", 256),
       "ddpm_church": ("google/ddpm-church-256", 256),
       "ldm_celebahq": ("CompVis/ldm-celebahq-256", 256)}


def _defaults(recipe: str) -> dict[str, str]:
    """The groups a recipe file overrides (``override /<group>: <option>``)."""
    spec = OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / f"{recipe}.yaml"))
    out = {}
    for d in spec.get("defaults", []):
        if isinstance(d, dict):
            for k, v in d.items():
                out[k.replace("override ", "").strip("/ ")] = v
    return out


def _compose(recipe: str, *extra: str, output_dir: Path | None = None):
    """A recipe as shipped; its metrics group is replaced by ``fidelity`` only while that group's
    config file is not in lowbit (Inception/CLIP metrics are added separately)."""
    metrics = _defaults(recipe).get("metrics")
    fallback = [] if metrics is None or (CONF_DIR / "metrics" / f"{metrics}.yaml").is_file() \
        else ["metrics=fidelity"]
    return compose_config([f"experiment={recipe}", *fallback, *extra], output_dir=output_dir)


def test_every_paper_recipe_is_covered():
    ours = [r for r in RECIPES if r.split("/")[0] in
            ("qdiffusion", "quest", "efficientdm", "binarydm", "bidm")]
    assert sorted(ours) == sorted(PAPER)
    for r in PAPER:  # and each has its README with the exact command
        readme = CONF_DIR.parent.parent / "experiments" / r.split("/")[0] / "README.md"
        assert f"experiment={r}" in readme.read_text(), (readme, r)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(tmp_path, recipe):
    cfg = _compose(recipe, output_dir=tmp_path / "run")
    assert cfg.model.name and cfg.method.name and cfg.sampler.steps > 0
    if recipe in PAPER:
        for key, want in PAPER[recipe].items():
            got = OmegaConf.select(cfg, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == want, key
        assert _defaults(recipe)["metrics"] == PAPER_METRICS[recipe]


@pytest.mark.parametrize("recipe", [r for r in PAPER if PAPER[r]["model.name"] in CONVERTED])
def test_recipe_on_a_converted_model_needs_its_path(tmp_path, recipe):
    """The CompVis LDMs are not on the hub: without model.path the run stops before any
    compute, naming the key and the fix."""
    cfg = _compose(recipe, output_dir=tmp_path / "run")
    assert OmegaConf.is_missing(cfg.model, "path")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "model.path" and "Fix:" in str(e.value)


@pytest.mark.parametrize("model", [*HUB, *CONVERTED])
def test_model_configs(make_cfg, model):
    if model in HUB:
        cfg = make_cfg(f"model={model}")
        assert (cfg.model.path, cfg.model.resolution) == HUB[model]
        assert cfg.model.loader.path == HUB[model][0]
    else:
        assert OmegaConf.is_missing(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"), "path")
        cfg = make_cfg(f"model={model}", "model.path=/some/converted/folder")
        assert cfg.model.loader.path == "/some/converted/folder" and cfg.model.resolution == 256
    assert cfg.model.loader._target_ == "lowbit.models.hub.load_diffusers"


# ------------------------------------------------------------------------------------------------
# random-weight pipelines of the papers' LDMs
# ------------------------------------------------------------------------------------------------
def write_ldm_pipeline(folder: Path, autoencoder: str = "vq", num_class_embeds: int | None = None,
                       seed: int = 0) -> Path:
    """A small LDM with random weights: a UNet2DModel (attention at its three lower resolutions,
    as LDM-4's U-Net) on the latents of a VQ-f4 ``VQModel`` (``LDMPipeline``: component
    ``vqvae``) or of a KL-f8 ``AutoencoderKL`` (component ``vae``), LDM's noise schedule, for
    32² (VQ-f4) or 64² (KL-f8) images."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiffusionPipeline,
        LDMPipeline,
        UNet2DModel,
        VQModel,
    )

    torch.manual_seed(seed)
    levels, latent = (3, 3) if autoencoder == "vq" else (4, 4)
    ae_kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                 up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels,
                 layers_per_block=1, latent_channels=latent, norm_num_groups=32)
    ae = VQModel(num_vq_embeddings=64, sample_size=32, **ae_kw) if autoencoder == "vq" \
        else AutoencoderKL(sample_size=64, **ae_kw)
    unet = UNet2DModel(
        sample_size=8, in_channels=latent, out_channels=latent, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96, 128), attention_head_dim=32, norm_num_groups=32,
        num_class_embeds=num_class_embeds)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                          beta_schedule="scaled_linear", clip_sample=False)
    if autoencoder == "vq":
        pipe = LDMPipeline(vqvae=ae.eval(), unet=unet.eval(), scheduler=sched)
    else:
        class LatentPipeline(DiffusionPipeline):  # the components of a converted LDM-8
            def __init__(self, unet, vae, scheduler):
                super().__init__()
                self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

        pipe = LatentPipeline(unet=unet.eval(), vae=ae.eval(), scheduler=sched)
    pipe.save_pretrained(str(folder))
    return Path(folder)


@torch.no_grad()
def test_ldm_pipeline_with_vqvae_loads_and_samples_like_diffusers(tmp_path):
    """LDMPipeline names its autoencoder ``vqvae``: the loader finds it (a latent model, not a
    pixel one), and samples what diffusers' own LDMPipeline samples from the same seed."""
    from diffusers import LDMPipeline

    from lowbit.models.hub import load_diffusers
    from lowbit.sampling import SamplerConfig, sample_many

    folder = write_ldm_pipeline(tmp_path / "ldm")
    d = load_diffusers(str(folder), name="ldm")
    assert (d.conditioning, d.family, d.latent) == ("none", "unet", True)
    assert type(d.vae).__name__ == "VQModel"
    assert d.sample_shape == (3, 8, 8) and d.image_shape == (3, 32, 32)
    x = sample_many(d, SamplerConfig("ddim", 3, 0.0, 1.0, 2), None, 2, seed=0, progress=False)
    ours = (d.decode(x) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    ref = LDMPipeline.from_pretrained(str(folder))(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, eta=0.0,
        output_type="np").images
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert ours.std() > 0.01  # decoded images, not a constant


# ------------------------------------------------------------------------------------------------
# each paper recipe for 2 samples on its architecture
# ------------------------------------------------------------------------------------------------
# the architecture each recipe's model stands for: (pipeline, image side of the test)
ARCH = {"ddpm_cifar10": ("ddpm", 32), "sd14": ("sd_v1", 32), "ldm4_bedroom": ("ldm_vq", 32),
        "ldm4_imagenet": ("ldm_vq_class", 32), "ldm8_church": ("ldm_kl", 64)}
_INIT = ["method.bits_rules.weight.init=minmax", "method.bits_rules.act.init=minmax"]
_BINARY = ["method.steps=2", "method.batch_size=2", "method.checkpoint_every=2",
           "method.calib_n=4", "method.calib_batch_size=2", "bits.weight.init=minmax",
           "bits.act.init=minmax"]
# tiny budgets (min-max ranges: the MSE search is what costs minutes on a CPU)
TINY = {
    "qdiffusion": ["method.calib_n=4", "method.calib_steps=2", "method.calib_batch_size=4",
                   "method.adaround.iters=2", "method.act_recon.iters=2", *_INIT],
    "quest": ["method.calib_n=4", "method.calib_steps=2", "method.batch_size=2",
              "method.checkpoint_every=2", "method.tla.steps=2", "method.cma.steps=2",
              "method.adaround.iters=2", *_INIT],
    "efficientdm": ["method.calib_n=4", "method.calib_steps=2", "method.steps=3",
                    "method.batch_size=2", "method.checkpoint_every=3", "method.rank=4",
                    "method.trajectory_steps=3", *_INIT],
    "binarydm": [*_BINARY, "method.lrm_samples=4"],
    "bidm": _BINARY,
}
# run by default: two of the cheapest (seconds each), an unconditional and a class-conditional
# LDM with guidance; the Q-Diffusion recipes (block reconstruction) take 20-40 s each


def _write_images(folder: Path, n: int, side: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    """Pipelines and data, written once per module when first asked for."""
    root = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    made: dict[str, list[str]] = {}

    def get(model: str) -> list[str]:
        kind, side = ARCH[model]
        if kind in made:
            return made[kind]
        from lowbit.models.presets import write_preset_pipeline

        folder = root / kind
        if kind == "ddpm":
            write_preset_pipeline(folder, "ddpm_cifar10", block_out_channels=(32, 32, 32, 32))
        elif kind == "sd_v1":
            write_preset_pipeline(folder, "sd_v1")
        else:
            write_ldm_pipeline(folder, "kl" if kind == "ldm_kl" else "vq",
                               num_class_embeds=1001 if kind == "ldm_vq_class" else None)
        data = root / f"data_{kind}"
        if kind == "sd_v1":
            data.mkdir()
            (data / "captions.txt").write_text("a red bus on a street\ntwo cats on a sofa\n")
            data_kw = [f"dataset.path={data / 'captions.txt'}"]
        elif kind == "ldm_vq_class":
            for c in ("n01440764", "n01443537"):  # one folder per class, as ImageNet's
                _write_images(data / c, 6, side, rng)
            data_kw = [f"dataset.path={data}"]
        else:
            _write_images(data, 12, side, rng)
            data_kw = [f"dataset.path={data}"]
        made[kind] = [f"model.path={folder}", f"model.resolution={side}", *data_kw]
        return made[kind]

    return get


def _cases():
    for recipe in PAPER:
        # run by `pytest -m slow`; the default suite composes and validates every recipe
        yield pytest.param(recipe, id=recipe, marks=[pytest.mark.slow])


@pytest.mark.parametrize("recipe", list(_cases()))
def test_recipe_runs_on_its_architecture(tmp_path, arch, monkeypatch, recipe):
    from lowbit.methods.quest import QuEST
    from lowbit.pipeline import run_experiment

    critical = []  # the critical layers QuEST's CMA stage was given by the model config
    stage_groups = QuEST.stage_groups

    def record(self, student, stage, model_name, family=None, model_critical=None):
        critical.append((stage, model_critical))
        return stage_groups(self, student, stage, model_name, family, model_critical)

    monkeypatch.setattr(QuEST, "stage_groups", record)

    model, method = PAPER[recipe]["model.name"], PAPER[recipe]["method.name"]
    overrides = [*arch(model), *TINY[method], "metrics=fidelity", "metrics.num_samples=2",
                 "metrics.grid_size=2", "sampler.steps=3", "sampler.batch_size=2",
                 "logger=none", "device=cpu", "threads=1", "time_vs_fp=false"]
    cfg = _compose(recipe, *overrides, output_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(tmp_path / "cache")
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    print(f"{recipe}: {time.perf_counter() - t0:.1f} s")
    assert res["status"] == "done"
    assert res["model"] == model and res["method"].startswith(
        "ptq" if method == "qdiffusion" else method)
    assert res["bits"].startswith(PAPER[recipe]["bits.name"])
    # the student against the FP model on the same seeds: quantized, and finite
    assert res["metrics"]["mse"] > 0 and np.isfinite(res["metrics"]["psnr"])
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2
    if method == "quest":
        want = cfg.model.get("quest_critical_layers")
        assert critical == [("tla", want), ("cma", want)]


def test_quest_critical_layers_of_sd_come_from_the_model_config(tmp_path):
    """QuEST trains SD's feed-forward layers only in CMA (the model config's
    ``quest_critical_layers``); the method's table would add the LDM attention projections."""
    from lowbit.methods import build_method
    from lowbit.methods.ptq import quant_config
    from lowbit.models.presets import build_preset
    from lowbit.quant import quantize_

    cfg = _compose("quest/sd14_coco", "metrics=fidelity", output_dir=tmp_path / "run")
    method = build_method(cfg.method)
    student = build_preset("sd_v1", cross_attention_dim=32, sample_size=8)
    quantize_(student, quant_config(cfg).with_overrides({"act": {"timestep_aware": True}}),
              init_weights=False)  # which parameters train does not depend on their ranges
    model_list = list(cfg.model.quest_critical_layers)
    cma, _ = method.stage_groups(student, "cma", cfg.model.name, "unet_text", model_list)
    weights = [n for n, _ in cma[0].params]
    assert weights and all(".ff.net." in n for n in weights)
    table, _ = method.stage_groups(student, "cma", cfg.model.name, "unet_text")
    assert any(".attn1.to_q." in n for n, _ in table[0].params)
