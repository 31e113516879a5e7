"""Peak memory of one run, also when several runs share a process (Hydra's basic launcher).

The process-lifetime max RSS (``ru_maxrss``) cannot be reset, so on CPU a daemon thread samples
the resident set size while the run is inside :class:`PeakMemory`; on CUDA the allocator's peak
statistics are reset at entry.
"""

from __future__ import annotations

import os
import resource
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; elsewhere the lifetime maximum)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_mb``: the run's own peak (MiB)."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self.peak_mb = max(self.peak_mb, rss_mb())
        return self.peak_mb

    def __exit__(self, *exc) -> None:
        self.read()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
