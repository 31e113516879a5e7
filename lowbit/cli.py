"""Hydra entry points: ``lowbit`` (one run, or a sweep with ``-m``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("lowbit")

CONF_DIR = Path(__file__).resolve().parent / "conf"


def task_wrapper(fn: Callable[[DictConfig], dict]) -> Callable[[DictConfig], float | None]:
    """Log the run dir, record a failure in results.json (unless a finished result is already
    there) and return the metric an Optuna sweeper would optimise (FID)."""

    def wrapped(cfg: DictConfig) -> float | None:
        out = Path(cfg.paths.output_dir)
        log.info("run dir: %s", out)
        try:
            results = fn(cfg)
        except Exception as e:
            _record_failure(out, cfg, e)
            raise
        return results.get("metrics", {}).get("fid")

    return wrapped


def _record_failure(out: Path, cfg: DictConfig, e: Exception) -> None:
    from lowbit.pipeline import RESULTS
    from lowbit.tracking import read_results, write_json_atomic

    path = out / RESULTS
    try:
        if path.is_file() and read_results(path).get("status") == "done":
            return  # never overwrite results already written
        if not out.is_dir():
            return
        write_json_atomic(path, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "model": cfg.model.name, "method": cfg.method.name,
                                 "bits": cfg.bits.name, "sampler": cfg.sampler.name})
    except Exception:  # noqa: BLE001 - reporting the original error matters more
        pass


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from lowbit.pipeline import run_experiment

    return task_wrapper(run_experiment)(cfg)


def main() -> None:
    _hydra_main()


def compose_config(overrides: list[str] | None = None, output_dir: str | Path | None = None) -> DictConfig:
    """The config ``lowbit`` would run with these overrides, for use from Python and tests.

    Hydra's run dir does not exist outside ``@hydra.main``, so ``paths.output_dir`` is set to
    ``output_dir`` (a new temporary folder if None).
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or tempfile.mkdtemp(prefix="lowbit-"))
    OmegaConf.resolve(cfg)
    return cfg
