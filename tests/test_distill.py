"""Data-free distillation on the training stack: parameter selection, deterministic trajectory
data, the FP stream, and that only the selected parameters train."""

from __future__ import annotations

import copy
import dataclasses
import functools

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

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
from lowbit.train.data import rank_slice

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


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fp_stream_ranks_advance_only_their_rows(setup, eta):
    """Under DDP each rank runs the teacher on its rows of the step's trajectories only; the
    rows are those of the one-process batch (rank_slice's, guidance pairs kept), also with a
    stochastic DDIM step (η > 0) whose noise is drawn for the whole batch. Equal within float
    rounding: the teacher sees a batch of 2 instead of 4 rows, and CPU kernels may block a
    batch differently (a few ulps per step, over the 7 steps of trajectory 0 replayed here)."""
    model, _, _, _ = setup
    sampler = dataclasses.replace(SAMPLER, eta=eta)
    whole = FPTrajectoryStream(model, sampler, batch_size=4, seed=5)
    ranks = [FPTrajectoryStream(model, sampler, batch_size=4, seed=5) for _ in range(2)]
    calls = []
    for s in ranks:
        real = s.denoiser.call
        s.denoiser = copy.copy(s.denoiser)
        s.denoiser.call = lambda net, x, *a, _r=real: calls.append(len(x)) or _r(net, x, *a)
    for n in (0, 6, 7):
        full = rank_slice(whole(n), 0, 1)
        for r, s in enumerate(ranks):
            part = s(n, r, 2)
            ref = rank_slice(full, r, 2, halves=2)
            assert part.keys() == ref.keys()
            for k in ("t", "cond"):
                assert torch.equal(part[k], ref[k]), (n, r, k)
            for k in ("x", "target"):
                assert torch.allclose(part[k], ref[k], rtol=1e-4, atol=1e-5), (n, r, k)
    assert set(calls) == {4}  # 2 rows + their unconditional halves, never the whole 8
    with pytest.raises(ValueError, match="multiple of"):
        FPTrajectoryStream(model, sampler, batch_size=3, seed=5)(0, 0, 2)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("accumulate_grad_batches=2",),
    pytest.param(("accumulate_grad_batches=4",), marks=pytest.mark.slow),
    pytest.param(("gradient_checkpointing=true",), marks=pytest.mark.slow)])
def test_micro_batches_and_checkpointing_take_the_whole_batch_step(setup, tmp_path, overrides):
    """trainer.accumulate_grad_batches=k cuts each step's batch into k micro-batches (guidance
    pairs kept, LSQ counting the whole batch) and steps once; gradient checkpointing recomputes
    the blocks in backward. Both take the step of the whole batch. With SGD (updates linear in
    the gradient) every trained tensor's update after 2 steps equals the plain run's up to float
    reduction order: ~1e-6 relative on gradients that are sums of a few hundred products, so
    1e-4 of the tensor's largest update (plus the weight's float32 ulp) leaves two orders of
    margin.

    Micro-batches run with the activation quantizers off: a 4-bit activation quantizer turns
    the last-ulp differences of a conv over 4 rows instead of 8 (CPU kernels block batches
    differently) into whole-step flips where an input sits on a rounding boundary — measured
    here as 6.6e-7 in, 0.32 out at the mid block — which no tolerance separates from a wrong
    step. Checkpointing recomputes the same batch, so it runs fully quantized."""
    from lowbit.quant import quant_disabled
    from lowbit.quant.quantizers import UniformQuantizer

    model, _, cfg, base = setup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    seen: dict[tuple[str, ...], list[int]] = {}
    micro = overrides[0].startswith("accumulate")

    class Rows(L.Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.key, []).append(int(batch["x"].shape[0]))

    def updates(*trainer_overrides: str) -> dict[str, torch.Tensor]:
        student = copy.deepcopy(base)
        groups = [param_group(student, "w", "weight", 1e-2, ["*time_emb_proj", "*to_q"])]
        if not micro:
            groups.append(param_group(student, "a", "act_scale", 1e-4,
                                      param_exclude=["*.softmax.*"]))
        module = StudentModule(student, model.net, model, groups,
                               [TeacherMSE(guidance_scale=2.0)], max_steps=2,
                               optimizer=functools.partial(torch.optim.SGD, foreach=False))
        stream = FPTrajectoryStream(model, SAMPLER, batch_size=4, seed=9)
        tcfg = OmegaConf.merge(cfg.trainer, OmegaConf.from_dotlist(list(trainer_overrides)))
        with quant_disabled(student, weight=False, act=micro):
            fit_module(module, FPTrajectoryData(stream), tcfg,
                       tmp_path / ("_".join(trainer_overrides) or "plain"), max_steps=2,
                       checkpoint_every=2, callbacks=[Rows(trainer_overrides)])
        k = int(trainer_overrides[0].split("=")[1]) if trainer_overrides and micro else 1
        assert {q.batch_split for q in student.modules() if isinstance(q, UniformQuantizer)} \
            == {k}  # LSQ's gradient scale counts the whole batch
        after = student.state_dict()
        return {k: after[k] - before[k] for k in after
                if after[k].is_floating_point() and not torch.equal(after[k], before[k])}

    plain, other = updates(), updates(*overrides)
    assert plain.keys() == other.keys() and plain
    assert micro or any(k.endswith(".scale") for k in plain)
    for k in plain:
        # + one float32 ulp of the weight: an update is read back as the difference of two
        # rounded weights, so gradients 1e-6 apart can land one ulp apart
        ulp = torch.finfo(torch.float32).eps * before[k].abs().max()
        err = (other[k] - plain[k]).abs().max()
        assert err <= 1e-4 * plain[k].abs().max() + ulp, (k, float(err))
    k = int(overrides[0].split("=")[1]) if micro else 1
    assert seen[overrides] == [8 // k] * (2 * k)  # 4 trajectories + uncond halves, in k passes


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
