"""AdaRound / BRECQ block reconstruction of weight rounding (Q-Diffusion's weight PTQ).

For each reconstruction unit — a ``ResnetBlock2D``, ``BasicTransformerBlock`` or stand-alone
``Attention`` (BRECQ's block granularity), or any quantized layer outside such blocks — the rounding
of every weight is learnt: ``W̃ = Δ·(clamp(⌊W/Δ⌋ + h(V) + z) − z)`` with the rectified sigmoid
``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1 (Nagel et al. 2020, Eq. 22–23), minimising

    ‖f(x̂) − f_FP(x)‖² (summed over channels, BRECQ's rec loss) + λ Σ (1 − |2h(V) − 1|^β)   (Eq. 24)

with λ = 0.01 and β annealed 20 → 2 after a warm-up of 20 % of the iterations (no rounding loss
during warm-up). Afterwards rounding is hard (h ∈ {0, 1}) and written back into ``weight`` as the
dequantized grid values, so the weight quantizer reproduces exactly those integers and the module
keeps its structure and state_dict keys.

Resumable: with ``state_dir`` each finished unit's weights and weight-quantizer state are saved
(``<index>_<name>.pt``, loaded with ``weights_only=True``); a re-run restores them and skips the unit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .modules import QuantModuleMixin
from .quantize import quant_disabled, set_timestep
from .quantizers import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (Eq. 23)
BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock", "Attention")


@dataclass
class AdaRoundConfig:
    iters: int = 20000  # per unit (Q-Diffusion: 20k)
    lr: float = 1e-3  # Adam on V (BRECQ default for weights)
    reg_weight: float = 0.01  # λ of the rounding loss
    beta: tuple[float, float] = (20.0, 2.0)  # temperature annealed from → to
    warmup: float = 0.2  # fraction of iterations with no rounding loss and β fixed
    granularity: str = "block"  # block | layer
    block_types: tuple[str, ...] = BLOCK_TYPES  # class names that form one unit
    include: tuple[str, ...] = ("*",)  # unit names to reconstruct (fnmatch)
    input_from: str = "quant"  # quant: inputs from the partly quantized model (BRECQ/Q-Diffusion); fp
    act_quant: bool = False  # quantize activations during reconstruction (needs calibrate_ first)
    store_device: str | None = None  # where captured unit inputs live; "cpu" saves accelerator memory
    # rows per iteration, drawn from one captured calibration batch (BRECQ/Q-Diffusion: 32);
    # None: the whole captured batch
    batch_size: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str = "adaround") -> AdaRoundConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                             f"allowed: {', '.join(f.name for f in fields(cls))}.")
        return cls(**d)

    def __post_init__(self) -> None:
        self.beta = tuple(float(b) for b in self.beta)
        self.block_types, self.include = tuple(self.block_types), tuple(self.include)
        if len(self.beta) != 2:
            raise ValueError(f"adaround.beta={list(self.beta)} must be [start, end].")
        if self.granularity not in ("block", "layer"):
            raise ValueError(f"adaround.granularity={self.granularity!r}; allowed: block, layer.")
        if self.input_from not in ("quant", "fp"):
            raise ValueError(f"adaround.input_from={self.input_from!r}; allowed: quant, fp.")
        if self.iters < 1:
            raise ValueError(f"adaround.iters={self.iters} must be >= 1.")
        if self.batch_size is not None and (isinstance(self.batch_size, bool)
                                            or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"adaround.batch_size={self.batch_size!r} must be a positive "
                             f"integer or null (the whole captured batch).")


class AdaRoundRounding:
    """Learnable rounding of ``v = W/Δ``: ``⌊v⌋ + h(V)``, hard ``⌊v⌋ + 1[h(V) ≥ 0.5]``."""

    def __init__(self) -> None:
        self.alpha: nn.Parameter | None = None  # V, created on the first call (shape of W/Δ)
        self.hard = False

    def init_from(self, v: Tensor) -> None:
        rest = (v - torch.floor(v)).detach().float()
        # V such that h(V) equals the fractional part: start at the FP weight (AdaRound init)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def __call__(self, v: Tensor) -> Tensor:
        if self.alpha is None:
            self.init_from(v)
        h = (self.h() >= 0.5).to(v.dtype) if self.hard else self.h()
        return torch.floor(v.detach()) + h

    def regularizer(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()  # AdaRound Eq. 24


def beta_at(it: int, cfg: AdaRoundConfig) -> float:
    """BRECQ's LinearTempDecay: β fixed during warm-up, then linear from β_start to β_end."""
    start = cfg.warmup * cfg.iters
    if it < start:
        return cfg.beta[0]
    rel = (it - start) / max(1.0, cfg.iters - start)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * max(0.0, 1.0 - rel)


