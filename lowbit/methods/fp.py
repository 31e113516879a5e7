"""``method=fp``: the full-precision model, unchanged."""

from __future__ import annotations

from torch import nn

from lowbit.methods.base import Method, MethodContext


class FullPrecision(Method):
    name = "fp"

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        return teacher
