"""Load any diffusers pipeline — a hub id or a local folder — as a :class:`Denoiser`.

The family is detected from the pipeline's components (``model_index.json``):

- ``unet`` = ``UNet2DConditionModel`` + ``text_encoder`` + ``tokenizer``: text-to-image (Stable
  Diffusion v1.x), latent, conditioning ``text``;
- ``transformer`` (DiT): class-conditional (``num_embeds_ada_norm`` classes; the null class is the
  extra index after them), latent;
- ``unet`` = ``UNet2DModel``: unconditional, or class-conditional when it has class embeddings
  (``model.num_classes`` / ``model.null_class`` say which index is the null class); latent when a
  ``vae`` (``AutoencoderKL``) or ``vqvae`` (``VQModel``: diffusers' ``LDMPipeline`` names its
  autoencoder so) is present, pixel space otherwise (DDPM);
- ``unet`` = ``UNet2DConditionModel`` + ``class_embedder``: class-conditional through
  cross-attention (a CompVis LDM such as cin256 converted by :mod:`lowbit.models.ldm_convert`;
  a CompVis ``model.ckpt`` + yaml is converted on first load), latent.

The noise schedule is the pipeline's own scheduler config. Nothing is downloaded when
``HF_HUB_OFFLINE=1``: a hub id must then be in the local cache, or the error says how to fetch it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lowbit.config import ConfigError
from lowbit.models.adapter import Denoiser

NETWORK_KEYS = ("unet", "transformer")
# the autoencoder of a latent pipeline: ``vae`` (Stable Diffusion, DiT), ``vqvae`` (LDMPipeline)
AUTOENCODER_KEYS = ("vae", "vqvae")
# scheduler-config keys that describe the training noise schedule (samplers are built from them)
_PRIVATE = ("_class_name", "_diffusers_version")


def resolve_pipeline_folder(path: str, revision: str | None = None) -> Path:
    """A local folder as is; a hub id through the hub cache (no download when offline)."""
    local = Path(os.path.expanduser(str(path)))
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")):
        raise ConfigError("model.path", str(path), "is not a pipeline folder",
                          "give a folder written by a diffusers pipeline's save_pretrained, "
                          "or a hub id such as google/ddpm-cifar10-32")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(str(path), revision=revision, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same actionable message
        why = "not in the local hub cache (HF_HUB_OFFLINE=1)" if offline else \
            f"could not be fetched from the hub ({type(e).__name__}: {e})"
        raise ConfigError(
            "model.path", str(path), why,
            f"fetch it beforehand on a machine with network (`huggingface-cli download {path}`) "
            f"and copy the cache, or pass model.path=<local pipeline folder>") from e


def _component(folder: Path, key: str, spec: list | None, torch_dtype: torch.dtype | None) -> Any:
    """Load one pipeline component by the class named in ``model_index.json``."""
    if spec is None or spec[0] is None:
        return None
    library, cls_name = spec
    module = __import__(library, fromlist=[cls_name])
    cls = getattr(module, cls_name)
    sub = folder / key
    if key == "tokenizer":
        return cls.from_pretrained(str(sub))
    if key == "scheduler":
        return json.loads((sub / "scheduler_config.json").read_text())
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return cls.from_pretrained(str(sub), **kw).eval()


def _noise_schedule(scheduler_cfg: dict | None) -> dict:
    if scheduler_cfg is None:
        raise ConfigError("model.path", "", "the pipeline has no scheduler config",
                          "use a pipeline folder with scheduler/scheduler_config.json")
    return {k: v for k, v in scheduler_cfg.items() if k not in _PRIVATE}


def load_diffusers(path: str | None, name: str = "", num_classes: int | None = None,
                   null_class: int | None = None, revision: str | None = None,
                   torch_dtype: str | None = None, ldm_checkpoint: str | None = None,
                   ldm_config: str | None = None, cache_dir: str | None = None) -> Denoiser:
    """Model loader of ``model=diffusers`` and the real-model configs (Hydra ``_target_``).

    ``num_classes`` / ``null_class``: for class-conditional ``UNet2DModel`` pipelines and class
    embedders, which indices are classes and which is the null class of classifier-free guidance
    (DiT: read from the model). ``ldm_checkpoint`` + ``ldm_config`` instead of ``path``: a CompVis
    latent-diffusion ``model.ckpt`` and its yaml, converted once into
    ``<cache_dir>/ldm/<fingerprint>``.
    """
    if ldm_checkpoint:
        from lowbit.models.ldm_convert import converted_folder

        if path:
            raise ConfigError("model.path", path, "model.checkpoint gives the model already",
                              "pass either model.path or model.checkpoint + model.ldm_config")
        path = str(converted_folder(ldm_checkpoint, ldm_config, cache_dir))
    folder = resolve_pipeline_folder(path, revision)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError("model.path", str(path), f"{index_file} is missing",
                          "give the folder of a whole diffusers pipeline (save_pretrained)")
    index = json.loads(index_file.read_text())
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    key = next((k for k in NETWORK_KEYS if index.get(k) and index[k][0]), None)
    if key is None:
        raise ConfigError("model.path", str(path), "the pipeline has neither a unet nor a "
                          "transformer", "give a diffusion pipeline folder")
    net = _component(folder, key, index[key], dtype)
    vae_key = next((k for k in AUTOENCODER_KEYS if index.get(k) and index[k][0]), "vae")
    vae = _component(folder, vae_key, index.get(vae_key), dtype)
    schedule = _noise_schedule(_component(folder, "scheduler", index.get("scheduler"), None))
    cfg = net.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (int(cfg.in_channels), int(size), int(size))
    common: dict[str, Any] = dict(net=net, noise_schedule=schedule, sample_shape=shape,
                                  name=name or folder.name, vae=vae,
                                  vae_scale=float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
                                  if vae is not None else 1.0)
    if key == "transformer":
        n = int(num_classes or cfg.num_embeds_ada_norm)
        return Denoiser(conditioning="class", num_classes=n,
                        null_class=n if null_class is None else int(null_class), **common)
    if index.get("class_embedder") and index["class_embedder"][0]:
        embedder = _component(folder, "class_embedder", index["class_embedder"], dtype)
        n = int(num_classes or embedder.config.num_embeddings)
        return Denoiser(conditioning="class", num_classes=n, null_class=null_class,
                        class_embedder=embedder, **common)
    if getattr(cfg, "cross_attention_dim", None):
        text_encoder = _component(folder, "text_encoder", index.get("text_encoder"), dtype)
        tokenizer = _component(folder, "tokenizer", index.get("tokenizer"), None)
        return Denoiser(conditioning="text", text_encoder=text_encoder, tokenizer=tokenizer,
                        **common)
    if getattr(cfg, "num_class_embeds", None):
        n = int(num_classes or cfg.num_class_embeds)
        return Denoiser(conditioning="class", num_classes=n, null_class=null_class, **common)
    return Denoiser(conditioning="none", **common)
