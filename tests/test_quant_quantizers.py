"""Quantizer maths against PyTorch's own fake-quant kernels (the oracle nobody here wrote)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.quant import QuantConfig, QuantSpec, UniformQuantizer
from lowbit.quant.quantizers import (
    MIN_SCALE,
    int_range,
    lp_error,
    mse_qparams,
    qparams_from_range,
)

BITS = (2, 4, 8)


def _adversarial_rows(seed: int = 0) -> torch.Tensor:
    """[12, 40] rows: random, all-zero, constant, huge, tiny, huge+tiny mixed, all-negative…"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 40, generator=g)
    x[1] = 0.0  # all-zero channel
    x[2] = 1.2345  # constant positive
    x[3] = -7.0  # constant negative
    x[4] *= 1e30  # huge
    x[5] *= 1e-30  # tiny
    x[6, ::2] = 1e30  # huge and tiny mixed
    x[6, 1::2] = 1e-30
    x[7] = -x[7].abs()  # all negative
    x[8] = x[8].abs()  # all positive
    x[9] = torch.tensor([3e38, -3e38] * 20)  # near float32 max
    x[10] = 1e-42  # subnormal
    x[11] *= 1e3
    return x


def _ties(scale: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """x exactly at k + 0.5 steps (round-half-to-even decides) over the whole grid."""
    k = torch.arange(qmin - 3, qmax + 3, dtype=torch.float32) + 0.5
    if zp is not None:
        k = k - zp.reshape(-1, 1)
    return k.expand(scale.numel(), -1) * scale.reshape(-1, 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("init", ["minmax", "mse", "percentile"])
def test_per_channel_weight_bit_exact(bits: int, symmetric: bool, init: str) -> None:
    x = _adversarial_rows()
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", init=init)
    q = UniformQuantizer.for_weight(spec, x.shape)
    q.init_from_tensor(x)
    scale = q.scale.detach()
    zp = None if q.zero_point is None else q.zero_point.detach()
    assert torch.isfinite(scale).all() and (scale >= MIN_SCALE).all()
    zp_i = torch.zeros(12, dtype=torch.int32) if zp is None else zp.to(torch.int32)
    qmin, qmax = int_range(bits, symmetric)
    for inp in (x, _ties(scale, zp, qmin, qmax), x * 0.999, torch.randn(12, 40) * 3):
        ref = torch.fake_quantize_per_channel_affine(inp, scale, zp_i, 0, qmin, qmax)
        out = q(inp)
        assert torch.equal(out, ref)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_act_bit_exact(bits: int, symmetric: bool) -> None:
    qmin, qmax = int_range(bits, symmetric)
    for seed, x in enumerate([torch.randn(3, 5, 7) * 4, torch.zeros(2, 8), torch.full((4, 4), -2.5),
                              torch.tensor([1e30, -1e-30, 0.0, 5.0])]):
        spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="tensor")
        q = UniformQuantizer.for_act(spec, x.shape[-1], -1)
        s, z = qparams_from_range(x.amin().reshape(1), x.amax().reshape(1), bits, symmetric)
        q.set_qparams(s, z)
        zi = 0 if z is None else int(z)
        ties = _ties(s, z, qmin, qmax)
        for inp in (x, ties, torch.randn(6, 9, generator=torch.Generator().manual_seed(seed)) * 2):
            ref = torch.fake_quantize_per_tensor_affine(inp, float(s), zi, qmin, qmax)
            assert torch.equal(q(inp), ref)
            with torch.no_grad():  # the in-place sampling path (one clamp with shifted bounds)
                assert torch.equal(q(inp), ref)


def test_conv_activation_channel_axis_bit_exact() -> None:
    x = torch.randn(2, 6, 5, 5) * torch.tensor([0.0, 1, 10, 100, 1e-3, 1e20]).reshape(1, 6, 1, 1)
    spec = QuantSpec(bits=8, granularity="channel")
    q = UniformQuantizer.for_act(spec, 6, 1)
    rows = q.rows(x)
    assert rows.shape == (6, 50)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), 8, False)
    q.set_qparams(s, z)
    ref = torch.fake_quantize_per_channel_affine(x, s, z.to(torch.int32), 1, 0, 255)
    assert torch.equal(q(x), ref)


