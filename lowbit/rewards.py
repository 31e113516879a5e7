"""Differentiable rewards R(image, condition) for reward-guided distillation (``reward`` group).

A reward scores decoded images in ``[-1, 1]`` (``[B, C, H, W]``) against what they were asked to
show, one value per sample, *with* a gradient to the images: RG-LCD maximises it on the
student's one-step prediction (``L = L_LCD − β·R``).

==============  ===================================================================  ===========
``reward=``     what R is                                                            status
==============  ===================================================================  ===========
``none``        no reward (plain LCD)                                                —
``digits``      log p(requested class | image) under the *reward* digit classifier   working
                (``digits_reward_classifier.safetensors``: another architecture and
                seed than the classifier that measures FID and conditional accuracy,
                so reward hacking shows as reward ↑ with cond. acc./FID not following)
``clip``        cosine similarity of CLIP image and prompt embeddings, CLIP loaded   working
                from a local folder or the local hub cache (never downloaded), as
                the ``clip`` metric loads it
``pickscore``   PickScore (a CLIP-H fine-tuned on human preferences, Kirstain et al.  working
                2023): logit_scale · cos(image, prompt), from a local folder holding
                the PickScore model and the CLIP-H processor (save_pretrained)
latent_proxy    RG-LCD's latent proxy (:mod:`lowbit.proxy_reward`): a small network  working
                on latents fitted to an expert reward's preferences; no decode
``hpsv2``,      human-preference reward models (HPSv2, ImageReward) — the paper's    refused
``imagereward`` experts; not implemented: a run naming them fails before compute     (stub)
==============  ===================================================================  ===========
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.config import ConfigError

__all__ = ["ClipReward", "DigitsReward", "PickScoreReward", "Reward", "UnavailableReward",
           "build_reward"]


class Reward:
    """Base of the rewards: ``name`` (logged), :meth:`check` (before any compute; loads the
    model), ``__call__(images, batch) -> [B]`` with a gradient to ``images``. ``batch`` is the
    training batch (``cond``: class labels; ``image_idx`` with :attr:`captions` for prompts)."""

    name = "reward"

    def check(self) -> None:  # noqa: B027 - optional
        """Load what the reward needs; raise :class:`ConfigError` naming ``reward.*``."""

    def to(self, device: torch.device) -> Reward:
        return self

    def __call__(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class DigitsReward(Reward):
    """log-probability of the requested digit under the reward classifier
    (:func:`lowbit.models.digits.load_reward_classifier`; ``checkpoint`` null = the shipped
    one). Its parameters are frozen; the gradient flows to the images only."""

    name = "digits"

    def __init__(self, checkpoint: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.model: nn.Module | None = None

    def check(self) -> None:
        from lowbit.models.digits import RESOLUTION, load_reward_classifier

        if self.model is None:
            try:
                self.model = load_reward_classifier(self.checkpoint).requires_grad_(False)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError("reward.checkpoint", self.checkpoint, str(e),
                                  "pass reward.checkpoint=null (the shipped reward classifier) "
                                  "or train one: lowbit-train-digits reward_classifier") from e
        self.resolution = RESOLUTION

    def to(self, device: torch.device) -> DigitsReward:
        self.check()
        self.model.to(device)
        return self

    def __call__(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        self.check()
        labels = batch.get("cond")
        if labels is None or labels.dim() != 1:
            raise ValueError("reward=digits needs class labels (a class-conditional model)")
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False)
        logp = F.log_softmax(self.model(x), dim=1)
        return logp.gather(1, labels.to(logp.device).long().reshape(-1, 1)).squeeze(1)


class ClipReward(Reward):
    """Cosine similarity of the CLIP embeddings of each image and its prompt. The model loads
    as the ``clip`` metric loads it (:class:`lowbit.metrics.clip.ClipScore`: a local folder or
    the local hub cache); the image preprocessing (resize to the model's input size, the
    processor's mean/std) is done in torch so the gradient reaches the images. Prompts come from
    :attr:`captions` (set by the method: the training images' captions) indexed by the batch's
    ``image_idx``."""

    name = "clip"
    #: multiply the cosine by the model's learnt temperature (PickScore's score)
    logit_scaled = False

    def __init__(self, model_path: str | None = None) -> None:
        self.model_path = model_path
        self.captions: list[str] | None = None
        self._loaded: tuple[Any, Any] | None = None

    def check(self) -> None:
        if self._loaded is None:
            from lowbit.metrics.clip import ClipScore

            model, processor = ClipScore(self.model_path).load(key="reward")
            self._loaded = (model.requires_grad_(False), processor)

    def to(self, device: torch.device) -> ClipReward:
        self.check()
        self._loaded[0].to(device)
        return self

    def __call__(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        self.check()
        model, processor = self._loaded
        if self.captions is None or "image_idx" not in batch:
            raise ValueError("reward=clip needs the prompts of the training images (a "
                             "captioned dataset)")
        prompts = [self.captions[int(i)] for i in batch["image_idx"]]
        ip = processor.image_processor
        size = int(model.config.vision_config.image_size)
        dev = next(model.parameters()).device
        x = images.float().to(dev)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate((x + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(ip.image_mean, device=dev).reshape(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, device=dev).reshape(1, -1, 1, 1)
        from lowbit.metrics.clip import _features

        img = _features(model.get_image_features(pixel_values=(x - mean) / std))
        tok = processor.tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=int(model.config.text_config.max_position_embeddings),
                                  return_tensors="pt")
        with torch.no_grad():
            txt = _features(model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                    attention_mask=tok["attention_mask"].to(dev)))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return cos * model.logit_scale.exp().float() if self.logit_scaled else cos


class PickScoreReward(ClipReward):
    """PickScore: ``logit_scale · cos(E_image, E_prompt)`` of the PickScore model (a CLIP-H
    fine-tuned on Pick-a-Pic preferences), with CLIP-H's processor — loaded from one local
    folder holding both, e.g. ``CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")`` and
    ``CLIPProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")`` saved into it
    with ``save_pretrained``. The preprocessing and the gradient are :class:`ClipReward`'s."""

    name = "pickscore"
    logit_scaled = True


class UnavailableReward(Reward):
    """A reward lowbit names but does not implement: refused before any compute."""

    def __init__(self, reward: str, why: str = "") -> None:
        self.name = reward
        self.why = why

    def check(self) -> None:
        why = f": {self.why}" if self.why else ""
        raise ConfigError("reward", self.name, f"not implemented in lowbit{why}",
                          "use reward=digits (built-in digits model), reward=clip "
                          "reward.model_path=<local CLIP folder>, reward=pickscore "
                          "reward.model_path=<local PickScore folder>, or reward=none")


def build_reward(cfg: Any) -> Reward | None:
    """The ``reward`` group instantiated and checked (``None``: ``reward=none`` or no group)."""
    if cfg is None or cfg.get("_target_") is None:
        return None
    from hydra.utils import instantiate

    kw = {k: v for k, v in cfg.items() if k != "name"}
    reward = instantiate(kw, _convert_="all")
    if not isinstance(reward, Reward):
        raise ConfigError("reward._target_", cfg.get("_target_"), "is not a lowbit Reward",
                          "use one of lowbit/conf/reward/")
    reward.check()
    return reward


def reward_label(cfg: Any) -> str:
    return "none" if cfg is None else str(cfg.get("name", "none"))