# ------------------------------------------------------------------------------------------------
# units and captured data
# ------------------------------------------------------------------------------------------------
def _quant_layers(module: nn.Module) -> list[QuantModuleMixin]:
    return [m for m in module.modules() if isinstance(m, QuantModuleMixin)
            and not all(q.passthrough for q in m.weight_quantizers())]


def reconstruction_units(model: nn.Module, cfg: AdaRoundConfig) -> list[tuple[str, nn.Module]]:
    """Units in registration order: blocks (``block_types``) or quantized layers outside them."""
    units: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        is_block = cfg.granularity == "block" and type(m).__name__ in cfg.block_types
        if is_block and _quant_layers(m):
            units.append((name, m))
            taken.append(name)
        elif isinstance(m, QuantModuleMixin) and _quant_layers(m):
            units.append((name, m))
    return [(n, m) for n, m in units if any(fnmatch.fnmatchcase(n, p) for p in cfg.include)]


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the unit."""


def _detach(x: Any, device: str | None) -> Any:
    if isinstance(x, Tensor):
        return x.detach().to(device) if device else x.detach()
    if isinstance(x, tuple | list):
        return type(x)(_detach(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _detach(v, device) for k, v in x.items()}
    return x


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot read a tensor from a block output of type {type(out).__name__}")


@dataclass
class _Captured:
    args: tuple
    kwargs: dict
    timestep: Any


@torch.no_grad()
def capture_inputs(model: nn.Module, unit: nn.Module, batches: list[Mapping[str, Any]],
                   store_device: str | None = None) -> list[_Captured]:
    """The unit's (args, kwargs) on its first call in each forward pass over ``batches``; the pass
    stops at the unit."""
    records: list[_Captured] = []
    current: dict[str, Any] = {}

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        records.append(_Captured(_detach(args, store_device), _detach(kwargs, store_device),
                                 current.get("timestep")))
        raise _Stop

    handle = unit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            current["timestep"] = batch.get("timestep")
            with contextlib.suppress(_Stop):
                model(**batch)
    finally:
        handle.remove()
    return records


def _to(x: Any, device: torch.device) -> Any:
    return _detach(x, str(device))


def _rows(c: _Captured, target: Tensor, n: int | None, rng: random.Random
          ) -> tuple[_Captured, Tensor]:
    """``n`` random rows of a captured batch and its target (every tensor whose first axis is
    the batch's, indexed alike); all of it when ``n`` is None or not smaller."""
    rows = int(target.shape[0])
    if n is None or n >= rows:
        return c, target
    idx = torch.tensor(sorted(rng.sample(range(rows), n)))

    def pick(x: Any) -> Any:
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == rows:
            return x[idx.to(x.device)]
        if isinstance(x, (list, tuple)):
            return type(x)(pick(v) for v in x)
        if isinstance(x, dict):
            return {k: pick(v) for k, v in x.items()}
        return x

    return _Captured(pick(c.args), pick(c.kwargs), c.timestep), target[idx.to(target.device)]


def _run_unit(unit: nn.Module, c: _Captured, device: torch.device) -> Tensor:
    set_timestep(unit, c.timestep)
    return _first_tensor(unit(*_to(c.args, device), **_to(c.kwargs, device)))


def rec_loss(out: Tensor, target: Tensor) -> Tensor:
    """BRECQ's ``lp_loss(p=2)``: squared error summed over dim 1 (channels), averaged over the rest."""
    d = (out.float() - target.float()).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


# ------------------------------------------------------------------------------------------------
# reconstruction
# ------------------------------------------------------------------------------------------------
@dataclass
class UnitResult:
    name: str
    loss_nearest: float | None = None  # rec loss with round-to-nearest, before
    loss_final: float | None = None  # rec loss with the learnt hard rounding, after
    resumed: bool = False
    skipped: str = ""


@dataclass
class AdaRoundResult:
    units: list[UnitResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"units": [asdict(u) for u in self.units]}


def _attach_rounding(unit: nn.Module) -> list[tuple[UniformQuantizer, AdaRoundRounding]]:
    out = []
    layers = _quant_layers(unit)
    for layer in layers:
        for q in layer.weight_quantizers():
            if not q.passthrough:
                r = AdaRoundRounding()
                q.set_rounding(r)
                out.append((q, r))
    with torch.no_grad():  # first call creates V from W/Δ
        for layer in layers:
            layer.quantized_weight()
    return out


@torch.no_grad()
def _bake_hard_rounding(unit: nn.Module, rounders: list[tuple[UniformQuantizer, AdaRoundRounding]]
                        ) -> None:
    for _, r in rounders:
        r.hard = True
    layers = _quant_layers(unit)
    new_weights = [layer.quantized_weight() for layer in layers]
    for q, _ in rounders:
        q.set_rounding(None)
    for layer, w in zip(layers, new_weights, strict=True):
        layer.weight.copy_(w.to(layer.weight.dtype))  # no_grad: bumps _version


def _eval_loss(unit: nn.Module, data: list[_Captured], targets: list[Tensor],
               device: torch.device) -> float:
    with torch.no_grad():
        return float(sum(rec_loss(_run_unit(unit, c, device), t.to(device))
                         for c, t in zip(data, targets, strict=True)) / max(1, len(data)))


def _unit_file(state_dir: Path, index: int, name: str) -> Path:
    return state_dir / f"{index:04d}_{name or 'model'}.pt"


def _unit_state(unit: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in unit.state_dict().items()
            if k.endswith("weight") or ".weight_quantizer" in k or k.startswith("weight_quantizer")}


def adaround_(model: nn.Module, batches: Iterable[Mapping[str, Any]],
              config: AdaRoundConfig | Mapping[str, Any] | None = None, *,
              state_dir: str | Path | None = None, progress: bool = True) -> AdaRoundResult:
    """Learn the weight rounding of a :func:`quantize_`-d model, unit by unit (see module doc).

    ``batches``: calibration forward kwargs (each with one timestep), iterated several times.
    ``state_dir``: save each finished unit there and skip units already saved (resume).
    """
    from tqdm.auto import tqdm

    cfg = config if isinstance(config, AdaRoundConfig) else AdaRoundConfig.from_dict(config)
    batches = list(batches)
    if not batches:
        raise ValueError("adaround_: no calibration batches.")
    units = reconstruction_units(model, cfg)
    if not units:
        raise ValueError("adaround_: no quantized weights to reconstruct; call quantize_ first.")
    device = next(model.parameters()).device
    sdir = Path(state_dir) if state_dir is not None else None
    if sdir is not None:
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "adaround.json").write_text(json.dumps(asdict(cfg), indent=1))
    rng = random.Random(cfg.seed)
    result = AdaRoundResult()
    bar = tqdm(units, desc="adaround", disable=not progress)
    for index, (name, unit) in enumerate(bar):
        bar.set_postfix_str(name)
        res = UnitResult(name)
        result.units.append(res)
        path = _unit_file(sdir, index, name) if sdir is not None else None
        if path is not None and path.is_file():
            unit.load_state_dict(torch.load(path, map_location=device, weights_only=True),
                                 strict=False)
            res.resumed = True
            continue
        res.loss_nearest, res.loss_final, res.skipped = _reconstruct_unit(
            model, unit, batches, cfg, device, rng, progress)
        if path is not None and not res.skipped:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one run write the same file
            torch.save(_unit_state(unit), tmp)
            tmp.replace(path)  # atomic: a killed run never leaves a half-written unit
    return result


