"""FP sampling trajectories: the data of calibration and data-free distillation.

Q-Diffusion's recipe: run the FP sampler (the sampler used for evaluation) from pure noise, keep
x_t at ``calib_steps`` uniformly spaced steps for ``calib_n`` samples, and feed the denoiser
both its conditional and its unconditional input when classifier-free guidance is on. The set is
generated once per (model, sampler, seed, sizes) and cached on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.models.adapter import Denoiser
from lowbit.sampling import SamplerConfig, check_finite, sample_many

log = logging.getLogger(__name__)


@dataclass
class TrajectorySet:
    """x_t ``[S, N, ...]`` at timesteps ``[S]`` for conditioning ``cond`` ``[N, ...]`` (or None),
    S kept steps × N samples, and the adapter that turns them into network inputs."""

    xt: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor | None
    guidance_scale: float
    denoiser: Denoiser

    def __len__(self) -> int:
        return self.xt.shape[0] * self.xt.shape[1]

    @property
    def num_samples(self) -> int:
        return self.xt.shape[1]

    def batch(self, s: int, idx: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``{"x", "t", "cond"}`` at kept step ``s`` for samples ``idx`` as the network sees them
        during sampling: conditional and (with guidance) unconditional halves in one batch."""
        x = self.xt[s, idx]
        t = self.timesteps[s].expand(len(idx))
        c = self.cond[idx] if self.cond is not None else None
        x, t, c = self.denoiser.guidance_batch(x, t, c, self.guidance_scale)
        return {"x": x, "t": t, "cond": c}

    def model_inputs(self, s: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network's forward kwargs for :meth:`batch` (what :func:`calibrate_` feeds)."""
        b = self.batch(s, idx)
        return self.denoiser.inputs(b["x"], b["t"], b["cond"])

    def batches(self, batch_size: int, steps: list[int] | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Network kwargs in batches with a single timestep each (timestep-aware quantizers
        need that)."""
        g = torch.Generator().manual_seed(seed)
        n = self.xt.shape[1]
        for s in steps if steps is not None else range(self.xt.shape[0]):
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for i in range(0, n, batch_size):
                yield self.model_inputs(s, order[i : i + batch_size])

    def split(self, n_holdout: int) -> tuple[TrajectorySet, TrajectorySet]:
        """Calibration / held-out parts (by sample), for measuring methods on unseen inputs."""
        a, b = self.xt[:, :-n_holdout], self.xt[:, -n_holdout:]
        ca = self.cond[:-n_holdout] if self.cond is not None else None
        cb = self.cond[-n_holdout:] if self.cond is not None else None

        def mk(x: torch.Tensor, c: torch.Tensor | None) -> TrajectorySet:
            return TrajectorySet(x, self.timesteps, c, self.guidance_scale, self.denoiser)

        return mk(a, ca), mk(b, cb)


def kept_step_indices(num_steps: int, calib_steps: int) -> list[int]:
    """``calib_steps`` uniformly spaced indices into a ``num_steps`` schedule (both ends kept)."""
    calib_steps = min(calib_steps, num_steps)
    if calib_steps == 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (calib_steps - 1)) for i in range(calib_steps)})


#: bump when what a cached trajectory file holds, or how it is generated, changes
CACHE_FORMAT = 2


def _cache_key(model_id: str, sampler: SamplerConfig, n: int, calib_steps: int, seed: int,
               conditions: torch.Tensor | Sequence[str] | None = None,
               denoiser: Denoiser | None = None) -> str:
    """Everything that shapes the cached data: the model (name + weights), its noise schedule
    and sample shape, every sampler field (``batch_size`` too: batch ``b`` draws its noise from
    ``seed + b``), the scheduler options lowbit derives, the sizes, the seed and the conditions."""
    from lowbit.sampling import scheduler_options

    cond = (None if conditions is None else
            conditions.tolist() if isinstance(conditions, torch.Tensor) else list(conditions))
    schedule = dict(denoiser.noise_schedule) if denoiser is not None else None
    blob = json.dumps([CACHE_FORMAT, model_id, dataclasses.asdict(sampler),
                       scheduler_options(schedule or {}, sampler.kind), schedule,
                       list(denoiser.sample_shape) if denoiser is not None else None,
                       denoiser.conditioning if denoiser is not None else None,
                       n, calib_steps, seed, cond], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identifies the weights (not just the name), so a retrained model never reuses a cache."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(float(v.float().sum())).encode())
    return h.hexdigest()[:16]


def fp_trajectories(denoiser: Denoiser, sampler: SamplerConfig, n: int, calib_steps: int,
                    seed: int, cache_dir: Path | None,
                    conditions: torch.Tensor | Sequence[str] | None = None) -> TrajectorySet:
    """Generate (or load from ``cache_dir``) FP trajectories of ``n`` samples; conditioning from
    ``conditions`` (labels or prompts, see :meth:`Denoiser.make_cond`; default: classes evenly)."""
    key = _cache_key(f"{denoiser.name}:{model_fingerprint(denoiser.net)}", sampler, n,
                     calib_steps, seed, conditions, denoiser)
    name = denoiser.name or "model"
    path = Path(cache_dir) / "trajectories" / f"{name}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            d = load_file(str(path))
            check_finite(d["xt"], f"cached trajectories {path}", "it is regenerated")
            return TrajectorySet(d["xt"], d["timesteps"], d.get("cond"), sampler.guidance_scale,
                                 denoiser)
        except Exception as e:  # noqa: BLE001 - a broken cache file is regenerated, not fatal
            log.warning("trajectory cache %s unreadable (%s); regenerating", path, e)

    keep = set(kept_step_indices(sampler.steps, calib_steps))
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in sorted(keep)}
    ts: dict[int, torch.Tensor] = {}

    def grab(i: int, t: torch.Tensor, x_in: torch.Tensor, _eps: torch.Tensor) -> None:
        if i in keep:
            xs[i].append(x_in.detach().cpu())
            ts[i] = t.detach().cpu().reshape(())

    cond = denoiser.make_cond(conditions, n)
    sample_many(denoiser, sampler, cond, n, seed=seed, callback=grab, progress=False)
    order = sorted(keep)
    for i in order:  # sample() checked every ε; the kept inputs are what calibration reads
        for x in xs[i]:
            check_finite(x, f"FP trajectories (x_t at step {i})", "check sampler.guidance_scale "
                            "and the FP model")
    traj = TrajectorySet(torch.stack([torch.cat(xs[i]) for i in order]),
                         torch.stack([ts[i] for i in order]).long(), cond,
                         sampler.guidance_scale, denoiser)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent jobs share the cache
        tensors = {"xt": traj.xt.contiguous(), "timesteps": traj.timesteps}
        if cond is not None:
            tensors["cond"] = cond.contiguous()
        save_file(tensors, str(tmp))
        tmp.replace(path)
    return traj
