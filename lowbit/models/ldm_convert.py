"""CompVis latent-diffusion checkpoints → diffusers pipeline folders that lowbit loads.

The quantization papers evaluate the original CompVis LDMs (Rombach et al. 2022), which come as a
``model.ckpt`` (a torch pickle with ``state_dict``: ``model.diffusion_model.*`` = the U-Net,
``first_stage_model.*`` = the autoencoder, ``cond_stage_model.*`` = the conditioning encoder) and
the repository's yaml (``configs/latent-diffusion/<name>.yaml``). :func:`convert_ldm` turns the
pair into a pipeline folder; :func:`lowbit.models.hub.load_diffusers` loads it like any other.

================================  ===============================  ==================================
CompVis                           diffusers                        pipeline component
================================  ===============================  ==================================
``openaimodel.UNetModel`` with    ``UNet2DModel`` (or              ``unet``
legacy ``AttentionBlock``\\ s      :class:`LDMUNet2DModel`, see
(LSUN bedrooms, churches)         there)
``UNetModel`` with                ``UNet2DConditionModel``,        ``unet``
``SpatialTransformer``\\ s         ``cross_attention_dim`` =
(ImageNet cin256)                 ``context_dim``
``ClassEmbedder``                 :class:`ClassEmbedder`           ``class_embedder``
``VQModelInterface`` (VQ-f4)      ``VQModel`` (codebook            ``vqvae`` (as ``LDMPipeline``)
                                  ``quantize.embedding.weight``)
``AutoencoderKL`` (KL-f8)         ``AutoencoderKL``                ``vae``
``linear_start/end, timesteps``   ``DDIMScheduler``                ``scheduler``
================================  ===============================  ==================================

The U-Net with spatial transformers and the autoencoders are mapped by diffusers' own
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` (the Stable Diffusion layout is
the same code); the unconditional U-Net with legacy attention blocks is walked here in
``UNetModel.__init__``'s build order. Every checkpoint key is either used or known to be unused
(the U-Net copy the weights were not taken from, the training loss, LatentDiffusion's own
schedule buffers — ``betas`` is checked against the yaml), and every diffusers parameter gets a
value (strict ``load_state_dict``); otherwise the conversion stops and names the keys.

Which U-Net weights: by default the EMA copy (``model_ema.*``) when the checkpoint holds one for
every U-Net parameter and the yaml keeps EMAs (``use_ema``, LatentDiffusion's default true) —
what the papers sample with: CompVis's ``scripts/sample_diffusion.py`` samples inside
``ema_scope`` and Q-Diffusion's ``scripts/sample_diffusion_ldm.py`` copies the EMA weights into
the model before quantizing it — else ``model.diffusion_model.*``. ``ema=True``/``False`` forces
the choice.

A class-conditional model is loaded by lowbit as conditioning ``class``: the labels go through
the class embedder into the U-Net's cross-attention as a one-token context, and the null class of
classifier-free guidance is the embedder's extra row (cin256-v2: 1000 of 1001).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from lowbit.config import ConfigError

UNET = "model.diffusion_model."
FIRST_STAGE = "first_stage_model."
COND_STAGE = "cond_stage_model."
EMA = "model_ema."
# keys no pipeline component needs: LitEma's copies and bookkeeping (the U-Net's copy is read
# only when taken), the autoencoder's training loss, and LatentDiffusion's buffers of its own noise
# schedule (the scheduler is rebuilt from the yaml; ``betas`` is compared with it)
UNUSED_PREFIXES = (EMA, FIRST_STAGE + "loss.", FIRST_STAGE + "model_ema.")
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar", "cond_ids")
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
# bump when the folder layout written here changes: cached conversions are then redone
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# components diffusers has no class for
# ------------------------------------------------------------------------------------------------
class ClassEmbedder(ModelMixin, ConfigMixin):
    """CompVis ``ClassEmbedder``: one learnt vector per class label, given to the U-Net's
    cross-attention as a one-token context ``[B, 1, D]``."""

    @register_to_config
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels)[:, None, :]


class LDMUNet2DModel(UNet2DModel):
    """``UNet2DModel`` whose attention blocks all have ``attention_heads`` heads.

    A CompVis U-Net given ``num_heads`` keeps the head count fixed and lets the head width grow with
    the channels (LDM-8 LSUN-Churches: 8 heads of 24 … 96 channels); ``UNet2DModel`` has a single
    ``attention_head_dim`` for all blocks. This one is built with one head per block
    (``attention_head_dim=None``), then each attention is split into ``attention_heads`` heads:
    the projections keep their shapes, only the head split and the softmax scale change.
    """

    def __init__(self, *args: Any, attention_heads: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_to_config(attention_heads=attention_heads)
        if attention_heads:
            for module in self.modules():
                if isinstance(module, Attention):
                    module.heads = int(attention_heads)
                    module.scale = (module.inner_dim // module.heads) ** -0.5


# diffusers' from_config passes only the keys named in the __init__ signature: name all of
# UNet2DModel's and ``attention_heads``
_UNET2D_SIGNATURE = inspect.signature(UNet2DModel.__init__)
LDMUNet2DModel.__init__.__signature__ = _UNET2D_SIGNATURE.replace(parameters=[
    *_UNET2D_SIGNATURE.parameters.values(),
    inspect.Parameter("attention_heads", inspect.Parameter.KEYWORD_ONLY, default=None)])


# ------------------------------------------------------------------------------------------------
# the yaml
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LDMConfig:
    """What a CompVis latent-diffusion yaml says about the parts lowbit converts."""

    source: str
    unet: dict
    first_stage: str  # "vq" | "kl"
    ddconfig: dict
    embed_dim: int
    n_embed: int | None
    num_classes: int | None  # ClassEmbedder rows (cin256-v2: 1000 classes + the null class)
    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float
    scale_by_std: bool
    use_ema: bool

    @property
    def cross_attention(self) -> bool:
        return bool(self.unet.get("use_spatial_transformer", False))


def _refuse(source: str, problem: str, fix: str) -> ConfigError:
    return ConfigError("model.ldm_config", source, problem, fix)


def read_ldm_config(config_yaml: str | Path) -> LDMConfig:
    """The yaml's LatentDiffusion parameters, refusing what has no diffusers counterpart here."""
    from omegaconf import OmegaConf

    source = str(config_yaml)
    if not Path(config_yaml).is_file():
        raise _refuse(source, "no such file", "give the yaml the checkpoint was trained with, "
                      "e.g. configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml")
    raw = OmegaConf.to_container(OmegaConf.load(config_yaml), resolve=True)
    model = raw.get("model", {}) if isinstance(raw, dict) else {}
    params = model.get("params", {})
    if not str(model.get("target", "")).endswith("LatentDiffusion") or "unet_config" not in params:
        raise _refuse(source, f"model.target is {model.get('target')!r}, not a LatentDiffusion "
                      "with a unet_config", "give a configs/latent-diffusion/*.yaml")
    if params.get("parameterization", "eps") != "eps":
        raise _refuse(source, f"parameterization={params['parameterization']!r}: lowbit's "
                      "denoisers predict ε", "convert an ε-prediction model")
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise _refuse(source, "only LDM's 'linear' beta schedule (linspace of √β, squared) has a "
                      "diffusers counterpart here", "convert a model trained with "
                      "beta_schedule: linear")
    unet_cfg = params["unet_config"]
    if unet_cfg.get("target") != UNET_TARGET:
        raise _refuse(source, f"unet_config.target={unet_cfg.get('target')!r}",
                      f"convert a model whose U-Net is {UNET_TARGET}")
    unet = dict(unet_cfg.get("params", {}))
    _check_unet(source, unet)

    fs = params.get("first_stage_config", {})
    fs_params = fs.get("params", {})
    ddconfig = dict(fs_params.get("ddconfig", {}))
    kind = {VQ_TARGET: "vq", KL_TARGET: "kl"}.get(fs.get("target"))
    if kind is None:
        raise _refuse(source, f"first_stage_config.target={fs.get('target')!r}",
                      f"convert a model whose first stage is {VQ_TARGET} (VQ-f4) or {KL_TARGET}")
    if ddconfig.get("attn_resolutions") or ddconfig.get("attn_type", "vanilla") != "vanilla" \
            or not ddconfig.get("resamp_with_conv", True) or ddconfig.get("tanh_out") \
            or ddconfig.get("give_pre_end") or ddconfig.get("use_linear_attn"):
        raise _refuse(source, "the autoencoder has attention outside its middle block, linear "
                      "attention or no resampling convolutions: diffusers' Encoder/Decoder do not",
                      "convert an autoencoder with attn_resolutions: [] (the LDM first stages)")
    if bool(ddconfig.get("double_z", True)) != (kind == "kl"):
        raise _refuse(source, f"ddconfig.double_z={ddconfig.get('double_z')} does not match "
                      f"{fs.get('target')}", "fix the yaml's first_stage_config")
    embed_dim = int(fs_params["embed_dim"])
    if kind == "kl" and embed_dim != int(ddconfig["z_channels"]):
        raise _refuse(source, f"embed_dim={embed_dim} != z_channels={ddconfig['z_channels']}: "
                      "diffusers' AutoencoderKL has one latent width",
                      "convert a KL autoencoder with embed_dim = z_channels")

    cond = params.get("cond_stage_config")
    num_classes = None
    if cond == "__is_unconditional__":
        if unet.get("use_spatial_transformer"):
            raise _refuse(source, "an unconditional U-Net with spatial transformers",
                          "convert an unconditional model with attention blocks (LSUN) or a "
                          "class-conditional one with spatial transformers (cin256)")
    elif isinstance(cond, dict) and str(cond.get("target", "")).endswith(".ClassEmbedder"):
        cp = cond.get("params", {})
        num_classes = int(cp.get("n_classes", 1000))
        if params.get("conditioning_key") != "crossattn" or not unet.get("use_spatial_transformer"):
            raise _refuse(source, "a ClassEmbedder not feeding cross-attention",
                          "convert a cin256-style model (conditioning_key: crossattn, "
                          "use_spatial_transformer: true)")
        if int(cp.get("embed_dim", -1)) != int(unet.get("context_dim") or -2):
            raise _refuse(source, f"ClassEmbedder embed_dim={cp.get('embed_dim')} != the U-Net's "
                          f"context_dim={unet.get('context_dim')}", "fix the yaml")
    else:
        what = cond.get("target") if isinstance(cond, dict) else cond
        raise _refuse(source, f"cond_stage_config={what!r}: lowbit converts unconditional LDMs "
                      "and class-conditional ones (ClassEmbedder through cross-attention)",
                      "text-to-image LDMs: use a diffusers Stable Diffusion pipeline instead")

    return LDMConfig(
        source=source, unet=unet, first_stage=kind, ddconfig=ddconfig, embed_dim=embed_dim,
        n_embed=int(fs_params["n_embed"]) if kind == "vq" else None, num_classes=num_classes,
        linear_start=float(params.get("linear_start", 1e-4)),
        linear_end=float(params.get("linear_end", 2e-2)),
        timesteps=int(params.get("timesteps", 1000)),
        scale_factor=float(params.get("scale_factor", 1.0)),
        scale_by_std=bool(params.get("scale_by_std", False)),
        use_ema=bool(params.get("use_ema", True)))


