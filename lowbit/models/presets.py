"""Architecture presets: the real diffusers configs of the models lowbit reproduces, random weights.

No weights can be downloaded here, so layer coverage, shapes, speed and memory are tested on the
architectures themselves: DDPM-CIFAR10 at full size (``google/ddpm-cifar10-32``'s config), the
Stable Diffusion v1.x U-Net with its real block structure (cross-attention transformer blocks,
GEGLU feed-forward, 1×1 proj convs) shrunk in width, and a DiT with the real DiT block structure
(adaLN-Zero, patch embedding, two-stage output projection) with few layers and a small width.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

# google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 model, 35.7 M parameters): attention at 16×16.
DDPM_CIFAR10_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
)

# CompVis/stable-diffusion-v1-4 and v1-5 U-Net (860 M parameters at this width).
SD_V1_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name: SD v1 has 8 heads
)

# facebook/DiT-XL-2-256 transformer (675 M parameters at this size).
DIT_XL_2_CONFIG: dict[str, Any] = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)


def ddpm_cifar10_unet(**overrides: Any) -> UNet2DModel:
    """DDPM-CIFAR10 U-Net at full size, random weights."""
    return UNet2DModel(**{**DDPM_CIFAR10_CONFIG, **overrides})


def sd_v1_unet(width: int = 32, cross_attention_dim: int = 768, sample_size: int = 64,
               **overrides: Any) -> UNet2DConditionModel:
    """SD v1.x U-Net, widths (w, 2w, 4w, 4w) instead of (320, 640, 1280, 1280); ``width`` must be
    a multiple of 32 (GroupNorm groups). Block structure, heads and text width as the real one."""
    if width % 32:
        raise ValueError(f"sd_v1_unet: width={width} must be a multiple of 32 (norm_num_groups).")
    cfg = {**SD_V1_CONFIG, "block_out_channels": (width, 2 * width, 4 * width, 4 * width),
           "cross_attention_dim": cross_attention_dim, "sample_size": sample_size}
    return UNet2DConditionModel(**{**cfg, **overrides})


def dit_small(num_layers: int = 2, num_attention_heads: int = 2, attention_head_dim: int = 16,
              sample_size: int = 8, **overrides: Any) -> DiTTransformer2DModel:
    """DiT-XL/2's block structure with few layers and a small width (heads × head dim)."""
    cfg = {**DIT_XL_2_CONFIG, "num_layers": num_layers, "num_attention_heads": num_attention_heads,
           "attention_head_dim": attention_head_dim, "sample_size": sample_size}
    return DiTTransformer2DModel(**{**cfg, **overrides})


def _digits(**overrides: Any) -> nn.Module:
    from lowbit.models.digits import DIGITS_UNET_CONFIG

    return UNet2DModel(**{**DIGITS_UNET_CONFIG, **overrides})


PRESETS: dict[str, Callable[..., nn.Module]] = {
    "digits": _digits,
    "ddpm_cifar10": ddpm_cifar10_unet,
    "sd_v1": sd_v1_unet,
    "dit": dit_small,
}


def build_preset(name: str, seed: int | None = 0, **overrides: Any) -> nn.Module:
    """A preset architecture with random weights (seeded), in eval mode."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    if seed is not None:
        torch.manual_seed(seed)
    return PRESETS[name](**overrides).eval()


def example_inputs(model: nn.Module, batch_size: int = 2, timestep: int | torch.Tensor = 500,
                   sample_size: int | None = None, seq_len: int = 77,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """Forward kwargs with random data for any preset (class labels / text states as needed)."""
    cfg = model.config
    size = sample_size or cfg.sample_size
    size = size if isinstance(size, int) else size[0]
    device = next(model.parameters()).device
    kw: dict[str, Any] = {"generator": generator, "device": device}
    t = torch.as_tensor(timestep, device=device)
    if isinstance(model, DiTTransformer2DModel):
        return {"hidden_states": torch.randn(batch_size, cfg.in_channels, size, size, **kw),
                "timestep": t.expand(batch_size) if t.dim() == 0 else t,
                "class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (batch_size,), **kw)}
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch_size, cfg.in_channels, size, size, **kw), "timestep": t}
    if isinstance(model, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.randn(batch_size, seq_len,
                                                      cfg.cross_attention_dim, **kw)
    elif getattr(cfg, "num_class_embeds", None):
        inputs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch_size,), **kw)
    return inputs


# ------------------------------------------------------------------------------------------------
# random-weight pipeline folders: the real model families, loadable offline with model.path=
# ------------------------------------------------------------------------------------------------
TINY_TEXT_DIM = 32


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> nn.Module:
    """A random-weight ``AutoencoderKL`` with SD's structure in miniature (2× downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(32, 32), layers_per_block=1,
                         norm_num_groups=32, sample_size=32).eval()


def tiny_clip_text(folder: Path, seed: int = 0) -> tuple[nn.Module, Any]:
    """A random-weight CLIP text encoder (``TINY_TEXT_DIM`` wide) and a character-level CLIP BPE
    tokenizer whose vocabulary files are written into ``folder`` (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=16)
    torch.manual_seed(seed)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=TINY_TEXT_DIM,
                                       intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return enc, tok


def write_preset_pipeline(folder: str | Path, preset: str, seed: int = 0, **overrides: Any
                          ) -> Path:
    """Write a random-weight diffusers pipeline of a real model family to ``folder``
    (``save_pretrained``), loadable with ``model=diffusers model.path=<folder>``:

    - ``ddpm_cifar10``: ``DDPMPipeline`` (pixel space, unconditional; pass e.g.
      ``block_out_channels=(32, 64, 64, 64)`` to shrink it);
    - ``sd_v1``: ``StableDiffusionPipeline`` with the SD v1 U-Net structure (width 32), a tiny
      random VAE, CLIP text encoder and tokenizer;
    - ``dit``: ``DiTPipeline`` with a small DiT and a tiny random VAE.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMPipeline,
        DDPMScheduler,
        DiTPipeline,
        PNDMScheduler,
        StableDiffusionPipeline,
    )

    folder = Path(folder)
    if preset == "ddpm_cifar10":
        unet = build_preset("ddpm_cifar10", seed, **overrides)
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    elif preset == "sd_v1":
        unet = build_preset("sd_v1", seed, **{"cross_attention_dim": TINY_TEXT_DIM,
                                              "sample_size": 16, **overrides})
        enc, tok = tiny_clip_text(folder / "_vocab", seed)
        sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=tiny_vae(4, seed), text_encoder=enc, tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif preset == "dit":
        net = build_preset("dit", seed, **overrides)
        pipe = DiTPipeline(transformer=net, vae=tiny_vae(4, seed),
                           scheduler=DDIMScheduler(num_train_timesteps=1000))
    else:
        raise ValueError(f"unknown preset {preset!r}; choose ddpm_cifar10, sd_v1 or dit")
    pipe.save_pretrained(str(folder))
    return folder
