"""``calibrate_``: initialise activation quantizers from forward passes on calibration data.

Each batch is a dict of forward kwargs holding one timestep (Q-Diffusion's timestep-stratified
calibration set: x_t of an FP sampling trajectory at ``calib_steps`` steps). During the passes every
static activation quantizer observes its input — per timestep bucket when it is timestep-aware —
and the model runs unquantized activations (weights quantized by default, as in Q-Diffusion/BRECQ
where activation ranges are set with quantized weights). Memory stays bounded: exact running
min/max per scale entry plus a weighted reservoir sample (Efraimidis–Spirakis A-Res) of at most
``max_samples`` values per quantizer and bucket for the MSE/percentile inits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .modules import QuantModuleMixin
from .quantize import act_quantizers, quant_disabled, weight_quantizers
from .quantizers import UniformQuantizer, init_qparams, qparams_from_range


@dataclass
class _BucketStats:
    xmin: Tensor | None = None  # [G]
    xmax: Tensor | None = None
    samples: Tensor | None = None  # [G, m] columns of the rows view
    keys: Tensor | None = None  # [m] reservoir keys (log-space, larger is kept)
    calls: int = 0

    def update(self, rows: Tensor, max_cols: int | None, generator: torch.Generator) -> None:
        mn, mx = rows.amin(dim=1), rows.amax(dim=1)
        self.xmin = mn if self.xmin is None else torch.minimum(self.xmin, mn)
        self.xmax = mx if self.xmax is None else torch.maximum(self.xmax, mx)
        self.calls += 1
        if max_cols is None:
            return
        m = rows.shape[1]
        k = min(m, max_cols)
        # drawn from the calibration's own generator: the result never depends on global RNG state
        idx = torch.randperm(m, generator=generator)[:k] if m <= 8 * max_cols else \
            torch.randint(m, (k,), generator=generator)
        idx = idx.to(rows.device)
        # A-Res: each of the k candidates stands for m/k elements; key = log(u) / weight
        keys = (torch.rand(k, generator=generator).log() / (m / k)).to(rows.device)
        cols = rows[:, idx]
        if self.samples is not None:
            cols = torch.cat([self.samples, cols], dim=1)
            keys = torch.cat([self.keys, keys])
        if keys.numel() > max_cols:
            keep = keys.topk(max_cols).indices
            cols, keys = cols[:, keep], keys[keep]
        self.samples, self.keys = cols, keys


class ActObserver:
    """Statistics of one activation quantizer, keyed by timestep bucket (``None`` = one bucket)."""

    def __init__(self, quantizer: UniformQuantizer, max_samples: int,
                 generator: torch.Generator) -> None:
        self.generator = generator
        self.buckets: dict[float | None, _BucketStats] = {}
        needs_samples = quantizer.spec.init != "minmax"
        g = max(1, quantizer.num_scales // max(1, getattr(quantizer, "num_buckets", 1)))
        self.max_cols = max(16, max_samples // g) if needs_samples else None

    def __call__(self, quantizer: UniformQuantizer, x: Tensor) -> None:
        key = None
        if quantizer.timestep_aware:
            t = quantizer.timestep
            if t is None:
                raise RuntimeError(
                    f"calibrating timestep-aware quantizer {quantizer.name}: no timestep was set; "
                    f"pass `timestep` in each calibration batch.")
            key = float(t)
        rows = quantizer.rows(x.detach().float())
        st = self.buckets.setdefault(key, _BucketStats())
        st.update(rows, self.max_cols, self.generator)
        if not (torch.isfinite(st.xmin).all() and torch.isfinite(st.xmax).all()):
            where = "" if key is None else f" at timestep {key:g}"
            raise FloatingPointError(
                f"calibrating {quantizer.name}: its input holds NaN/inf{where} (call "
                f"{st.calls}), so no range can be set. Fix: check the calibration data (FP "
                f"trajectories, guidance scale) and the model's weights.")

    @torch.no_grad()
    def finalize(self, quantizer: UniformQuantizer) -> bool:
        """Set the quantizer's Δ/zero point per bucket; False if it never saw data."""
        if not self.buckets:
            return False
        keys = sorted(self.buckets, key=lambda k: -math.inf if k is None else k)
        scales, zps = [], []
        for k in keys:
            st = self.buckets[k]
            if quantizer.spec.init == "minmax":
                s, z = qparams_from_range(st.xmin, st.xmax, quantizer.bits, quantizer.spec.symmetric)
            else:
                s, z = init_qparams(st.samples, quantizer.spec, st.xmin, st.xmax)
            scales.append(s)
            zps.append(z)
        zp = None if zps[0] is None else torch.stack(zps)
        if quantizer.timestep_aware and keys != [None]:
            quantizer.set_qparams(torch.stack(scales), zp, timesteps=torch.tensor(keys))
        else:
            quantizer.set_qparams(scales[0], None if zp is None else zp[0])
        return True


