"""Checks of a composed config that fail before any compute, naming the key and the fix."""

from __future__ import annotations

import math
import os
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

DEVICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")
#: the fewest samples each metric item can measure: the Fréchet distance needs a sample
#: covariance (N - 1 >= 1 degrees of freedom) and KID's unbiased MMD estimate divides by m(m - 1)
#: for a subset of m <= N samples, so both need N >= 2
MIN_SAMPLES = {"lowbit.metrics.DigitsMetrics": 2, "lowbit.metrics.digits.DigitsMetrics": 2}


class ConfigError(ValueError, CompactHydraException):
    """A config value lowbit cannot run with. The message names the key and how to fix it
    (Hydra prints it without a traceback)."""

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


def _non_finite(node: object, prefix: str = "") -> tuple[str, float] | None:
    """The first NaN/inf number in a resolved config (``yaml`` reads ``.nan`` and ``1e999``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            found = _non_finite(v, f"{prefix}{k}.")
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _non_finite(v, f"{prefix}{i}.")
            if found:
                return found
    elif isinstance(node, float) and not math.isfinite(node):
        return prefix[:-1], node
    return None


def _bool(cfg: DictConfig, key: str, allow_none: bool = False) -> None:
    v = _get(cfg, key)
    if isinstance(v, bool) or (allow_none and v is None):
        return
    choices = "true, false or null" if allow_none else "true or false"
    raise ConfigError(key, v, f"must be {choices}", f"pass {key}=true or {key}=false")


def _check_device(cfg: DictConfig) -> None:
    v = _get(cfg, "device")
    name = str(v)
    ok = name in ("auto", "cpu", "cuda", "mps") or (
        name.startswith("cuda:") and name[5:].isdigit())
    if not ok:
        raise ConfigError("device", v, f"unknown device (lowbit runs on {', '.join(DEVICES)})",
                          "pass device=auto, device=cpu or device=cuda")


def _check_seed(cfg: DictConfig) -> None:
    v = _get(cfg, "seed")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError("seed", v, "must be a non-negative integer", "pass seed=0")


def _check_sampler(cfg: DictConfig) -> None:
    from lowbit.sampling import SCHEDULERS

    kind = _get(cfg, "sampler.kind")
    if kind not in SCHEDULERS:
        raise ConfigError("sampler.kind", kind, "unknown sampler",
                          f"choose one of sampler.kind={', '.join(sorted(SCHEDULERS))}, or a "
                          f"preset: sampler=ddim20")


def _check_metrics(cfg: DictConfig) -> None:
    _positive_int(cfg, "metrics.grid_size", 100)
    n = _get(cfg, "metrics.num_samples")
    items = _get(cfg, "metrics.items") or {}
    for name, item in items.items():
        if item is None:
            continue
        need = MIN_SAMPLES.get(str(item.get("_target_")), 1)
        if str(item.get("_target_")).endswith("InceptionMetrics"):  # FID, IS splits, PR's k
            need = max(2, int(item.get("is_splits", 10)) if item.get("inception_score", True)
                       else 1, int(item.get("pr_k", 3)) + 1 if item.get("precision_recall", True)
                       else 1)
        if n < need:
            raise ConfigError("metrics.num_samples", n, f"metrics.items.{name} needs at least "
                              f"{need} samples (a Fréchet distance needs a sample "
                              f"covariance; IS its splits; precision/recall k + 1)",
                              f"pass metrics.num_samples={max(need, 50)} or more (FID is biased "
                              f"high below a few hundred)")


def _check_method(cfg: DictConfig) -> None:
    """The method's typed hyper-parameters (strict ``from_cfg`` in its constructor)."""
    if _get(cfg, "method._target_") is None:
        return
    from lowbit.methods import build_method

    name = _get(cfg, "method.name")
    try:
        build_method(cfg.method)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("method", name, str(e),
                          f"correct it on the command line or in lowbit/conf/method/{name}.yaml"
                          ) from e


def check_cache_dir(cfg: DictConfig) -> None:
    """``paths.cache_dir`` must be a writable folder (FP trajectories, references, samples)."""
    v = _get(cfg, "paths.cache_dir")
    if v is None:
        return
    folder = Path(os.path.expanduser(str(v)))
    fix = "pass paths.cache_dir=<a writable folder> (or set LOWBIT_CACHE)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("paths.cache_dir", str(v), f"cannot create it ({e.strerror})", fix) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("paths.cache_dir", str(v), "is not writable", fix)


