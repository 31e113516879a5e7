"""The eval-mode weight cache of quantized layers: cached outputs equal uncached ones bit for bit,
and every way the quantized weight can change invalidates it (a stale weight is a silent wrong
result). Each invalidation test first checks that the change alters the output, so it could fail.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowbit.models.digits import build_digits_unet
from lowbit.quant import QuantConfig, calibrate_, quant_disabled, quantize_
from lowbit.quant.binary import Binarizer, BinarySpec, binarize_, sign_clip_ste
from lowbit.quant.modules import QuantLinear, QuantModuleMixin, set_weight_cache_

W4A8 = {"name": "w4a8", "weight": {"bits": 4, "init": "minmax"}, "act": {"init": "minmax"}}
W4_LSQ = {"name": "w4a16", "weight": {"bits": 4, "init": "minmax", "learnable": True},
          "act": {"bits": None}, "first_last_bits": None, "time_emb_bits": None}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean((2, 3)))


class WeightDelta(nn.Module):
    """A weight adapter (the adapter slot's protocol): ``scaling · D``."""

    adapts = "weight"

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.zeros(shape))
        self.scaling = 1.0

    def delta(self) -> torch.Tensor:
        return self.d * self.scaling


def _tiny(cfg: dict = W4_LSQ, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    quantize_(model, cfg)
    return model.eval()


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _layers(model: nn.Module) -> list[QuantModuleMixin]:
    return [m for m in model.modules() if isinstance(m, QuantModuleMixin)]


def _hits(model: nn.Module) -> int:
    return sum(m._weight_cache.hits for m in _layers(model) if "_weight_cache" in m.__dict__)


def cached_equals_fresh(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Run twice with the cache (fills, then reuses it), then with the cache off; all three must
    be bit-identical. Returns the output."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            out = model(*args, **kwargs)
        return out.sample if hasattr(out, "sample") else out

    first, hits = run(), _hits(model)
    second = run()
    assert _hits(model) > hits, "the second eval pass should reuse the cached weights"
    set_weight_cache_(model, False)
    try:
        fresh = run()
    finally:
        set_weight_cache_(model, True)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    return fresh


# ------------------------------------------------------------------------------------------------
# correctness of the cached path
# ------------------------------------------------------------------------------------------------
def test_digits_unet_cached_equals_uncached_at_every_timestep() -> None:
    """The whole U-Net (split shortcut layers, attention, time embedding) over several timesteps
    and conditions: cached and uncached outputs are bit-identical."""
    torch.manual_seed(0)
    model = build_digits_unet().eval()
    cfg = {**W4A8, "weight": {"bits": 4, "init": "mse", "granularity": "group:8"},
           "act": {"bits": 8, "timestep_aware": True}}
    quantize_(model, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [dict(sample=torch.randn(3, 1, 16, 16, generator=g), timestep=torch.tensor(t),
                    class_labels=torch.tensor([0, 4, 9])) for t in (900, 500, 40)]
    calibrate_(model, batches)
    assert any(m.split for m in _layers(model))
    for b in batches:
        cached_equals_fresh(model, **b)


def test_cache_is_used_only_without_gradients_in_eval() -> None:
    model = _tiny()
    layer = model.proj
    with torch.no_grad():
        assert layer.quantized_weight() is layer.quantized_weight()  # no_grad + eval: reused
    model.train()
    with torch.no_grad():
        assert layer.quantized_weight() is not layer.quantized_weight()  # train: recomputed
    model.eval()
    w = layer.quantized_weight()  # eval with grad on a trainable weight: the graph is needed
    assert w.requires_grad and w is not layer.quantized_weight()
    layer.weight.requires_grad_(False)
    for p in layer.weight_quantizer.parameters():
        p.requires_grad_(False)
    assert layer.quantized_weight() is layer.quantized_weight()  # nothing to differentiate


def test_gradients_flow_as_before_in_train_mode() -> None:
    """Gradients of weight, bias and LSQ step sizes equal those of the uncached module, also
    after an eval pass has filled the cache."""
    grads = []
    for cache in (True, False):
        model = _tiny()
        set_weight_cache_(model, cache)
        cached_equals_fresh(model, X) if cache else None
        model.train()
        model(X).square().sum().backward()
        named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
        assert all(g is not None for _, g in named)
        # weights, biases and step sizes get a gradient (a zero point's may round to none)
        assert all(g.abs().sum() > 0 for n, g in named if not n.endswith("zero_point"))
        grads.append([g.clone() for _, g in named])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_eval_with_gradients_through_the_input_uses_the_cache_correctly() -> None:
    """Weights frozen, input gradient wanted (e.g. guidance): a weight cached under inference
    mode is not reused outside it, and the input gradient equals the uncached one."""
    model = _tiny()
    model.requires_grad_(False)
    with torch.inference_mode():
        model(X)
    gx = []
    for cache in (True, False):
        set_weight_cache_(model, cache)
        x = X.clone().requires_grad_(True)
        model(x).sum().backward()
        gx.append(x.grad)
    assert torch.equal(*gx)


# ------------------------------------------------------------------------------------------------
# invalidation: every way the quantized weight can change
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["sgd", "adam_foreach", "adam_fused"])
def test_optimizer_step_after_eval_invalidates(opt: str) -> None:
    """eval (cache filled) → train → optimizer step on weights and LSQ step sizes → eval."""
    model = _tiny()
    before = cached_equals_fresh(model, X)
    params = [p for p in model.parameters() if p.requires_grad]
    make = {"sgd": lambda: torch.optim.SGD(params, lr=0.5),
            "adam_foreach": lambda: torch.optim.Adam(params, lr=0.05, foreach=True),
            "adam_fused": lambda: torch.optim.Adam(params, lr=0.05, fused=True)}[opt]
    optimizer = make()
    model.train()
    model(X).square().sum().backward()
    optimizer.step()
    model.eval()
    after = cached_equals_fresh(model, X)
    assert not torch.equal(before, after)


def test_optimizer_step_in_eval_mode_invalidates() -> None:
    """A training loop that never calls train(): only the parameters' versions change."""
    model = _tiny()
    before = cached_equals_fresh(model, X)
    optimizer = torch.optim.SGD([model.proj.weight_quantizer.scale], lr=0.5)
    model(X).square().sum().backward()
    optimizer.step()
    assert not model.training
    assert not torch.equal(before, cached_equals_fresh(model, X))


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_invalidates(assign: bool) -> None:
    model, other = _tiny(seed=0), _tiny(seed=1)
    before = cached_equals_fresh(model, X)
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    model.load_state_dict(torch.load(buf, weights_only=True), assign=assign)
    after = cached_equals_fresh(model, X)
    assert not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(after, other(X))


def test_calibration_and_requantization_invalidate() -> None:
    """Re-initialised weight step sizes (init_weight_quantizers / set_qparams) and a
    re-calibration of the activations."""
    model = _tiny(W4A8)
    calibrate_(model, [{"x": X}])
    before = cached_equals_fresh(model, X)
    q = model.conv.weight_quantizer
    q.set_qparams(q.scale.detach() * 1.7, q.zero_point.detach())
    mid = cached_equals_fresh(model, X)
    assert not torch.equal(before, mid)
    model.conv.init_weight_quantizers()
    assert torch.equal(cached_equals_fresh(model, X), before)
    calibrate_(model, [{"x": 3 * X}])
    assert not torch.equal(before, cached_equals_fresh(model, X))


def test_in_place_weight_edit_under_no_grad_invalidates() -> None:
    model = _tiny()
    before = cached_equals_fresh(model, X)
    with torch.no_grad():
        model.proj.weight.mul_(-1.0)
    assert not torch.equal(before, cached_equals_fresh(model, X))


def test_replaced_parameter_and_data_assignment_invalidate() -> None:
    model = _tiny()
    before = cached_equals_fresh(model, X)
    model.proj.weight = nn.Parameter(-model.proj.weight.detach().clone())
    mid = cached_equals_fresh(model, X)
    assert not torch.equal(before, mid)
    model.proj.weight.data = -model.proj.weight.detach().clone()  # new storage
    assert torch.equal(cached_equals_fresh(model, X), before)


def test_writes_through_data_need_clear_weight_cache() -> None:
    """``.data`` hides a write from ``_version``: the documented remedy restores a fresh weight."""
    model = _tiny()
    before = cached_equals_fresh(model, X)
    model.proj.weight.data.mul_(-1.0)
    model.proj.clear_weight_cache()
    assert not torch.equal(before, cached_equals_fresh(model, X))


def test_quant_disabled_and_enabled_flags_invalidate() -> None:
    model = _tiny()
    q_out = cached_equals_fresh(model, X)
    with quant_disabled(model):
        fp_out = cached_equals_fresh(model, X)
    assert not torch.equal(q_out, fp_out)
    assert torch.equal(cached_equals_fresh(model, X), q_out)


def test_weight_adapter_changes_invalidate() -> None:
    """The adapter slot: attaching, an in-place update of its parameter, a new scaling (a plain
    attribute), removing it."""
    model = _tiny()
    base = cached_equals_fresh(model, X)
    layer: QuantLinear = model.proj
    adapter = WeightDelta(layer.weight.shape)
    layer.set_adapter(adapter)
    assert torch.equal(cached_equals_fresh(model, X), base)  # D = 0
    with torch.no_grad():
        adapter.d.normal_(generator=torch.Generator().manual_seed(0))
    with_delta = cached_equals_fresh(model, X)
    assert not torch.equal(with_delta, base)
    adapter.scaling = 0.0
    assert torch.equal(cached_equals_fresh(model, X), base)
    adapter.scaling = 1.0
    assert torch.equal(cached_equals_fresh(model, X), with_delta)
    layer.set_adapter(None)
    assert torch.equal(cached_equals_fresh(model, X), base)


def test_adapter_training_step_invalidates() -> None:
    model = _tiny()
    layer = model.proj
    adapter = WeightDelta(layer.weight.shape)
    layer.set_adapter(adapter)
    before = cached_equals_fresh(model, X)
    model.requires_grad_(False)
    adapter.d.requires_grad_(True)
    optimizer = torch.optim.Adam([adapter.d], lr=0.1)
    model.train()
    model(X).square().sum().backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(before, cached_equals_fresh(model, X))


def test_custom_rounding_is_not_cached_and_a_baked_weight_is_seen() -> None:
    """AdaRound's sequence: set a rounding (its state lives outside the module: no caching),
    remove it, write the hard-rounded weight through ``.data`` (no ``_version`` bump): the stale
    pre-rounding weight must not come back."""
    model = _tiny()
    layer = model.proj
    q = layer.weight_quantizer
    before = cached_equals_fresh(model, X)
    calls = []

    def floor_rounding(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.floor(v)

    q.set_rounding(floor_rounding)
    with torch.no_grad():
        layer.quantized_weight()
        layer.quantized_weight()
        baked = layer.quantized_weight().clone()
    assert len(calls) == 3  # called every time: not cached
    q.set_rounding(None)
    layer.weight.data.copy_(baked)
    after = cached_equals_fresh(model, X)
    assert not torch.equal(before, after)


def test_observer_sees_every_call() -> None:
    model = _tiny()
    cached_equals_fresh(model, X)
    seen = []
    model.proj.weight_quantizer.observer = lambda q, x: seen.append(x.shape)
    with torch.no_grad():
        model(X)
        model(X)
    assert len(seen) == 2
    model.proj.weight_quantizer.observer = None
    cached_equals_fresh(model, X)


class StagedBinarizer(Binarizer):
    """Two bases ``σ₁·sign(w) + σ₂·sign(r)`` until a stage buffer switches to one (the shape of
    BinaryDM's EBB): state in a parameter and a buffer."""

    def __init__(self, out_channels: int) -> None:
        super().__init__("staged")
        self.sigma1 = nn.Parameter(torch.full((out_channels,), 0.1))
        self.sigma2 = nn.Parameter(torch.full((out_channels,), 0.05))
        self.register_buffer("stage", torch.ones((), dtype=torch.long))

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (w.dim() - 1)
        b1 = self.sigma1.reshape(view) * sign_clip_ste(w)
        if int(self.stage) != 1:
            return b1
        return b1 + self.sigma2.reshape(view) * sign_clip_ste(w - b1)


def test_binarizers_learnt_scale_weight_and_stage_invalidate() -> None:
    """Binary layers go through the same path: α learnt by an optimizer step (``sign``), α
    recomputed from an edited weight (``xnor``), a stage buffer switched in place."""
    torch.manual_seed(0)
    model = Tiny()
    quantize_(model, {"name": "w1a32", "weight": {"bits": 1}, "act": {"bits": None},
                      "first_last_bits": None, "time_emb_bits": None})
    binarize_(model, lambda name, _m: BinarySpec(weight="xnor" if name == "conv" else "sign"))
    model.eval()
    before = cached_equals_fresh(model, X)
    optimizer = torch.optim.SGD([model.proj.weight_quantizer.alpha], lr=1.0)
    model.train()
    model(X).square().sum().backward()
    optimizer.step()
    model.eval()
    stepped = cached_equals_fresh(model, X)
    assert not torch.equal(before, stepped)
    with torch.no_grad():
        model.conv.weight[0].mul_(3.0)  # xnor: α = mean|w| of the edited weight
    edited = cached_equals_fresh(model, X)
    assert not torch.equal(stepped, edited)
    model.conv.weight_quantizer = StagedBinarizer(model.conv.out_channels)
    two = cached_equals_fresh(model, X)
    assert not torch.equal(edited, two)
    with torch.no_grad():
        model.conv.weight_quantizer.stage.fill_(2)
    assert not torch.equal(two, cached_equals_fresh(model, X))


def test_dtype_change_copy_and_pickle() -> None:
    """``.double()`` drops the float32 weight; a deepcopy has its own cache; a whole pickled
    module (weak references inside the cache) saves and loads."""
    model = _tiny()
    out32 = cached_equals_fresh(model, X)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.proj.weight.mul_(-1.0)
    assert not torch.equal(cached_equals_fresh(twin, X), out32)
    assert torch.equal(cached_equals_fresh(model, X), out32)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(cached_equals_fresh(loaded, X), out32)
    model.double()
    out64 = cached_equals_fresh(model, X.double())
    assert out64.dtype == torch.float64


def test_timestep_aware_weight_quantizer_is_not_cached() -> None:
    model = _tiny()
    q = model.proj.weight_quantizer
    q.timestep_aware = True  # a quantizer whose weight grid follows the denoising step
    with torch.no_grad():
        assert model.proj.quantized_weight() is not model.proj.quantized_weight()


def test_set_weight_cache_switch() -> None:
    model = _tiny()
    assert set_weight_cache_(model, False) == 2
    with torch.no_grad():
        assert model.proj.quantized_weight() is not model.proj.quantized_weight()
    set_weight_cache_(model, True)
    with torch.no_grad():
        assert model.proj.quantized_weight() is model.proj.quantized_weight()


def test_quant_config_object_path() -> None:
    """quantize_ with a QuantConfig preset (the pipeline's path) caches too."""
    torch.manual_seed(0)
    model = Tiny()
    quantize_(model, QuantConfig.from_dict(W4A8))
    calibrate_(model.eval(), [{"x": X}])
    cached_equals_fresh(model, X)
