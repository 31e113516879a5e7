"""Model registry: the built-in digits model, diffusers loaders and architecture presets.

A model config names a loader (``model.loader._target_``) that returns a
:class:`~lowbit.models.adapter.Denoiser` — the adapter every other part of lowbit calls.
"""

from lowbit.models.adapter import Denoiser

__all__ = ["Denoiser"]
