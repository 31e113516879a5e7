"""Sampling in shards: each batch of a run's samples is a file, dealt out over the run's
processes and kept until the run is done, so N processes give the images one process gives and
an interrupted sampling run resumes where it stopped.

Batch ``b`` holds samples ``b·B … (b+1)·B−1`` (B = ``sampler.batch_size``) drawn from seed
``seed + b`` (:func:`lowbit.sampling.sample_batch`). Rank ``r`` of ``W`` samples batches
``r, r+W, r+2W, …``, decodes them to uint8 images and writes ``<store>/batch<b>.safetensors``
atomically; rank 0 reads every batch back in order. The store's folder is named by a key of
everything the images depend on (the network's weights, the sampler, n, the seed, the
conditions, the feature cache), so a file is only ever reused for the same images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit import dist
from lowbit.models.adapter import Denoiser
from lowbit.sampling import SamplerConfig, batch_starts, sample_batch

log = logging.getLogger(__name__)

#: the run folder's shard stores (kept across attempts until one is done; see lowbit.rundir)
SHARD_DIR = "sample_shards"


def shard_key(net: torch.nn.Module, sampler: SamplerConfig, n: int, seed: int,
              cond: torch.Tensor | None, extra: str = "") -> str:
    """A name for the images of ``net`` under these settings (``extra``: e.g. the cache label)."""
    from lowbit.data.trajectories import model_fingerprint

    h = hashlib.sha256(repr((model_fingerprint(net), sampler, n, seed, extra)).encode())
    if cond is not None:
        h.update(cond.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ShardStore:
    """The batch files of one key under ``root`` (``root/<key>/batch<b>.safetensors``)."""

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = Path(root), key
        self.folder = self.root / key

    def path(self, b: int) -> Path:
        return self.folder / f"batch{b:06d}.safetensors"

    def has(self, b: int) -> bool:
        return self.path(b).is_file()  # written by rename: present means complete

    def save(self, b: int, images: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(b)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"images": images.contiguous()}, str(tmp))
        tmp.replace(path)

    def load(self, b: int) -> torch.Tensor:
        return load_file(str(self.path(b)))["images"]

    def prune_stale(self) -> None:
        """Remove the stores of other keys under ``root`` (images of another student/sampler)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and p.name != self.key:
                    shutil.rmtree(p, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


@dataclass
class ShardStats:
    """What one process did: ``batches`` of the run, ``sampled`` by this process in this
    attempt, ``resumed`` (found finished in the store), ``seconds`` spent sampling."""

    batches: int
    sampled: int = 0
    resumed: int = 0
    seconds: float = 0.0


def sample_images(denoiser: Denoiser, sampler: SamplerConfig, cond: torch.Tensor | None, n: int,
                  seed: int, decode: Callable[[torch.Tensor], torch.Tensor],
                  store: ShardStore | None, progress: bool = True
                  ) -> tuple[torch.Tensor | None, ShardStats]:
    """uint8 images of ``n`` samples (``decode`` maps a batch of x₀ to uint8), on rank 0 (None on
    the other ranks), and this process's :class:`ShardStats`. Without a ``store`` (one process
    only) the images stay in memory; with one, finished batches are skipped and every rank's
    batches meet in the store."""
    from tqdm.auto import tqdm

    world = dist.world_size()
    if store is None and world > 1:
        raise ValueError("sampling over several processes needs a shard store (a folder the "
                         "ranks share)")
    nb = len(batch_starts(n, sampler.batch_size))
    stats = ShardStats(batches=nb)
    kept: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    mine = dist.shard(range(nb))
    for b in tqdm(mine, desc="sampling", disable=not progress):
        if store is not None and store.has(b):
            stats.resumed += 1
            continue
        images = decode(sample_batch(denoiser, sampler, cond, n, seed, b))
        stats.sampled += 1
        if store is None:
            kept[b] = images
        else:
            store.save(b, images)
    stats.seconds = time.perf_counter() - t0
    if stats.resumed:
        log.info("sampling: %d of %d batches of this process were already in %s", stats.resumed,
                 len(mine), store.folder if store else "")
    dist.barrier()
    if not dist.is_main():
        return None, stats
    images = torch.cat([kept[b] if store is None else store.load(b) for b in range(nb)])
    return images, stats
