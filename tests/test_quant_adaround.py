"""AdaRound block reconstruction: it must beat round-to-nearest on held-out inputs, end with hard
integer rounding, and resume from its state directory."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.models.digits import build_digits_unet
from lowbit.quant import AdaRoundConfig, adaround_, quant_disabled, quantize_
from lowbit.quant.adaround import (
    AdaRoundRounding,
    beta_at,
    capture_inputs,
    rec_loss,
    reconstruction_units,
)

BLOCK = "down_blocks.1.resnets.0"  # ResnetBlock2D 32 → 64 channels at 8×8, with a shortcut conv
W3 = {"name": "w3a16", "weight": {"bits": 3, "init": "minmax"}, "act": {"bits": None},
      "first_last_bits": None, "time_emb_bits": None}


def _batches(seed: int, n: int = 8, b: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [dict(sample=torch.randn(b, 1, 16, 16, generator=g), timestep=torch.tensor(t),
                 class_labels=torch.randint(0, 10, (b,), generator=g))
            for t in torch.linspace(950, 0, n).round().long().tolist()]


def _block_error(model: torch.nn.Module, fp: torch.nn.Module, batches: list[dict]) -> float:
    """Mean rec loss of the block vs the FP block, both fed the FP model's block inputs."""
    unit, fp_unit = model.get_submodule(BLOCK), fp.get_submodule(BLOCK)
    with quant_disabled(model):
        inputs = capture_inputs(model, unit, batches)
    with torch.no_grad():
        return sum(float(rec_loss(unit(*c.args, **c.kwargs), fp_unit(*c.args, **c.kwargs)))
                   for c in inputs) / len(inputs)


def test_temperature_schedule_and_rounding_init() -> None:
    cfg = AdaRoundConfig(iters=100)
    assert beta_at(0, cfg) == 20 and beta_at(19, cfg) == 20
    assert beta_at(60, cfg) == pytest.approx(20 - 18 * 40 / 80) and beta_at(100, cfg) == 2
    v = torch.tensor([0.2, 1.5, -2.7, 3.0])
    r = AdaRoundRounding()
    torch.testing.assert_close(r(v), v, atol=1e-6, rtol=0)  # h(V) starts at the fractional part
    r.hard = True
    assert torch.equal(r(v), torch.tensor([0.0, 2.0, -3.0, 3.0]))
    with pytest.raises(ValueError, match="granularity"):
        AdaRoundConfig(granularity="net")
    with pytest.raises(ValueError, match=r"adaround\.iter\b"):
        AdaRoundConfig.from_dict({"iter": 10})
    assert AdaRoundConfig.from_dict({"beta": [10, 1]}).beta == (10.0, 1.0)  # a yaml list


def test_units_are_blocks_or_loose_layers() -> None:
    model = build_digits_unet()
    quantize_(model, W3)
    names = [n for n, _ in reconstruction_units(model, AdaRoundConfig())]
    assert names[:4] == ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2",
                         "down_blocks.0.resnets.0"]
    assert "down_blocks.1.attentions.0" in names and "down_blocks.0.downsamplers.0.conv" in names
    assert not any(n.startswith(f"{BLOCK}.") for n in names)  # layers of a block are not units
    layers = [n for n, _ in reconstruction_units(model, AdaRoundConfig(granularity="layer"))]
    assert f"{BLOCK}.conv1" in layers and len(layers) == 76


def test_adaround_beats_nearest_rounding_and_resumes(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    fp = copy.deepcopy(model)
    quantize_(model, W3)
    train, held_out = _batches(0), _batches(1)
    err_nearest = _block_error(model, fp, held_out)
    conv = model.get_submodule(f"{BLOCK}.conv1")
    scale = conv.weight_quantizer.scale.detach().reshape(-1, 1, 1, 1)
    zero = conv.weight_quantizer.zero_point.detach().reshape(-1, 1, 1, 1)
    v = fp.get_submodule(f"{BLOCK}.conv1").weight.detach() / scale  # W/Δ

    cfg = {"iters": 300, "include": [BLOCK], "input_from": "fp"}
    result = adaround_(model, train, cfg, state_dir=tmp_path, progress=False)
    (unit,) = result.units
    assert unit.name == BLOCK and unit.loss_final < unit.loss_nearest
    err_ada = _block_error(model, fp, held_out)
    assert err_ada < 0.95 * err_nearest, (err_nearest, err_ada)

    # hard rounding is baked in: weights sit on the grid, each code is ⌊W/Δ⌋ or ⌊W/Δ⌋ + 1
    assert torch.equal(conv.quantized_weight(), conv.weight)
    codes = conv.weight.detach() / scale  # = q - z
    assert torch.equal(codes, torch.round(codes))
    free = (torch.floor(v) + zero >= 0) & (torch.floor(v) + 1 + zero <= 7)  # not clipped (3 bits)
    assert ((codes == torch.floor(v)) | (codes == torch.floor(v) + 1))[free].all()
    assert (codes != torch.round(v))[free].any()  # AdaRound changed some roundings

    # resume: a fresh quantized copy restores the unit from state_dir without training
    resumed = copy.deepcopy(fp)
    quantize_(resumed, W3)
    again = adaround_(resumed, train, cfg, state_dir=tmp_path, progress=False)
    assert again.units[0].resumed and again.units[0].loss_final is None
    assert torch.equal(resumed.get_submodule(f"{BLOCK}.conv1").weight, conv.weight)
    with torch.no_grad():
        b = held_out[0]
        assert torch.equal(resumed(**b).sample, model(**b).sample)


def _rows_run(iters: int) -> tuple[list[int], float, float]:
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    fp = copy.deepcopy(model)
    quantize_(model, W3)
    held_out = _batches(1)
    err_nearest = _block_error(model, fp, held_out)
    rows: list[int] = []
    unit = model.get_submodule(BLOCK)
    handle = unit.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        adaround_(model, _batches(0), {"iters": iters, "include": [BLOCK], "input_from": "fp",
                                       "batch_size": 3}, progress=False)
    finally:
        handle.remove()
    return rows, err_nearest, _block_error(model, fp, held_out)


def test_iterations_draw_batch_size_rows_of_a_captured_batch() -> None:
    """adaround.batch_size: each iteration runs that many rows (the same rows of every input and
    of the target) drawn from one captured batch, as BRECQ/Q-Diffusion draw 32; null keeps the
    whole batch."""
    rows, _, _ = _rows_run(20)
    assert rows.count(3) == 20 and set(rows) == {3, 8}  # + full batches: capture and losses
    with pytest.raises(ValueError, match="adaround.batch_size"):
        AdaRoundConfig.from_dict({"batch_size": 0})


@pytest.mark.slow
def test_minibatch_adaround_still_beats_nearest_rounding() -> None:
    """Drawing 3 rows of 8 per iteration is still a reconstruction: it beats nearest rounding on
    held-out inputs (by less than the whole-batch run above: noisier gradients)."""
    _, err_nearest, err = _rows_run(300)
    assert err < err_nearest
