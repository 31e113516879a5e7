"""The shared distillation machinery: parameter selection, deterministic data, exact resume."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lowbit.cli import compose_config
from lowbit.data.trajectories import fp_trajectories
from lowbit.methods.distill import (
    CachedTrajectoryData,
    DistillationModule,
    FPTrajectoryData,
    FPTrajectoryStream,
    LocalLoss,
    fit_distillation,
    param_group,
    quantized_student,
    select_params,
)
from lowbit.methods.ptq import quant_config
from lowbit.models.digits import load_digits_model
from lowbit.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", steps=10, guidance_scale=2.0, batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Honour OMP_NUM_THREADS (conftest sets 2 threads; on a shared machine 1 is faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", before)))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = load_digits_model()
    traj = fp_trajectories(loaded, SAMPLER, n=24, calib_steps=10, seed=3,
                           cache_dir=tmp_path_factory.mktemp("cache"))
    cfg = compose_config(["bits=w4a4", "trainer.enable_progress_bar=false"])
    # min–max init: calibration in a second (the MSE search is for real runs)
    qcfg = quant_config(cfg).with_overrides({"act": {"timestep_aware": True, "init": "minmax"},
                                             "weight": {"init": "minmax"}})
    torch.manual_seed(0)
    student, info = quantized_student(loaded.denoiser, qcfg, traj, batch_size=24)
    return loaded, traj, cfg, student


def test_select_params_by_role_and_pattern(setup):
    _, _, _, student = setup
    w = select_params(student, "weight", ["*time_emb_proj"])
    assert w and all(n.endswith("time_emb_proj.weight") for n, _ in w)
    assert len(w) == sum(1 for n, _ in student.named_modules() if n.endswith("time_emb_proj"))
    acts = select_params(student, "act_scale", exclude=["*time_emb_proj"])
    assert not any("time_emb_proj" in n for n, _ in acts)
    assert any("matmul_quantizers.softmax" in n for n, _ in acts)  # attention matmuls included
    no_sm = select_params(student, "act_scale", param_exclude=["*.softmax.*"])
    assert len(no_sm) == len(select_params(student, "act_scale")) - sum(
        "softmax" in n for n, _ in select_params(student, "act_scale"))
    with pytest.raises(ValueError, match="unknown parameter role"):
        select_params(student, "gamma")
    with pytest.raises(ValueError, match="no weight parameters"):
        param_group(student, "g", "weight", 1e-3, ["*does_not_exist"])


def test_cached_data_is_a_function_of_the_step(setup):
    _, traj, _, _ = setup
    a, b = CachedTrajectoryData(traj, 8, seed=1), CachedTrajectoryData(traj, 8, seed=1)
    # visiting steps in another order (a resumed run) gives the same batches
    for step in (0, 7, 31, 3, 45):
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x["sample"], y["sample"]) and torch.equal(x["timestep"], y["timestep"])
    # one data epoch visits every (step, sample) pair once, one timestep per batch
    seen = []
    for step in range(a.per_epoch):
        bt = a.batch(step)
        assert bt["timestep"].unique().numel() == 1
        seen.append(bt["sample"].shape[0])
    assert sum(seen) == traj.xt.shape[0] * traj.xt.shape[1] * 2  # cond + uncond halves


def test_fp_stream_advances_with_the_fp_model_and_replays_exactly(setup):
    loaded, _, _, _ = setup
    mk = lambda: FPTrajectoryStream(loaded.denoiser, loaded, SAMPLER, batch_size=3, seed=5)  # noqa: E731
    s = mk()
    seq = [s(n) for n in range(12)]  # 10 steps of trajectory 0, 2 of trajectory 1
    ts = [int(b["timestep"][0]) for b in seq]
    assert ts[:10] == sorted(ts[:10], reverse=True) and ts[10] == ts[0]  # a new trajectory
    assert not torch.equal(seq[10]["sample"], seq[0]["sample"])  # from fresh noise
    replay = mk()(6)  # a resumed run jumps straight to step 6
    assert torch.equal(replay["sample"], seq[6]["sample"])
    assert torch.equal(replay["target"], seq[6]["target"])
    with torch.no_grad():  # the target is the teacher's own output
        assert torch.allclose(seq[6]["target"], loaded.denoiser(
            seq[6]["sample"], seq[6]["timestep"], class_labels=seq[6]["class_labels"]).sample)


class Interrupt(RuntimeError):
    pass


def _fit(setup, ckpt_dir, steps, resume=False, stop_at=None, local=False):
    loaded, traj, cfg, base = setup
    student = copy.deepcopy(base)
    groups = [param_group(student, "w", "weight", 1e-3, ["*time_emb_proj", "*to_q"]),
              param_group(student, "a", "act_scale", 1e-4, param_exclude=["*.softmax.*"])]
    module = DistillationModule(student, loaded.denoiser, groups, max_steps=steps,
                                guidance_scale=2.0, optimizer="adamw", schedule="linear",
                                local_losses=[LocalLoss("tla", ["*time_emb_proj"])] if local else [])
    stream = FPTrajectoryStream(loaded.denoiser, loaded, SAMPLER, batch_size=2, seed=9)
    callbacks = []
    if stop_at is not None:
        import lightning as L

        class StopAt(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == stop_at:
                    raise Interrupt(f"interrupted at step {stop_at}")

        callbacks = [StopAt()]
    stats = fit_distillation(module, FPTrajectoryData(stream), cfg.trainer, ckpt_dir,
                             max_steps=steps, resume=resume, epoch_steps=2, callbacks=callbacks)
    return student, stats


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(setup, tmp_path):
    """Lightning checkpoints (model, AdamW, LR schedule, loop state) + step-indexed data: an
    interrupted and resumed run ends bit-identical to one that never stopped."""
    full, stats = _fit(setup, tmp_path / "a", steps=5)
    assert (tmp_path / "a" / "last.ckpt").is_file() and stats.steps == 5
    with pytest.raises(Interrupt):
        _fit(setup, tmp_path / "b", steps=5, stop_at=3)  # last checkpoint: step 2
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed, rstats = _fit(setup, tmp_path / "b", steps=5, resume=True)
    assert rstats.resumed_from is not None
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], setup[3].state_dict()[k])]
    assert changed, "training changed nothing"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run is loaded, not trained again
    again, astats = _fit(setup, tmp_path / "b", steps=5, resume=True)
    assert astats.seconds == 0.0
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())


def test_only_selected_parameters_change_and_local_loss_is_logged(setup, tmp_path):
    student, stats = _fit(setup, tmp_path / "c", steps=2, local=True)
    before = setup[3].state_dict()
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed
    assert all(k.endswith(("time_emb_proj.weight", "to_q.weight", ".scale")) for k in changed)
    assert not any("softmax" in k for k in changed)
    assert stats.trainable_params == sum(stats.groups.values())
