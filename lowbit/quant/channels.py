"""Parameter-free channel maps shared by quantized layers' side paths (binary shortcuts,
IR-QLoRA's elastic connections)."""

from __future__ import annotations

import math

from torch import Tensor


def channel_map(x: Tensor, c_out: int, axis: int) -> Tensor:
    """Parameter-free map of ``x``'s channels to ``c_out``: mean over groups of channels when
    shrinking, repeat when growing (via the gcd when neither divides the other)."""
    c_in = x.shape[axis]
    if c_in == c_out:
        return x
    g = math.gcd(c_in, c_out)
    if g != c_in:  # shrink to g channels: mean of consecutive groups of c_in/g
        xm = x.movedim(axis, -1)
        x = xm.reshape(*xm.shape[:-1], g, c_in // g).mean(dim=-1).movedim(-1, axis)
    if g != c_out:
        x = x.repeat_interleave(c_out // g, dim=axis)
    return x