def test_group_granularity_matches_per_channel_on_groups() -> None:
    w = torch.randn(8, 4, 3, 3)  # K = 36, groups of 12 along the flattened reduction dim
    spec = QuantSpec(bits=4, granularity="group:12", symmetric=True)
    q = UniformQuantizer.for_weight(spec, w.shape)
    q.init_from_tensor(w)
    assert q.scale.shape == (8, 3)
    rows = w.reshape(24, 12)
    s = q.scale.detach().reshape(24)
    ref = torch.fake_quantize_per_channel_affine(rows, s, torch.zeros(24, dtype=torch.int32), 0,
                                                 -8, 7).reshape(w.shape)
    assert torch.equal(q(w), ref)
    # a group that does not divide K falls back to per-channel, and says so
    q2 = UniformQuantizer.for_weight(QuantSpec(bits=4, granularity="group:64"), w.shape)
    assert q2.kind == "channel" and "per-channel" in q2.note


def test_token_granularity_is_dynamic_per_token() -> None:
    x = torch.randn(2, 5, 16) * torch.arange(1, 6).reshape(1, 5, 1)
    q = UniformQuantizer.for_act(QuantSpec(bits=8, granularity="token"), 16, -1)
    assert q.is_initialized and q.num_scales == 0
    out = q(x)
    for b in range(2):
        for t in range(5):
            row = x[b, t]
            s, z = qparams_from_range(row.amin(), row.amax(), 8, False)
            ref = torch.fake_quantize_per_tensor_affine(row, float(s), int(z), 0, 255)
            assert torch.equal(out[b, t], ref)


def test_degenerate_statistics_never_give_bad_scales() -> None:
    for xmin, xmax in [(0.0, 0.0), (5.0, 5.0), (-math.inf, math.inf), (math.nan, math.nan),
                       (-3e38, 3e38), (1e-45, 1e-45)]:
        for bits in (1, 2, 4, 8):
            for sym in ((False,) if bits == 1 else (True, False)):
                s, z = qparams_from_range(torch.tensor([xmin]), torch.tensor([xmax]), bits, sym)
                assert torch.isfinite(s).all() and (s > 0).all(), (xmin, xmax, bits, sym)
                assert z is None or torch.isfinite(z).all()
    q = UniformQuantizer.for_weight(QuantSpec(bits=4, init="mse"), (3, 4))
    q.init_from_tensor(torch.tensor([[0.0] * 4, [math.nan] * 4, [math.inf, -math.inf, 0.0, 1.0]]))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


def test_mse_init_beats_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((16, 2048))
    mn, mx = x.amin(1), x.amax(1)
    s0, z0 = qparams_from_range(mn, mx, 4, False)
    s1, z1 = mse_qparams(x, mn, mx, 4, False)

    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return lp_error(x, torch.fake_quantize_per_channel_affine(x, s, z.int(), 0, 0, 15))

    assert (err(s1, z1) <= err(s0, z0)).all()
    assert err(s1, z1).mean() < 0.8 * err(s0, z0).mean()
    assert (s1 < s0).all()  # the search clips the tails


def test_percentile_clips_outliers() -> None:
    x = torch.randn(1, 10000)
    x[0, 0] = 1000.0
    q = UniformQuantizer.for_weight(QuantSpec(bits=8, init="percentile", percentile=99.9), x.shape)
    q.init_from_tensor(x)
    assert float(q.scale) < 10.0 / 255 * 2  # range from the 99.9th percentile, not the outlier


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradients_match_torch_learnable_fake_quant(symmetric: bool) -> None:
    """Gradients w.r.t. x, Δ and z equal torch's LSQ kernel with the same grad factor."""
    bits = 4
    qmin, qmax = int_range(bits, symmetric)
    x = torch.randn(64, 8) * 2
    spec = QuantSpec(bits=bits, symmetric=symmetric, learnable=True)
    q = UniformQuantizer.for_act(spec, 8, -1)
    s0 = torch.tensor([0.3])
    z0 = None if symmetric else torch.tensor([6.0])
    q.set_qparams(s0, z0)
    assert q.scale.requires_grad
    xa = x.clone().requires_grad_(True)
    q(xa).pow(2).sum().backward()

    xb = x.clone().requires_grad_(True)
    sb = s0.clone().requires_grad_(True)
    zb = (torch.zeros(1) if z0 is None else z0.clone()).requires_grad_(True)
    g = 1.0 / math.sqrt(x.numel() * qmax)
    out = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, qmin, qmax, g)
    out.pow(2).sum().backward()
    assert torch.equal(q(x), out.detach())
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(q.scale.grad.reshape(1), sb.grad, rtol=1e-4, atol=1e-5)
    if not symmetric:
        torch.testing.assert_close(q.zero_point.grad.reshape(1), zb.grad, rtol=1e-4, atol=1e-5)


