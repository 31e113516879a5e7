"""The shipped digits checkpoints: safe loading, clear errors, and that they are trained."""

from __future__ import annotations

import pytest
import torch

from lowbit.data.digits import load_digits_tensors, split_indices
from lowbit.models.digits import (
    CLASSIFIER_FILE,
    UNET_FILE,
    asset_path,
    load_digit_classifier,
    load_digits_model,
    load_digits_unet,
)


def test_shipped_checkpoints_are_small_safetensors():
    for name in (UNET_FILE, CLASSIFIER_FILE):
        path = asset_path(name)
        assert path.is_file(), path
        assert path.stat().st_size < 8 * 2**20
        with open(path, "rb") as f:  # safetensors: 8-byte header length, then a JSON header
            n = int.from_bytes(f.read(8), "little")
            assert f.read(1) == b"{" and n < path.stat().st_size


def test_classifier_recognises_held_out_digits():
    x, y = load_digits_tensors()
    _, val = split_indices(len(x))
    clf = load_digit_classifier()
    with torch.no_grad():
        acc = (clf(x[val]).argmax(1) == y[val]).float().mean().item()
    assert acc > 0.97


def test_unet_denoises_better_than_identity():
    """The trained U-Net predicts the added noise far better than chance (MSE 1)."""
    from diffusers import DDPMScheduler

    loaded = load_digits_model()
    x0, y = load_digits_tensors()
    x0, y = x0[:256], y[:256]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.full((len(x0),), 300)
    xt = DDPMScheduler(**loaded.noise_schedule).add_noise(x0, noise, t)
    with torch.no_grad():
        eps = loaded(xt, t, y)
    assert torch.mean((eps - noise) ** 2).item() < 0.2


def test_missing_checkpoint_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="lowbit-train-digits") as e:
        load_digits_unet(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_digits_unet(bad)


def test_wrong_architecture_checkpoint_names_file(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_digits_unet(other)