def _check_unet(source: str, p: dict) -> None:
    unsupported = {
        "dims": (p.get("dims", 2) != 2, "a U-Net that is not 2-D"),
        "num_classes": (p.get("num_classes") is not None, "label_emb class conditioning"),
        "n_embed": (p.get("n_embed") is not None, "codebook-id prediction"),
        "conv_resample": (not p.get("conv_resample", True), "resampling without convolutions"),
        "num_heads_upsample": (p.get("num_heads_upsample", -1) not in (-1, p.get("num_heads", -1)),
                               "other head counts when upsampling"),
        "context_dim": (isinstance(p.get("context_dim"), list), "a context_dim per level"),
    }
    for key, (bad, what) in unsupported.items():
        if bad:
            raise _refuse(source, f"unet_config.params.{key}={p.get(key)!r}: {what} has no "
                          "diffusers counterpart here", "convert one of the LDM-4/LDM-8 models "
                          "(LSUN bedrooms/churches, ImageNet cin256)")
    if p.get("use_spatial_transformer") and p.get("resblock_updown"):
        raise _refuse(source, "resblock_updown with spatial transformers",
                      "diffusers' UNet2DConditionModel resamples with convolutions only")
    if p.get("num_heads", -1) == -1 and p.get("num_head_channels", -1) == -1:
        raise _refuse(source, "neither num_heads nor num_head_channels is set",
                      "fix the yaml's unet_config.params")


