"""method=efficientdm (QALoRA + TALSQ) and method=qat: exact LoRA merge, TALSQ interpolation,
ablation keys, and the fine-tune's effect on held-out FP trajectories."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit.data.trajectories import fp_trajectories
from lowbit.methods import MethodContext, build_method
from lowbit.methods.efficientdm import (
    EfficientDM,
    add_lora_,
    has_qalora,
    mean_weight_step,
    merge_lora_,
    talsq_buckets_,
)
from lowbit.methods.ptq import calibration_set, quant_config, sampler_config
from lowbit.metrics.fidelity import eps_error_by_step
from lowbit.models.digits import load_digits_model
from lowbit.quant import QuantConv2d, TimestepActQuantizer, quant_disabled
from lowbit.sampling import build_scheduler
from lowbit.train import build_student, select_params

FAST = ("sampler.steps=10", "method.calib_n=16", "method.calib_steps=10", "method.batch_size=8",
        "trainer.enable_progress_bar=false", "method.checkpoint_every=10", "logger=none")
# the digits budgets and rates: conf/experiment/digits/<method>.yaml
LR = {"efficientdm": ("experiment=digits/efficientdm",), "qat": ("experiment=digits/qat",)}


pytestmark = pytest.mark.usefixtures("omp_threads")


def _ctx(make_cfg, method, *overrides):
    cfg = make_cfg(f"method={method}", "bits=w4a4", *FAST, *LR[method], *overrides)
    loaded = load_digits_model()
    return cfg, MethodContext(cfg=cfg, output_dir=Path(cfg.paths.output_dir),
                              cache_dir=Path(cfg.paths.cache_dir), model=loaded), loaded


@pytest.fixture(scope="module")
def ptq_student(tmp_path_factory):
    from lowbit.cli import compose_config

    cfg = compose_config(["method=efficientdm", "bits=w4a4", *FAST, *LR["efficientdm"],
                          f"paths.cache_dir={tmp_path_factory.mktemp('c')}"])
    loaded = load_digits_model()
    ctx = MethodContext(cfg=cfg, output_dir=tmp_path_factory.mktemp("r"),
                        cache_dir=Path(cfg.paths.cache_dir), model=loaded)
    traj = calibration_set(ctx, loaded.net, 8, 10)
    qcfg = quant_config(cfg).with_overrides({"act": {"timestep_aware": True, "interp": "linear"}})
    student, _ = build_student(loaded.net, qcfg, traj.batches(16))
    return cfg, loaded, traj, student



def test_qalora_merge_is_exact(ptq_student):
    """MERGE: Q(W₀ + B·A) during training == Q(W_merged) after merge_lora_, bit for bit; the
    merged model has the PTQ model's state_dict keys (only Ŵ is stored)."""
    cfg, loaded, traj, base = ptq_student
    student = copy.deepcopy(base)
    names = add_lora_(student, rank=4, exclude=list(cfg.method.lora_exclude))
    assert "conv_in" not in names and not any(n.startswith("time_embedding") for n in names)
    mods = dict(student.named_modules())
    assert isinstance(mods["down_blocks.0.resnets.0.conv1"], QuantConv2d)
    assert has_qalora(mods["down_blocks.0.resnets.0.conv1"])
    assert has_qalora(mods["mid_block.attentions.0.to_q"])
    g = torch.Generator().manual_seed(0)
    for n in names:  # a trained-looking LoRA (B starts at zero)
        lora = mods[n].lora
        lora.B.data = torch.randn(lora.B.shape, generator=g) * 0.02
    batch = next(traj.batches(4))
    with torch.no_grad():
        y_train = student(**batch).sample
        assert not torch.equal(y_train, base(**batch).sample)  # the LoRA does something
        assert merge_lora_(student) == len(names)
        y_merged = student(**batch).sample
    assert torch.equal(y_train, y_merged)
    assert student.state_dict().keys() == base.state_dict().keys()
    assert not select_params(student, "lora")


def test_conv_lora_is_kxk_then_1x1():
    """Conv LoRA: A is a k×k conv (c_in → r), B a 1×1 conv (r → c_out); B·A is the k×k kernel
    that computes the same thing (checked in FP, quantizers off)."""
    conv = QuantConv2d.from_module(torch.nn.Conv2d(6, 5, 3, padding=1), *_specs())
    add_lora_(torch.nn.Sequential(conv), rank=2)
    conv.lora.B.data.normal_()
    assert conv.lora.A.shape == (2, 6, 3, 3) and conv.lora.B.shape == (5, 2, 1, 1)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad(), quant_disabled(conv):
        lora_path = F.conv2d(x, conv.weight, conv.bias, padding=1) + F.conv2d(
            F.conv2d(x, conv.lora.A, padding=1), conv.lora.B)
        assert torch.allclose(conv(x), lora_path, atol=1e-5)


