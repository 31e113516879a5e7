"""CompVis latent-diffusion checkpoints → diffusers pipeline folders (lowbit.models.ldm_convert).

The CompVis code is not installed and nothing is downloaded. For a tiny model of each kind the
papers use — LDM-4 LSUN-Bedrooms (VQ-f4, legacy attention blocks, ``num_head_channels``), LDM-8
LSUN-Churches (KL-f8, a fixed ``num_heads`` over growing widths, scale-shift norm, resampling
ResBlocks, ``scale_by_std``) and LDM-4 ImageNet cin256 (VQ-f4, spatial transformers fed by a
ClassEmbedder) — a checkpoint in CompVis's key layout is written from a random-weight diffusers
model by the inverse mapping below. That inverse is written independently of the converter: the
CompVis modules come from a transcription of ``openaimodel.UNetModel.__init__`` and are paired
with the diffusers modules in forward order. Three oracles then hold the converter to the real
layout and semantics:

- key names and shapes read off the CompVis sources (openaimodel.py, attention.py, model.py,
  autoencoder.py, taming's VectorQuantizer2, encoders/modules.py ClassEmbedder);
- a functional transcription of ``UNetModel.forward`` (QKVAttentionLegacy's head split, the
  FiLM scale-shift, ResBlock up/down, SpatialTransformer) run on the CompVis state dict, against
  the converted U-Net;
- the random diffusers model itself: the converted U-Net and autoencoder reproduce it exactly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lowbit.config import ConfigError, validate
from lowbit.models import ldm_convert
from lowbit.models.hub import load_diffusers
from lowbit.models.ldm_convert import (
    convert_ldm,
    first_stage_model,
    read_ldm_config,
    unet2d_condition_model,
    unet2d_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULE = {"vq": (0.0015, 0.0195), "kl": (0.0015, 0.0155), "cin": (0.0015, 0.0195)}
VQ_F4 = {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
         "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
         "dropout": 0.0}
KL_F8 = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
         "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
         "dropout": 0.0}
UNETS = {  # the real models' unet_config.params at 1/6 … 1/7 of their width
    "vq": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
           "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3],
           "num_head_channels": 16},
    "kl": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
           "attention_resolutions": [1, 2, 4], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
           "num_heads": 2, "use_scale_shift_norm": True, "resblock_updown": True},
    "cin": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3],
            "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 32},
}
N_CLASSES = 11  # 10 classes + the null class, as cin256-v2's 1000 + 1
# the released models' unet_config.params and first stages (configs/latent-diffusion/
# lsun_bedrooms-ldm-vq-4.yaml, lsun_churches-ldm-kl-8.yaml, cin256-v2.yaml)
REAL_UNETS = {
    "vq": {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
           "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
           "num_head_channels": 32},
    "kl": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
           "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2,
           "channel_mult": [1, 2, 2, 4, 4], "num_heads": 8, "use_scale_shift_norm": True,
           "resblock_updown": True},
    "cin": {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
            "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 512},
}
REAL_FIRST_STAGES = {
    "vq": {**VQ_F4, "resolution": 256, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2},
    "kl": {**KL_F8, "resolution": 256, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
}
# U-Net sizes in the LDM paper's hyper-parameter tables (Rombach et al. 2022, appendix)
PAPER_MILLIONS = {"vq": 274, "kl": 294, "cin": 400}
KL_SCALE = 0.25  # the scale_factor buffer of a scale_by_std model


def ldm_yaml(kind: str, real: bool = False) -> dict:
    """A configs/latent-diffusion/*.yaml of the kind: tiny, or as released."""
    start, end = SCHEDULE[kind]
    unet = (REAL_UNETS if real else UNETS)[kind]
    first_stage = REAL_FIRST_STAGES if real else {"vq": VQ_F4, "kl": KL_F8}
    n_embed, n_classes, context = (8192, 1001, 512) if real else (64, N_CLASSES, 32)
    params = {
        "linear_start": start, "linear_end": end, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "image_size": 8,
        "channels": unet["in_channels"], "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": unet},
        "first_stage_config": {
            "target": "ldm.models.autoencoder." + ("AutoencoderKL" if kind == "kl"
                                                   else "VQModelInterface"),
            "params": {"embed_dim": 4 if kind == "kl" else 3,
                       **({} if kind == "kl" else {"n_embed": n_embed}),
                       "ddconfig": first_stage["kl" if kind == "kl" else "vq"],
                       "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": "__is_unconditional__"}
    if kind == "kl":
        params.update(scale_by_std=True, loss_type="l1", concat_mode=False)
    if kind == "cin":
        params.update(cond_stage_key="class_label", cond_stage_trainable=True,
                      conditioning_key="crossattn", use_ema=False,
                      cond_stage_config={"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                         "params": {"n_classes": n_classes,
                                                    "embed_dim": context, "key": "class_label"}})
    return {"model": {"base_learning_rate": 1e-4,
                      "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


# ------------------------------------------------------------------------------------------------
# CompVis's UNetModel, transcribed: its modules, and its forward on a state dict
# ------------------------------------------------------------------------------------------------
def unet_skeleton(p: dict) -> list[tuple[str, str, int, int]]:
    """(module, kind, channels in, channels out) as ``UNetModel.__init__`` builds them."""
    mc, nrb, updown = p["model_channels"], p["num_res_blocks"], p.get("resblock_updown", False)
    att = "st" if p.get("use_spatial_transformer") else "attn"
    mods = [("input_blocks.0.0", "conv", p["in_channels"], mc)]
    chans, ch, ds, n = [mc], mc, 1, 1
    for level, mult in enumerate(p["channel_mult"]):
        for _ in range(nrb):
            mods.append((f"input_blocks.{n}.0", "res", ch, mult * mc))
            ch = mult * mc
            if ds in p["attention_resolutions"]:
                mods.append((f"input_blocks.{n}.1", att, ch, ch))
            chans.append(ch)
            n += 1
        if level != len(p["channel_mult"]) - 1:
            mods.append((f"input_blocks.{n}.0", "res_down", ch, ch) if updown
                        else (f"input_blocks.{n}.0.op", "down", ch, ch))
            chans.append(ch)
            n, ds = n + 1, ds * 2
    mods += [("middle_block.0", "res", ch, ch), ("middle_block.1", att, ch, ch),
             ("middle_block.2", "res", ch, ch)]
    n = 0
    for level, mult in list(enumerate(p["channel_mult"]))[::-1]:
        for i in range(nrb + 1):
            mods.append((f"output_blocks.{n}.0", "res", ch + chans.pop(), mc * mult))
            ch, k = mc * mult, 1
            if ds in p["attention_resolutions"]:
                mods.append((f"output_blocks.{n}.1", att, ch, ch))
                k = 2
            if level and i == nrb:
                mods.append((f"output_blocks.{n}.{k}", "res_up", ch, ch) if updown
                            else (f"output_blocks.{n}.{k}.conv", "up", ch, ch))
                ds //= 2
            n += 1
    return mods


def heads_of(p: dict, channels: int) -> int:
    return p["num_heads"] if p.get("num_head_channels", -1) == -1 \
        else channels // p["num_head_channels"]


def compvis_unet_forward(sd: dict, p: dict, x, t, context=None):
    """``UNetModel.forward`` on CompVis keys (``model.diffusion_model.`` stripped)."""
    def lin(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def gn(h, name, eps=1e-5):  # GroupNorm32 (UNet), Normalize (eps 1e-6, spatial transformer)
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def conv(h, name, **kw):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)

    half = p["model_channels"] // 2  # timestep_embedding: [cos | sin], max_period 10000
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = lin(F.silu(lin(emb, "time_embed.0")), "time_embed.2")

    def resblock(h, name, up=False, down=False):
        skip = h
        h = F.silu(gn(h, f"{name}.in_layers.0"))
        if up:
            h, skip = (F.interpolate(a, scale_factor=2, mode="nearest") for a in (h, skip))
        if down:
            h, skip = F.avg_pool2d(h, 2, 2), F.avg_pool2d(skip, 2, 2)
        h = conv(h, f"{name}.in_layers.2", padding=1)
        e = lin(F.silu(emb), f"{name}.emb_layers.1")[..., None, None]
        if p.get("use_scale_shift_norm"):
            scale, shift = e.chunk(2, dim=1)
            h = gn(h, f"{name}.out_layers.0") * (1 + scale) + shift
        else:
            h = gn(h + e, f"{name}.out_layers.0")
        h = conv(F.silu(h), f"{name}.out_layers.3", padding=1)
        if f"{name}.skip_connection.weight" in sd:
            skip = conv(skip, f"{name}.skip_connection")
        return skip + h

    def attention_block(h, name):  # AttentionBlock + QKVAttentionLegacy
        b, c, hh, ww = h.shape
        x_ = h.reshape(b, c, -1)
        qkv = F.conv1d(F.group_norm(x_, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"],
                                    1e-5), sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
        heads = heads_of(p, c)
        ch = c // heads
        q, k, v = qkv.reshape(b * heads, ch * 3, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, hh * ww)
        out = F.conv1d(a, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])
        return (x_ + out).reshape(b, c, hh, ww)

    def cross_attention(h, ctx, name, heads):
        q, k, v = lin(h, f"{name}.to_q"), lin(ctx, f"{name}.to_k"), lin(ctx, f"{name}.to_v")
        q, k, v = (a.reshape(a.shape[0], a.shape[1], heads, -1).transpose(1, 2) for a in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return lin(out.transpose(1, 2).reshape(h.shape), f"{name}.to_out.0")

    def spatial_transformer(h, name):
        b, c, hh, ww = h.shape
        heads = heads_of(p, c)
        x_ = conv(gn(h, f"{name}.norm", eps=1e-6), f"{name}.proj_in")
        x_ = x_.reshape(b, c, -1).transpose(1, 2)
        for d in range(p.get("transformer_depth", 1)):
            blk = f"{name}.transformer_blocks.{d}"

            def ln(a, n, blk=blk):
                return F.layer_norm(a, (c,), sd[f"{blk}.{n}.weight"], sd[f"{blk}.{n}.bias"])
            x_ = cross_attention(ln(x_, "norm1"), ln(x_, "norm1"), f"{blk}.attn1", heads) + x_
            x_ = cross_attention(ln(x_, "norm2"), context, f"{blk}.attn2", heads) + x_
            y, gate = lin(ln(x_, "norm3"), f"{blk}.ff.net.0.proj").chunk(2, dim=-1)
            x_ = lin(y * F.gelu(gate), f"{blk}.ff.net.2") + x_
        x_ = x_.transpose(1, 2).reshape(b, c, hh, ww)
        return conv(x_, f"{name}.proj_out") + h

    def apply(h, name, kind):
        if kind == "conv":
            return conv(h, name, padding=1)
        if kind in ("res", "res_down", "res_up"):
            return resblock(h, name, up=kind == "res_up", down=kind == "res_down")
        if kind == "down":
            return conv(h, name, stride=2, padding=1)
        if kind == "up":
            return conv(F.interpolate(h, scale_factor=2, mode="nearest"), name, padding=1)
        return attention_block(h, name) if kind == "attn" else spatial_transformer(h, name)

    blocks: dict[str, list] = {}
    for name, kind, _, _ in unet_skeleton(p):
        block = "middle_block" if name.startswith("middle") else ".".join(name.split(".")[:2])
        blocks.setdefault(block, []).append((name, kind))
    h, hs = x, []
    for block, layers in blocks.items():
        if block.startswith("output_blocks"):
            h = torch.cat([h, hs.pop()], dim=1)
        for name, kind in layers:
            h = apply(h, name, kind)
        if block.startswith("input_blocks"):
            hs.append(h)
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


# ------------------------------------------------------------------------------------------------
# diffusers → CompVis, written against the skeleton above
# ------------------------------------------------------------------------------------------------
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_sequence(net) -> list[tuple[str, str]]:
    """(module, kind) of a diffusers U-Net in forward order."""
    seq = []
    for side, blocks in (("down", net.down_blocks), ("up", net.up_blocks)):
        if side == "up":
            seq += [("mid_block.resnets.0", "res"), ("mid_block.attentions.0", "att"),
                    ("mid_block.resnets.1", "res")]
        for b, blk in enumerate(blocks):
            attentions = getattr(blk, "attentions", None)
            for j in range(len(blk.resnets)):
                seq.append((f"{side}_blocks.{b}.resnets.{j}", "res"))
                if attentions:
                    seq.append((f"{side}_blocks.{b}.attentions.{j}", "att"))
            resample = "downsamplers" if side == "down" else "upsamplers"
            if getattr(blk, resample, None):
                seq.append((f"{side}_blocks.{b}.{resample}.0", "resample"))
    return seq


def compvis_unet_state(net, p: dict) -> dict:
    """The CompVis ``model.diffusion_model.*`` state dict of a diffusers U-Net."""
    src = {k: v.detach().clone() for k, v in net.state_dict().items()}
    taken, out = set(), {}

    def take(dkey, ckey, fn=lambda a: a):
        out[ckey] = fn(src[dkey])
        taken.add(dkey)

    take("conv_in.weight", "input_blocks.0.0.weight")
    take("conv_in.bias", "input_blocks.0.0.bias")
    for i, j in ((1, 0), (2, 2)):
        take(f"time_embedding.linear_{i}.weight", f"time_embed.{j}.weight")
        take(f"time_embedding.linear_{i}.bias", f"time_embed.{j}.bias")
    take("conv_norm_out.weight", "out.0.weight")
    take("conv_norm_out.bias", "out.0.bias")
    take("conv_out.weight", "out.2.weight")
    take("conv_out.bias", "out.2.bias")
    skeleton = unet_skeleton(p)[1:]
    sequence = diffusers_sequence(net)
    assert len(skeleton) == len(sequence)
    for (cname, ckind, _, cout), (dname, dkind) in zip(skeleton, sequence):
        assert (ckind, dkind) in {("res", "res"), ("attn", "att"), ("st", "att"),
                                  ("res_down", "resample"), ("down", "resample"),
                                  ("res_up", "resample"), ("up", "resample")}, (cname, dname)
        params = [k[len(dname) + 1:] for k in src if k.startswith(dname + ".")]
        if ckind.startswith("res"):
            for k in params:
                layer, leaf = k.rsplit(".", 1)
                take(f"{dname}.{k}", f"{cname}.{RESNET[layer]}.{leaf}")
        elif ckind in ("down", "up"):
            for leaf in ("weight", "bias"):
                take(f"{dname}.conv.{leaf}", f"{cname}.{leaf}")
        elif ckind == "st":  # Transformer2DModel keeps CompVis's names
            for k in params:
                take(f"{dname}.{k}", f"{cname}.{k}")
        else:  # legacy attention: q|k|v per head, fused into one Conv1d
            heads = heads_of(p, cout)
            for leaf in ("weight", "bias"):
                q, k, v = (src[f"{dname}.to_{x}.{leaf}"] for x in "qkv")
                taken.update(f"{dname}.to_{x}.{leaf}" for x in "qkv")
                per_head = torch.stack([a.reshape(heads, cout // heads, *a.shape[1:])
                                        for a in (q, k, v)], dim=1)
                fused = per_head.reshape(3 * cout, *q.shape[1:])
                out[f"{cname}.qkv.{leaf}"] = fused[..., None] if leaf == "weight" else fused
            take(f"{dname}.to_out.0.weight", f"{cname}.proj_out.weight", lambda a: a[..., None])
            take(f"{dname}.to_out.0.bias", f"{cname}.proj_out.bias")
            take(f"{dname}.group_norm.weight", f"{cname}.norm.weight")
            take(f"{dname}.group_norm.bias", f"{cname}.norm.bias")
    assert taken == set(src), sorted(set(src) - taken)[:5]
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def compvis_autoencoder_state(ae) -> dict:
    """The CompVis ``first_stage_model.*`` state dict of a diffusers VQModel / AutoencoderKL."""
    levels = len(ae.config.block_out_channels)
    out = {}
    for k, t in ae.state_dict().items():
        t = t.detach().clone()
        m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|"
                         r"upsamplers)\.(\d+)\.(.+)", k)
        if m:
            part, side, i, sub, j, rest = m.groups()
            level = int(i) if side == "down" else levels - 1 - int(i)  # Decoder.up is prepended
            c = f"{part}.{side}.{level}." + (
                f"block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
                if sub == "resnets" else f"{side}sample.{rest}")
        elif ".mid_block.resnets." in k:
            c = re.sub(r"mid_block\.resnets\.(\d)", lambda r: f"mid.block_{int(r[1]) + 1}", k)
        elif ".mid_block.attentions.0." in k:  # AttnBlock: Conv2d 1×1 q, k, v, proj_out
            c = (k.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
                 .replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
            t = t[:, :, None, None] if t.ndim == 2 else t
        else:
            c = k.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + c] = t
    return out


# ------------------------------------------------------------------------------------------------
# key names and shapes from the CompVis sources, for the tiny configs above
# ------------------------------------------------------------------------------------------------
U = "model.diffusion_model."
A = "first_stage_model."
REAL_KEYS = {
    "vq": {
        U + "input_blocks.0.0.weight": (32, 3, 3, 3),
        U + "time_embed.0.weight": (128, 32),
        U + "time_embed.2.weight": (128, 128),
        U + "input_blocks.1.0.in_layers.0.weight": (32,),
        U + "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        U + "input_blocks.1.0.emb_layers.1.weight": (32, 128),
        U + "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        U + "input_blocks.3.0.op.weight": (32, 32, 3, 3),
        U + "input_blocks.4.0.skip_connection.weight": (64, 32, 1, 1),
        U + "input_blocks.4.1.norm.weight": (64,),
        U + "input_blocks.4.1.qkv.weight": (192, 64, 1),  # conv_nd(1, C, 3C, 1)
        U + "input_blocks.4.1.qkv.bias": (192,),
        U + "input_blocks.4.1.proj_out.weight": (64, 64, 1),
        U + "input_blocks.6.0.op.weight": (64, 64, 3, 3),
        U + "input_blocks.8.1.qkv.weight": (288, 96, 1),
        U + "middle_block.0.in_layers.2.weight": (96, 96, 3, 3),
        U + "middle_block.1.qkv.weight": (288, 96, 1),
        U + "middle_block.1.proj_out.weight": (96, 96, 1),
        U + "middle_block.2.out_layers.3.weight": (96, 96, 3, 3),
        U + "output_blocks.0.0.in_layers.0.weight": (192,),
        U + "output_blocks.0.0.skip_connection.weight": (96, 192, 1, 1),
        U + "output_blocks.2.0.in_layers.2.weight": (96, 160, 3, 3),
        U + "output_blocks.2.1.qkv.weight": (288, 96, 1),
        U + "output_blocks.2.2.conv.weight": (96, 96, 3, 3),
        U + "output_blocks.5.2.conv.weight": (64, 64, 3, 3),
        U + "output_blocks.8.0.skip_connection.weight": (32, 64, 1, 1),
        U + "out.0.weight": (32,),
        U + "out.2.weight": (3, 32, 3, 3),
        A + "encoder.conv_in.weight": (32, 3, 3, 3),
        A + "encoder.down.0.block.0.conv1.weight": (32, 32, 3, 3),
        A + "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        A + "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        A + "encoder.mid.block_1.norm1.weight": (64,),
        A + "encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
        A + "encoder.mid.attn_1.proj_out.weight": (64, 64, 1, 1),
        A + "encoder.norm_out.weight": (64,),
        A + "encoder.conv_out.weight": (3, 64, 3, 3),
        A + "quant_conv.weight": (3, 3, 1, 1),
        A + "quantize.embedding.weight": (64, 3),
        A + "post_quant_conv.weight": (3, 3, 1, 1),
        A + "decoder.conv_in.weight": (64, 3, 3, 3),
        A + "decoder.mid.attn_1.v.weight": (64, 64, 1, 1),
        A + "decoder.up.2.block.1.conv2.weight": (64, 64, 3, 3),
        A + "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
        A + "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
        A + "decoder.conv_out.weight": (3, 32, 3, 3),
    },
    "kl": {
        U + "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift
        U + "input_blocks.1.1.qkv.weight": (96, 32, 1),
        U + "input_blocks.3.0.in_layers.2.weight": (32, 32, 3, 3),  # ResBlock(down=True)
        U + "input_blocks.3.0.emb_layers.1.weight": (64, 128),
        U + "input_blocks.9.0.out_layers.3.weight": (64, 64, 3, 3),
        U + "input_blocks.10.0.skip_connection.weight": (128, 64, 1, 1),
        U + "middle_block.1.qkv.weight": (384, 128, 1),
        U + "output_blocks.2.1.in_layers.2.weight": (128, 128, 3, 3),  # ResBlock(up=True)
        U + "output_blocks.5.2.emb_layers.1.weight": (128, 128),
        U + "output_blocks.11.1.proj_out.weight": (32, 32, 1),
        A + "encoder.conv_out.weight": (8, 64, 3, 3),  # double_z
        A + "quant_conv.weight": (8, 8, 1, 1),
        A + "post_quant_conv.weight": (4, 4, 1, 1),
        A + "decoder.up.3.block.0.conv1.weight": (64, 64, 3, 3),
        "scale_factor": (),
    },
    "cin": {
        U + "input_blocks.4.1.norm.weight": (64,),
        U + "input_blocks.4.1.proj_in.weight": (64, 64, 1, 1),
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (64, 64),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 32),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.weight": (64, 64),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.bias": (64,),
        U + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (512, 64),  # GEGLU
        U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (64, 256),
        U + "input_blocks.4.1.transformer_blocks.0.norm3.weight": (64,),
        U + "input_blocks.4.1.proj_out.weight": (64, 64, 1, 1),
        U + "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (96, 32),
        U + "output_blocks.2.2.conv.weight": (96, 96, 3, 3),
        "cond_stage_model.embedding.weight": (N_CLASSES, 32),
    },
}
ABSENT = {
    "vq": [U + "input_blocks.9.0.in_layers.0.weight", U + "output_blocks.8.1.norm.weight",
           A + "decoder.up.0.upsample.conv.weight", A + "encoder.down.2.downsample.conv.weight"],
    "kl": [U + "input_blocks.3.0.op.weight", U + "output_blocks.2.1.conv.weight",
           A + "quantize.embedding.weight"],
    "cin": [U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.bias", U + "label_emb.weight"],
}


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def _randomize(module, seed: int):
    """Random weights everywhere (norm affines too, so that a swapped pair would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _schedule_buffers(kind: str) -> dict:
    start, end = SCHEDULE[kind]
    betas = torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt().float()}


class Made:
    def __init__(self, kind: str, folder: Path):
        torch.manual_seed(0)
        self.kind, self.p = kind, UNETS[kind]
        self.yaml = folder / f"{kind}.yaml"
        OmegaConf.save(OmegaConf.create(ldm_yaml(kind)), self.yaml)
        cfg = read_ldm_config(self.yaml)
        self.unet = _randomize(unet2d_condition_model(self.p) if kind == "cin"
                               else unet2d_model(self.p), 1)
        self.scale = KL_SCALE if kind == "kl" else 1.0
        self.ae = _randomize(first_stage_model(cfg, self.scale), 2)
        unet_sd = compvis_unet_state(self.unet, self.p)
        self.compvis_unet = {k[len(U):]: v for k, v in unet_sd.items()}  # the weights converted
        self.sd = {**unet_sd, **compvis_autoencoder_state(self.ae), **_schedule_buffers(kind)}
        if kind == "kl":  # scale_by_std's buffer; self.unet is LitEma's copy of other weights
            self.sd["scale_factor"] = torch.tensor(KL_SCALE)
            self.raw_unet = _randomize(unet2d_model(self.p), 3)
            self.sd.update(compvis_unet_state(self.raw_unet, self.p))
            self.sd.update({"model_ema." + k[len("model."):].replace(".", ""): v
                            for k, v in unet_sd.items()})
            self.sd["model_ema.decay"] = torch.tensor(0.9999)
            self.sd["model_ema.num_updates"] = torch.tensor(1, dtype=torch.int)
        if kind == "cin":
            g = torch.Generator().manual_seed(4)
            self.table = torch.randn(N_CLASSES, 32, generator=g)
            self.sd["cond_stage_model.embedding.weight"] = self.table
        self.ckpt = folder / f"{kind}.ckpt"
        torch.save({"state_dict": self.sd, "epoch": 3, "global_step": 1000}, self.ckpt)

    def inputs(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = self.p["in_channels"]
        return torch.randn(2, c, 8, 8, generator=g), torch.tensor([999, 17])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("compvis")
    cache: dict[str, Made] = {}

    def get(kind: str) -> Made:
        if kind not in cache:
            cache[kind] = Made(kind, root)
        return cache[kind]

    return get


KINDS = ("vq", "kl", "cin")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_layout_is_compvis(made, kind):
    """The written checkpoints have CompVis's key names and shapes, and only CompVis names."""
    sd = made(kind).sd
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    want = dict(REAL_KEYS[kind])
    if kind == "cin":  # the bedroom config's layer grid and VQ autoencoder, spatial transformers
        want = {**{k: v for k, v in REAL_KEYS["vq"].items()
                   if not re.search(r"\.1\.(qkv|proj_out)\.", k)}, **want}
    assert {k: shapes.get(k) for k in want} == want
    assert not [k for k in ABSENT[kind] if k in sd]
    assert not [k for k in sd if re.search(r"down_blocks|up_blocks|resnets|mid_block|attentions|"
                                           r"group_norm|time_emb_proj|conv_shortcut", k)]
    # every ResBlock of the transcribed constructor, with its channels
    for name, kind_, cin, cout in unet_skeleton(made(kind).p):
        if kind_.startswith("res"):
            assert shapes[f"{U}{name}.in_layers.2.weight"] == (cout, cin, 3, 3)
            assert (f"{U}{name}.skip_connection.weight" in sd) == (cin != cout)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_converts_loads_and_reproduces(made, tmp_path, kind):
    m = made(kind)
    out = tmp_path / "pipe"
    if kind == "vq":  # the console script's entry point
        assert ldm_convert.main([str(m.ckpt), str(m.yaml), str(out)]) == 0
    else:
        assert convert_ldm(m.ckpt, m.yaml, out) == out
    index = json.loads((out / "model_index.json").read_text())
    record = json.loads((out / "ldm_conversion.json").read_text())
    assert record["weights"] == ("model_ema (EMA)" if kind == "kl" else "model.diffusion_model")
    d = load_diffusers(str(out), name=kind, num_classes=N_CLASSES - 1 if kind == "cin" else None,
                       null_class=N_CLASSES - 1 if kind == "cin" else None)

    # the U-Net: exactly the random diffusers model, and CompVis's forward on the checkpoint
    x, t = m.inputs()
    unet_sd = m.compvis_unet
    if kind == "cin":
        labels = torch.tensor([3, N_CLASSES - 1])
        ctx = m.table[labels][:, None, :]
        ours = d(x, t, labels)
        assert torch.equal(ours, m.unet(x, t, encoder_hidden_states=ctx).sample)
        ref = compvis_unet_forward(unet_sd, m.p, x, t, ctx)
        assert (d.conditioning, d.family, d.num_classes, d.null_class) == (
            "class", "unet_text", N_CLASSES - 1, N_CLASSES - 1)
        assert torch.equal(d.null_cond(2), torch.full((2,), N_CLASSES - 1))
        assert index["class_embedder"] == ["lowbit.models.ldm_convert", "ClassEmbedder"]
    else:
        ours = d(x, t)
        assert torch.equal(ours, m.unet(x, t).sample)
        ref = compvis_unet_forward(unet_sd, m.p, x, t)
        assert (d.conditioning, d.family) == ("none", "unet")
    # float32 sums in another order (SDPA vs einsum) over ~40 layers: |Δ| ~ 1e-6 of the output
    # scale; 1e-4 leaves a margin of 100
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)

    # the autoencoder: the same decode, the LDM latent scale
    assert d.latent and type(d.vae).__name__ == ("AutoencoderKL" if kind == "kl" else "VQModel")
    assert d.vae_scale == pytest.approx(m.scale)
    z = torch.randn(2, *d.sample_shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d.decode(z), m.ae.decode(z / m.scale).sample.clamp(-1, 1))
    assert d.image_shape == ((3, 64, 64) if kind == "kl" else (3, 32, 32))

    # the scheduler: LDM's betas, DDIM without clipping, CompVis's step offset
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(d.noise_schedule)
    start, end = SCHEDULE[kind]
    ldm_betas = torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.betas.double(), ldm_betas, rtol=1e-6, atol=0)
    assert (d.noise_schedule["clip_sample"], d.noise_schedule["set_alpha_to_one"],
            d.noise_schedule["steps_offset"]) == (False, False, 1)
    assert index["_class_name"] == ("LDMPipeline" if kind == "vq" else "CompVisLatentDiffusion")
    if kind == "kl":  # 2 heads at every width: lowbit's UNet2DModel subclass
        assert index["unet"] == ["lowbit.models.ldm_convert", "LDMUNet2DModel"]
        assert {a.heads for a in d.net.modules() if hasattr(a, "heads")} == {2}


@pytest.mark.parametrize("kind", KINDS)
def test_released_configs_map_completely(tmp_path, kind):
    """At the released models' size (meta tensors: no memory, no time): every CompVis key of the
    U-Net and the first stage maps, every diffusers parameter gets one of the right shape, and
    the U-Net has the paper's size."""
    yaml = tmp_path / "real.yaml"
    OmegaConf.save(OmegaConf.create(ldm_yaml(kind, real=True)), yaml)
    cfg = read_ldm_config(yaml)
    with torch.device("meta"):
        net = unet2d_condition_model(cfg.unet) if kind == "cin" else unet2d_model(cfg.unet)
        ae = first_stage_model(cfg, 1.0)
    unet_sd = {k[len(U):]: v for k, v in compvis_unet_state(net, cfg.unet).items()}
    ae_sd = {k[len(A):]: v for k, v in compvis_autoencoder_state(ae).items()}
    convert = ldm_convert.convert_unet_cross if kind == "cin" else (
        lambda sd, _net: ldm_convert.convert_unet2d(sd, cfg.unet))
    for module, sd, (out, used) in ((net, unet_sd, convert(unet_sd, net)),
                                    (ae, ae_sd, ldm_convert.convert_first_stage(ae_sd, ae))):
        assert used == set(sd)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in
                                                        module.state_dict().items()}
    assert int(sum(p.numel() for p in net.parameters()) / 1e6) == PAPER_MILLIONS[kind]
    assert type(net).__name__ == {"vq": "UNet2DModel", "kl": "LDMUNet2DModel",
                                  "cin": "UNet2DConditionModel"}[kind]


@torch.no_grad()
def test_ema_weights_unless_told_or_kept_none(made, tmp_path):
    """A checkpoint with a whole EMA copy converts its EMA U-Net (above); ema=False, or a yaml with
    use_ema: false, takes model.diffusion_model.*; ema=True without a copy is refused."""
    m = made("kl")
    no_ema_yaml = tmp_path / "no_ema.yaml"
    spec = ldm_yaml("kl")
    spec["model"]["params"]["use_ema"] = False
    OmegaConf.save(OmegaConf.create(spec), no_ema_yaml)
    x, t = m.inputs(1)
    for name, yaml, ema in (("raw", m.yaml, False), ("kept_none", no_ema_yaml, None)):
        out = convert_ldm(m.ckpt, yaml, tmp_path / name, ema=ema)
        assert torch.equal(load_diffusers(str(out))(x, t), m.raw_unet(x, t).sample)
        record = json.loads((out / "ldm_conversion.json").read_text())
        assert record["weights"] == "model.diffusion_model"
    with pytest.raises(ConfigError, match="no EMA weights"):
        convert_ldm(made("vq").ckpt, made("vq").yaml, tmp_path / "no_copy", ema=True)


class TrainerState:
    """Stands for the training loop's objects a Lightning checkpoint pickles."""


def test_unsafe_pickle_is_refused(made, tmp_path):
    m = made("vq")
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": m.sd, "loops": TrainerState()}, ckpt)
    with pytest.raises(ConfigError) as e:
        convert_ldm(ckpt, m.yaml, tmp_path / "out")
    msg = str(e.value)
    assert e.value.key == "model.checkpoint" and str(ckpt) in msg
    assert "cannot be loaded safely" in msg and "weights_only=False" in msg
    assert "torch.save({'state_dict': ck['state_dict']}" in msg
    assert not (tmp_path / "out").exists()


def test_unmapped_keys_are_named(made, tmp_path):
    m = made("vq")
    ckpt = tmp_path / "extra.ckpt"
    extra = {U + "id_predictor.1.weight": torch.zeros(64, 32, 1, 1),
             "cond_stage_model.embedding.weight": torch.zeros(10, 8)}
    torch.save({"state_dict": {**m.sd, **extra}}, ckpt)
    with pytest.raises(ConfigError) as e:
        convert_ldm(ckpt, m.yaml, tmp_path / "out")
    assert str(ckpt) in str(e.value) and all(k in str(e.value) for k in extra)
    # a checkpoint of another model: the U-Net does not fit the yaml
    with pytest.raises(ConfigError, match="does not describe this checkpoint's U-Net") as e:
        convert_ldm(made("cin").ckpt, m.yaml, tmp_path / "other")


def test_unsupported_models_are_refused(tmp_path):
    spec = ldm_yaml("vq")
    spec["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 640}}
    bad = tmp_path / "txt2img.yaml"
    OmegaConf.save(OmegaConf.create(spec), bad)
    with pytest.raises(ConfigError, match="BERTEmbedder") as e:
        read_ldm_config(bad)
    assert e.value.key == "model.ldm_config"


def test_model_config_converts_once_into_the_cache(made, make_cfg, tmp_path, monkeypatch):
    """``model=ldm4_bedroom model.checkpoint=… model.ldm_config=…`` composes, validates and loads;
    the second load reuses ``<paths.cache_dir>/ldm/<fingerprint>``."""
    from hydra.utils import instantiate

    m = made("vq")
    cfg = make_cfg("model=ldm4_bedroom", f"model.checkpoint={m.ckpt}",
                   f"model.ldm_config={m.yaml}", f"paths.cache_dir={tmp_path / 'cache'}")
    validate(cfg)
    d = instantiate(cfg.model.loader)
    assert (d.name, d.conditioning, d.latent) == ("ldm4_bedroom", "none", True)
    folders = list((tmp_path / "cache" / "ldm").iterdir())
    assert [f.name for f in folders] == [ldm_convert.fingerprint(m.ckpt, m.yaml)]
    x, t = m.inputs()
    with torch.no_grad():
        assert torch.equal(d(x, t), m.unet(x, t).sample)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(ldm_convert, "convert_ldm", no_second_conversion)
    assert instantiate(cfg.model.loader).name == "ldm4_bedroom"

    both = make_cfg("model=ldm4_bedroom", f"model.checkpoint={m.ckpt}", "model.path=/x",
                    f"model.ldm_config={m.yaml}")
    with pytest.raises(ConfigError, match="either model.path or model.checkpoint"):
        validate(both)
    no_yaml = make_cfg("model=ldm4_bedroom", f"model.checkpoint={m.ckpt}")
    with pytest.raises(ConfigError) as e:
        validate(no_yaml)
    assert e.value.key == "model.ldm_config"