# ------------------------------------------------------------------------------------------------
# the checkpoint
# ------------------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: str | Path) -> dict[str, Tensor]:
    """The state dict of a CompVis ``model.ckpt`` (or ``.safetensors``), read without running any
    pickled code (``weights_only=True``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError("model.checkpoint", str(checkpoint), "no such file",
                          "give the CompVis model.ckpt (e.g. models/ldm/lsun_beds256/model.ckpt)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ConfigError("model.checkpoint", str(path), f"is not a torch checkpoint ({e})",
                              "give the CompVis model.ckpt") from e
        resaved = path.with_name(path.stem + ".state_dict.ckpt")
        raise ConfigError(
            "model.checkpoint", str(path),
            "cannot be loaded safely: besides tensors it pickles other objects (e.g. the "
            "training loop's state), and unpickling them would run code from the file",
            "if you trust the file, re-save its state_dict once and convert that:\n"
            f"  python -c \"import torch; ck = torch.load('{path}', map_location='cpu', "
            f"weights_only=False)\n  torch.save({{'state_dict': ck['state_dict']}}, "
            f"'{resaved}')\"\n(pytorch-lightning must be importable if the pickle names its "
            "classes)") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConfigError("model.checkpoint", str(path), "holds no state_dict of tensors",
                          "give the CompVis model.ckpt")
    return sd


def _roots(tensors: Any) -> set[int]:
    """Identities of the tensors (or of the tensors they are views of)."""
    out = set()
    for t in tensors:
        while t._base is not None:
            t = t._base
        out.add(id(t))
    return out


def _used_by(src: dict[str, Tensor], converted: dict[str, Tensor]) -> set[str]:
    """The keys of ``src`` whose tensors ended up in ``converted``: diffusers' converters copy the
    tensors or take views of them, so identity tells which were used."""
    roots = _roots(converted.values())
    return {k for k, t in src.items() if _roots([t]) <= roots}


# ------------------------------------------------------------------------------------------------
# U-Net with legacy attention blocks → UNet2DModel
# ------------------------------------------------------------------------------------------------
def _levels(p: dict) -> tuple[list[int], list[bool]]:
    """Channels and whether there is attention, per level (``ds`` = 2^level in
    ``attention_resolutions``, as UNetModel decides)."""
    chans = [int(p["model_channels"]) * int(m) for m in p["channel_mult"]]
    attn = [2 ** i in set(p["attention_resolutions"]) for i in range(len(chans))]
    return chans, attn


def _attention_heads(p: dict, channels: int) -> int:
    """Heads of a CompVis attention layer on ``channels`` channels."""
    nhc = int(p.get("num_head_channels", -1))
    return int(p["num_heads"]) if nhc == -1 else channels // nhc


def unet2d_model(p: dict) -> UNet2DModel:
    """A random-weight diffusers U-Net shaped like CompVis ``UNetModel(**p)`` with attention
    blocks."""
    chans, attn = _levels(p)
    updown = bool(p.get("resblock_updown", False))
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else \
        ("DownBlock2D", "UpBlock2D")
    kwargs: dict[str, Any] = dict(
        sample_size=int(p["image_size"]), in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]), block_out_channels=tuple(chans),
        layers_per_block=int(p["num_res_blocks"]),
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)),
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm") else "default",
        # UNetModel: sinusoidal embedding [cos | sin] without frequency shift, GroupNorm32(32,
        # eps 1e-5) everywhere, attention included; the mid attention's norm too under scale-shift
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, attn_norm_num_groups=32,
        norm_eps=1e-5, act_fn="silu", dropout=float(p.get("dropout", 0.0)), add_attention=True,
        downsample_padding=1, mid_block_scale_factor=1.0)
    if int(p.get("num_head_channels", -1)) != -1:
        return UNet2DModel(attention_head_dim=int(p["num_head_channels"]), **kwargs)
    heads = int(p["num_heads"])
    widths = {c // heads for c, a in zip(chans, attn) if a} | {chans[-1] // heads}
    if len(widths) == 1:  # one head width fits all blocks
        return UNet2DModel(attention_head_dim=widths.pop(), **kwargs)
    return LDMUNet2DModel(attention_head_dim=None, attention_heads=heads, **kwargs)


def _unet2d_modules(p: dict) -> list[tuple[str, str, str]]:
    """(CompVis module, diffusers module, kind) of every module of ``UNetModel(**p)`` in its
    build order; kind is ``resnet``, ``attention`` or ``same`` (same parameter names)."""
    chans, attn = _levels(p)
    n_res, updown, last = int(p["num_res_blocks"]), bool(p.get("resblock_updown")), len(chans) - 1
    out = [("input_blocks.0.0", "conv_in", "same")]
    i = 1
    for level in range(len(chans)):
        for j in range(n_res):
            out.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if attn[level]:
                out.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}",
                            "attention"))
            i += 1
        if level != last:  # Downsample (conv ``op``) or ResBlock(down=True)
            out.append((f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", "resnet")
                       if updown else (f"input_blocks.{i}.0.op",
                                       f"down_blocks.{level}.downsamplers.0.conv", "same"))
            i += 1
    out += [("middle_block.0", "mid_block.resnets.0", "resnet"),
            ("middle_block.1", "mid_block.attentions.0", "attention"),
            ("middle_block.2", "mid_block.resnets.1", "resnet")]
    i = 0
    for u, level in enumerate(reversed(range(len(chans)))):
        for j in range(n_res + 1):
            out.append((f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", "resnet"))
            k = 1
            if attn[level]:
                out.append((f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", "attention"))
                k = 2
            if level and j == n_res:  # Upsample (``conv``) or ResBlock(up=True)
                out.append((f"output_blocks.{i}.{k}", f"up_blocks.{u}.upsamplers.0", "resnet")
                           if updown else (f"output_blocks.{i}.{k}.conv",
                                           f"up_blocks.{u}.upsamplers.0.conv", "same"))
            i += 1
    out += [("time_embed.0", "time_embedding.linear_1", "same"),
            ("time_embed.2", "time_embedding.linear_2", "same"),
            ("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]
    return out


def split_qkv(t: Tensor, heads: int, legacy: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v of a fused ``qkv`` projection (rows ``3C``). ``QKVAttentionLegacy`` splits the
    heads first (rows: head, then q|k|v, then channel); ``QKVAttention`` splits q|k|v first."""
    c = t.shape[0] // 3
    if not legacy:
        return t[:c], t[c:2 * c], t[2 * c:]
    per_head = t.reshape(heads, 3, c // heads, *t.shape[1:])
    q, k, v = (per_head[:, i].reshape(c, *t.shape[1:]) for i in range(3))
    return q, k, v


def convert_unet2d(unet_sd: dict[str, Tensor], p: dict) -> tuple[dict[str, Tensor], set[str]]:
    """diffusers ``UNet2DModel`` keys from CompVis ``UNetModel`` keys (``model.diffusion_model.``
    stripped), and the CompVis keys used."""
    from diffusers.loaders.single_file_utils import update_unet_resnet_ldm_to_diffusers

    out: dict[str, Tensor] = {}
    used: set[str] = set()
    legacy = not p.get("use_new_attention_order", False)
    for src, dst, kind in _unet2d_modules(p):
        keys = [k for k in unet_sd if k.startswith(src + ".")]
        if kind == "resnet":  # in_layers.0 → norm1, emb_layers.1 → time_emb_proj, …
            update_unet_resnet_ldm_to_diffusers(keys, out, unet_sd, {"old": src, "new": dst})
            used.update(keys)
        elif kind == "same":
            out.update({dst + k[len(src):]: unet_sd[k] for k in keys})
            used.update(keys)
        else:  # AttentionBlock: GroupNorm, Conv1d qkv [3C, C, 1], Conv1d proj_out [C, C, 1]
            names = [f"{src}.{n}.{leaf}" for n in ("norm", "qkv", "proj_out")
                     for leaf in ("weight", "bias")]
            if not all(n in unet_sd for n in names):
                continue  # not an attention block: the strict load names what is missing
            w = unet_sd[f"{src}.qkv.weight"]
            heads = _attention_heads(p, w.shape[1])
            for part, name in ((w[..., 0], "weight"), (unet_sd[f"{src}.qkv.bias"], "bias")):
                for proj, t in zip(("to_q", "to_k", "to_v"), split_qkv(part, heads, legacy)):
                    out[f"{dst}.{proj}.{name}"] = t
            out[f"{dst}.to_out.0.weight"] = unet_sd[f"{src}.proj_out.weight"][..., 0]
            out[f"{dst}.to_out.0.bias"] = unet_sd[f"{src}.proj_out.bias"]
            out[f"{dst}.group_norm.weight"] = unet_sd[f"{src}.norm.weight"]
            out[f"{dst}.group_norm.bias"] = unet_sd[f"{src}.norm.bias"]
            used.update(names)
    return out, used


# ------------------------------------------------------------------------------------------------
# U-Net with spatial transformers → UNet2DConditionModel
# ------------------------------------------------------------------------------------------------
def unet2d_condition_model(p: dict) -> nn.Module:
    """A random-weight ``UNet2DConditionModel`` shaped like CompVis ``UNetModel(**p)`` with
    spatial transformers (diffusers' ``attention_head_dim`` is the number of heads here)."""
    from diffusers import UNet2DConditionModel

    chans, attn = _levels(p)
    return UNet2DConditionModel(
        sample_size=int(p["image_size"]), in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]), block_out_channels=tuple(chans),
        layers_per_block=int(p["num_res_blocks"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=int(p["context_dim"]),
        attention_head_dim=tuple(_attention_heads(p, c) for c in chans),
        transformer_layers_per_block=int(p.get("transformer_depth", 1)),
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm") else "default",
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        use_linear_projection=False, upcast_attention=False, downsample_padding=1,
        mid_block_scale_factor=1.0, dropout=float(p.get("dropout", 0.0)))


def convert_unet_cross(unet_sd: dict[str, Tensor], net: nn.Module
                       ) -> tuple[dict[str, Tensor], set[str]]:
    """diffusers ``UNet2DConditionModel`` keys by diffusers' Stable Diffusion converter (the same
    CompVis layout), and the CompVis keys used."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefixed = {UNET + k: t for k, t in unet_sd.items()}
    out = convert_ldm_unet_checkpoint(prefixed, dict(net.config))
    return out, _used_by(unet_sd, out)


# ------------------------------------------------------------------------------------------------
# first stage → VQModel / AutoencoderKL
# ------------------------------------------------------------------------------------------------
def first_stage_model(cfg: LDMConfig, scaling_factor: float) -> nn.Module:
    """A random-weight diffusers autoencoder shaped like the yaml's first stage."""
    from diffusers import AutoencoderKL, VQModel

    dd = cfg.ddconfig
    levels = len(dd["ch_mult"])
    kw = dict(in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]),
              down_block_types=("DownEncoderBlock2D",) * levels,
              up_block_types=("UpDecoderBlock2D",) * levels,
              block_out_channels=tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]),
              layers_per_block=int(dd["num_res_blocks"]), act_fn="silu",
              latent_channels=int(dd["z_channels"]), norm_num_groups=32,
              sample_size=int(dd["resolution"]), scaling_factor=scaling_factor)
    if cfg.first_stage == "vq":
        return VQModel(num_vq_embeddings=int(cfg.n_embed), vq_embed_dim=cfg.embed_dim, **kw)
    return AutoencoderKL(**kw)


