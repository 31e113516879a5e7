"""method=irqlora: NF grids, ICQ on the real digits U-Net weights, IEC, training effect, the run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.methods.irqlora import apply_irqlora_
from lowbit.models.digits import load_digits_model
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.blockwise import BlockwiseGridQuantizer, double_quantize, normal_float_levels
from lowbit.quant.lora import IECLoRA
from lowbit.sampling import SamplerConfig
from lowbit.train import FPTrajectoryStream, StudentModule, TeacherMSE, param_group

# bitsandbytes / QLoRA NF4 (Dettmers et al. 2023, Appendix E)
NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
       0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def test_nf4_is_qloras_grid_and_lower_bits_are_nested_shapes():
    torch.testing.assert_close(normal_float_levels(4), torch.tensor(NF4), atol=1e-4, rtol=0)
    for bits in (2, 3):
        lv = normal_float_levels(bits)
        assert len(lv) == 2**bits and lv[0] == -1 and lv[-1] == 1 and (lv == 0).any()


@pytest.fixture(scope="module")
def unet_layers():
    unet = load_digits_model().net
    return [m.weight.detach() for n, m in unet.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.numel() % 64 == 0
            and n.startswith(("down_blocks", "mid_block", "up_blocks"))][:12]


@pytest.mark.parametrize("grid,bits", [("nf", 4), ("nf", 2), ("int", 3)])
def test_icq_raises_code_entropy_on_real_unet_weights(unet_layers, grid, bits):
    plain, icq = [], []
    for w in unet_layers:
        plain.append(BlockwiseGridQuantizer(w, bits, grid, icq=False, candidates=41).entropy(w))
        icq.append(BlockwiseGridQuantizer(w, bits, grid, icq=True, candidates=41).entropy(w))
    plain_h, icq_h = torch.stack(plain).mean(), torch.stack(icq).mean()
    # IR-QLoRA reports 3.67 → 3.74 bits on LLaMA-7B NF4; the maximum is `bits`
    assert icq_h > plain_h + 0.02, (plain_h, icq_h)
    assert icq_h <= bits


def test_blockwise_quantizer_accuracy_and_double_quantized_centre(unet_layers):
    w = unet_layers[3]
    q = BlockwiseGridQuantizer(w, 4, "nf", candidates=41)
    wq = q(w)
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum())
    assert sqnr > 18  # torchao's bar for int4 weights
    # τ sits on an 8-bit grid (one scale per layer)
    torch.testing.assert_close(q.center.detach(), double_quantize(q.center.detach()))
    assert q(w) is wq  # cached while the frozen weight is unchanged


def test_iec_starts_at_zero_and_trains_beta_with_gcd_maps():
    torch.manual_seed(0)
    lin = nn.Linear(6, 10)
    lora = IECLoRA(lin, rank=4)  # 4 divides neither 6 nor 10: gcd maps
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), torch.zeros(3, 10))
    with torch.no_grad():
        lora.B.weight.normal_()
    lora(x).pow(2).sum().backward()
    assert lora.beta1.grad is not None and lora.beta1.grad != 0
    assert lora.beta2.grad is not None and lora.beta2.grad != 0
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    assert IECLoRA(conv, rank=4)(torch.randn(2, 8, 6, 6)).shape == (2, 16, 3, 3)


def _student(bits: int = 4):
    loaded = load_digits_model()
    teacher = loaded.net
    s = copy.deepcopy(teacher)
    quantize_(s, QuantConfig.from_dict({"name": f"w{bits}a16", "weight": {"bits": bits, "init": "minmax"},
                                        "act": {"bits": None}, "sm_bits": None,
                                        "split_shortcut": False, "first_last_bits": 8,
                                        "time_emb_bits": 8}))
    layers = apply_irqlora_(s, bits, "nf", rank=4, candidates=21)
    return loaded, teacher, s, layers


def test_irqlora_starts_as_the_quantized_base_and_distillation_reduces_its_loss():
    torch.manual_seed(0)
    loaded, teacher, s, layers = _student(2)
    assert len(layers) > 50 and "conv_in" not in layers and "time_embedding.linear_1" not in layers
    groups = [param_group(s, "lora", "lora", 1e-3)]
    names = {n for n, _ in groups[0].params}
    assert any(n.endswith("lora.beta1") for n in names) and not any("weight_quantizer" in n
                                                                    for n in names)
    module = StudentModule(s, teacher, loaded, groups, [TeacherMSE(guidance_scale=2.0)],
                           max_steps=20)
    sampler = SamplerConfig(kind="ddim", steps=5, guidance_scale=2.0, batch_size=8)
    batch = FPTrajectoryStream(loaded, sampler, batch_size=8, seed=0)(2)
    with torch.no_grad():
        before = float(module.losses(batch)["loss"])
    module.apply_trainable()
    opt = torch.optim.Adam([p for g in groups for _, p in g.params], lr=1e-3)
    for _ in range(6):
        opt.zero_grad()
        module.losses(batch)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = float(module.losses(batch)["loss"])
    assert after < 0.8 * before, (before, after)


def test_irqlora_run_records_entropy_and_costs(make_cfg):
    from lowbit.pipeline import run_experiment

    res = run_experiment(make_cfg("method=irqlora", "bits=w4a16", "method.steps=2",
                                  "method.batch_size=4", "method.icq_candidates=11",
                                  "metrics.num_samples=20", "sampler.steps=3", "logger=none"))
    assert res["method"] == "irqlora(nf)"
    assert 3.0 < res["report"]["code_entropy"] <= 4.0
    c = res["cost"]
    assert c["trainable_params"] > 0 and c["size_x"] > 2 and "ops" in c and "finetune_s" in c
    assert "calib_s" in c and 0 < c["trainable_share"] < 1


@pytest.mark.slow
def test_icq_beats_irqlora_without_it_by_more_than_the_seed_spread(held_out_eps_error):
    """EFFECT (about 7 min on one thread): IR-QLoRA at W2A16 with and without ICQ, seeds 0 and 1,
    the method's defaults (100 steps of batch 16). Measured: with ICQ 0.0215 / 0.0220, without
    0.0263 / 0.0264; the seed spread is 0.0006 at most. The full method's worst seed must stay
    below the ablation's best by three times the larger spread. (IEC measured 0.0215 / 0.0221
    without it: no effect at this budget, so it has no such test.)"""
    from lowbit.ablate import ablate

    full, v = ablate(held_out_eps_error, ("method=irqlora", "bits=w2a16"), ["method.icq=false"],
                     (0, 1))
    print(f"weighted eps error: ICQ {full}, no ICQ {v.errors}, spread {v.spread:.4f}")
    assert v.worse, v
