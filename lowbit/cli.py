"""Hydra entry points: ``lowbit`` (one run, or a sweep with ``-m``)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("lowbit")

CONF_DIR = Path(__file__).resolve().parent / "conf"
#: where the ranks > 0 of a multi-process run log (kept in the run folder across attempts)
RANK_LOGS = "rank_logs"


def _job_log(output_subdir: str | None, run_dir: str, job_name: str) -> str:
    """The job log's path: beside Hydra's ``.hydra/`` (``output_subdir``) in the attempt's
    staging folder; ``rank_logs/`` for a rank started without one (``hydra.output_subdir=null``:
    the other processes of a multi-process run)."""
    if output_subdir is None:
        return str(Path(run_dir) / RANK_LOGS / f"{job_name}.log")
    return str(Path(run_dir) / Path(output_subdir).parent / f"{job_name}.log")


OmegaConf.register_new_resolver("lowbit_job_log", _job_log, replace=True)


class JobLogHandler(logging.FileHandler):
    """The job log's file handler: creates the log's folder when it first writes."""

    def _open(self):  # noqa: ANN202 - logging's own signature
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


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
    """``results.json`` with status failed and the error — unless the folder holds a finished
    result, or an unreadable one (the refusal names it), which a failure never replaces."""
    from lowbit.rundir import RESULTS
    from lowbit.tracking import read_results, write_json_atomic

    path = out / RESULTS
    try:
        if not out.is_dir():
            return
        if path.is_file() and read_results(path).get("status") == "done":
            log.error("this attempt failed; %s keeps the earlier finished result", path)
            return  # never overwrite results already written
        sampler = cfg.get("sampler") or {}
        write_json_atomic(path, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "model": _label(cfg, "model.name"),
                                 "method": _label(cfg, "method.name"),
                                 "bits": _label(cfg, "bits.name"),
                                 "sampler": f"{sampler.get('kind')}{sampler.get('steps')}",
                                 "sampler_preset": _label(cfg, "sampler.name")})
    except Exception:  # noqa: BLE001 - reporting the original error matters more
        pass


def _label(cfg: DictConfig, key: str) -> object:
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # noqa: BLE001 - an unresolvable value is not worth a second error
        return None


class RunDirCheck(Callback):
    """Hydra callback: an unwritable ``hydra.run.dir`` / ``hydra.sweep.dir`` is reported as
    lowbit's own error (exit status 1), before Hydra tries to create it. Hydra turns a
    callback's exception into a warning, so the error is printed here and the process exits."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        _exit_on_error(_check_hydra_dir, config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        _exit_on_error(_check_hydra_dir, config, "hydra.sweep.dir")


def _exit_on_error(check: Callable[..., None], *args: object) -> None:
    import sys

    from lowbit.config import ConfigError

    try:
        check(*args)
    except ConfigError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


def _check_hydra_dir(config: DictConfig, key: str) -> None:
    from lowbit.config import ConfigError

    try:
        folder = Path(str(OmegaConf.select(config, key)))
    except Exception:  # noqa: BLE001 - Hydra reports its own interpolation errors
        return
    fix = f"pass {key}=<a writable folder> (or paths.log_dir=<a writable folder>)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(key, str(folder), f"cannot create it ({e.strerror})", fix) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(key, str(folder), "is not writable", fix)


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
