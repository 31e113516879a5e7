"""The denoiser adapter and the diffusers loader, on random-weight pipelines of the real families
written by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.models.digits import NULL_CLASS, load_digits_model
from lowbit.models.hub import load_diffusers
from lowbit.models.presets import write_preset_pipeline
from lowbit.sampling import SamplerConfig, sample_many

PRESET_ARGS = {"ddpm_cifar10": {"block_out_channels": (32, 32, 32, 32)}, "sd_v1": {}, "dit": {}}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {p: write_preset_pipeline(root / p, p, **kw) for p, kw in PRESET_ARGS.items()}


def test_digits_guidance_is_one_batch_of_cond_and_null():
    d = load_digits_model()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 16, 16, generator=g), torch.tensor(500), torch.tensor([1, 2, 3])
    with torch.no_grad():
        got = d.guided(x, t, y, 2.0)
        eps_c = d.net(x, t.expand(3), class_labels=y).sample
        eps_u = d.net(x, t.expand(3), class_labels=torch.full((3,), NULL_CLASS)).sample
    torch.testing.assert_close(got, eps_u + 2.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    xb, tb, cb = d.guidance_batch(x, t, y, 2.0)
    assert xb.shape[0] == 6 and cb.tolist() == [1, 2, 3, NULL_CLASS, NULL_CLASS, NULL_CLASS]
    assert d.guidance_batch(x, t, y, 1.0)[0] is x  # no guidance: the batch as it is


@pytest.mark.parametrize("preset,kind,family,latent", [
    ("ddpm_cifar10", "none", "unet", False), ("sd_v1", "text", "unet_text", True),
    ("dit", "class", "dit", True)])
def test_families_detected_and_sampled(pipelines, preset, kind, family, latent):
    d = load_diffusers(str(pipelines[preset]), name=preset)
    assert (d.conditioning, d.family, d.latent) == (kind, family, latent)
    prompts = ["a red square", "two cats"] if kind == "text" else None
    cond = d.make_cond(prompts, 2)
    if kind == "text":
        assert cond.shape[:2] == (2, d.tokenizer.model_max_length)
        # guidance's null input is the embedding of the empty prompt
        torch.testing.assert_close(d.null_cond(1), d.encode_text([""]))
    x = sample_many(d, SamplerConfig("ddim", 2, 0.0, 3.0, 2), cond, 2, seed=0, progress=False)
    assert x.shape == (2, *d.sample_shape) and torch.isfinite(x).all()
    img = d.decode(x)
    assert img.shape == (2, *d.image_shape) and img.min() >= -1 and img.max() <= 1
    if latent:  # encode/decode map between image and latent space
        assert d.encode(img).shape == x.shape


def test_dit_learned_sigma_is_split_off(pipelines):
    d = load_diffusers(str(pipelines["dit"]))
    assert d.net.config.out_channels == 2 * d.sample_shape[0]
    x = torch.randn(2, *d.sample_shape)
    out = d(x, torch.tensor(10), torch.tensor([3, 4]))
    assert out.shape == x.shape
    assert d.null_class == d.num_classes == 1000


def test_sampling_is_a_function_of_the_seed_only(pipelines):
    d = load_diffusers(str(pipelines["dit"]))
    cfg = SamplerConfig("ddim", 3, 0.0, 2.0, 2)
    cond = d.make_cond(None, 4)
    a = sample_many(d, cfg, cond, 4, seed=5, progress=False)
    b = sample_many(d, cfg, cond[2:], 2, seed=6, progress=False)  # the second batch alone
    torch.testing.assert_close(a[2:], b, rtol=0, atol=0)


def test_hub_id_offline_names_the_id_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="model.path='nobody/no-such-model'.*huggingface-cli"):
        load_diffusers("nobody/no-such-model")


def test_text_model_needs_prompts(pipelines):
    d = load_diffusers(str(pipelines["sd_v1"]))
    with pytest.raises(ValueError, match="dataset=prompts"):
        d.make_cond(None, 2)
