"""Training-free feature caching for U-Nets: DeepCache (Ma et al., CVPR 2024).

Adjacent denoising steps produce nearly the same high-level features. On a *full* step the whole
U-Net runs and every module of the deep part records its output: the down blocks below the skip
branch ``branch`` (and the downsampler that feeds them), the mid block, and the up blocks above
it. On the *partial* steps in between, those modules return their recorded outputs without
computing; only the time embedding, ``conv_in``, the ``branch`` shallow down blocks, the matching
up blocks (fed the cached deep feature and the fresh skip features) and the output layers run. So
the stock diffusers forward runs unchanged — no model code is forked — and the deep modules are
skipped by replacing their ``forward`` on the instance while the cache is attached (parameter
names and hooks stay as they are, so a quantized student caches its own features and its timestep
hook still sees each sampler timestep once per call).

Which steps are full is a function of the ``timestep`` argument the network is called with (the
sampler's schedule is known in advance), never of a call counter: ``uniform`` makes every
``interval``-th step of the schedule full; ``nonuniform`` (the paper's N-U schedule) puts the same
number of full steps denser around step ``center`` with spacing growing as ``|u|^power``.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

SCHEDULES = ("uniform", "nonuniform")


def full_step_indices(num_steps: int, interval: int, schedule: str = "uniform",
                      center: int | None = None, power: float = 1.4) -> list[int]:
    """Indices (0 = the first, noisiest step) of the full steps of a ``num_steps`` schedule.

    Both schedules have ``ceil(num_steps / interval)`` full steps and always include step 0.
    ``nonuniform``: points ``u`` evenly spaced on ``[-center^(1/p), (T-1-center)^(1/p)]`` map to
    ``center + sign(u)|u|^p``; near ``center`` the full steps are denser, far from it sparser.
    """
    if num_steps < 1 or interval < 1:
        raise ValueError(f"num_steps={num_steps} and interval={interval} must be >= 1")
    k = math.ceil(num_steps / interval)
    if schedule == "uniform" or k >= num_steps:
        return list(range(0, num_steps, interval)) if k < num_steps else list(range(num_steps))
    if schedule != "nonuniform":
        raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    c = num_steps // 2 if center is None else int(center)
    if not 0 <= c < num_steps:
        raise ValueError(f"center={c} must be a step index in [0, {num_steps - 1}]")
    p = float(power)
    lo, hi = -(c ** (1 / p)), (num_steps - 1 - c) ** (1 / p)
    # more candidate points than needed until k distinct steps (rounding merges close ones)
    for m in range(k, 4 * num_steps):
        u = torch.linspace(lo, hi, m, dtype=torch.float64)
        idx = torch.round(c + u.sign() * u.abs() ** p).long().clamp(0, num_steps - 1)
        steps = sorted({0, *idx.tolist()})
        if len(steps) >= k:
            break
    if len(steps) > k:  # keep step 0 and the k - 1 closest to the centre
        rest = sorted(steps[1:], key=lambda s: (abs(s - c), s))[: k - 1]
        steps = sorted({0, *rest})
    return steps


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """The ``cache=deepcache`` config: ``interval`` N (1 = no caching), ``branch`` (how many
    down blocks — and up blocks — stay live on partial steps; 1 = the shallowest skip branch),
    ``schedule`` (uniform | nonuniform), ``center`` / ``power`` of the non-uniform schedule."""

    name: str = "deepcache"
    interval: int = 3
    branch: int = 1
    schedule: str = "uniform"
    center: int | None = None
    power: float = 1.4

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"cache.interval={self.interval!r} must be an integer >= 1")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 1:
            raise ValueError(f"cache.branch={self.branch!r} must be an integer >= 1 (1 = the "
                             f"shallowest skip branch)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"cache.schedule={self.schedule!r}: choose one of "
                             f"{', '.join(SCHEDULES)}")
        if not self.power >= 1:
            raise ValueError(f"cache.power={self.power!r} must be >= 1")

    @property
    def label(self) -> str:
        s = f"deepcache(N={self.interval},b={self.branch}"
        if self.schedule == "nonuniform":
            s += f",nu c={self.center} p={self.power:g}"
        return s + ")"

    def check(self, net: nn.Module) -> None:
        """A clear error for a network DeepCache does not apply to (before any compute)."""
        deep_modules(net, self.branch)

    def attach(self, net: nn.Module, timesteps: Sequence[int] | Tensor) -> CacheHandle:
        """Cache ``net``'s deep features over the sampler schedule ``timesteps`` (in sampling
        order); detach with the handle (or use it as a context manager)."""
        ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        full = {ts[i] for i in full_step_indices(len(ts), self.interval, self.schedule,
                                                 self.center, self.power)}
        return CacheHandle(net, deep_modules(net, self.branch), full, self)


def deep_modules(net: nn.Module, branch: int) -> list[tuple[str, nn.Module]]:
    """The modules a partial step skips: down blocks ``branch…`` and the downsampler before them,
    the mid block, and the up blocks before the last ``branch`` ones."""
    down, up = getattr(net, "down_blocks", None), getattr(net, "up_blocks", None)
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList):
        raise ValueError(f"cache=deepcache needs a U-Net (down_blocks / up_blocks); "
                         f"{type(net).__name__} has none. Fix: cache=none for this model")
    if len(down) != len(up):
        raise ValueError(f"cache=deepcache: {type(net).__name__} has {len(down)} down and "
                         f"{len(up)} up blocks; DeepCache needs a symmetric U-Net")
    if not 1 <= branch < len(down):
        raise ValueError(f"cache.branch={branch}: this U-Net has {len(down)} down blocks, so the "
                         f"branch must be in [1, {len(down) - 1}] (partial steps keep that many "
                         f"blocks on each side)")
    out = [(f"down_blocks.{i}", down[i]) for i in range(branch, len(down))]
    # the last live down block's downsampler feeds only the deep part (the next down block and,
    # through the skip tuple, the first deep up block): skipped too
    for j, m in enumerate(getattr(down[branch - 1], "downsamplers", None) or ()):
        out.append((f"down_blocks.{branch - 1}.downsamplers.{j}", m))
    if getattr(net, "mid_block", None) is not None:
        out.append(("mid_block", net.mid_block))
    out += [(f"up_blocks.{i}", up[i]) for i in range(len(up) - branch)]
    return out


def _timestep(args: tuple, kwargs: dict) -> int:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise ValueError("cache=deepcache: the network was called without a timestep")
    t = torch.as_tensor(t).reshape(-1)
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("cache=deepcache: one call mixes timesteps; caching needs one per call")
    return int(t[0])


class CacheHandle:
    """An attached cache: counts full and partial calls; :meth:`detach` restores the network."""

    def __init__(self, net: nn.Module, deep: list[tuple[str, nn.Module]], full: set[int],
                 config: DeepCache) -> None:
        self.net, self.deep, self.full, self.config = net, deep, full, config
        self.partial_now = False
        self.outputs: dict[str, Any] = {}
        self.batch: tuple[int, ...] | None = None
        self.calls = {"full": 0, "partial": 0}
        for name, m in deep:
            m.forward = types.MethodType(self._replay(name, type(m).forward), m)
        self.pre = net.register_forward_pre_hook(self._before, with_kwargs=True)

    def _replay(self, name: str, forward):
        handle = self

        def replay(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if handle.partial_now:
                return handle.outputs[name]
            out = forward(module, *args, **kwargs)
            handle.outputs[name] = out
            return out

        return replay

    def _before(self, _net: nn.Module, args: tuple, kwargs: dict) -> None:
        t = _timestep(args, kwargs)
        x = kwargs.get("sample", args[0] if args else None)
        shape = tuple(x.shape) if isinstance(x, Tensor) else None
        partial = t not in self.full
        if partial and (not self.outputs or shape != self.batch):
            if not self.outputs:
                raise RuntimeError(
                    f"cache=deepcache: timestep {t} is a partial step but nothing is cached yet "
                    f"(a trajectory must start at a full step; the schedule's full steps are "
                    f"{sorted(self.full, reverse=True)})")
            raise RuntimeError(f"cache=deepcache: partial step at timestep {t} with input "
                               f"{shape}, but the cache holds features of {self.batch}")
        self.partial_now = partial
        if not partial:
            self.batch = shape
        self.calls["partial" if partial else "full"] += 1

    def detach(self) -> None:
        for _, m in self.deep:
            m.__dict__.pop("forward", None)
        self.pre.remove()
        self.outputs.clear()

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def build_cache(cfg: Any) -> DeepCache | None:
    """The ``cache`` group as an object (None for ``cache=none``); bad keys name themselves."""
    if cfg is None or cfg.get("name", "none") == "none":
        return None
    d = {k: v for k, v in dict(cfg).items() if k != "_target_"}
    known = {f.name for f in dataclasses.fields(DeepCache)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join('cache.' + u for u in unknown)}; allowed: "
                         f"{', '.join(sorted(known))}")
    return DeepCache(**d)
