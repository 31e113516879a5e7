"""scikit-learn's bundled handwritten digits (1,797 8×8 images), upsampled for the digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lowbit.models.digits import RESOLUTION


def load_digits_tensors(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images in [-1, 1] of shape [N, 1, R, R] and int64 labels [N].

    The 8×8 originals (values 0–16) are upsampled bilinearly; the data ship with scikit-learn,
    so nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(data.target.astype(np.int64))
    return x, y


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/validation split (the classifier is judged on digits it never saw).

    The validation part is also the digits' held-out split (``DigitsDataset(split="heldout")``):
    a fixed seeded permutation, so every run and method sees the same held-out digits."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images → uint8 [0, 255], the form every metric and file sees."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def save_png_folder(images_u8: torch.Tensor, folder: Path, labels: torch.Tensor | None = None) -> None:
    """Write [N, C, H, W] uint8 images as PNG files (``00000_c7.png``: index and class)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_u8):
        arr = img.permute(1, 2, 0).numpy()
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        tag = f"_c{int(labels[i])}" if labels is not None else ""
        Image.fromarray(arr).save(folder / f"{i:05d}{tag}.png")


def reference_folder(cache_dir: Path, resolution: int = RESOLUTION) -> Path:
    """All real digits as PNG files — the reference set of the digits FID (``split="all"``).
    Written once into ``cache_dir`` and rebuilt whenever its checksum manifest does not match."""
    from lowbit.data.datasets import DigitsDataset

    return DigitsDataset(resolution=resolution, reference_split="all").reference(cache_dir)