@dataclass
class CalibrationResult:
    """What :func:`calibrate_` saw and set."""

    num_batches: int = 0
    timesteps: list[float] = field(default_factory=list)
    calibrated: int = 0
    dynamic: int = 0
    never_called: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "timesteps": self.timesteps,
                "calibrated": self.calibrated, "dynamic": self.dynamic,
                "never_called": self.never_called}


def _to_device(batch: Mapping[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Mapping[str, Any]], *, max_samples: int = 4096,
               quantized_weights: bool = True, reinit_weights: bool = False,
               device: torch.device | str | None = None, progress: bool = False,
               seed: int = 0) -> CalibrationResult:
    """Initialise every static activation quantizer of a :func:`quantize_`-d model.

    ``batches``: dicts of forward kwargs, e.g. ``{"sample": x_t, "timestep": t, "class_labels":
    y}``, each with a single timestep value. ``max_samples`` bounds the values kept per quantizer
    and timestep bucket for the MSE/percentile inits. ``quantized_weights=False`` observes the
    fully FP model. Weight quantizers keep the Δ set by ``quantize_`` (or a checkpoint; those never
    initialised are initialised now); ``reinit_weights`` re-derives every weight Δ from the current
    weights — not after AdaRound, whose weights already sit on the grid. ``seed`` fixes the
    random subsample kept for those inits, so a calibration is reproducible.
    """
    for m in model.modules():  # weights: from quantize_, or now if asked / never initialised
        if isinstance(m, QuantModuleMixin) and (
                reinit_weights or not all(q.is_initialized for q in m.weight_quantizers())):
            m.init_weight_quantizers()
    static = [q for q in act_quantizers(model) if not (q.passthrough or q.dynamic)]
    result = CalibrationResult(dynamic=sum(q.dynamic for q in act_quantizers(model)))
    generator = torch.Generator().manual_seed(seed)  # the MSE/percentile samples' reservoir
    observers = {id(q): ActObserver(q, max_samples, generator) for q in static}
    for q in static:
        q.observer = observers[id(q)]
    seen_t: set[float] = set()
    try:
        with quant_disabled(model, weight=not quantized_weights, act=False):
            it = batches
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(batches, desc="calibrate", leave=False)
            for batch in it:
                batch = _to_device(batch, device)
                if "timestep" in batch and batch["timestep"] is not None:
                    seen_t.add(float(torch.as_tensor(batch["timestep"]).reshape(-1)[0]))
                model(**batch)
                result.num_batches += 1
    finally:
        for q in static:
            q.observer = None
    for q in static:
        if observers[id(q)].finalize(q):
            result.calibrated += 1
        else:
            result.never_called.append(q.name)
    result.timesteps = sorted(seen_t)
    if not weight_quantizers(model) and not static:
        raise ValueError("calibrate_: the model has no quantizers; call quantize_(model, config) first.")
    return result