def test_passthrough_bits_and_roles() -> None:
    x = torch.randn(4, 4)
    for bits in (None, 16, 32):
        q = UniformQuantizer.for_act(QuantSpec(bits=bits), 4, -1)
        assert q.passthrough and q(x) is x
        assert q.params_by_role() == {"scale": [], "zero_point": []}
    q = UniformQuantizer.for_weight(QuantSpec(bits=4), (4, 4))
    roles = q.params_by_role()
    assert roles["scale"] == [q.scale] and roles["zero_point"] == [q.zero_point]
    assert not q.scale.requires_grad
    q.set_learnable(True)
    assert q.scale.requires_grad and q.zero_point.requires_grad


def test_uncalibrated_act_quantizer_raises() -> None:
    q = UniformQuantizer.for_act(QuantSpec(bits=8), 4, -1, name="blk.input")
    with pytest.raises(RuntimeError, match="blk.input is not calibrated"):
        q(torch.randn(2, 4))


def test_config_validation_names_key_and_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"bits\.weight\.bits=12 .*allowed values: null, 1, 2"):
        QuantConfig.from_dict({"weight": {"bits": 12}})
    with pytest.raises(ValueError, match=r"bits\.sm_bits"):
        QuantConfig.from_dict({"sm_bits": 9})
    with pytest.raises(ValueError, match=r"unknown key\(s\) bits\.wieght"):
        QuantConfig.from_dict({"wieght": {"bits": 4}})
    with pytest.raises(ValueError, match=r"bits\.act\.granularity='row'"):
        QuantConfig.from_dict({"act": {"granularity": "row"}})
    with pytest.raises(ValueError, match="token is for activations"):
        QuantConfig.from_dict({"weight": {"granularity": "token"}})
    with pytest.raises(ValueError, match=r"init='max'"):
        QuantConfig.from_dict({"act": {"init": "max"}})
    cfg = QuantConfig.from_dict({"name": "x", "weight": {"bits": 4, "granularity": "group:64"},
                                 "overrides": {"*attn*": {"act": {"bits": 8}}, "conv_in": "fp"}})
    assert cfg.weight.granularity == "group:64" and len(cfg.overrides) == 2
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg  # to_dict round-trips


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("shape,scale_shape", [((4, 8, 5, 5), ()), ((4, 8, 5, 5), (1, 8, 1, 1)),
                                               ((6, 12), (6, 1))])
def test_fake_quantize_without_graph_equals_the_autograd_path(shape, scale_shape, zero_point):
    """Sampling runs fake_quantize in place (no autograd graph): bit-identical to the path that
    builds the graph, at the grid's edges, halfway points and out-of-range values too."""
    from lowbit.quant.quantizers import fake_quantize

    g = torch.Generator().manual_seed(0)
    scale = torch.rand(scale_shape, generator=g) * 0.2 + 0.01
    z = torch.randint(0, 16, scale_shape, generator=g).float() if zero_point else None
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[:8] = (torch.arange(8) - 3.5) * scale.reshape(-1)[0]  # exact halfway points
    x.view(-1)[8] = float("inf")
    qmin, qmax = (0, 15) if zero_point else (-8, 7)
    graph = fake_quantize(x.clone().requires_grad_(True), scale, z, qmin, qmax)
    assert graph.requires_grad
    with torch.no_grad():
        fast = fake_quantize(x, scale, z, qmin, qmax)
    assert torch.equal(graph.detach(), fast)
    assert torch.equal(x.view(-1)[8], torch.tensor(float("inf")))  # the input is left alone
