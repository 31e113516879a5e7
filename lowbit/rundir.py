"""The run folder: what one attempt writes, the config fingerprint, staging and swap.

A run folder holds the files of **one attempt** (one execution of ``lowbit`` into that folder)::

    <run dir>/results.json          written last; its ``fingerprint`` names the config
    <run dir>/student.safetensors   the method's student (metadata ``lowbit_fingerprint``)
    <run dir>/quant_map.json        how the student rebuilds without its method
    <run dir>/samples/ grid.png     exactly the images the metrics read
    <run dir>/packed/               export=true (lowbit-export writes it later otherwise)
    <run dir>/.hydra/ lowbit.log    the attempt's composed config and log (Hydra)

An attempt writes all of them into ``<run dir>/.staging-<attempt>/`` and :meth:`Attempt.commit`
swaps them in only when the attempt is done: ``results.json`` leaves first and arrives last, so
whenever a ``results.json`` is present every file beside it belongs to the same attempt. A failed
attempt never touches the folder's files; its log and config are kept in ``.failed-attempt/``.

Kept **across** attempts (never swapped):

- training state, for resume: ``checkpoints/`` (Lightning ``last.ckpt``), ``adaround/`` (finished
  reconstruction units), ``train_logs/``, ``sample_shards/`` (the batches of samples an
  unfinished attempt drew, :mod:`lowbit.shards`). ``checkpoints/fingerprint.json`` stamps them with the
  training fingerprint of the config that made them (:func:`training_config`); see
  :func:`plan_resume` for when they are resumed, refused or discarded;
- ``wandb/``: W&B keeps one sub-folder per run, so attempts never share a file there.
- ``rank_logs/``: the logs of ranks 1, 2, … of multi-process runs (:mod:`lowbit.dist`), appended.

The **fingerprint** is a hash of the resolved config without the keys that do not shape results
(:data:`NOT_RESULT_KEYS`: where and how a run executes, what happens after it, labels of the
job). The training fingerprint also leaves out ``metrics`` (they measure the student, they do
not shape it), so the same fine-tune can be measured again with other metrics via
``force=true resume=true``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

# -- file names ----------------------------------------------------------------------------------
RESULTS = "results.json"
STUDENT = "student.safetensors"
QMAP = "quant_map.json"  # = lowbit.quant.qmap.QMAP_FILE
SAMPLES = "samples"
GRID = "grid.png"
PACKED = "packed"
HYDRA_DIR = ".hydra"
CHECKPOINTS = "checkpoints"
FINGERPRINT_FILE = "fingerprint.json"
STAGING_PREFIX = ".staging-"
REPLACED_PREFIX = ".replaced-"
FAILED_ATTEMPT = ".failed-attempt"
#: in the staging folder (swapped in with it): the attempt's id and run fingerprint
ATTEMPT_FILE = "attempt.json"
#: training state kept across attempts (resume); stamped by checkpoints/fingerprint.json
STATE_DIRS = (CHECKPOINTS, "adaround", "train_logs", "sample_shards")
#: held (flock) by the live attempt: a second process on the same folder is refused
LOCK_FILE = ".lock"
#: kept across attempts without belonging to one
KEPT = (*STATE_DIRS, "wandb", LOCK_FILE, "rank_logs")
#: safetensors metadata key of the student's fingerprint
STUDENT_FINGERPRINT_KEY = "lowbit_fingerprint"

# -- the fingerprint -----------------------------------------------------------------------------
#: top-level keys that do not shape a run's results: re-run control (force, resume), what happens
#: after the run (export, logger), where and how fast it runs (paths, device, threads, hydra), and
#: labels of the job (task_name, tags)
NOT_RESULT_KEYS = ("force", "resume", "export", "logger", "threads", "device", "paths", "tags",
                   "hydra", "task_name")
#: Trainer keys about progress display and log cadence only
NOT_RESULT_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")
#: what the training state does not depend on besides those: the metrics measure the student
NOT_TRAINING_KEYS = ("metrics",)


def _container(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(dict(cfg), default=str))


def result_config(cfg: Any) -> dict[str, Any]:
    """The part of ``cfg`` that shapes a run's results (see :data:`NOT_RESULT_KEYS`)."""
    c = {k: v for k, v in _container(cfg).items() if k not in NOT_RESULT_KEYS}
    if isinstance(c.get("trainer"), dict):
        c["trainer"] = {k: v for k, v in c["trainer"].items()
                        if k not in NOT_RESULT_TRAINER_KEYS}
    return c


