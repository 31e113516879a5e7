"""Data-free distillation on the training stack: parameter selection, deterministic trajectory
data, the FP stream, and that only the selected parameters train."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from lowbit.cli import compose_config
from lowbit.data.trajectories import fp_trajectories
from lowbit.methods.ptq import quant_config
from lowbit.models.digits import load_digits_model
from lowbit.sampling import SamplerConfig
from lowbit.train import (
    CachedTrajectoryData,
    FPTrajectoryData,
    FPTrajectoryStream,
    LayerMSE,
    StudentModule,
    TeacherMSE,
    build_student,
    fit_module,
    param_group,
    select_params,
)

SAMPLER = SamplerConfig(kind="ddim", steps=10, guidance_scale=2.0, batch_size=64)


pytestmark = pytest.mark.usefixtures("omp_threads")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = load_digits_model()
    traj = fp_trajectories(model, SAMPLER, n=24, calib_steps=10, seed=3,
                           cache_dir=tmp_path_factory.mktemp("cache"))
    cfg = compose_config(["bits=w4a4", "trainer.enable_progress_bar=false"])
    # min–max init: calibration in a second (the MSE search is for real runs)
    qcfg = quant_config(cfg).with_overrides({"act": {"timestep_aware": True, "init": "minmax"},
                                             "weight": {"init": "minmax"}})
    student, _ = build_student(model.net, qcfg, traj.batches(24))
    return model, traj, cfg, student


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
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["t"], y["t"])
        assert torch.equal(x["cond"], y["cond"])
    # another seed stream, another order
    other = CachedTrajectoryData(traj, 8, seed=1, stream="other")
    assert not all(torch.equal(a.batch(s)["x"], other.batch(s)["x"]) for s in range(4))
    # one data epoch visits every (step, sample) pair once, one timestep per batch
    seen = []
    for step in range(a.per_epoch):
        bt = a.batch(step)
        assert bt["t"].unique().numel() == 1
        seen.append(bt["x"].shape[0])
    assert sum(seen) == traj.xt.shape[0] * traj.xt.shape[1] * 2  # cond + uncond halves


def test_fp_stream_advances_with_the_fp_model_and_replays_exactly(setup):
    model, _, _, _ = setup
    mk = lambda: FPTrajectoryStream(model, SAMPLER, batch_size=3, seed=5)  # noqa: E731
    s = mk()
    seq = [s(n) for n in range(12)]  # 10 steps of trajectory 0, 2 of trajectory 1
    ts = [int(b["t"][0]) for b in seq]
    assert ts[:10] == sorted(ts[:10], reverse=True) and ts[10] == ts[0]  # a new trajectory
    assert not torch.equal(seq[10]["x"], seq[0]["x"])  # from fresh noise
    assert (seq[0]["cond"][3:] == model.null_class).all()  # the unconditional half
    replay = mk()(6)  # a resumed run jumps straight to step 6
    assert torch.equal(replay["x"], seq[6]["x"])
    assert torch.equal(replay["target"], seq[6]["target"])
    with torch.no_grad():  # the target is the teacher's own output
        b = seq[6]
        assert torch.allclose(b["target"], model.call(model.net, b["x"], b["t"], b["cond"]))


def test_only_selected_parameters_change_and_local_loss_is_logged(setup, tmp_path):
    model, _, cfg, base = setup
    student = copy.deepcopy(base)
    groups = [param_group(student, "w", "weight", 1e-3, ["*time_emb_proj", "*to_q"]),
              param_group(student, "a", "act_scale", 1e-4, param_exclude=["*.softmax.*"])]
    terms = [TeacherMSE(guidance_scale=2.0),
             LayerMSE("tla", ["*time_emb_proj"]).resolve(student, model.net)]
    module = StudentModule(student, model.net, model, groups, terms, max_steps=2,
                           optimizer=functools.partial(torch.optim.AdamW, foreach=False))
    stream = FPTrajectoryStream(model, SAMPLER, batch_size=2, seed=9)
    stats = fit_module(module, FPTrajectoryData(stream), cfg.trainer, tmp_path, max_steps=2,
                       checkpoint_every=2)
    before = base.state_dict()
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed
    assert all(k.endswith(("time_emb_proj.weight", "to_q.weight", ".scale")) for k in changed)
    assert not any("softmax" in k for k in changed)
    assert stats.trainable_params == sum(stats.groups.values())
    values = module.losses(FPTrajectoryData(stream).batch(0))
    assert set(values) == {"global", "tla", "loss"}
    assert torch.allclose(values["loss"], values["global"] + values["tla"])
