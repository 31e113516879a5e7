"""Guidance as an input: the w-embedding of a guidance-distilled (LCM) student.

A latent consistency model is distilled from the *guided* teacher at a guidance scale w drawn per
sample, and learns w as an input (LCM §4.2), so sampling needs one network call per step instead
of the two of classifier-free guidance. diffusers' ``TimestepEmbedding`` already has the slot:
``cond_proj``, a bias-free Linear from a ``time_cond_proj_dim``-wide embedding of w, added to
the sinusoidal timestep features before the time MLP (``sample + cond_proj(condition)``).
``UNet2DConditionModel`` feeds it ``timestep_cond``; ``UNet2DModel`` (the digits model) calls its
time embedding without a condition.

:func:`add_guidance_embedding_` gives any U-Net the same slot without touching diffusers' code:
a zero-initialised :class:`GuidanceProjection` at ``time_embedding.cond_proj`` (so the student
starts as exactly the teacher, and its keys are those of a diffusers model built with
``time_cond_proj_dim``) and a forward pre-hook on ``time_embedding`` that passes the embedding of
the current w as its ``condition`` when the caller gave none. The current w is set per call with
:meth:`GuidanceProjection.at` — by the training loss (a tensor, one w per sample) and by
:meth:`lowbit.models.adapter.Denoiser.guided` when it samples such a network (the sampler's
``guidance_scale``, one forward, no conditional/unconditional doubling).

Convention: w here is lowbit's guidance scale s of ``ε_u + s·(ε_c − ε_u)`` (s = 1: the
conditional model alone); the embedding reads ``s − 1``, as diffusers' LCM pipeline embeds
``guidance_scale − 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GuidanceProjection", "add_guidance_embedding_", "guidance_embedding",
           "guidance_scale_embedding"]


def guidance_scale_embedding(w: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal features ``[B, dim]`` of the guidance values ``w`` ``[B]`` (VDM's Fourier
    embedding at ``scale · w``, the form LCM embeds w with: half sines, half cosines, geometric
    frequencies from 1 down to 1/10000; an odd ``dim`` ends with a zero column)."""
    w = w.reshape(-1).float() * scale
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=w.device) / max(half - 1, 1))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class GuidanceProjection(nn.Linear):
    """``time_embedding.cond_proj`` of a guidance-distilled U-Net: embedding of w → the time
    embedding's input width, zero-initialised, no bias (diffusers' ``cond_proj``), plus the w of
    the current call (:meth:`at`; ``None``: no guidance input — the network is the teacher)."""

    def __init__(self, embedding_dim: int, out_features: int) -> None:
        super().__init__(embedding_dim, out_features, bias=False)
        nn.init.zeros_(self.weight)
        self.embedding_dim = int(embedding_dim)
        self.w: Tensor | None = None

    @contextlib.contextmanager
    def at(self, w: float | Tensor) -> Iterator[None]:
        """Within the block, the network's time embedding reads guidance ``w`` (a number, or one
        value per sample)."""
        before = self.w
        self.w = torch.as_tensor(w, dtype=torch.float32)
        try:
            yield
        finally:
            self.w = before

    def condition(self, batch: int, like: Tensor) -> Tensor:
        """The embedding of the current w (``s − 1``) for ``batch`` samples."""
        w = self.w.to(like.device).reshape(-1)
        if w.numel() == 1:
            w = w.expand(batch)
        elif w.numel() != batch:
            raise ValueError(f"guidance w holds {w.numel()} values for a batch of {batch}")
        return guidance_scale_embedding(w - 1.0, self.embedding_dim).to(like.dtype)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of ``time_embedding``: pass the w-embedding as its ``condition``
        unless the caller gave one (``timestep_cond`` of a ``UNet2DConditionModel``)."""
        if self.w is None:
            return None
        sample = args[0] if args else kwargs["sample"]
        given = args[1] if len(args) > 1 else kwargs.get("condition")
        if given is not None:
            return None
        cond = self.condition(sample.shape[0], sample)
        return (sample, cond), {}


def guidance_embedding(net: nn.Module) -> GuidanceProjection | None:
    """The network's :class:`GuidanceProjection` (``None``: guidance is not an input)."""
    proj = getattr(getattr(net, "time_embedding", None), "cond_proj", None)
    return proj if isinstance(proj, GuidanceProjection) else None


def _install(time_embedding: nn.Module, proj: GuidanceProjection) -> GuidanceProjection:
    time_embedding.cond_proj = proj
    # a bound method of the submodule: a deepcopy of the network (the EMA target) hooks its copy
    time_embedding.register_forward_pre_hook(proj.pre_hook, with_kwargs=True)
    return proj


def add_guidance_embedding_(net: nn.Module, embedding_dim: int = 256) -> GuidanceProjection:
    """Give ``net`` (a diffusers U-Net with a ``time_embedding``) a zero-initialised w-embedding
    in place; returns it. The network's outputs are unchanged until a w is set and trained."""
    te = getattr(net, "time_embedding", None)
    if te is None or not hasattr(te, "linear_1"):
        raise ValueError(f"{type(net).__name__} has no diffusers TimestepEmbedding "
                         f"(time_embedding.linear_1): the w-embedding needs one")
    if guidance_embedding(net) is not None:
        raise ValueError("the network already has a w-embedding")
    if getattr(te, "cond_proj", None) is not None:
        raise ValueError(f"{type(net).__name__} already takes a timestep condition "
                         f"(time_embedding.cond_proj): it is a guidance-distilled model")
    ref = te.linear_1.weight
    proj = GuidanceProjection(embedding_dim, te.linear_1.in_features).to(ref.device)
    _install(te, proj)
    if hasattr(net, "register_to_config") and "time_cond_proj_dim" in getattr(net, "config", {}):
        net.register_to_config(time_cond_proj_dim=int(embedding_dim))
    return proj


# -- quantization maps: a reloaded student gets its w-embedding (and hook) back ----------------------
def _describe(m: GuidanceProjection) -> dict[str, Any]:
    return {"embedding_dim": m.embedding_dim, "out_features": m.out_features}


def _build(_existing: nn.Module | None, spec: dict[str, Any], ctx: Any) -> nn.Module:
    proj = GuidanceProjection(int(spec["embedding_dim"]), int(spec["out_features"]))
    return _install(ctx.parent, proj)


def _register() -> None:
    from lowbit.quant.qmap import register_module_class

    register_module_class(GuidanceProjection, describe=_describe, build=_build)


_register()
