"""Named seed streams: every random draw of a run comes from ``(run seed, stream name, index)``.

A stream name says what the numbers are for (``"calibration"``, ``"quest/tla/order"``,
``"qat/noise"`` …) and the index which draw of that stream (a data epoch, a step, a trajectory).
The generator's seed is a hash of the three, so streams never overlap by accident (no magic
offsets such as ``seed + 10_000`` or ``seed * 1_000_003 + j``), a new stream never shifts an old
one, and a draw depends on nothing that ran before it — the basis of exact resume.
"""

from __future__ import annotations

import hashlib

import torch

_MASK = (1 << 62) - 1  # leaves room for ``seed + b`` per sampling batch below 2**63


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 62-bit seed for draw ``index`` of ``stream`` of a run with seed ``seed``."""
    if not stream:
        raise ValueError("a seed stream needs a name")
    digest = hashlib.sha256(f"lowbit/{int(seed)}/{stream}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK


def generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for draw ``index`` of ``stream`` (see :func:`derive_seed`)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, index))
