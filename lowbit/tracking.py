"""results.json (atomic) and Weights & Biases (offline by default).

results.json is always written before W&B is touched, and any W&B failure (no disk, bad key,
no network) is reported as a warning — never at the cost of the run's results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

RESULT_KEYS = ("model", "method", "bits", "dataset", "sampler", "metrics", "cost", "status",
               "config", "version")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def _finite(o: Any) -> Any:
    """JSON has no NaN/inf: store them as null rather than writing an invalid file."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mode of files lowbit writes through a temporary file (mkstemp creates 0600): what ``open``
#: would create, 0644 under the usual umask
FILE_MODE = 0o666 & ~_umask()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def image_grid_uint8(images_u8: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N, C, H, W] uint8 → one [H', W', 3] uint8 grid (W&B ≥ 0.30 casts floats without rescaling,
    so the conversion to uint8 is done here)."""
    from torchvision.utils import make_grid

    grid = make_grid(images_u8.float(), nrow=nrow, padding=1, pad_value=255.0)
    return grid.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def upscale_nearest(img: np.ndarray, min_tile: int = 64, tile: int | None = None) -> np.ndarray:
    """``img`` [H, W(, C)] enlarged by an integer factor with nearest-neighbour, so that a tile of
    ``tile`` pixels (default: the image's shorter side) becomes at least ``min_tile`` — a grid of
    16×16 digits readable at a glance."""
    side = tile or min(img.shape[:2])
    k = max(1, math.ceil(min_tile / max(side, 1)))
    return img.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else img


@dataclass
class SampleTable:
    """The first samples of a run with what they were drawn for (a class label or a prompt) and
    per-sample scores (PSNR to the FP sample of the same seed, CLIP score …): the W&B table of
    samples and the grid's caption."""

    images: torch.Tensor | None  # uint8 [N, C, H, W]
    conditions: list[str] = field(default_factory=list)  # "" when unconditional
    scores: dict[str, list[float]] = field(default_factory=dict)
    nrow: int = 10

    def grid_caption(self, limit: int = 400) -> str:
        """The grid's conditions row by row ("row 1: 0 1 2 …" for labels, prompts numbered)."""
        if not any(self.conditions):
            return "generated samples"
        if all(c.startswith("class ") for c in self.conditions):
            rows = [" ".join(c[len("class "):] for c in self.conditions[i : i + self.nrow])
                    for i in range(0, len(self.conditions), self.nrow)]
            text = "; ".join(f"row {r + 1}: {row}" for r, row in enumerate(rows))
        else:
            text = " | ".join(f"{i}: {c}" for i, c in enumerate(self.conditions))
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def wandb_table(self) -> Any:
        import wandb

        cols = ["index", "image", "condition", *self.scores]
        data = []
        for i, img in enumerate(self.images):
            arr = img.permute(1, 2, 0).numpy()
            arr = arr[..., 0] if arr.shape[-1] == 1 else arr
            cond = self.conditions[i] if i < len(self.conditions) else ""
            data.append([i, wandb.Image(upscale_nearest(arr, 64), caption=cond), cond,
                         *(v[i] for v in self.scores.values())])
        return wandb.Table(columns=cols, data=data)


class WandbRun:
    """One W&B run per job. Every call is guarded: W&B failing only produces a warning."""

    def __init__(self, enabled: bool, **init_kwargs: Any) -> None:
        self.run = None
        self.error: str | None = None
        if not enabled:
            return
        try:
            import wandb

            self.run = wandb.init(**init_kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker must never take a run down
            self._fail("init", e)

    def _fail(self, what: str, e: Exception) -> None:
        self.error = f"wandb {what} failed: {type(e).__name__}: {e}"
        log.warning("%s — results.json is unaffected", self.error)

    def log(self, data: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def log_results(self, results: dict, grid_u8: torch.Tensor | None,
                    samples: SampleTable | None = None) -> None:
        if self.run is None:
            return
        try:
            import wandb

            flat = {f"metrics/{k}": v for k, v in results.get("metrics", {}).items()}
            flat.update({f"cost/{k}": v for k, v in results.get("cost", {}).items()
                         if isinstance(v, (int, float))})
            if grid_u8 is not None:
                caption = samples.grid_caption() if samples is not None else "generated samples"
                flat["samples"] = wandb.Image(grid_u8.numpy(), caption=caption)
            if samples is not None and samples.images is not None:
                flat["sample_table"] = samples.wandb_table()
            cols = ["model", "method", "bits", "sampler", *results.get("metrics", {})]
            row = [results.get(c) for c in cols[:4]] + list(results.get("metrics", {}).values())
            flat["results"] = wandb.Table(columns=cols, data=[row])
            self.run.log(flat)
            # the run's identity too: lowbit.plots.load_wandb_project reads a project back
            ident = {k: results.get(k) for k in ("model", "method", "bits", "dataset", "sampler",
                                                 "cache", "seed")}
            self.run.summary.update(flat | ident | {"status": results.get("status")})
        except Exception as e:  # noqa: BLE001
            self._fail("log_results", e)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)
        finally:
            self.run = None
