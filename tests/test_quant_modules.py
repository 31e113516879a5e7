"""Quantized modules: same parameters/keys as the float modules, roles, split, attention, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from lowbit.models.digits import build_digits_unet
from lowbit.models.presets import build_preset, example_inputs
from lowbit.quant import (
    AttentionQuantizers,
    QuantAttnProcessor,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate_,
    quant_disabled,
    quant_params,
    quantize_,
)

W4 = {"name": "w4a16", "weight": {"bits": 4, "init": "minmax"}, "act": {"bits": None},
      "first_last_bits": None, "time_emb_bits": None}
W8A8 = {"name": "w8a8", "weight": {"init": "minmax"}, "act": {"init": "minmax"}}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean((2, 3)))


def _digits_batches(n: int = 3, b: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [dict(sample=torch.randn(b, 1, 16, 16, generator=g), timestep=torch.tensor(t),
                 class_labels=torch.randint(0, 10, (b,), generator=g))
            for t in torch.linspace(900, 50, n).round().long().tolist()]


def test_quant_modules_are_their_float_modules() -> None:
    torch.manual_seed(0)
    model = Tiny()
    keys = set(model.state_dict())
    weight = model.conv.weight
    quantize_(model, W8A8)
    assert type(model.conv) is QuantConv2d and isinstance(model.conv, nn.Conv2d)
    assert type(model.proj) is QuantLinear and isinstance(model.proj, nn.Linear)
    assert model.conv.weight is weight  # same Parameter object, not a copy
    new_keys = set(model.state_dict())
    assert keys <= new_keys
    assert all("quantizer" in k for k in new_keys - keys)
    assert "conv.weight_quantizer.scale" in new_keys and "proj.input_quantizer.scale" in new_keys


def test_weight_quantization_equals_torch_fake_quant() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    quantize_(model, W4)
    x = torch.randn(2, 3, 6, 6)
    wq = model.conv.weight_quantizer
    zp = wq.zero_point.detach().to(torch.int32)
    w_ref = torch.fake_quantize_per_channel_affine(ref.conv.weight, wq.scale.detach(), zp, 0, 0, 15)
    assert torch.equal(model.conv.quantized_weight(), w_ref)
    assert torch.equal(model.conv(x), F.conv2d(x, w_ref, ref.conv.bias, padding=1))


def test_quant_params_by_role() -> None:
    torch.manual_seed(0)
    model = Tiny()
    quantize_(model, W8A8)
    conv = model.conv
    assert conv.quant_params("weight") == [conv.weight]
    assert conv.quant_params("bias") == [conv.bias]
    assert conv.quant_params("weight_scale") == [conv.weight_quantizer.scale]
    assert conv.quant_params("weight_zero_point") == [conv.weight_quantizer.zero_point]
    assert conv.quant_params("act_scale") == [conv.input_quantizer.scale]
    named = dict(quant_params(model, "act_scale"))
    assert set(named) == {"conv", "proj"}
    assert [n for n, _ in quant_params(model, "weight", pattern="pro*")] == ["proj"]
    with pytest.raises(ValueError, match="unknown parameter role 'lora_A'"):
        conv.quant_params("lora_A")


def test_fp_bits_leave_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    x = _digits_batches(1)[0]
    with torch.no_grad():
        y0 = model(**x).sample
    report = quantize_(model, QuantConfig.from_dict({"name": "fp", "weight": {"bits": None},
                                                     "act": {"bits": None}, "sm_bits": None}))
    assert report.quantized == [] and report.counts["linear"] == 0
    assert [type(m) for m in model.modules()] == types
    assert not model._forward_pre_hooks
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules()
               if isinstance(m, Attention))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**x).sample, y0)


def test_quant_disabled_is_bit_identical_to_fp() -> None:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    fp = copy.deepcopy(model)
    batches = _digits_batches()
    quantize_(model, W8A8)
    calibrate_(model, batches)
    with torch.no_grad(), quant_disabled(model):
        assert torch.equal(model(**batches[0]).sample, fp(**batches[0]).sample)
    with torch.no_grad():  # and re-enabled afterwards
        assert not torch.equal(model(**batches[0]).sample, fp(**batches[0]).sample)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, W8A8)


def test_shortcut_split_has_one_quantizer_per_half() -> None:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    report = quantize_(model, {**W8A8, "split_conv1": True})
    # up_blocks.0 consumes cat([mid output (64), skip (64)]); its last resnet cat([64, 32])
    conv1 = model.up_blocks[0].resnets[0].conv1
    assert conv1.split == 64 and report.counts["split"] == 12
    assert conv1.input_quantizer.tensor_shape == (64,)
    assert conv1.input_quantizer_skip.tensor_shape == (64,)
    assert conv1.weight_quantizer_skip.tensor_shape == (64, 64, 3, 3)
    short = model.up_blocks[0].resnets[1].conv_shortcut
    assert (short.split, short.input_quantizer_skip.tensor_shape) == (64, (64,))
    calibrate_(model, _digits_batches())
    # the two halves get separate ranges: quantize each half by hand and compare
    x = torch.randn(2, 128, 4, 4)
    x[:, 64:] *= 20
    h = conv1.input_quantizer(x[:, :64])
    s = conv1.input_quantizer_skip(x[:, 64:])
    w = torch.cat([conv1.weight_quantizer(conv1.weight[:, :64]),
                   conv1.weight_quantizer_skip(conv1.weight[:, 64:])], 1)
    ref = F.conv2d(torch.cat([h, s], 1), w, conv1.bias, padding=1)
    assert torch.equal(conv1(x), ref)
    off = quantize_(build_digits_unet(), {**W8A8, "split_shortcut": False})
    assert off.counts["split"] == 0
    skip_only = quantize_(build_digits_unet(), W8A8)  # Q-Diffusion: the skip conv only
    assert skip_only.counts["split"] == 6


@pytest.mark.parametrize("preset", ["digits", "sd_v1", "dit"])
def test_attention_processor_explicit_path_matches_sdpa(preset: str) -> None:
    """With quantizers observing (FP values), the explicit softmax(QKᵀ)V path equals SDPA; with
    8-bit quantizers the output moves but stays close."""
    model = build_preset(preset)
    fp = copy.deepcopy(model)
    quantize_(model, {**W8A8, "weight": {"bits": None}, "act": {"bits": None}, "attn_bits": 8, "name": "attn8"})
    procs = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs)
    kw = {"sample_size": 16} if preset == "sd_v1" else {}
    x = example_inputs(model, 2, 400, **kw)
    mqs = [m for m in model.modules() if isinstance(m, AttentionQuantizers)]
    seen: list[torch.Tensor] = []
    for mq in mqs:
        for q in mq.quantizers():
            q.observer = lambda q, t: seen.append(t)
    with torch.no_grad():
        y_fp, y_obs = fp(**x).sample, model(**x).sample
    for mq in mqs:
        for q in mq.quantizers():
            q.observer = None
    assert len(seen) == 4 * len(mqs)
    torch.testing.assert_close(y_obs, y_fp, rtol=1e-4, atol=1e-4)
    calibrate_(model, [x])
    with torch.no_grad():
        y_q = model(**x).sample
    sqnr = 10 * torch.log10(y_fp.pow(2).mean() / (y_fp - y_q).pow(2).mean())
    assert 20 < sqnr < 200


def test_cross_attention_with_mask() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=48, heads=4, dim_head=8).eval()
    fp = copy.deepcopy(attn)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

    quantize_(Holder(), {"name": "a", "weight": {"bits": None}, "act": {"bits": 8}})
    assert isinstance(attn.processor, QuantAttnProcessor)
    mq = attn.matmul_quantizers
    assert mq.q.tensor_shape == (32,) and mq.k.tensor_shape == (32,)
    h, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 48)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    bias = (1 - mask) * -10000.0  # diffusers' additive encoder mask, [B, N_k]
    with quant_disabled(attn):
        y_fp = attn(h, ctx, bias[:, None])
    for q in [attn.to_q, attn.to_k, attn.to_v, attn.to_out[0], *mq.quantizers()]:
        for qq in (q.quantizers() if hasattr(q, "quantizers") else [q]):
            qq.observer = lambda q, t: None
    y_obs = attn(h, ctx, bias[:, None])
    torch.testing.assert_close(y_obs, y_fp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_fp, fp(h, ctx, bias[:, None]), rtol=0, atol=0)


def test_state_dict_round_trip_restores_outputs_exactly(tmp_path) -> None:
    cfg = {"name": "w4a8", "weight": {"bits": 4, "init": "mse"},
           "act": {"bits": 8, "init": "mse", "timestep_aware": True, "learnable": True}}
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    fp_state = copy.deepcopy(model.state_dict())
    quantize_(model, cfg)
    batches = _digits_batches(4)
    calibrate_(model, batches)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    torch.manual_seed(123)  # different random weights: everything must come from the checkpoint
    fresh = build_digits_unet().eval()
    quantize_(fresh, cfg, init_weights=False)  # the checkpoint brings every quantizer's state
    with pytest.raises(RuntimeError, match="is not calibrated"):
        fresh(**batches[0])
    with pytest.raises(RuntimeError, match="conv_in.weight is not calibrated: run quantize_ with"):
        fresh.conv_in.quantized_weight()
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    q = fresh.down_blocks[1].attentions[0].matmul_quantizers.q
    assert q.timesteps.numel() == 4 and q.scale.requires_grad
    with torch.no_grad():
        for b in batches + _digits_batches(2, seed=7):
            assert torch.equal(fresh(**b).sample, model(**b).sample)
    assert set(fp_state) <= set(state)


def test_lora_compatible_layers_and_unsupported_types() -> None:
    lora = pytest.importorskip("diffusers.models.lora")

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lora.LoRACompatibleLinear(4, 4)
            self.conv = lora.LoRACompatibleConv(2, 2, 1)
            self.up = nn.ConvTranspose2d(2, 2, 2)

    with pytest.warns(FutureWarning):
        model = M()
    keys = set(model.state_dict())
    report = quantize_(model, W8A8)
    assert type(model.lin) is QuantLinear and type(model.conv) is QuantConv2d
    assert keys <= set(model.state_dict())
    assert [(r.name, r.reason) for r in report.kept_fp] == [
        ("up", "unsupported layer type ConvTranspose2d")]