def _reconstruct_unit(model: nn.Module, unit: nn.Module, batches: list[Mapping[str, Any]],
                      cfg: AdaRoundConfig, device: torch.device, rng: random.Random,
                      progress: bool) -> tuple[float | None, float | None, str]:
    from tqdm.auto import tqdm

    with quant_disabled(model):
        fp_inputs = capture_inputs(model, unit, batches, cfg.store_device)
        if not fp_inputs:
            return None, None, "never called on the calibration batches"
        targets = [_run_unit(unit, c, device).detach() for c in fp_inputs]
        if cfg.store_device:
            targets = [t.to(cfg.store_device) for t in targets]
    with quant_disabled(model, weight=False, act=not cfg.act_quant):
        inputs = (fp_inputs if cfg.input_from == "fp"
                  else capture_inputs(model, unit, batches, cfg.store_device))
        loss_nearest = _eval_loss(unit, inputs, targets, device)
        params = [p for p in unit.parameters() if p.requires_grad]
        was_training = unit.training
        unit.eval()
        for p in params:
            p.requires_grad_(False)
        rounders = _attach_rounding(unit)
        try:
            opt = torch.optim.Adam([r.alpha for _, r in rounders], lr=cfg.lr)
            warm = cfg.warmup * cfg.iters
            it_bar = tqdm(range(cfg.iters), desc="iters", leave=False, disable=not progress)
            with torch.enable_grad():
                for it in it_bar:
                    i = rng.randrange(len(inputs))
                    c, target = _rows(inputs[i], targets[i], cfg.batch_size, rng)
                    loss = rec_loss(_run_unit(unit, c, device), target.to(device))
                    if it >= warm:
                        beta = beta_at(it, cfg)
                        loss = loss + cfg.reg_weight * sum(r.regularizer(beta) for _, r in rounders)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            _bake_hard_rounding(unit, rounders)
        finally:
            for q, _ in rounders:
                q.set_rounding(None)
            for p in params:
                p.requires_grad_(True)
            unit.train(was_training)
        loss_final = _eval_loss(unit, inputs, targets, device)
    return loss_nearest, loss_final, ""
