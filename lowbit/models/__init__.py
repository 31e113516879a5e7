"""Model registry: the built-in digits model, diffusers loaders and architecture presets.

A model config names a loader (``model.loader._target_``) that returns a
:class:`~lowbit.models.digits.LoadedModel`.
"""

from lowbit.models.digits import LoadedModel

__all__ = ["LoadedModel"]
