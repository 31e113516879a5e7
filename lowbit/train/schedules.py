"""Learning-rate factors for ``torch.optim.lr_scheduler.LambdaLR`` (picklable objects whose state
the scheduler saves, so a checkpoint restores them)::

    scheduler:
      _target_: torch.optim.lr_scheduler.LambdaLR
      _partial_: true
      lr_lambda: {_target_: lowbit.train.schedules.LinearDecay, total: ${...steps}}
"""

from __future__ import annotations


class LinearDecay:
    """lr factor 1 → 0 over ``total`` steps."""

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.total)
