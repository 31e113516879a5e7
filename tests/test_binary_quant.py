"""Binarizers (lowbit.quant.binary): values, STE gradients, binary layers, the kind registries;
BinaryDM's EBB binarizer and BiDM's shortcut as registered kinds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.quant import QuantConfig, calibrate_, model_size, quant_disabled, quantize_
from lowbit.quant.binary import (
    ActBinarizer,
    BinaryConv2d,
    BinaryLinear,
    BinarySpec,
    SignWeightBinarizer,
    binarize_,
    sign_clip_ste,
    sign_quad_ste,
)
from lowbit.quant.channels import channel_map

X = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])


def test_sign_is_plus_minus_one_with_clipped_ste():
    x = X.clone().requires_grad_(True)
    y = sign_clip_ste(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]  # sign(0) = +1: two levels only
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]  # 1{|x| <= 1}


def test_sign_codes_of_edge_values_match_the_comparison():
    """The codes are where(x < 0, −1, +1) for every float: ±0, the smallest subnormals, ±inf
    and NaN (which is not < 0) included."""
    e = torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"), float("nan"),
                      3.0, -3.0, 0.5, -0.5])
    ref = torch.where(e < 0, -1.0, 1.0)
    assert torch.equal(sign_clip_ste(e), ref) and torch.equal(sign_quad_ste(e), ref)
    b = ActBinarizer(1, -1, threshold=True, ste="quad")
    with torch.no_grad():  # the in-place path of sampling
        assert torch.equal(b(e[:, None].clone()).squeeze(1), ref)


@pytest.mark.parametrize("shortcut", ["identity", "conv", "none"])
@pytest.mark.parametrize("scaling", ["learned", "xnor", "none"])
def test_binary_layers_sample_bit_identically_without_a_graph(scaling, shortcut):
    """Without autograd (sampling) a binary layer updates its GEMM output in place and fuses the
    bias into the GEMM when nothing scales it: the same values as the training-mode forward."""
    import lowbit.methods.bidm  # noqa: F401 - registers the shortcut kinds

    spec = BinarySpec(weight="xnor", act="rsign", scaling=scaling, shortcut=shortcut)
    _, m = _binary_tiny(spec)
    with torch.no_grad():
        for b in (m.body, m.head):
            b.input_quantizer.threshold.copy_(torch.linspace(-0.3, 0.3, b.input_quantizer.channels))
    x = torch.randn(3, 2, 6, 6)
    graph = m(x)
    with torch.no_grad():
        plain = m(x)
    if scaling == "none":  # bias inside the GEMM: one rounding fewer, not the same bits
        torch.testing.assert_close(plain, graph)
    else:
        assert torch.equal(plain, graph.detach())


def test_quadratic_ste_gradient_is_approxsign_derivative():
    x = X.clone().requires_grad_(True)
    sign_quad_ste(x).sum().backward()
    assert x.grad.tolist() == [0, 1, 2, 1, 0]  # max(0, 2 - 2|x|)


def test_sign_weight_binarizer_scales_by_mean_abs():
    w = torch.tensor([[0.5, -0.1, 0.2, -0.6], [0.1, 0.1, -0.1, 0.3]])
    for learnable in (True, False):
        b = SignWeightBinarizer(w, learnable=learnable)
        out = b(w)
        alpha = w.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(out, alpha * torch.where(w < 0, -1.0, 1.0))
    wl = w.clone().requires_grad_(True)
    SignWeightBinarizer(w, learnable=True)(wl).sum().backward()
    assert torch.all(wl.grad != 0)  # STE passes the gradient to the latent weights


def test_ebb_two_bases_by_hand_then_one_after_the_switch():
    from lowbit.methods.binarydm import EBBWeightBinarizer

    w = torch.tensor([[0.5, -0.1, 0.2, -0.6]])
    b = EBBWeightBinarizer(w)
    # σ₁ = mean|w| = 0.35; residual r = w − σ₁ sign w = [0.15, 0.25, −0.15, −0.25]; σ₂ = 0.2
    torch.testing.assert_close(b.sigma1.detach(), torch.tensor([0.35]))
    torch.testing.assert_close(b.sigma2.detach(), torch.tensor([0.2]))
    torch.testing.assert_close(b(w).detach(), torch.tensor([[0.55, -0.15, 0.15, -0.55]]))
    one_basis = 0.35 * torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert (b(w) - w).norm() < (one_basis - w).norm()  # the second basis reduces the error
    assert b.bits == 2
    b.switch_stage()
    torch.testing.assert_close(b(w).detach(), one_basis)
    assert b.bits == 1 and float(b.regularizer()) == 0.0


def test_ebb_regulariser_drives_sigma2_to_zero():
    from lowbit.methods.binarydm import EBBWeightBinarizer

    torch.manual_seed(0)
    w = torch.randn(8, 16) * 0.05
    b = EBBWeightBinarizer(w)
    start = b.sigma2.detach().abs().mean()
    opt = torch.optim.Adam([b.sigma2], lr=2e-3)
    for _ in range(300):
        opt.zero_grad()
        (0.09 * b.regularizer()).backward()
        opt.step()
    assert b.sigma2.detach().abs().max() < 0.05 * start


def test_act_binarizer_uses_its_threshold_in_the_forward_pass():
    a = ActBinarizer(2, channel_axis=1, threshold=True, ste="quad")
    with torch.no_grad():
        a.threshold.copy_(torch.tensor([-0.2, 0.2]))
    x = torch.full((1, 2, 1, 1), 0.1, requires_grad=True)
    y = a(x)
    assert y.flatten().tolist() == [-1.0, 1.0]  # sign(0.1 − 0.2), sign(0.1 + 0.2)
    y.sum().backward()
    assert a.threshold.grad is not None and torch.all(a.threshold.grad != 0)


def test_channel_map_means_groups_and_repeats():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_map(x, 3, 1).flatten().tolist() == [0.5, 2.5, 4.5]
    assert channel_map(x[:, :2], 4, 1).flatten().tolist() == [0, 0, 1, 1]
    assert channel_map(x, 4, 1).shape == (1, 4, 1, 1)  # via gcd(6, 4) = 2


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        return self.head(self.body(self.conv_in(x)).mean(dim=(2, 3)))


W1A1 = {"name": "w1a1", "weight": {"bits": 1, "init": "minmax"},
        "act": {"bits": 1, "init": "minmax"}, "first_last_bits": None}


def _binary_tiny(spec: BinarySpec) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp = _Tiny()
    m = copy.deepcopy(fp)
    quantize_(m, QuantConfig.from_dict(W1A1))
    names = binarize_(m, spec)
    assert names == ["conv_in", "body", "head"]
    return fp, m


def test_binary_conv_matches_its_formula_and_is_fp_when_disabled():
    import lowbit.methods.bidm  # noqa: F401 - registers the shortcut kinds

    spec = BinarySpec(weight="xnor", act="rsign", scaling="learned", shortcut="identity")
    fp, m = _binary_tiny(spec)
    assert isinstance(m.body, BinaryConv2d) and isinstance(m.head, BinaryLinear)
    x = torch.randn(3, 4, 6, 6)
    body = m.body
    with torch.no_grad():
        body.input_quantizer.threshold.copy_(torch.linspace(-0.3, 0.3, 4))
        w = body.weight
        alpha = w.abs().reshape(8, -1).mean(1).reshape(-1, 1, 1, 1)
        xb = torch.where(x + body.input_quantizer.threshold.reshape(1, -1, 1, 1) < 0, -1.0, 1.0)
        conv = torch.nn.functional.conv2d(xb, alpha * torch.where(w < 0, -1.0, 1.0), None, 2, 1)
        k = torch.nn.functional.conv2d(x.abs().mean(1, keepdim=True), torch.full((1, 1, 3, 3), 1 / 9),
                                       None, 2, 1)
        short = torch.nn.functional.adaptive_avg_pool2d(x.repeat_interleave(2, dim=1), (3, 3))
        expected = conv * k + body.bias.reshape(1, -1, 1, 1) + 0.3 * short
        torch.testing.assert_close(body(x), expected)
        with quant_disabled(m):  # no binarizer, no scaling, no shortcut: the FP layers
            xin = torch.randn(3, 2, 6, 6)
            torch.testing.assert_close(m(xin), fp(xin))


def test_binary_layers_train_their_extras():
    import lowbit.methods.bidm  # noqa: F401 - registers the shortcut kinds

    fp, m = _binary_tiny(BinarySpec(weight="sign", act="rsign", scaling="learned", shortcut="conv"))
    x = torch.randn(4, 2, 6, 6)
    loss = (m(x) - fp(x).detach()).pow(2).mean()
    loss.backward()
    for p in (m.body.weight, m.body.weight_quantizer.alpha, m.body.input_quantizer.threshold,
              m.body.scaling.filter, m.body.shortcut.scale, m.body.shortcut.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_calibration_skips_binarizers_and_size_counts_one_bit():
    spec = BinarySpec(weight="xnor", act="keep")
    torch.manual_seed(0)
    m = _Tiny()
    cfg = {**W1A1, "name": "w1a4", "act": {"bits": 4, "init": "minmax"}}
    quantize_(m, QuantConfig.from_dict(cfg))
    binarize_(m, spec)
    res = calibrate_(m, [{"x": torch.randn(4, 2, 6, 6)}])
    assert res.calibrated == 3  # the three 4-bit input quantizers; binarizers need nothing
    size = model_size(m)
    n_w = sum(mod.weight.numel() for mod in (m.conv_in, m.body, m.head))
    assert size.weight_bits_total == n_w  # one bit per binary weight
    from lowbit.methods.binarydm import EBBWeightBinarizer

    ebb = copy.deepcopy(m)
    ebb.body.weight_quantizer = EBBWeightBinarizer(ebb.body.weight)
    assert model_size(ebb).weight_bits_total == n_w + ebb.body.weight.numel()  # 2 bases


def test_binary_spec_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="weight binarizer"):
        BinarySpec(weight="ternary")
    with pytest.raises(ValueError, match="shortcut"):
        BinarySpec(shortcut="dense")


def test_xnor_baseline_scales_binary_activations_by_k():
    """method=binary_baseline variant=xnor at A1 is XNOR-Net: ``conv(sign x, α sign w) ⊙ K`` with
    ``K = mean_c|x| ∗ (1/k²)`` (a fixed box filter, no parameter); at A4 activations keep the
    bits' quantizer and no K; ReAct keeps only its thresholds."""
    from lowbit.cli import compose_config
    from lowbit.methods.binary_baseline import BinaryBaseline

    def spec(*ov, act_bits):
        return BinaryBaseline(compose_config(["method=binary_baseline", *ov]).method).spec(act_bits)

    assert spec(act_bits=1) == BinarySpec(weight="xnor", act="sign", scaling="xnor")
    assert spec(act_bits=4).scaling == "none"
    assert spec("method.variant=react", act_bits=1).scaling == "none"
    _, m = _binary_tiny(spec(act_bits=1))
    body = m.body
    assert not list(body.scaling.parameters())  # K's filter is fixed
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        w = body.weight
        alpha = w.abs().reshape(8, -1).mean(1).reshape(-1, 1, 1, 1)
        xb = torch.where(x < 0, -1.0, 1.0)
        conv = torch.nn.functional.conv2d(xb, alpha * torch.where(w < 0, -1.0, 1.0), None, 2, 1)
        k = torch.nn.functional.conv2d(x.abs().mean(1, keepdim=True),
                                       torch.full((1, 1, 3, 3), 1 / 9), None, 2, 1)
        torch.testing.assert_close(body(x), conv * k + body.bias.reshape(1, -1, 1, 1))
        xl = torch.randn(5, 8)
        head = m.head
        wl = head.weight
        ref = torch.nn.functional.linear(torch.where(xl < 0, -1.0, 1.0),
                                         wl.abs().mean(1, keepdim=True) * torch.where(wl < 0, -1.0, 1.0))
        torch.testing.assert_close(head(xl), ref * xl.abs().mean(-1, keepdim=True) + head.bias)