def _specs():
    from lowbit.quant import QuantSpec

    return QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=None)


def test_talsq_interpolation_matches_at_shared_steps(ptq_student):
    """TALSQ learnt on a 10-step schedule, sampled with 5 steps: at the timesteps the schedules
    share, the interpolated Δ and zero point are exactly the learnt ones; in between they lie
    between the neighbours (not the code's plain subsampling)."""
    _, loaded, _, base = ptq_student
    q = next(m for m in base.modules() if isinstance(m, TimestepActQuantizer)
             and m.num_buckets > 1 and m.zero_point is not None)
    q = copy.deepcopy(q)
    with torch.no_grad():  # as if trained: every bucket moved differently
        q.scale.mul_(torch.linspace(0.5, 1.5, q.num_buckets).reshape(-1, *[1] * (q.scale.dim() - 1)))
    train_t = set(build_scheduler(loaded.noise_schedule, "ddim", 10).timesteps.tolist())
    assert set(q.timesteps.long().tolist()) == train_t
    eval_t = build_scheduler(loaded.noise_schedule, "ddim", 5).timesteps.tolist()
    shared = [t for t in eval_t if t in train_t]
    assert len(shared) >= 4
    for t in shared:
        q.set_timestep(t)
        k = int((q.timesteps == t).nonzero())
        s, z = q.current_qparams()
        assert torch.equal(s, q.scale[k]) and torch.equal(z, q.zero_point[k])
    lo, hi = sorted(train_t)[3], sorted(train_t)[4]
    q.set_timestep((lo + hi) / 2)
    s, _ = q.current_qparams()
    i = int((q.timesteps == lo).nonzero())
    assert torch.allclose(s, (q.scale[i] + q.scale[i + 1]) / 2)


def test_talsq_keeps_one_step_per_training_step(ptq_student):
    """TALSQ with more training steps (20) than calibration buckets (10): after
    ``talsq_buckets_`` every quantizer has one Δ per training timestep, equal to the calibrated
    Δ at the shared timesteps, and a training step at one timestep moves only its own Δ
    (before, it trained the two neighbouring calibration buckets through the interpolation)."""
    _, loaded, _, base = ptq_student
    s = copy.deepcopy(base)
    calib_t = set(build_scheduler(loaded.noise_schedule, "ddim", 10).timesteps.tolist())
    train_t = build_scheduler(loaded.noise_schedule, "ddim", 20).timesteps.tolist()
    qs = [m for m in s.modules() if isinstance(m, TimestepActQuantizer) and m.num_buckets > 1]
    old = {id(q): (q.timesteps.clone(), q.scale.detach().clone()) for q in qs}
    assert talsq_buckets_(s, train_t) == len(qs) > 0
    for q in qs:
        assert q.timesteps.tolist() == sorted(train_t)
        ts, sc = old[id(q)]
        for t in calib_t & set(train_t):
            assert torch.equal(q.scale[q.timesteps.tolist().index(t)], sc[ts.tolist().index(t)])
    q = qs[0]
    q.scale.requires_grad_(True)  # TALSQ trains it
    t = sorted(train_t)[5]
    assert t not in calib_t  # a training step between two calibration steps
    q.set_timestep(t)
    c = q.tensor_shape[0]
    x = torch.randn(4, c, 3, 3) if q.channel_axis == 1 else torch.randn(4, c)
    q(x).pow(2).sum().backward()
    moved = (q.scale.grad.reshape(q.num_buckets, -1).abs().sum(1) > 0).nonzero().flatten()
    assert moved.tolist() == [5]


def test_efficientdm_keeps_skip_and_downsample_convs_fp_by_default():
    """EfficientDM's reference code keeps the residual 1×1 skip convs and the downsample convs
    FP (METHODS.md); method.bits_rules.skip_fp=false quantizes them."""
    from lowbit.cli import compose_config
    from lowbit.quant import QuantConfig, quantize_

    for method in ("efficientdm", "qat"):
        qcfg = quant_config(compose_config([f"method={method}", "bits=w4a4"]))
        assert qcfg.skip_fp
    unet = copy.deepcopy(load_digits_model().net)
    report = quantize_(unet, quant_config(compose_config(["method=efficientdm", "bits=w4a4"])))
    skip = [n for n, m in unet.named_modules() if n.endswith("conv_shortcut")
            or ".downsamplers." in n and isinstance(m, torch.nn.Conv2d)]
    assert skip and all(type(unet.get_submodule(n)) is torch.nn.Conv2d for n in skip)
    assert report is not None
    off = quant_config(compose_config(["method=efficientdm", "bits=w4a4",
                                       "method.bits_rules.skip_fp=false"]))
    assert isinstance(off, QuantConfig) and not off.skip_fp


