"""Checks of a composed config that fail before any compute, naming the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value lowbit cannot run with. The message names the key and how to fix it."""

    def __init__(self, key: str, value: object, problem: str, fix: str) -> None:
        super().__init__(f"{key}={value!r}: {problem}. Fix: {fix}")
        self.key = key


def _get(cfg: DictConfig, key: str, default: object = None) -> object:
    return OmegaConf.select(cfg, key, default=default)


def _positive_int(cfg: DictConfig, key: str, example: int) -> None:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(key, v, "must be a positive integer", f"pass {key}={example}")


def _number_in(cfg: DictConfig, key: str, lo: float, hi: float | None, example: float) -> None:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f"≥ {lo}"
        raise ConfigError(key, v, f"must be a number {rng}", f"pass {key}={example}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found; return None if the run can start."""
    _positive_int(cfg, "metrics.num_samples", 500)
    _positive_int(cfg, "sampler.steps", 20)
    _positive_int(cfg, "sampler.batch_size", 250)
    _number_in(cfg, "sampler.eta", 0.0, 1.0, 0.0)
    _number_in(cfg, "sampler.guidance_scale", 0.0, None, 2.0)
    if _get(cfg, "threads") is not None:
        _positive_int(cfg, "threads", 2)

    method, bits = _get(cfg, "method.name"), _get(cfg, "bits.name")
    supported = list(_get(cfg, "method.supported_bits", []) or [])
    if supported and bits not in supported:
        raise ConfigError("bits", bits, f"method={method} does not run at these bits",
                          f"choose one of bits={','.join(supported)} for method={method}, "
                          f"or a method that supports bits={bits}")

    if bits != "fp" and _get(cfg, "bits") is not None:  # a name contradicting its bits, bad keys
        from lowbit.quant import QuantConfig

        QuantConfig.from_dict(OmegaConf.to_container(cfg.bits, resolve=True))

    if _get(cfg, "export", False) and (method == "fp" or bits == "fp"):
        raise ConfigError("export", True, "a full-precision run has no quantized model to pack",
                          "set export=false, or choose a quantized method and bits")
    if _get(cfg, "export", False):
        from lowbit.export import packable

        why = packable(method, bits)
        if why:
            raise ConfigError("export", True, why,
                              "set export=false: the fake-quant student is still saved "
                              "(student.safetensors + quant_map.json) and reloads with "
                              "lowbit.export.load_student")

    if "model" in cfg and "path" in cfg.model.keys() and OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path", "???", "this model config needs a pipeline",
                          "pass model.path=<hub id or local diffusers pipeline folder>")
    mpath = _get(cfg, "model.path")
    if mpath is not None and str(mpath).startswith((".", "/", "~")) and not Path(
            os.path.expanduser(str(mpath))).is_dir():
        raise ConfigError("model.path", mpath, "no such folder",
                          "give a folder written by a diffusers pipeline's save_pretrained, "
                          "or a hub id such as google/ddpm-cifar10-32")

    ckpt = _get(cfg, "model.loader.checkpoint")
    if ckpt and not Path(str(ckpt)).exists():
        raise ConfigError("model.loader.checkpoint", ckpt, "no such file or folder",
                          "give the path of an existing checkpoint, or null for the shipped one")

    n_cls = _get(cfg, "dataset.num_classes")
    if n_cls is not None and _get(cfg, "model.conditioning") == "class" and n_cls < 1:
        raise ConfigError("dataset.num_classes", n_cls, "a class-conditional model needs classes",
                          "set dataset.num_classes to the model's number of classes")


def check_writable(folder: Path) -> None:
    """Fail early (before sampling) when the run directory cannot hold results."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("paths.output_dir", str(folder), f"cannot create it ({e.strerror})",
                          "pass hydra.run.dir=<a writable folder> or paths.log_dir=...") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("paths.output_dir", str(folder), "is not writable",
                          "pass hydra.run.dir=<a writable folder> or paths.log_dir=...")
