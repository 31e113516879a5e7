"""CLIP score of text-conditioned samples: how well each image matches its prompt.

CLIP score (Hessel et al., 2021, without their 2.5 weight; the definition torchmetrics uses) is
``100 · max(cos(E_image, E_text), 0)`` for one image and its prompt, where E are the CLIP
model's projected image and text embeddings; a run's ``clip_score`` is its mean over the samples.
Scores from different CLIP backbones are not comparable, so every result names its backbone.

The score is computed here with transformers' ``CLIPModel`` and its processor rather than
through ``torchmetrics.functional.multimodal.clip_score``: that function returns only the mean,
which it clamps at 0 after averaging (not per sample), it reads ``get_*_features`` as tensors,
which transformers 5 returns as model outputs, and it truncates long prompts by cutting the
token ids, which drops the end-of-text token whose embedding CLIP's text model pools. Here long
prompts are truncated by the tokenizer, which keeps that token (as a Stable Diffusion pipeline
truncates the prompts its text encoder sees).

The model is loaded from a local folder (``save_pretrained``) or from the local Hugging Face
cache; it is never downloaded.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lowbit.config import ConfigError
from lowbit.metrics.base import Metric, MetricInputs

if TYPE_CHECKING:
    from lowbit.data.datasets import Dataset

log = logging.getLogger(__name__)

#: the CLIP backbone of the Stable Diffusion quantization papers' CLIP scores (ViT-L/14, the
#: text encoder SD v1.x itself conditions on)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
#: where a run's config names the metric's model (errors name this key)
DEFAULT_KEY = "metrics.items.clip"


def resolve_clip_folder(model_path: str, key: str = DEFAULT_KEY) -> Path:
    """The local folder of ``model_path``: a folder as is, a hub id from the local Hugging Face
    cache only (never downloaded). Raises :class:`ConfigError` naming ``<key>.model_path``."""
    if model_path in (None, ""):
        raise ConfigError(f"{key}.model_path", model_path, "no CLIP model given",
                          f"pass {key}.model_path={DEFAULT_CLIP} (from the local hub cache) or "
                          f"a folder written by CLIPModel/CLIPProcessor.save_pretrained")
    local = Path(os.path.expanduser(str(model_path)))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}.model_path", str(model_path), "the folder has no config.json",
                              "give a folder written by CLIPModel.save_pretrained and "
                              "CLIPProcessor.save_pretrained")
        return local
    if local.exists() or str(model_path).startswith((".", "/", "~")):
        raise ConfigError(f"{key}.model_path", str(model_path), "no such folder",
                          "give a folder written by CLIPModel/CLIPProcessor.save_pretrained, or "
                          f"a hub id in the local cache such as {DEFAULT_CLIP}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_path), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - every cache miss gets the same actionable message
        raise ConfigError(
            f"{key}.model_path", str(model_path),
            f"not in the local Hugging Face cache ({type(e).__name__}); the CLIP model is never "
            f"downloaded during a run",
            f"fetch it beforehand on a machine with network (`huggingface-cli download "
            f"{model_path}`) and copy the cache (HF_HOME), or pass {key}.model_path=<local "
            f"folder>") from e


def _features(out: Any) -> Tensor:
    """The projected embeddings of ``get_image_features``/``get_text_features``: a tensor in
    transformers 4, the ``pooler_output`` of a model output in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScore(Metric):
    """CLIP score of each sample against the prompt it was sampled with
    (``metrics.items.clip``): ``clip_score`` (mean of ``100 · max(cos, 0)`` over the samples),
    ``clip_score_std`` (their standard deviation across samples, population form), ``clip_n``
    (the number of samples) and ``clip_model`` (the backbone: the hub id, or the folder's name —
    scores of different backbones are not comparable).

    Prompts longer than the text model's context (77 tokens for CLIP) are truncated by the
    tokenizer, keeping the start and end tokens; the number of truncated prompts is logged.
    Measures text-conditioned samples only: :meth:`check` refuses a dataset without prompts and
    a call without ``MetricInputs.prompts`` is an error.

    model_path: a hub id in the local cache or a local folder (``save_pretrained`` of the model
    and its processor); batch_size: images (and prompts) per forward; device: where CLIP runs
    (null = the run's device).
    """

    def __init__(self, model_path: str = DEFAULT_CLIP, batch_size: int = 64,
                 device: str | None = None) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self.device = torch.device(device) if device else None
        self._loaded: tuple[Any, Any] | None = None

    @property
    def model_name(self) -> str:
        """The backbone as recorded in ``clip_model``: the hub id, or the local folder's name."""
        local = Path(os.path.expanduser(str(self.model_path)))
        return local.resolve().name if local.is_dir() else str(self.model_path)

    def check(self, dataset: Dataset | None = None, key: str = DEFAULT_KEY) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", self.batch_size, "must be a positive integer",
                              f"pass {key}.batch_size=64")
        if dataset is not None and dataset.conditioning != "text":
            raise ConfigError(key, "ClipScore", f"the CLIP score measures samples against their "
                              f"prompts, and dataset={dataset.name} has none (its conditioning "
                              f"is {dataset.conditioning!r})",
                              f"use a text dataset (dataset=prompts dataset.path=<prompts file>, "
                              f"or a captioned dataset=image_folder), or pass {key}=null")
        self.load(key)  # a missing or broken model fails here, before any compute

    def load(self, key: str = DEFAULT_KEY) -> tuple[Any, Any]:
        """The CLIP model (eval mode, on the CPU until a call moves it) and its processor,
        loaded once from local files."""
        if self._loaded is None:
            from transformers import CLIPModel, CLIPProcessor

            folder = resolve_clip_folder(self.model_path, key)
            try:
                model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
                processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # noqa: BLE001 - name the key whatever the loader raised
                raise ConfigError(f"{key}.model_path", str(self.model_path),
                                  f"cannot load a CLIP model and processor from {folder} "
                                  f"({type(e).__name__}: {str(e)[:300]})",
                                  "give a folder holding both the model's and the processor's "
                                  "save_pretrained files") from e
            self._loaded = (model, processor)
        return self._loaded

    def _device(self, ctx_device: torch.device | None = None) -> torch.device:
        return self.device or ctx_device or torch.device("cpu")

    def context_length(self) -> int:
        """Tokens the text model reads (77 for CLIP), start and end tokens included."""
        model, _ = self.load()
        return int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: list[str],
               device: torch.device | None = None) -> Tensor:
        """Per-sample CLIP scores ``100 · max(cos(E_image, E_text), 0)`` of uint8 ``[N, C, H,
        W]`` images (C = 1 or 3) against their N prompts, float32 ``[N]`` on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"the CLIP score takes uint8 [N, 1|3, H, W] images, got "
                            f"{images.dtype} {tuple(images.shape)}")
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"the CLIP score needs one prompt per image: {len(images)} images, "
                             f"{len(prompts)} prompts")
        model, processor = self.load()
        dev = self._device(device)
        model.to(dev)
        n_ctx = self.context_length()
        lengths = [len(ids) for ids in processor.tokenizer(prompts, verbose=False)["input_ids"]]
        long = [p for p, k in zip(prompts, lengths, strict=True) if k > n_ctx]
        if long:
            log.warning("CLIP score: %d of %d prompts are longer than CLIP's %d tokens and were "
                        "truncated (e.g. %r)", len(long), len(prompts), n_ctx, long[0][:80])
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = images[i : i + self.batch_size].cpu()
            if batch.shape[1] == 1:  # grey samples: CLIP reads RGB
                batch = batch.expand(-1, 3, -1, -1)
            pixels = processor.image_processor(list(batch), return_tensors="pt",
                                               input_data_format="channels_first")
            # padded to the full context: every prompt is encoded alike whatever its batch
            text = processor.tokenizer(prompts[i : i + self.batch_size], padding="max_length",
                                       truncation=True, max_length=n_ctx, return_tensors="pt")
            img = _features(model.get_image_features(pixel_values=pixels["pixel_values"].to(dev)))
            txt = _features(model.get_text_features(input_ids=text["input_ids"].to(dev),
                                                    attention_mask=text["attention_mask"].to(dev)))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out.append((100.0 * cos.clamp(min=0)).cpu())
        return torch.cat(out)

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        prompts = ctx.prompts
        if prompts is None:
            raise ValueError(f"the CLIP score needs the prompts the samples were drawn with "
                             f"(MetricInputs.conditions as a list of strings); these samples "
                             f"are {'class-conditional' if ctx.labels is not None else 'unconditional'}"
                             f": leave the metric out ({DEFAULT_KEY}=null)")
        s = self.scores(ctx.images, prompts, ctx.device).double()
        self.last_scores = s  # per sample, for the run's table of samples (W&B)
        std = float(s.std(correction=0)) if len(s) else math.nan
        return {"clip_score": float(s.mean()), "clip_score_std": std, "clip_n": len(s),
                "clip_model": self.model_name}
