"""Activation step reconstruction (Q-Diffusion's second PTQ stage, after BRECQ/AdaRound weights).

With the weights on their reconstructed grid and the activation quantizers calibrated
(:func:`~lowbit.quant.calibrate_`), the activation step sizes Δ of each reconstruction unit (the
blocks of :func:`~lowbit.quant.adaround.reconstruction_units`) are learnt with LSQ's
straight-through gradient, minimising the same block-output loss as the weight stage,

    ‖f(x̂; Ŵ, Δ) − f_FP(x)‖²   (summed over channels, BRECQ's rec loss),

where x̂ is the unit's input in the partly quantized model (weights and activations of the units
before it quantized) and f_FP its FP output on the FP model's input. Adam at 4e-5 as in
BRECQ/Q-Diffusion's activation reconstruction; only Δ trains (zero points and weights are
frozen). Unit by unit, resumable like :func:`~lowbit.quant.adaround_`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adaround import (
    BLOCK_TYPES,
    AdaRoundConfig,
    _eval_loss,
    _run_unit,
    capture_inputs,
    rec_loss,
    reconstruction_units,
)
from .quantize import act_quantizers, quant_disabled
from .quantizers import MIN_SCALE


@dataclass
class ActReconConfig:
    iters: int = 5000  # per unit
    lr: float = 4e-5  # Adam on Δ (BRECQ / Q-Diffusion activation reconstruction)
    granularity: str = "block"  # block | layer: the units of the weight stage
    block_types: tuple[str, ...] = BLOCK_TYPES
    store_device: str | None = None  # where captured unit inputs live
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str = "act_recon") -> ActReconConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                             f"allowed: {', '.join(f.name for f in fields(cls))}.")
        return cls(**d)

    def __post_init__(self) -> None:
        self.block_types = tuple(self.block_types)
        if self.iters < 1:
            raise ValueError(f"act_recon.iters={self.iters} must be >= 1.")
        if not self.lr > 0:
            raise ValueError(f"act_recon.lr={self.lr} must be positive.")
        if self.granularity not in ("block", "layer"):
            raise ValueError(f"act_recon.granularity={self.granularity!r}; allowed: block, layer.")


@dataclass
class ActUnitResult:
    name: str
    quantizers: int = 0
    loss_before: float | None = None  # rec loss with the calibrated Δ
    loss_after: float | None = None  # with the learnt Δ
    resumed: bool = False
    skipped: str = ""


@dataclass
class ActReconResult:
    units: list[ActUnitResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"units": [asdict(u) for u in self.units]}


def _unit_file(state_dir: Path, index: int, name: str) -> Path:
    return state_dir / f"act_{index:04d}_{name or 'model'}.pt"


def act_reconstruct_(model: nn.Module, batches: Iterable[Mapping[str, Any]],
                     config: ActReconConfig | Mapping[str, Any] | None = None, *,
                     state_dir: str | Path | None = None, progress: bool = True
                     ) -> ActReconResult:
    """Learn the activation Δ of a quantized, calibrated model unit by unit (see module doc).
    ``state_dir``: each finished unit's Δ is saved there and a re-run restores it (resume)."""
    from tqdm.auto import tqdm

    cfg = config if isinstance(config, ActReconConfig) else ActReconConfig.from_dict(config)
    batches = list(batches)
    if not batches:
        raise ValueError("act_reconstruct_: no calibration batches.")
    static = [q for q in act_quantizers(model) if not (q.passthrough or q.dynamic)]
    if not static:
        raise ValueError("act_reconstruct_: no static activation quantizer; quantize_ activations "
                         "and calibrate_ first.")
    not_ready = [q.name for q in static if not q.is_initialized]
    if not_ready:
        raise ValueError(f"act_reconstruct_: {not_ready[0]} (and {len(not_ready) - 1} more) not "
                         f"calibrated; run calibrate_ first.")
    units = reconstruction_units(model, AdaRoundConfig(granularity=cfg.granularity,
                                                       block_types=cfg.block_types))
    device = next(model.parameters()).device
    sdir = Path(state_dir) if state_dir is not None else None
    if sdir is not None:
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "act_recon.json").write_text(json.dumps(asdict(cfg), indent=1))
    rng = random.Random(cfg.seed)
    result = ActReconResult()
    for index, (name, unit) in enumerate(tqdm(units, desc="act recon", disable=not progress)):
        qs = [q for q in act_quantizers(unit) if not (q.passthrough or q.dynamic)]
        res = ActUnitResult(name, quantizers=len(qs))
        result.units.append(res)
        if not qs:
            res.skipped = "no static activation quantizer"
            continue
        path = _unit_file(sdir, index, name) if sdir is not None else None
        if path is not None and path.is_file():
            saved = torch.load(path, map_location=device, weights_only=True)
            with torch.no_grad():
                for i, q in enumerate(qs):
                    q.scale.copy_(saved[str(i)])
            res.resumed = True
            continue
        res.loss_before, res.loss_after, res.skipped = _reconstruct_unit(
            model, unit, qs, batches, cfg, device, rng, progress)
        if path is not None and not res.skipped:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one run write the same file
            torch.save({str(i): q.scale.detach().cpu() for i, q in enumerate(qs)}, tmp)
            tmp.replace(path)
    return result


def _reconstruct_unit(model: nn.Module, unit: nn.Module, qs: list, batches: list,
                      cfg: ActReconConfig, device: torch.device, rng: random.Random,
                      progress: bool) -> tuple[float | None, float | None, str]:
    from tqdm.auto import tqdm

    with quant_disabled(model):
        fp_inputs = capture_inputs(model, unit, batches, cfg.store_device)
        if not fp_inputs:
            return None, None, "never called on the calibration batches"
        targets = [_run_unit(unit, c, device).detach() for c in fp_inputs]
    inputs = capture_inputs(model, unit, batches, cfg.store_device)
    before = _eval_loss(unit, inputs, targets, device)
    params = [p for p in unit.parameters() if p.requires_grad]
    grads = {id(p): p.requires_grad for q in qs for p in (q.scale, q.zero_point) if p is not None}
    was_training = unit.training
    unit.eval()
    for p in params:
        p.requires_grad_(False)
    for q in qs:
        q.set_learnable(scale=True, zero_point=False)
    try:
        opt = torch.optim.Adam([q.scale for q in qs], lr=cfg.lr)
        with torch.enable_grad():
            for _ in tqdm(range(cfg.iters), desc="iters", leave=False, disable=not progress):
                i = rng.randrange(len(inputs))
                loss = rec_loss(_run_unit(unit, inputs[i], device), targets[i].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # Δ stays a valid step
                    for q in qs:
                        q.scale.clamp_(min=MIN_SCALE)
    finally:
        for q in qs:
            for p in (q.scale, q.zero_point):
                if p is not None:
                    p.requires_grad_(grads[id(p)])
        for p in params:
            p.requires_grad_(True)
        unit.train(was_training)
    return before, _eval_loss(unit, inputs, targets, device), ""