def training_config(cfg: Any) -> dict[str, Any]:
    """The part of ``cfg`` that shapes the training state (checkpoints): model, method, bits,
    dataset, sampler (calibration trajectories), seed, trainer …"""
    return {k: v for k, v in result_config(cfg).items() if k not in NOT_TRAINING_KEYS}


def fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of a config dict (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_fingerprint(cfg: Any) -> str:
    return fingerprint(result_config(cfg))


def training_fingerprint(cfg: Any) -> str:
    return fingerprint(training_config(cfg))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> str:
    """``key: old → new`` for the differing leaves of two config dicts (at most ``limit``)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    parts = [f"{k}: {a.get(k, '<absent>')!r} → {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"… {len(keys) - limit} more")
    return "; ".join(parts) or "(no key differs: written by another lowbit version)"


class RunDirError(ValueError, CompactHydraException):
    """The run folder cannot take this attempt (another config's results or checkpoints, a
    corrupt file, no space). The message names the file, the reason and the fix (Hydra prints
    it without a traceback)."""


# -- reading what a folder holds ----------------------------------------------------------------
def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def previous_results(run_dir: Path, force: bool) -> dict[str, Any] | None:
    """The folder's ``results.json`` (None without one). A file that is not a JSON object is an
    error naming it and ``force=true`` — unless ``force`` (the attempt replaces it)."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    try:
        res = read_json(path)
        if not isinstance(res, dict):
            raise ValueError(f"a JSON {type(res).__name__}, not an object")
    except (OSError, ValueError) as e:
        if force:
            log.warning("%s is unreadable (%s); force=true replaces it", path, e)
            return None
        raise RunDirError(f"{path} is unreadable ({e}). Fix: pass force=true to re-run the job "
                          f"and replace it, or choose another run dir "
                          f"(hydra.run.dir=...)") from e
    return res


def stored_fingerprint(results: Mapping[str, Any]) -> str | None:
    """The run fingerprint of ``results`` (recomputed from its config for older files)."""
    fp = results.get("fingerprint")
    if isinstance(fp, str):
        return fp
    cfg = results.get("config")
    return run_fingerprint(cfg) if isinstance(cfg, dict) else None


def check_skip(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The finished results to return instead of running (same fingerprint, not ``force``);
    None to run; :class:`RunDirError` when a finished result of another config is there."""
    force = bool(cfg.get("force", False))
    previous = previous_results(run_dir, force)
    if previous is None or force or previous.get("status") != "done":
        return None
    if stored_fingerprint(previous) == run_fingerprint(cfg):
        return previous
    path = Path(run_dir) / RESULTS
    old = previous.get("config")
    diff = (config_diff(result_config(old), result_config(cfg)) if isinstance(old, dict)
            else "its config is not recorded")
    raise RunDirError(f"{path} holds the finished results of another config ({diff}). Fix: pass "
                      f"force=true to replace them, or choose another run dir "
                      f"(hydra.run.dir=...)")


# -- training state (checkpoints) -----------------------------------------------------------------
def state_dirs(run_dir: Path) -> list[Path]:
    """The training-state folders present in ``run_dir`` (non-empty)."""
    out = []
    for name in STATE_DIRS:
        p = Path(run_dir) / name
        if p.is_dir() and any(f.name != FINGERPRINT_FILE for f in p.iterdir()):
            out.append(p)
    return out


def plan_resume(run_dir: Path, cfg: Any) -> bool:
    """Decide what happens to the training state of ``run_dir`` before any compute; returns the
    effective ``resume``.

    - no state: start fresh (``resume`` is irrelevant);
    - ``force=true`` (without ``resume=true``) or ``resume=false``: the state is discarded (logged);
    - otherwise (``resume`` true or null = auto) the state is resumed **only** when its stamp
      (``checkpoints/fingerprint.json``) matches this config's training fingerprint; a missing or
      different stamp is refused, naming the differing keys, with the fixes.

    So a plain re-run of an interrupted fine-tune continues it (resume by default when the
    fingerprint matches: the same config gives the same result, as exact resume guarantees).
    """
    run_dir = Path(run_dir)
    present = state_dirs(run_dir)
    resume = cfg.get("resume", None)
    force = bool(cfg.get("force", False))
    if not present:
        return bool(resume)
    names = ", ".join(p.name + "/" for p in present)
    if resume is False or (force and resume is not True):
        why = "resume=false" if resume is False else "force=true"
        log.warning("%s: discarding the training state in %s (%s)", why, run_dir, names)
        discard_state(run_dir)
        return False
    stamp_path = run_dir / CHECKPOINTS / FINGERPRINT_FILE
    fixes = ("Fix: pass force=true (or resume=false) to discard it and start afresh, or choose "
             "another run dir (hydra.run.dir=...)")
    try:
        stamp = read_json(stamp_path)
        if not isinstance(stamp, dict) or not isinstance(stamp.get("fingerprint"), str):
            raise ValueError("no fingerprint in it")
    except (OSError, ValueError) as e:
        raise RunDirError(f"{run_dir} holds training state ({names}) without a readable "
                          f"{CHECKPOINTS}/{FINGERPRINT_FILE} ({e}): lowbit cannot tell which "
                          f"config made it. {fixes}") from e
    if stamp["fingerprint"] != training_fingerprint(cfg):
        old = stamp.get("config")
        diff = (config_diff(old, training_config(cfg)) if isinstance(old, dict)
                else "config not recorded")
        raise RunDirError(f"{run_dir} holds the training state ({names}) of another config "
                          f"({diff}); resuming it would train one config's checkpoint under "
                          f"another's settings. {fixes}")
    for ckpt in sorted((run_dir / CHECKPOINTS).rglob("*.ckpt")):
        _check_checkpoint(ckpt, fixes)
    log.info("resuming the training state in %s (%s): its fingerprint matches this config",
             run_dir, names)
    return True


def _check_checkpoint(path: Path, fixes: str) -> None:
    """A torch checkpoint is a zip archive whose directory is at its end: a truncated file (a
    full disk, a copy cut short) has none. Reading the directory is cheap; nothing is loaded."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise RunDirError(f"{path} is truncated or corrupt ({e}); it cannot be resumed. Fix: "
                          f"delete it to restart that stage, or pass resume=false (or "
                          f"force=true) to discard the training state") from e


def discard_state(run_dir: Path) -> None:
    for name in STATE_DIRS:
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def stamp_state(run_dir: Path, cfg: Any) -> Path:
    """Write ``checkpoints/fingerprint.json`` (training fingerprint and config) before training
    writes any state."""
    path = Path(run_dir) / CHECKPOINTS / FINGERPRINT_FILE
    from lowbit.tracking import write_json_atomic

    write_json_atomic(path, {"fingerprint": training_fingerprint(cfg),
                             "config": training_config(cfg)})
    return path


def unstamp_if_unused(run_dir: Path) -> None:
    """Remove ``checkpoints/`` when it holds nothing but the stamp (a method without training
    state)."""
    ck = Path(run_dir) / CHECKPOINTS
    if not state_dirs(run_dir) and ck.is_dir():
        shutil.rmtree(ck, ignore_errors=True)


# -- one live attempt per folder ------------------------------------------------------------------
class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` for the whole attempt: a second process
    running a job in the same folder (two sweeps with one ``hydra.sweep.dir``, a re-run while the
    first is alive) is refused before any compute instead of deleting the live attempt's staging
    folder. The lock dies with its process, so a killed attempt never blocks the next one."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent}: another attempt (pid {holder}) is running in this folder. "
                f"Fix: wait for it to finish, or run this job in another folder "
                f"(hydra.run.dir / hydra.sweep.dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- staging and swap -----------------------------------------------------------------------------
def new_attempt_id() -> str:
    t = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t)) + f"-{int(t * 1e6) % 10**6:06d}" \
        f"-{os.getpid()}"


def hydra_staging(run_dir: Path) -> Path | None:
    """The staging folder Hydra wrote this job's ``.hydra/`` into (``hydra.output_subdir`` is
    ``.staging-<attempt>/.hydra``), or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        sub = HydraConfig.get().output_subdir
    except Exception:  # noqa: BLE001 - outside a Hydra job
        return None
    if not sub:
        return None
    parent = Path(str(sub)).parent
    if not parent.name.startswith(STAGING_PREFIX):
        return None
    runtime = Path(str(HydraConfig.get().runtime.output_dir))
    if runtime.resolve() != Path(run_dir).resolve():
        return None
    return Path(run_dir) / parent


class Attempt:
    """One attempt's staging folder in ``run_dir``; :meth:`commit` swaps it in."""

    def __init__(self, run_dir: Path, staging: Path | None = None,
                 fingerprint: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.staging = staging or self.run_dir / f"{STAGING_PREFIX}{new_attempt_id()}"
        self.id = self.staging.name[len(STAGING_PREFIX):]
        self.fingerprint = fingerprint

    def begin(self) -> Attempt:
        """Create the staging folder; remove what killed attempts left behind."""
        for p in self.run_dir.iterdir():
            if p.name.startswith((STAGING_PREFIX, REPLACED_PREFIX)) and p != self.staging:
                shutil.rmtree(p, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        from lowbit.tracking import write_json_atomic

        write_json_atomic(self.staging / ATTEMPT_FILE,
                          {"attempt": self.id, "fingerprint": self.fingerprint})
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> None:
        """Swap the staging folder's files in for the folder's previous attempt. ``results.json``
        leaves first and arrives last."""
        out, staging = self.run_dir, self.staging
        if not (staging / RESULTS).is_file():
            raise RuntimeError(f"{staging} has no {RESULTS}: nothing to commit")
        trash = out / f"{REPLACED_PREFIX}{self.id}"
        trash.mkdir(exist_ok=True)
        if (out / RESULTS).exists():
            os.replace(out / RESULTS, trash / RESULTS)
        for p in list(out.iterdir()):
            if p.name in KEPT or p in (trash, staging) or p.name.startswith(
                    (STAGING_PREFIX, REPLACED_PREFIX)):
                continue
            os.replace(p, trash / p.name)
        for p in list(staging.iterdir()):
            if p.name != RESULTS:
                os.replace(p, out / p.name)
        os.replace(staging / RESULTS, out / RESULTS)
        staging.rmdir()
        shutil.rmtree(trash, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (a skipped or refused attempt wrote nothing worth keeping)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def fail(self, error: BaseException) -> Path | None:
        """Keep a failed attempt's log, config and error in ``.failed-attempt/`` (replacing the
        previous one) and drop its outputs; the folder's own files are untouched."""
        dest = self.run_dir / FAILED_ATTEMPT
        try:
            shutil.rmtree(dest, ignore_errors=True)
            if not self.staging.is_dir():
                return None
            for p in list(self.staging.iterdir()):
                if p.name != HYDRA_DIR and not p.name.endswith(".log"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            (self.staging / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
            self.staging.rename(dest)
            return dest
        except OSError:  # no space, no permission: the error itself matters more
            shutil.rmtree(self.staging, ignore_errors=True)
            return None


def folder_fingerprint(folder: Path) -> str | None:
    """The run fingerprint of the attempt writing into ``folder`` (its ``attempt.json``)."""
    try:
        fp = read_json(Path(folder) / ATTEMPT_FILE).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) else None


def student_fingerprint(path: Path) -> str | None:
    """The fingerprint in a student file's safetensors metadata (None: none recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(STUDENT_FINGERPRINT_KEY)


# -- errors while writing -------------------------------------------------------------------------
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def no_space_error(e: OSError, run_dir: Path) -> RunDirError:
    """A clear error for a full disk (the file, the folder's previous results untouched)."""
    where = e.filename or run_dir
    return RunDirError(f"no space left on the device while writing {where} ({e.strerror}); the "
                       f"earlier files of {run_dir} are untouched. Fix: free space on that "
                       f"device (or set paths.cache_dir / hydra.run.dir elsewhere) and re-run")


#: metrics for which +inf is the right value (PSNR of identical images: mse = 0)
INF_ALLOWED = ("psnr",)


def all_finite(values: Any) -> list[str]:
    """Keys (dotted) of NaN or infinite floats in a nested dict of numbers (+inf allowed for
    :data:`INF_ALLOWED`)."""
    bad: list[str] = []
    for k, v in _flatten(values).items():
        if not isinstance(v, float) or math.isfinite(v):
            continue
        if v == math.inf and k.rsplit(".", 1)[-1].endswith(INF_ALLOWED):
            continue
        bad.append(k)
    return bad