def convert_first_stage(fs_sd: dict[str, Tensor], ae: nn.Module
                        ) -> tuple[dict[str, Tensor], set[str]]:
    """diffusers autoencoder keys by diffusers' converter (+ the VQ codebook), and the CompVis
    keys used (``first_stage_model.`` stripped)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = convert_ldm_vae_checkpoint({FIRST_STAGE + k: t for k, t in fs_sd.items()},
                                     dict(ae.config))
    if "quantize.embedding.weight" in fs_sd:  # taming's VectorQuantizer2 codebook
        out["quantize.embedding.weight"] = fs_sd["quantize.embedding.weight"]
    return out, _used_by(fs_sd, out)


def ldm_scheduler(cfg: LDMConfig) -> Any:
    """DDIM on LDM's schedule: β = linspace(√β_start, √β_end, T)² ("scaled_linear"), no x₀
    clipping (LatentDiffusion sets clip_denoised False), ᾱ_prev of the last step = ᾱ_0 and the
    steps shifted by one (CompVis DDIM's ``make_ddim_timesteps`` adds 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start,
                         beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


# ------------------------------------------------------------------------------------------------
# the whole pipeline
# ------------------------------------------------------------------------------------------------
def _load_strict(module: nn.Module, sd: dict[str, Tensor], what: str, cfg: LDMConfig) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise _refuse(cfg.source, f"does not describe this checkpoint's {what} ({e})",
                      "give the yaml the checkpoint was trained with") from None


def _unet_weights(sd: dict[str, Tensor], ema: bool | None, cfg: LDMConfig, checkpoint: str
                  ) -> tuple[dict[str, Tensor], bool]:
    """The U-Net's tensors (``model.diffusion_model.`` stripped) or their EMA copies (LitEma
    names a buffer after the parameter of ``model`` with its dots removed), and whether they are
    the EMA ones. ``ema=None``: the EMA copy when there is a whole one and the yaml keeps EMAs."""
    unet = {k[len(UNET):]: t for k, t in sd.items() if k.startswith(UNET)}
    flat = {k: EMA + ("diffusion_model." + k).replace(".", "") for k in unet}
    missing = [v for v in flat.values() if v not in sd]
    if ema is None:
        ema = cfg.use_ema and bool(unet) and not missing
    if not ema:
        return unet, False
    if missing:
        raise ConfigError("model.checkpoint", checkpoint, f"has no EMA weights ({len(missing)} "
                          f"missing, e.g. {missing[0]})", "convert with ema=False (--no-ema)")
    return {k: sd[flat[k]] for k in unet}, True


def _scaling_factor(sd: dict[str, Tensor], cfg: LDMConfig, checkpoint: str) -> tuple[float, str]:
    """The latent scale of LatentDiffusion: the ``scale_factor`` buffer (set from the data's std
    at the start of training when ``scale_by_std``), else the yaml's value (default 1)."""
    if "scale_factor" in sd:
        return float(sd["scale_factor"]), "checkpoint buffer scale_factor"
    if cfg.scale_by_std:
        raise ConfigError("model.checkpoint", checkpoint, "has no scale_factor buffer although "
                          "the yaml sets scale_by_std", "give the checkpoint trained with this yaml")
    return cfg.scale_factor, "yaml scale_factor" if cfg.scale_factor != 1.0 else "LDM default 1.0"


def _check_betas(sd: dict[str, Tensor], cfg: LDMConfig, checkpoint: str) -> None:
    if "betas" not in sd:
        return
    want = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps,
                          dtype=torch.float64) ** 2
    got = sd["betas"].double()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-8):
        raise _refuse(cfg.source, f"its schedule (linear_start={cfg.linear_start}, linear_end="
                      f"{cfg.linear_end}, timesteps={cfg.timesteps}) is not the checkpoint's "
                      f"betas (from {checkpoint})", "give the yaml the checkpoint was trained with")


