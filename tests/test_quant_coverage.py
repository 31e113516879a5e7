"""Coverage on the architecture presets: every Conv/Linear and attention matmul is quantized except
the configured exceptions (exact counts), rules act on the right layers, W8A8 stays close to FP.

Measured on random-weight presets (calibration: 4 batches of 4 at t = 900/600/300/50, held-out
inputs at t = 800/450/100; the bits/w8a8.yaml recipe): SQNR ≈ 28–31 dB digits, 27–28 dB SD v1
(shrunk), 37 dB DiT. Threshold: 25 dB.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.models.attention_processor import Attention
from torch import nn

from lowbit.models.presets import build_preset, example_inputs
from lowbit.quant import (
    QuantConfig,
    QuantModuleMixin,
    calibrate_,
    concat_split_points,
    model_size,
    quantize_,
)

BITS_DIR = Path(__file__).resolve().parents[1] / "lowbit" / "conf" / "bits"
SQNR_MIN_DB = 25.0

# (linear, conv, attention modules, convs reading cat([h, skip]): conv1 and conv_shortcut of the
# up-block resnets) of each preset; cross-checked below by a walk
EXPECTED = {
    "digits": (41, 35, 7, 12),
    "sd_v1": (184, 98, 32, 24),
    "dit": (20, 1, 2, 0),
    "ddpm_cifar10": (48, 65, 6, 24),
}


def bits_config(name: str, **over) -> QuantConfig:
    return QuantConfig.from_dict(yaml.safe_load((BITS_DIR / f"{name}.yaml").read_text())).with_overrides(over)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def _walk_counts(model: nn.Module) -> tuple[int, int, int]:
    return (sum(type(m) is nn.Linear for m in model.modules()),
            sum(type(m) is nn.Conv2d for m in model.modules()),
            sum(isinstance(m, Attention) for m in model.modules()))


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_every_layer_and_attention_matmul_is_quantized(preset: str) -> None:
    model = build_preset(preset)
    n_linear, n_conv, n_attn, n_split = EXPECTED[preset]
    assert _walk_counts(model) == (n_linear, n_conv, n_attn)
    report = quantize_(model, bits_config("w8a8"))
    c = report.counts
    # Q-Diffusion splits the skip conv's input only: one conv_shortcut per conv1
    assert (c["linear"], c["conv"], c["attention"], c["split"]) == (n_linear, n_conv, n_attn,
                                                                     n_split // 2)
    both = quantize_(build_preset(preset), bits_config("w8a8", split_conv1=True)).counts["split"]
    assert both == n_split
    assert c["attention_matmul"] == 2 * n_attn and c["kept_fp"] == 0
    assert _walk_counts(model)[:2] == (0, 0)  # no float Linear/Conv2d left
    assert all(isinstance(m, QuantModuleMixin) for m in model.modules()
               if isinstance(m, nn.Linear | nn.Conv2d))
    assert all(hasattr(m, "matmul_quantizers") for m in model.modules() if isinstance(m, Attention))
    json.dumps(report.to_dict())  # JSON-able


def test_ddpm_cifar10_preset_is_full_size() -> None:
    model = build_preset("ddpm_cifar10")
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # google/ddpm-cifar10-32
    assert [type(b).__name__ for b in model.down_blocks][1] == "AttnDownBlock2D"
    assert model.down_blocks[1].attentions[0].to_q.in_features == 256


def test_first_last_and_time_embedding_rules() -> None:
    cfg = bits_config("w4a4", first_last_bits=8, time_emb_bits=8)
    for preset, first, last, temb in [
        ("digits", ["conv_in"], ["conv_out"], ["time_embedding.linear_1", "time_embedding.linear_2"]),
        ("dit", ["pos_embed.proj"], ["proj_out_1", "proj_out_2"],
         ["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"]),
    ]:
        model = build_preset(preset)
        rec = {r.name: r for r in quantize_(model, cfg).quantized}
        for name in first + last + temb:
            assert (rec[name].weight_bits, rec[name].act_bits) == (8, 8), name
        others = [r for n, r in rec.items() if n not in first + last and "time" not in n
                  and r.kind != "attention"]
        assert others and all((r.weight_bits, r.act_bits) == (4, 4) for r in others)
        assert rec[first[0]].reasons == ["first layer: >= 8 bits"]
    model = build_preset("digits")
    rec = {r.name: r for r in quantize_(model, cfg.with_overrides(
        {"first_last_bits": None, "time_emb_bits": None})).quantized}
    assert rec["conv_in"].weight_bits == 4 and rec["time_embedding.linear_1"].act_bits == 4
    # weight-only: the 8-bit rule raises weights only, activations stay FP
    rec = {r.name: r for r in quantize_(build_preset("digits"),
                                        bits_config("w4a16", first_last_bits=8)).quantized}
    assert (rec["conv_in"].weight_bits, rec["conv_in"].act_bits) == (8, None)
    assert "down_blocks.1.attentions.0" not in rec


def test_skip_fp_exclude_and_overrides() -> None:
    model = build_preset("digits")
    report = quantize_(model, bits_config(
        "w4a8", weight={"init": "minmax"}, skip_fp=True,
        exclude=["*attentions.1*"],
        overrides={"*to_q": {"weight": {"bits": 8}}, "up_blocks.2.*": "fp",
                   "mid_block.attentions.0": {"sm_bits": None}}))
    fp = {r.name: r.reason for r in report.kept_fp}
    assert fp["down_blocks.1.resnets.0.conv_shortcut"] == "skip/downsample conv kept FP (skip_fp)"
    assert fp["down_blocks.0.downsamplers.0.conv"] == "skip/downsample conv kept FP (skip_fp)"
    assert fp["up_blocks.0.attentions.1"] == "excluded by '*attentions.1*'"
    assert fp["up_blocks.2.resnets.0.conv1"] == "override 'up_blocks.2.*': fp"
    assert type(model.up_blocks[2].resnets[0].conv1) is nn.Conv2d
    rec = {r.name: r for r in report.quantized}
    assert rec["down_blocks.1.attentions.0.to_q"].weight_bits == 8
    assert rec["down_blocks.1.attentions.0.to_k"].weight_bits == 4
    assert rec["mid_block.attentions.0"].sm_bits is None
    assert model.mid_block.attentions[0].matmul_quantizers.softmax.passthrough
    assert not {r.name for r in report.quantized} & set(fp)
    assert report.counts["attention_pv"] == report.counts["attention_qk"] - 1


def test_split_points_follow_the_unet_structure() -> None:
    sd = build_preset("sd_v1")  # widths (32, 64, 128, 128)
    splits = concat_split_points(sd)
    assert splits["up_blocks.0.resnets.0.conv1"] == 128  # h from the mid block, skip 128
    assert splits["up_blocks.1.resnets.2.conv_shortcut"] == 128  # h 128, skip 64
    assert splits["up_blocks.3.resnets.0.conv1"] == 64  # h 64 (after upsampling), skip 32
    for name, split in splits.items():
        conv = sd.get_submodule(name)
        assert 0 < split < conv.in_channels
    assert concat_split_points(build_preset("dit")) == {}


@pytest.mark.parametrize("preset", ["digits", "sd_v1", "dit"])
def test_w8a8_stays_close_to_fp(preset: str) -> None:
    """W8A8 (bits/w8a8.yaml; SD with min–max weight init to keep the test fast) on random-weight
    presets: SQNR of the denoiser output ≥ 25 dB on held-out inputs at three timesteps."""
    model = build_preset(preset)
    fp = copy.deepcopy(model)
    over = {"weight": {"init": "minmax"}} if preset == "sd_v1" else {}
    quantize_(model, bits_config("w8a8", **over))
    kw = {"sample_size": 16} if preset == "sd_v1" else {}
    calib = [example_inputs(model, 4, t, generator=torch.Generator().manual_seed(i), **kw)
             for i, t in enumerate([900, 600, 300, 50])]
    result = calibrate_(model, calib)
    assert result.never_called == [] and result.timesteps == [50.0, 300.0, 600.0, 900.0]
    for i, t in enumerate([800, 450, 100]):
        x = example_inputs(model, 2, t, generator=torch.Generator().manual_seed(100 + i), **kw)
        with torch.no_grad():
            db = sqnr_db(fp(**x).sample, model(**x).sample)
        assert db >= SQNR_MIN_DB, (preset, t, db)


def test_size_accounting() -> None:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    assert model_size(lin).total_mb == pytest.approx((16 * 8 + 8 + 16) * 4 / 2**20)
    report = quantize_(lin, {"name": "w4", "weight": {"bits": 4, "init": "minmax"},
                             "act": {"bits": 8}})
    # 128 weights × 4 bits; 8 weight scales + 8 zero points, 1 act scale + 1 zero point at 32 bits;
    # bias (8) and LayerNorm (16) at 32 bits
    expected_bits = 128 * 4 + (16 + 2) * 32 + (8 + 16) * 32
    size = report.size
    assert size["total_bytes"] == expected_bits / 8
    assert size["quantized_params"] == 128 and size["qparam_count"] == 18
    assert size["fp_mb"] == pytest.approx(152 * 4 / 2**20)
    digits = quantize_(build_preset("digits"), bits_config("w4a16", weight={"init": "minmax"}))
    assert 6.0 < digits.size["compression"] < 8.0
    fp16 = model_size(build_preset("digits"), fp_bits=16)
    assert fp16.compression == 1.0 and fp16.total_mb == pytest.approx(1_164_513 * 2 / 2**20)