def _check_ldm_checkpoint(cfg: DictConfig) -> None:
    """``model.checkpoint`` + ``model.ldm_config`` (a CompVis LDM, converted on first load)."""
    ckpt, yaml = _get(cfg, "model.checkpoint"), _get(cfg, "model.ldm_config")
    if not ckpt:
        return
    if not OmegaConf.is_missing(cfg.model, "path") and _get(cfg, "model.path"):
        raise ConfigError("model.checkpoint", ckpt, "model.path gives the model already",
                          "pass either model.path or model.checkpoint + model.ldm_config")
    if not Path(os.path.expanduser(str(ckpt))).is_file():
        raise ConfigError("model.checkpoint", ckpt, "no such file",
                          "give the CompVis model.ckpt (e.g. models/ldm/lsun_beds256/model.ckpt)")
    if not yaml or not Path(os.path.expanduser(str(yaml))).is_file():
        raise ConfigError("model.ldm_config", yaml, "a CompVis checkpoint needs its yaml",
                          "pass model.ldm_config=<configs/latent-diffusion/NAME.yaml>")


def _check_cache(cfg: DictConfig) -> None:
    from lowbit.cache import build_cache

    try:
        build_cache(_get(cfg, "cache"))
    except (ValueError, TypeError) as e:
        msg = str(e)
        key = msg.split("=", 1)[0] if msg.startswith("cache.") else "cache"
        raise ConfigError(key, _get(cfg, key) if key != "cache" else _get(cfg, "cache.name"),
                          msg, "see lowbit/conf/cache/deepcache.yaml for the keys and ranges"
                          ) from None


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found; return None if the run can start."""
    bad = _non_finite(OmegaConf.to_container(cfg, resolve=True))
    if bad:
        raise ConfigError(bad[0], bad[1], "is not a finite number", f"pass a finite {bad[0]}")
    _bool(cfg, "force")
    _bool(cfg, "resume", allow_none=True)
    _bool(cfg, "export")
    _bool(cfg, "time_vs_fp")
    _check_seed(cfg)
    _check_device(cfg)
    _positive_int(cfg, "metrics.num_samples", 500)
    _check_sampler(cfg)
    _positive_int(cfg, "sampler.steps", 20)
    _check_cache(cfg)
    if _get(cfg, "sampler.consistent_clip") is not None:
        _bool(cfg, "sampler.consistent_clip")
    _positive_int(cfg, "sampler.batch_size", 250)
    _number_in(cfg, "sampler.eta", 0.0, 1.0, 0.0)
    _number_in(cfg, "sampler.guidance_scale", 0.0, None, 2.0)
    if _get(cfg, "threads") is not None:
        _positive_int(cfg, "threads", 2)
    _check_metrics(cfg)

    method, bits = _get(cfg, "method.name"), _get(cfg, "bits.name")
    supported = list(_get(cfg, "method.supported_bits", []) or [])
    if supported and bits not in supported:
        raise ConfigError("bits", bits, f"method={method} does not run at these bits",
                          f"choose one of bits={','.join(supported)} for method={method}, "
                          f"or a method that supports bits={bits}")

    if bits != "fp" and _get(cfg, "bits") is not None:  # a name contradicting its bits, bad keys
        from lowbit.quant import QuantConfig, run_bits

        QuantConfig.from_dict(run_bits(cfg))

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

    # .keys(): `in` on a DictConfig is False for a missing (???) value, which is what is asked
    path_key = "model" in cfg and "path" in cfg.model.keys()  # noqa: SIM118
    if path_key and OmegaConf.is_missing(cfg.model, "path") and not _get(cfg, "model.checkpoint"):
        # a CompVis LDM config (conf/model/ldm*.yaml)
        ldm = "checkpoint" in cfg.model.keys()  # noqa: SIM118 - as "path" above
        raise ConfigError("model.path", "???", "this model config needs a pipeline",
                          "pass model.path=<hub id or local diffusers pipeline folder>" + (
                              ", or the CompVis files: model.checkpoint=<model.ckpt> "
                              "model.ldm_config=<its yaml>" if ldm else ""))
    _check_ldm_checkpoint(cfg)
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
    _check_method(cfg)
    check_cache_dir(cfg)


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