def _component(module: Any) -> list[str]:
    cls = type(module)
    library = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
    return [library, cls.__name__]


def convert_ldm(checkpoint: str | Path, config_yaml: str | Path, out_dir: str | Path,
                ema: bool | None = None) -> Path:
    """Write the diffusers pipeline folder of a CompVis latent-diffusion checkpoint into
    ``out_dir`` (new or empty) and return it. ``ema``: take the U-Net's ``model_ema.*`` weights
    (True), its ``model.diffusion_model.*`` ones (False), or the EMA ones when the checkpoint
    holds them and the yaml keeps EMAs (None, what the papers sample with)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out_dir", str(out), "exists and is not empty",
                          "give a new folder for the converted pipeline")
    cfg = read_ldm_config(config_yaml)
    checkpoint = str(checkpoint)
    sd = load_checkpoint(checkpoint)

    unet_sd, ema = _unet_weights(sd, ema, cfg, checkpoint)
    if cfg.cross_attention:
        unet = unet2d_condition_model(cfg.unet)
        unet_new, unet_used = convert_unet_cross(unet_sd, unet)
    else:
        unet = unet2d_model(cfg.unet)
        unet_new, unet_used = convert_unet2d(unet_sd, cfg.unet)
    scale, scale_from = _scaling_factor(sd, cfg, checkpoint)
    ae = first_stage_model(cfg, scale)
    fs_sd = {k[len(FIRST_STAGE):]: t for k, t in sd.items()
             if k.startswith(FIRST_STAGE) and not k.startswith(UNUSED_PREFIXES)}
    ae_new, ae_used = convert_first_stage(fs_sd, ae)
    embedder = None
    used = {UNET + k for k in unet_used} | {FIRST_STAGE + k for k in ae_used}
    if cfg.num_classes is not None:
        table = sd.get(COND_STAGE + "embedding.weight")
        if table is None:
            raise ConfigError("model.checkpoint", checkpoint, "has no cond_stage_model."
                              "embedding.weight (the ClassEmbedder)",
                              "give the checkpoint trained with this yaml")
        embedder = ClassEmbedder(cfg.num_classes, int(cfg.unet["context_dim"]))
        _load_strict(embedder, {"embedding.weight": table}, "class embedder", cfg)
        used.add(COND_STAGE + "embedding.weight")
    _check_betas(sd, cfg, checkpoint)
    used.update(k for k in ("betas", "scale_factor") if k in sd)

    _load_strict(unet, unet_new, "U-Net", cfg)
    _load_strict(ae, ae_new, "autoencoder", cfg)
    unmapped = sorted(k for k in sd if k not in used and not k.startswith(UNUSED_PREFIXES)
                      and k not in SCHEDULE_BUFFERS)
    if unmapped:
        shown = ", ".join(unmapped[:12]) + (f" … ({len(unmapped)} in all)" if len(unmapped) > 12
                                             else "")
        raise ConfigError("model.checkpoint", checkpoint, f"has keys the conversion does not map "
                          f"for {Path(cfg.source).name}: {shown}",
                          "give the yaml the checkpoint was trained with")

    components: dict[str, Any] = {"unet": unet.eval(),
                                  "vqvae" if cfg.first_stage == "vq" else "vae": ae.eval(),
                                  "scheduler": ldm_scheduler(cfg)}
    if embedder is not None:
        components["class_embedder"] = embedder.eval()
    out.mkdir(parents=True, exist_ok=True)
    for name, module in components.items():
        module.save_pretrained(str(out / name))
    # LDMPipeline's layout where it fits (unconditional, VQ autoencoder); the other folders are
    # for lowbit's loader: diffusers has no pipeline with a KL autoencoder under an unconditional
    # U-Net, nor one feeding class embeddings to cross-attention
    plain = embedder is None and cfg.first_stage == "vq"
    index = {"_class_name": "LDMPipeline" if plain else "CompVisLatentDiffusion",
             "_diffusers_version": diffusers.__version__,
             **{name: _component(m) for name, m in components.items()}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    record = {"checkpoint": Path(checkpoint).name, "config": Path(cfg.source).name,
              "weights": "model_ema (EMA)" if ema else "model.diffusion_model",
              "scaling_factor": scale, "scaling_factor_from": scale_from,
              "num_classes": cfg.num_classes, "format_version": FORMAT_VERSION}
    (out / "ldm_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def fingerprint(checkpoint: str | Path, config_yaml: str | Path, ema: bool | None = None
                ) -> str:
    """Cache key of a conversion: the checkpoint file's name, size and mtime (not its GBs), the
    yaml's text, the weights chosen and the folder format."""
    st = Path(checkpoint).stat()
    text = Path(config_yaml).read_bytes()
    key = f"{Path(checkpoint).name}|{st.st_size}|{st.st_mtime_ns}|" \
          f"{hashlib.sha256(text).hexdigest()}|ema={ema}|v{FORMAT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def converted_folder(checkpoint: str | Path, config_yaml: str | Path | None,
                     cache_dir: str | Path | None, ema: bool | None = None) -> Path:
    """The pipeline folder of a checkpoint, converted once into ``<cache_dir>/ldm/<fingerprint>``
    (written under a temporary name and renamed, so concurrent runs never see half a folder)."""
    if not config_yaml:
        raise ConfigError("model.ldm_config", config_yaml, "a CompVis checkpoint needs its yaml",
                          "pass model.ldm_config=<configs/latent-diffusion/NAME.yaml>")
    if not cache_dir:
        raise ConfigError("paths.cache_dir", cache_dir, "a converted checkpoint is cached there",
                          "pass paths.cache_dir=<a writable folder>")
    if not Path(checkpoint).is_file():
        raise ConfigError("model.checkpoint", str(checkpoint), "no such file",
                          "give the CompVis model.ckpt (e.g. models/ldm/lsun_beds256/model.ckpt)")
    if not Path(config_yaml).is_file():
        raise _refuse(str(config_yaml), "no such file", "give the yaml the checkpoint was "
                      "trained with, e.g. configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml")
    root = Path(os.path.expanduser(str(cache_dir))) / "ldm"
    final = root / fingerprint(checkpoint, config_yaml, ema)
    if (final / "model_index.json").is_file():
        return final
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_ldm(checkpoint, config_yaml, tmp, ema=ema)
        try:
            tmp.rename(final)
        except OSError:  # another run finished first
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lowbit-convert-ldm",
        description="Convert a CompVis latent-diffusion checkpoint (model.ckpt + its yaml) into a "
                    "diffusers pipeline folder for model.path=<out_dir>.")
    parser.add_argument("checkpoint", type=Path, help="the CompVis model.ckpt")
    parser.add_argument("config", type=Path, help="its configs/latent-diffusion/*.yaml")
    parser.add_argument("out_dir", type=Path, help="a new folder for the pipeline")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="--ema: the U-Net's model_ema.* weights, --no-ema: its "
                             "model.diffusion_model.* ones; default: the EMA ones when the "
                             "checkpoint holds them and the yaml keeps EMAs (as CompVis's and "
                             "Q-Diffusion's sampling scripts)")
    args = parser.parse_args(argv)
    try:
        out = convert_ldm(args.checkpoint, args.config, args.out_dir, ema=args.ema)
    except ConfigError as e:
        print(f"lowbit-convert-ldm: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
