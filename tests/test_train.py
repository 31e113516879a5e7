"""The training stack (lowbit.train): exact resume for data-free distillation and for QAT on real
images, optimiser and scheduler from config, pluggable loss terms, strict typed hyper-parameters,
named seed streams, loggers."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lowbit.cli import compose_config
from lowbit.data.trajectories import fp_trajectories
from lowbit.methods import MethodContext, build_method
from lowbit.methods.binarydm import BinaryDM, EBBRegularizer, ebb_binarizers
from lowbit.methods.ptq import quant_config
from lowbit.models.digits import load_digits_model
from lowbit.sampling import SamplerConfig
from lowbit.train import (
    FPTrajectoryData,
    FPTrajectoryStream,
    HParamError,
    LossTerm,
    RealImageData,
    StudentModule,
    TeacherMSE,
    build_loggers,
    build_student,
    derive_seed,
    fit_module,
    generator,
    param_group,
    qat_groups,
    wandb_run_id,
)
from lowbit.train.fit import stored_seconds
from lowbit.train.losses import DiffusionLoss

SAMPLER = SamplerConfig(kind="ddim", steps=5, guidance_scale=2.0, batch_size=64)


pytestmark = pytest.mark.usefixtures("omp_threads")


class Interrupt(RuntimeError):
    pass


def _stop_at(step: int) -> L.Callback:
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                raise Interrupt(f"interrupted at step {step}")
    return StopAt()


def _assert_resume_exact(run, tmp_path: Path, steps: int = 5, stop: int = 3) -> None:
    """``run(ckpt_dir, resume, callbacks) -> (student, stats)``: fit ``steps`` uninterrupted vs.
    stop after ``stop`` steps (last checkpoint at an epoch end before it), resume to ``steps``.
    The resumed fit's ``seconds`` are the interrupted attempt's checkpointed seconds plus its
    own."""
    full, stats = run(tmp_path / "a", False, [])
    assert (tmp_path / "a" / "last.ckpt").is_file() and stats.steps == steps
    assert stats.start_step == 0 and stats.seconds_before == 0.0 and stats.seconds > 0
    t0 = time.perf_counter()
    with pytest.raises(Interrupt):
        run(tmp_path / "b", False, [_stop_at(stop)])
    wall_interrupted = time.perf_counter() - t0
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < stop
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])  # teacher kept out
    before = stored_seconds(saved)
    assert 0 < before < wall_interrupted  # the interrupted attempt's time up to its checkpoint
    t0 = time.perf_counter()
    resumed, rstats = run(tmp_path / "b", True, [])
    wall_resumed = time.perf_counter() - t0
    assert rstats.resumed and rstats.start_step == saved["global_step"]
    # the sum of both parts: what the checkpoint held + this attempt's time (within its call)
    assert rstats.seconds_before == before
    assert 0 < rstats.seconds - before < wall_resumed
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run is loaded, not trained again; its time is the one stored with it
    again, astats = run(tmp_path / "b", True, [])
    assert astats.start_step == steps and astats.loss_first is None
    assert astats.seconds == rstats.seconds
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())


# ------------------------------------------------------------------------------------------------
# data-free distillation (EfficientDM-style: FP stream, AdamW + linear decay from its yaml)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill(tmp_path_factory):
    model = load_digits_model()
    traj = fp_trajectories(model, SAMPLER, n=8, calib_steps=5, seed=3,
                           cache_dir=tmp_path_factory.mktemp("cache"))
    cfg = compose_config(["method=efficientdm", "bits=w4a4", "method.steps=5",
                          "trainer.enable_progress_bar=false"])
    qcfg = quant_config(cfg).with_overrides({"act": {"timestep_aware": True, "init": "minmax"},
                                             "weight": {"init": "minmax"}})
    student, _ = build_student(model.net, qcfg, traj.batches(16))
    return model, cfg, student


def _distill_run(setup, steps=5):
    model, cfg, base = setup
    params = build_method(cfg.method).params

    def run(ckpt_dir, resume, callbacks):
        student = copy.deepcopy(base)
        groups = [param_group(student, "w", "weight", 1e-3, ["*time_emb_proj", "*to_q"]),
                  param_group(student, "a", "act_scale", 1e-4, param_exclude=["*.softmax.*"])]
        module = StudentModule(student, model.net, model, groups, [TeacherMSE(guidance_scale=2.0)],
                               max_steps=steps, optimizer=params.build_optimizer(),
                               scheduler=params.build_scheduler())
        data = FPTrajectoryData(FPTrajectoryStream(model, SAMPLER, batch_size=2, seed=9))
        stats = fit_module(module, data, cfg.trainer, ckpt_dir, steps, resume=resume,
                           checkpoint_every=2, callbacks=callbacks)
        return student, stats
    return run


def test_distillation_resume_is_bit_exact(distill, tmp_path):
    """Lightning checkpoint (model, AdamW, LR schedule, loop state) + step-indexed FP stream: an
    interrupted and resumed distillation ends bit-identical to one that never stopped."""
    _assert_resume_exact(_distill_run(distill), tmp_path)


def test_optimizer_and_scheduler_come_from_config(distill):
    model, cfg, base = distill
    student = copy.deepcopy(base)
    groups = [param_group(student, "w", "weight", 1e-3, ["*to_q"])]

    def configured(*overrides):
        c = compose_config(["method=efficientdm", "method.steps=10", *overrides])
        p = build_method(c.method).params
        m = StudentModule(student, model.net, model, groups, [TeacherMSE()], max_steps=p.steps,
                          optimizer=p.build_optimizer(), scheduler=p.build_scheduler())
        return m.configure_optimizers()

    out = configured()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[0]["weight_decay"] == 0.0  # the group's, not AdamW's default 0.01
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert out["lr_scheduler"]["interval"] == "step"
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # linear decay over 10 steps
    # any optimiser / scheduler by _target_, no string switch
    out = configured("method.optimizer._target_=torch.optim.SGD",
                     "~method.optimizer.foreach", "+method.optimizer.momentum=0.9",
                     "method.scheduler=null")
    assert type(out) is torch.optim.SGD and out.param_groups[0]["momentum"] == 0.9
    cos = compose_config(["method=binarydm", "method.steps=8"])
    sched = build_method(cos.method).params.build_scheduler()(torch.optim.AdamW(
        [torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and sched.T_max == 8


def test_loss_terms_plug_in(distill):
    """A term from outside lowbit.train plugs in: logged under its name, weighted in the total."""
    model, _, base = distill
    student = copy.deepcopy(base)

    class L1ToTeacher(LossTerm):
        name = "l1"
        needs_teacher = True

        def forward(self, out):
            return F.l1_loss(out.student_eps, out.teacher_eps)

    groups = [param_group(student, "w", "weight", 1e-3, ["*to_q"])]
    module = StudentModule(student, model.net, model, groups,
                           [TeacherMSE(0.5, guidance_scale=2.0), L1ToTeacher(3.0)], max_steps=1)
    batch = FPTrajectoryStream(model, SAMPLER, batch_size=2, seed=1)(0)
    with torch.no_grad():
        v = module.losses(batch)
    assert set(v) == {"global", "l1", "loss"}
    assert torch.allclose(v["loss"], 0.5 * v["global"] + 3.0 * v["l1"])
    # the guided comparison differs from the raw [cond | uncond] one
    raw = StudentModule(student, model.net, model, groups, [TeacherMSE()], max_steps=1)
    with torch.no_grad():
        assert not torch.allclose(raw.losses(batch)["loss"], v["global"])
    with pytest.raises(ValueError, match="distinct"):
        StudentModule(student, model.net, model, groups, [TeacherMSE(), TeacherMSE()], max_steps=1)


# ------------------------------------------------------------------------------------------------
# QAT on real images (BinaryDM: diffusion loss + EBB regulariser with its stage switch + LRM)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat")
    cfg = compose_config(["method=binarydm", "bits=w1a32", "method.calib_n=64",
                          "method.lrm_samples=64", "method.steps=3", "method.batch_size=2",
                          "method.ebb_switch=0.5", "trainer.enable_progress_bar=false",
                          f"paths.cache_dir={tmp / 'cache'}"], output_dir=tmp / "run")
    model = load_digits_model()
    ctx = MethodContext(cfg=cfg, output_dir=tmp / "run", cache_dir=tmp / "cache", model=model)
    method = BinaryDM(cfg.method)
    from lowbit.train import timestep_blocks

    blocks = timestep_blocks(model.net)
    student = method.binary_student(model.net, ctx, method.spec_for(blocks))
    lrm = method.lrm_term(model.net, ctx, blocks)
    return model, cfg, method, student, lrm


def test_real_data_qat_resume_is_bit_exact(qat, tmp_path):
    """Real images + noise drawn per step, EBB's stage switch (at step 2 of 3) and LRM's bases in
    the checkpoint: the resumed QAT run equals the uninterrupted one bit for bit."""
    model, cfg, method, base, lrm = qat
    p = method.params
    from lowbit.data.digits import load_digits_tensors

    x, y = load_digits_tensors()

    def run(ckpt_dir, resume, callbacks):
        student = copy.deepcopy(base)
        ebbs = ebb_binarizers(student)
        terms = [DiffusionLoss(), EBBRegularizer(ebbs, p.ebb_tau, p.ebb_switch),
                 copy.deepcopy(lrm)]
        groups = qat_groups(student, p.lr, p.scale_lr, keep_lr=[b.sigma2 for b in ebbs])
        module = StudentModule(student, model.net, model, groups, terms, max_steps=p.steps,
                               optimizer=p.build_optimizer(), scheduler=p.build_scheduler())
        data = RealImageData(model, x, y, p.batch_size, seed=0, p_uncond=p.p_uncond)
        stats = fit_module(module, data, cfg.trainer, ckpt_dir, p.steps, resume=resume,
                           checkpoint_every=1, callbacks=callbacks)
        assert all(int(b.stage) == 2 for b in ebbs)  # switched at step 2 (also when resumed)
        return student, stats

    _assert_resume_exact(run, tmp_path, steps=p.steps, stop=2)
    ck = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert any(k.startswith("terms.2.basis_") for k in ck["state_dict"])  # LRM bases


def test_real_image_batches_are_a_function_of_the_step(qat):
    model = qat[0]
    from lowbit.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    a = RealImageData(model, x, y, 16, seed=4, p_uncond=0.5)
    b = RealImageData(model, x, y, 16, seed=4, p_uncond=0.5)
    for step in (0, 300, 5, 112):  # 112 = one data epoch: new permutation
        u, v = a.batch(step), b.batch(step)
        assert all(torch.equal(u[k], v[k]) for k in ("x", "t", "cond", "noise", "x0"))
    assert (a.batch(0)["cond"] == model.null_class).any()  # label dropout
    assert not torch.equal(a.batch(0)["x0"], a.batch(a.per_epoch)["x0"])


# ------------------------------------------------------------------------------------------------
# typed hyper-parameters, seeds, loggers
# ------------------------------------------------------------------------------------------------
def test_method_hyper_parameters_are_strict_and_name_the_key():
    p = build_method(compose_config(["method=quest"]).method).params
    assert p.tla.steps == 40 and p.checkpoint_every == 25 and p.calib_batch_size == 128
    with pytest.raises(HParamError, match=r"method\.ckpt_every: unknown key"):
        build_method(compose_config(["method=quest", "+method.ckpt_every=5"]).method)
    with pytest.raises(HParamError, match=r"method\.tla\.lr='fast': expected a number"):
        build_method(compose_config(["method=quest", "method.tla.lr=fast"]).method)
    with pytest.raises(HParamError, match=r"method\.calib_batch_size is missing"):
        build_method(compose_config(["method=ptq", "~method.calib_batch_size"]).method)
    with pytest.raises(HParamError, match=r"method\.stages"):
        build_method(compose_config(["method=quest", "method.stages=[tla,xyz]"]).method)
    with pytest.raises(HParamError, match=r"method\.optimizer: cannot instantiate"):
        build_method(compose_config(["method=bidm", "method.optimizer._target_=torch.optim.Nope"]
                                    ).method)
    with pytest.raises(HParamError, match=r"method\.talsq=3: expected true or false"):
        build_method(compose_config(["method=efficientdm", "method.talsq=3"]).method)
    # every method config builds, with the common key names
    for m in ("ptq", "quest", "efficientdm", "qat", "irqlora", "binarydm", "bidm",
              "binary_baseline"):
        params = build_method(compose_config([f"method={m}"]).method).params
        for old in ("ckpt_every", "calib_batch", "calib_batches", "train_steps"):
            assert not hasattr(params, old), (m, old)


def test_named_seed_streams():
    assert derive_seed(0, "calibration") == derive_seed(0, "calibration")
    seeds = {derive_seed(s, n, i) for s in (0, 1) for n in ("a", "b") for i in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**62 for s in seeds)
    assert torch.equal(torch.rand(3, generator=generator(1, "x", 2)),
                       torch.rand(3, generator=generator(1, "x", 2)))
    with pytest.raises(ValueError):
        derive_seed(0, "")


def test_loggers_csv_always_wandb_from_the_logger_group(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    cfg = compose_config(["logger=none"], output_dir=tmp_path / "run")
    assert [type(lg) for lg in build_loggers(cfg, tmp_path / "run")] == [CSVLogger]
    cfg = compose_config(["logger=wandb"], output_dir=tmp_path / "run")
    csv, wb = build_loggers(cfg, tmp_path / "run", stage="tla")
    assert isinstance(csv, CSVLogger) and isinstance(wb, WandbLogger)
    assert Path(csv.log_dir) == tmp_path / "run" / "train_logs" / "tla"
    assert wb._wandb_init["id"] == wandb_run_id(cfg) and wb._offline
    assert wb._wandb_init["dir"] == str(tmp_path / "run")
    # the id is stable for a run dir (resume, and the pipeline's results land in the same run)
    assert wandb_run_id(compose_config([], output_dir=tmp_path / "run")) == wandb_run_id(cfg)
    assert wandb_run_id(compose_config(["+logger.run_id=abc"], output_dir=tmp_path)) == "abc"
