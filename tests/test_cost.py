"""OPs = BOPs/64 + FLOPs and size, checked against hand-computed numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from lowbit.metrics.cost import count_ops, model_costs
from lowbit.models.digits import load_digits_model
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.binary import BinarySpec, binarize_

# Conv2d(3 → 8, 3×3, padding 1) on a 5×5 input: w·h·c_in·c_out·k² = 5·5·3·8·9 = 5400 MACs
MACS = 5 * 5 * 3 * 8 * 9


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _ops(bits: dict | None, binary: BinarySpec | None = None) -> float:
    m = _Conv()
    if bits is not None:
        quantize_(m, QuantConfig.from_dict({"name": "x", "first_last_bits": None, **bits}))
        if binary is not None:
            binarize_(m, binary)
        for q in m.conv.act_quantizers():  # a stand-in calibration: any Δ gives the same count
            if not q.passthrough and hasattr(q, "set_qparams"):
                q.set_qparams(torch.ones(q.param_shape), None if q.zero_point is None
                              else torch.zeros(q.param_shape))
    return count_ops(m, {"x": torch.randn(1, 3, 5, 5)}).ops


def test_fp_conv_counts_its_macs_as_flops():
    assert _ops(None) == MACS


@pytest.mark.parametrize("wb,ab", [(4, 4), (4, 8), (2, 8), (8, 8)])
def test_quantized_conv_counts_bops_over_64(wb, ab):
    bits = {"weight": {"bits": wb}, "act": {"bits": ab}}
    assert _ops(bits) == pytest.approx(MACS * wb * ab / 64)


def test_binary_conv_w1a1_and_w1a4():
    w1a1 = {"weight": {"bits": 1}, "act": {"bits": 1}}
    assert _ops(w1a1, BinarySpec(weight="xnor", act="sign")) == pytest.approx(MACS / 64)
    w1a4 = {"weight": {"bits": 1}, "act": {"bits": 4}}
    assert _ops(w1a4, BinarySpec(weight="ebb", act="keep")) == pytest.approx(MACS * 2 * 4 / 64)
    # BiDM's k×k scaling filter is a real conv on the 1-channel mean map: 5·5·9 FLOPs more
    scaled = _ops(w1a1, BinarySpec(weight="xnor", act="rsign", scaling=True))
    assert scaled == pytest.approx(MACS / 64 + 5 * 5 * 9)


def test_weight_only_quantization_counts_flops():
    assert _ops({"weight": {"bits": 4}, "act": {"bits": None}}) == MACS


def test_attention_matmuls_counted():
    attn = Attention(16, heads=2, dim_head=8, residual_connection=True, _from_deprecated_attn_block=True)
    rep = count_ops(attn, {"hidden_states": torch.randn(1, 16, 4, 4)})
    n = 16  # tokens
    # q, k, v, out projections: 4 · n · 16 · 16; QKᵀ and softmax·V: 2 · n · n · 16
    assert rep.ops == pytest.approx(4 * n * 16 * 16 + 2 * n * n * 16)


def test_digits_model_costs_and_savings():
    loaded = load_digits_model()
    fp = loaded.net
    fp_cost = model_costs(fp, loaded)
    assert fp_cost["bops"] == 0 and fp_cost["size_mb"] == pytest.approx(
        sum(p.numel() for p in fp.parameters()) * 4 / 2**20)
    m = copy.deepcopy(fp)
    quantize_(m, QuantConfig.from_dict({"name": "w1a32", "weight": {"bits": 1, "init": "minmax"},
                                        "act": {"bits": None}}))
    binarize_(m, BinarySpec(weight="sign"))
    c = model_costs(m, loaded, reference=fp)
    assert c["ops_fp"] == fp_cost["ops"]
    assert c["size_x"] > 10  # 1-bit weights: most of the 4.4 MB becomes bits
    assert c["ops"] == fp_cost["ops"]  # W1A32: FP activations → FP MACs, no OPs saving


def test_per_input_channel_activations_count_as_flops():
    """Activation scales that vary along K cannot be applied to an integer accumulator: such a
    layer dequantizes and computes in floating point, whatever its nominal bits."""
    per_channel = {"weight": {"bits": 4}, "act": {"bits": 4, "granularity": "channel"}}
    assert _ops(per_channel) == MACS
    per_tensor = {"weight": {"bits": 4}, "act": {"bits": 4, "granularity": "tensor"}}
    assert _ops(per_tensor) == pytest.approx(MACS * 16 / 64)
