"""The reward of a run's samples (``metrics.items.reward``): what RG-LCD maximises, measured on
the final samples, so a table shows whether a reward-guided student raised it — and, beside the
evaluation classifier's accuracy and FID, whether it did so by reward hacking."""

from __future__ import annotations

import torch

from lowbit.config import ConfigError
from lowbit.metrics.base import Metric, MetricInputs
from lowbit.rewards import Reward


class RewardScore(Metric):
    """``reward_<name>``: the mean reward of the samples under ``reward`` (a :class:`lowbit.
    rewards.Reward`, built from its ``_target_`` like the ``reward`` group), each sample scored
    against the condition it was sampled with (its class label, or its prompt). On digits,
    ``reward_digits`` is the mean log p(requested class) under the *reward* classifier — another
    architecture and seed than the classifier behind FID and conditional accuracy.

    reward: the reward model; batch_size: images per call; device: where it runs (cpu keeps
    recorded numbers comparable; null = the run's device)."""

    def __init__(self, reward: Reward | None = None, batch_size: int = 256,
                 device: str | None = "cpu") -> None:
        self.reward = reward
        self.batch_size = batch_size
        self.device = device

    def check(self, dataset=None, key: str = "metrics") -> None:
        if not isinstance(self.reward, Reward):
            raise ConfigError(f"{key}.reward", self.reward, "is not a lowbit Reward",
                              f"give {key}.reward a _target_ of lowbit/rewards.py "
                              f"(e.g. lowbit.rewards.DigitsReward), or {key}=null")
        if getattr(self.reward, "latent", False):
            raise ConfigError(f"{key}.reward", self.reward.name, "a latent proxy scores latents, "
                              "and this metric scores the decoded samples",
                              "score with its expert (e.g. lowbit.rewards.DigitsReward)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", self.batch_size, "must be a positive integer",
                              f"pass {key}.batch_size=256")
        try:
            self.reward.check()
        except ConfigError as e:
            raise ConfigError(f"{key}.reward", self.reward.name, str(e),
                              f"fix the reward model's path, or {key}=null") from e

    @torch.no_grad()
    def __call__(self, ctx: MetricInputs) -> dict[str, float]:
        reward = self.reward
        device = torch.device(self.device) if self.device else ctx.device
        reward.to(device)
        labels, prompts = ctx.labels, ctx.prompts
        if labels is None and prompts is None:
            raise ValueError(f"the {reward.name} reward scores samples against their conditions; "
                             f"this run's samples have none")
        if prompts is not None:
            reward.captions = prompts
        scores = []
        for i in range(0, len(ctx.images), self.batch_size):
            x = ctx.images[i : i + self.batch_size].to(device).float() / 127.5 - 1.0
            batch = ({"cond": labels[i : i + len(x)]} if labels is not None
                     else {"image_idx": torch.arange(i, i + len(x))})
            scores.append(reward(x, batch).double().cpu())
        return {f"reward_{reward.name}": float(torch.cat(scores).mean())}
