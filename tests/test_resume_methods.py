"""Exact resume of every fine-tuning method, and honest fine-tune time across a resume.

Each case runs a method's ``prepare`` on the built-in digits model three times with tiny budgets:
uninterrupted; interrupted after step ``k`` of one training stage (the last checkpoint is at an
earlier step, so the resumed run redoes work); resumed with ``resume=true``. Every run stands for
a fresh process (a new model, method and context) and starts from another global RNG state, so
an initialisation that drew from the global RNG instead of a named seed stream shows up too. The
resumed student must equal the uninterrupted one bit for bit (``torch.equal`` on every tensor of
its state dict), and its ``finetune_s`` must count the interrupted attempt's checkpointed
training time as well as the resumed part.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch

from lowbit.methods import MethodContext, build_method
from lowbit.models.digits import load_digits_model
from lowbit.pipeline import build_dataset
from lowbit.train import FitStats
from lowbit.train.fit import stored_seconds

fit_mod = importlib.import_module("lowbit.train.fit")  # the module (lowbit.train.fit is a function)

TINY = ("threads=1", "sampler.steps=3", "logger=none", "trainer.enable_progress_bar=false")
# four optimiser steps (per stage), a checkpoint every two: the interrupted run stops after
# step 3, so its last checkpoint is at step 2 and the resumed run redoes step 3
TRAIN = ("method.batch_size=2", "method.checkpoint_every=2")
DISTILL = ("method.calib_n=4", "method.calib_steps=2", "method.calib_batch_size=4",
           "method.max_samples=256", "method.steps=4", *TRAIN)
REAL = ("method.calib_n=8", "method.calib_batch_size=4", "method.steps=4", *TRAIN)
METHODS = {
    # TLA then CMA, four steps each
    "quest": ("method=quest", "bits=w4a4", "method.calib_n=4", "method.calib_steps=2",
              "method.calib_batch_size=4", "method.max_samples=256", "method.tla.steps=4",
              "method.cma.steps=4", "method.adaround.iters=2", *TRAIN),
    "efficientdm": ("method=efficientdm", "bits=w4a4", "method.rank=4", *DISTILL),
    "qat": ("method=qat", "bits=w4a4", *DISTILL),
    # EBB switches to one basis at step 2: inside the redone part
    "binarydm": ("method=binarydm", "bits=w1a4", "method.lrm_samples=8", "method.ebb_switch=0.5",
                 *REAL),
    "bidm": ("method=bidm", "bits=w1a1", *REAL),
    "binary_baseline": ("method=binary_baseline", "bits=w1a1", "method.variant=react", *REAL),
    "irqlora": ("method=irqlora", "bits=w4a16", "method.rank=4", "method.icq_candidates=11",
                "method.steps=4", *TRAIN),
}
STOP = 3  # interrupted after this many steps of the stage
# (method, checkpoint folder of the interrupted stage): QuEST inside either stage
CASES = [("quest", "tla"), ("quest", "cma"), ("efficientdm", None), ("qat", None),
         ("binarydm", None), ("bidm", None), ("binary_baseline", None), ("irqlora", None)]
# the default run: two stages with a finished stage loaded, real-data QAT with the cross-timestep
# state, a LoRA init; the rest is marked slow (about a minute each on one busy CPU thread)
FAST = {("quest", "cma"), ("bidm", None), ("irqlora", None)}


pytestmark = pytest.mark.usefixtures("omp_threads")


class Interrupt(RuntimeError):
    pass


def _stop_at(step: int) -> L.Callback:
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                raise Interrupt(f"interrupted after step {step}")
    return StopAt()


@dataclass
class Fits:
    """What the fits of one run did: per checkpoint folder its stats and wall-clock seconds."""

    stats: dict[str, FitStats] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)


@pytest.fixture
def run_method(make_cfg, monkeypatch):
    """``run(method, out, resume, seed, fits, stop_in=None) -> (student, ctx)``: one run of the
    method's ``prepare`` as the pipeline makes it (fresh model, dataset and context), with the
    global RNG seeded to ``seed``; its fits are recorded in ``fits``; ``stop_in``: interrupt the
    fit whose checkpoints go to that folder after :data:`STOP` steps."""
    build_trainer, fit_module = fit_mod.build_trainer, fit_mod.fit_module
    plan: dict = {}

    def build_trainer_stopping(trainer_cfg, ckpt_dir, max_steps, loggers=False, callbacks=(),
                               **kw):
        if Path(ckpt_dir).name == plan.get("stop_in"):
            callbacks = [*callbacks, _stop_at(STOP)]
        return build_trainer(trainer_cfg, ckpt_dir, max_steps, loggers, callbacks, **kw)

    def fit_module_timed(module, data, trainer_cfg, ckpt_dir, *args, **kw):
        t0, name = time.perf_counter(), Path(ckpt_dir).name
        try:
            st = fit_module(module, data, trainer_cfg, ckpt_dir, *args, **kw)
            plan["fits"].stats[name] = st
            return st
        finally:
            plan["fits"].wall[name] = time.perf_counter() - t0

    monkeypatch.setattr(fit_mod, "build_trainer", build_trainer_stopping)
    monkeypatch.setattr(fit_mod, "fit_module", fit_module_timed)

    def run(method: str, out: Path, resume: bool, seed: int, fits: Fits,
            stop_in: str | None = None):
        plan["stop_in"], plan["fits"] = stop_in, fits
        cfg = make_cfg(*TINY, *METHODS[method], f"resume={str(resume).lower()}", output_dir=out)
        torch.manual_seed(seed)
        model = load_digits_model()
        ctx = MethodContext(cfg=cfg, output_dir=out, cache_dir=Path(cfg.paths.cache_dir),
                            model=model, dataset=build_dataset(cfg))
        return build_method(cfg.method).prepare(model.net, ctx), ctx

    return run


@pytest.mark.parametrize("method,stage", [
    pytest.param(m, s, id=f"{m}-{s}" if s else m,
                 marks=() if (m, s) in FAST else pytest.mark.slow) for m, s in CASES])
def test_interrupted_finetune_resumes_bit_exact(run_method, tmp_path, method, stage):
    folder = stage or fit_mod.CHECKPOINT_DIR
    full, full_ctx = run_method(method, tmp_path / "full", False, 1, Fits())

    out, killed, fits = tmp_path / "interrupted", Fits(), Fits()
    with pytest.raises(Interrupt):
        run_method(method, out, False, 2, killed, stop_in=folder)
    ckpt_dir = out / fit_mod.CHECKPOINT_DIR / (stage or "")
    saved = torch.load(ckpt_dir / fit_mod.CKPT_NAME, weights_only=True)
    assert 0 < saved["global_step"] < STOP  # the resumed run redoes steps
    stored = stored_seconds(saved)

    resumed, ctx = run_method(method, out, True, 3, fits)
    assert fits.stats[folder].resumed
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"

    # fine-tune time: the interrupted attempt's checkpointed seconds + the resumed part
    assert fits.stats[folder].seconds_before == stored > 0
    total = ctx.cost["finetune_s"]
    assert total == sum(s.seconds for s in fits.stats.values())  # what the method records
    # every counted second was spent inside a fit of one of the two attempts, and the total
    # exceeds all the resumed attempt spent in its fits (it holds checkpointed time before it)
    # more than this attempt clocked (the interrupted part counts), never more than both
    # attempts' wall time (the clock runs inside each fit_module call)
    this_attempt = sum(s.seconds - s.seconds_before for s in fits.stats.values())
    assert this_attempt < total <= sum(killed.wall.values()) + sum(fits.wall.values())
    assert full_ctx.cost["finetune_s"] > 0
