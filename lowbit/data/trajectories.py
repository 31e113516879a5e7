"""FP sampling trajectories: the data of calibration and data-free distillation.

Q-Diffusion's recipe: run the FP sampler (the sampler used for evaluation) from pure noise, keep
x_t at ``calib_steps`` uniformly spaced steps for ``calib_n`` samples, and feed the denoiser
both its conditional and its unconditional input when classifier-free guidance is on. The set is
generated once per (model, sampler, seed, sizes) and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.models import LoadedModel
from lowbit.sampling import GuidedDenoiser, SamplerConfig, sample_many

log = logging.getLogger(__name__)


@dataclass
class TrajectorySet:
    """x_t [S, N, ...] at timesteps t [S] for labels [N] (S kept steps, N samples)."""

    xt: torch.Tensor
    timesteps: torch.Tensor
    labels: torch.Tensor
    guidance_scale: float
    null_class: int | None
    conditional: bool = True

    def __len__(self) -> int:
        return self.xt.shape[0] * self.xt.shape[1]

    def model_inputs(self, s: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Denoiser kwargs at kept step ``s`` for samples ``idx`` — conditional and (with
        guidance) unconditional halves in one batch, exactly as sampling calls the model."""
        x, y = self.xt[s, idx], self.labels[idx]
        t = self.timesteps[s].expand(len(idx))
        if not self.conditional:
            return {"sample": x, "timestep": t}
        if self.null_class is not None and self.guidance_scale != 1.0:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            y = torch.cat([y, torch.full_like(y, self.null_class)])
        return {"sample": x, "timestep": t, "class_labels": y}

    def batches(self, batch_size: int, steps: list[int] | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches with a single timestep each (timestep-aware quantizers need that)."""
        g = torch.Generator().manual_seed(seed)
        n = self.xt.shape[1]
        for s in steps if steps is not None else range(self.xt.shape[0]):
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for i in range(0, n, batch_size):
                yield self.model_inputs(s, order[i : i + batch_size])

    def split(self, n_holdout: int) -> tuple[TrajectorySet, TrajectorySet]:
        """Calibration / held-out parts (by sample), for measuring methods on unseen inputs."""
        a, b = self.xt[:, :-n_holdout], self.xt[:, -n_holdout:]
        la, lb = self.labels[:-n_holdout], self.labels[-n_holdout:]
        def mk(x: torch.Tensor, y: torch.Tensor) -> TrajectorySet:
            return TrajectorySet(x, self.timesteps, y, self.guidance_scale, self.null_class,
                                 self.conditional)

        return mk(a, la), mk(b, lb)


def kept_step_indices(num_steps: int, calib_steps: int) -> list[int]:
    """``calib_steps`` uniformly spaced indices into a ``num_steps`` schedule (both ends kept)."""
    calib_steps = min(calib_steps, num_steps)
    if calib_steps == 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (calib_steps - 1)) for i in range(calib_steps)})


def _cache_key(model_id: str, sampler: SamplerConfig, n: int, calib_steps: int, seed: int) -> str:
    blob = json.dumps([model_id, sampler.kind, sampler.steps, sampler.eta, sampler.guidance_scale,
                       n, calib_steps, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identifies the weights (not just the name), so a retrained model never reuses a cache."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(float(v.float().sum())).encode())
    return h.hexdigest()[:16]


def fp_trajectories(loaded: LoadedModel, sampler: SamplerConfig, n: int, calib_steps: int,
                    seed: int, cache_dir: Path | None) -> TrajectorySet:
    """Generate (or load from ``cache_dir``) FP trajectories of ``n`` samples, evenly over classes."""
    conditional = loaded.conditioning == "class"
    key = _cache_key(f"{loaded.name}:{model_fingerprint(loaded.denoiser)}", sampler, n,
                     calib_steps, seed)
    path = Path(cache_dir) / "trajectories" / f"{loaded.name}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            d = load_file(str(path))
            return TrajectorySet(d["xt"], d["timesteps"], d["labels"], sampler.guidance_scale,
                                 loaded.null_class, conditional)
        except Exception as e:  # noqa: BLE001 - a broken cache file is regenerated, not fatal
            log.warning("trajectory cache %s unreadable (%s); regenerating", path, e)

    keep = set(kept_step_indices(sampler.steps, calib_steps))
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in sorted(keep)}
    ts: dict[int, torch.Tensor] = {}

    def grab(i: int, t: torch.Tensor, x_in: torch.Tensor, _eps: torch.Tensor) -> None:
        if i in keep:
            xs[i].append(x_in.detach().cpu())
            ts[i] = t.detach().cpu().reshape(())

    labels = torch.arange(n) % max(loaded.num_classes, 1)
    denoiser = GuidedDenoiser(loaded.denoiser, loaded.null_class, conditional)
    sample_many(denoiser, loaded.noise_schedule, sampler, labels, loaded.sample_shape, seed=seed,
                callback=grab, progress=False)
    order = sorted(keep)
    traj = TrajectorySet(torch.stack([torch.cat(xs[i]) for i in order]),
                         torch.stack([ts[i] for i in order]).long(), labels,
                         sampler.guidance_scale, loaded.null_class, conditional)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"xt": traj.xt.contiguous(), "timesteps": traj.timesteps, "labels": labels},
                  str(tmp))
        tmp.replace(path)
    return traj