def test_ablation_keys_change_what_trains(ptq_student):
    cfg, _, _, base = ptq_student
    from omegaconf import OmegaConf

    def groups(**kw):
        m = EfficientDM(OmegaConf.merge(cfg.method, kw))
        s = copy.deepcopy(base)
        layers = m.adapt_(s)
        return m, s, layers, m.param_groups(s, layers)

    m, s, layers, gs = groups(rank=4)
    assert m.label == "efficientdm(r4)"
    lora = [g for g in gs if g.name.startswith("lora/")]
    assert len(lora) == len(layers)  # scale-aware: one lr per layer = mean Δ_w / div
    mods = dict(s.named_modules())
    for g in lora:
        name = g.name.removeprefix("lora/")
        assert g.lr == pytest.approx(mean_weight_step(mods[name]) / 100)
        assert all(p.shape[0] == 4 or p.shape[1] == 4 for _, p in g.params)
    assert {g.name for g in gs} >= {"weight_scale", "act_scale", "act_zero_point"}
    m, _, _, gs = groups(scale_aware=False, talsq=False, rank=8)
    assert m.label == "efficientdm(r8,-scale_aware,-talsq)"
    assert [g.lr for g in gs if g.name == "lora"] == [pytest.approx(1e-4)]
    assert not any(g.name.startswith("act_") for g in gs)


# the QAT baseline's effect takes another ~50 s on one loaded thread: slow suite
@pytest.mark.parametrize("method", ["efficientdm", pytest.param("qat", marks=pytest.mark.slow)])
def test_finetune_beats_its_ptq_start_on_held_out_trajectories(make_cfg, method):
    """EFFECT: with its digits experiment config (conf/experiment/digits/<method>.yaml),
    data-free distillation on FP trajectories from pure noise lowers the held-out, (1−ᾱ)-weighted
    ε error of the W4A4 PTQ student it starts from by at least 5 % (measured: EfficientDM 12 %,
    QAT 9 %; the plain ε mean is mostly the t = 0 step's, which barely changes the images, and
    moved 4–7 % across machines)."""
    cfg, ctx, loaded = _ctx(make_cfg, method)
    teacher = loaded.net
    torch.manual_seed(0)
    traj = calibration_set(ctx, teacher, 16, 10)
    qcfg = quant_config(cfg).with_overrides({"act": {"timestep_aware": True, "interp": "linear"}})
    ptq, _ = build_student(teacher, qcfg, traj.batches(128))
    held = fp_trajectories(loaded, sampler_config(cfg), n=16, calib_steps=10, seed=777,
                           cache_dir=ctx.cache_dir)
    torch.manual_seed(0)
    student = build_method(cfg.method).prepare(teacher, ctx)
    e_ptq = eps_error_by_step(ptq, teacher, held, batch_size=16)["weighted"]
    e_ft = eps_error_by_step(student, teacher, held, batch_size=16)["weighted"]
    print(f"{method}: held-out weighted eps MSE PTQ {e_ptq:.5f} -> {e_ft:.5f}")
    assert e_ft < 0.95 * e_ptq, (e_ptq, e_ft)
    assert not select_params(student, "lora")  # merged
    assert (ctx.output_dir / "checkpoints" / "last.ckpt").is_file()
    share = ctx.cost["trainable_share"]
    assert share > 0.9 if method == "qat" else 0 < share < 0.9


# -- the effect of TALSQ, against the same run with it switched off -------------------------------
@pytest.mark.slow
def test_talsq_beats_efficientdm_without_it_seed_by_seed(held_out_eps_error):
    """EFFECT (about 8 min on one thread): EfficientDM W4A4 with its digits config, with and
    without TALSQ, seeds 0–2. Measured (``lowbit-ablate experiment=digits/efficientdm bits=w4a4
    --without method.talsq=false --seeds 0,1,2``): with TALSQ 0.00181 / 0.00164 / 0.00218,
    without 0.00264 / 0.00199 / 0.00282. The seeds' own spread (0.0008) is as large as the gap,
    so the unpaired rule of the other effect tests cannot see it; seed by seed (same calibration
    data, initial state and batches) TALSQ wins on every seed by +0.00061 ± 0.00024. The test
    asks for the paired rule: every seed's gap positive and their mean above twice their std
    (without the scale-aware rate, a component with no effect, the gaps were +0.00000 / +0.00003
    / +0.00007: not worse)."""
    from lowbit.ablate import ablate

    full, v = ablate(held_out_eps_error, ("experiment=digits/efficientdm", "bits=w4a4"),
                     ["method.talsq=false"], (0, 1, 2))
    print(f"weighted eps error: TALSQ {full}, no TALSQ {v.errors}, per seed {v.paired}")
    assert v.paired_worse, v
