"""method=rglcd: consistency distillation pieces, the w-embedding, the EMA target, the reward,
exact resume and the LCM sampling path (digits model, tiny budgets)."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import LCMScheduler

from lowbit.config import ConfigError
from lowbit.methods import MethodContext, build_method
from lowbit.methods.rglcd import (
    DDIMGrid,
    LCDModule,
    PseudoHuber,
    RewardTerm,
    consistency_scalings,
)
from lowbit.models.digits import (
    DIGITS_NOISE_SCHEDULE,
    DigitClassifier,
    DigitRewardClassifier,
    load_digits_model,
    load_reward_classifier,
)
from lowbit.models.guidance import add_guidance_embedding_, guidance_embedding
from lowbit.pipeline import build_dataset
from lowbit.rewards import DigitsReward, build_reward
from lowbit.train import NoiseSchedule, qat_groups

fit_mod = importlib.import_module("lowbit.train.fit")

pytestmark = pytest.mark.usefixtures("omp_threads")

TINY = ("threads=1", "logger=none", "trainer.enable_progress_bar=false", "method=rglcd",
        "method.batch_size=2", "method.checkpoint_every=2", "method.steps=4", "method.lr=1e-4",
        "method.w_min=1", "method.w_max=3", "method.num_ddim_timesteps=10")


def _module(beta: float = 0.0, decay: float = 0.95) -> tuple[LCDModule, torch.nn.Module]:
    model = load_digits_model()
    teacher = model.net.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    add_guidance_embedding_(student, 32)
    terms = [PseudoHuber(0.001)]
    if beta:
        terms.append(RewardTerm(DigitsReward(), model, beta))
    grid = DDIMGrid(NoiseSchedule(model.noise_schedule).alphas_cumprod, 10)
    module = LCDModule(student, teacher, model, qat_groups(student, 1e-3, None), terms, grid=grid,
                       ema_decay=decay, clip_x0=1.0, max_steps=4)
    return module, teacher


def _batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1,
            "noise": torch.randn(n, 1, 16, 16, generator=g),
            "index": torch.tensor([9, 3][:n]), "w": torch.tensor([1.5, 2.5][:n]),
            "cond": torch.tensor([3, 7][:n])}


# -- consistency pieces --------------------------------------------------------------------------
def test_boundary_scalings_match_lcm_scheduler_and_hold_at_zero():
    sched = LCMScheduler.from_config(DIGITS_NOISE_SCHEDULE)
    for t in (0, 1, 19, 259, 999):
        ours = consistency_scalings(torch.tensor([t]), 10.0)
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        assert torch.allclose(ours[0].double(), torch.as_tensor(ref[0]).double(), atol=1e-6)
        assert torch.allclose(ours[1].double(), torch.as_tensor(ref[1]).double(), atol=1e-6)
    module, _ = _module()
    module.target.load_state_dict(module.student.state_dict())
    # perturb the student so f(z, 0) = z is the boundary condition, not an accident of zeros
    with torch.no_grad():
        guidance_embedding(module.student).weight.normal_()
    z = torch.randn(2, 1, 16, 16)
    f = module.consistency(module.student, z, torch.zeros(2, dtype=torch.long),
                           torch.tensor([4, 10]), torch.tensor([1.0, 3.0]))
    assert torch.equal(f, z)


def test_ddim_grid_is_lcm_schedulers_skip_grid():
    alphas = NoiseSchedule(DIGITS_NOISE_SCHEDULE).alphas_cumprod
    grid = DDIMGrid(alphas, 50)
    sched = LCMScheduler.from_config(DIGITS_NOISE_SCHEDULE)
    sched.set_timesteps(50, original_inference_steps=50)
    assert torch.equal(grid.timesteps.flip(0), sched.timesteps.long())
    idx = torch.tensor([0, 1, 49])
    assert grid.target(idx).tolist() == [0, 19, 979]


# -- the w-embedding --------------------------------------------------------------------------------
def test_w_embedding_starts_at_zero_and_sampling_makes_one_call():
    model = load_digits_model()
    teacher = model.net
    student = copy.deepcopy(teacher)
    proj = add_guidance_embedding_(student, 64)
    assert torch.count_nonzero(proj.weight) == 0
    assert "time_embedding.cond_proj.weight" in student.state_dict()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor(500), torch.tensor([1, 2, 3])
    with torch.no_grad():
        for w in (1.0, 2.0, 7.5):
            with proj.at(w):
                assert torch.equal(model.call(student, x, t, y), model.call(teacher, x, t, y))
        # the adapter samples such a network once per step, on the conditional batch only
        seen = []
        h = student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["sample"].shape[0]),
                                              with_kwargs=True)
        proj.weight.normal_()
        a = model.guided(x, t, y, 2.0, net=student)
        b = model.guided(x, t, y, 4.0, net=student)
        h.remove()
        assert seen == [3, 3]
        assert not torch.equal(a, b)  # w reaches the network
        assert proj.w is None  # the w of a call does not leak into the next
    # a deep copy (the EMA target) is hooked to its own projection
    twin = copy.deepcopy(student)
    with torch.no_grad():
        guidance_embedding(twin).weight.zero_()
        with guidance_embedding(twin).at(3.0):
            assert torch.equal(model.call(twin, x, t, y), model.call(teacher, x, t, y))


# -- the EMA target ---------------------------------------------------------------------------------
def test_ema_target_follows_the_configured_decay():
    module, _ = _module(decay=0.9)
    before = {k: v.clone() for k, v in module.target.state_dict().items()}
    with torch.no_grad():
        for g in module.groups:
            for _, p in g.params:
                p.add_(torch.randn_like(p))
    student = dict(module.student.named_parameters())
    module.update_target()
    after = dict(module.target.named_parameters())
    for name in ("conv_in.weight", "time_embedding.cond_proj.weight"):
        expect = 0.9 * before[name] + 0.1 * student[name]
        assert torch.allclose(after[name], expect, atol=1e-6)
    assert not any(p.requires_grad for p in module.target.parameters())
    assert any(k.startswith("target.") for k in module.state_dict())  # checkpointed


# -- the reward -------------------------------------------------------------------------------------
def test_reward_gradient_reaches_the_student_only():
    module, teacher = _module(beta=1.0)
    module.apply_trainable()
    values = module.losses(_batch())
    assert set(values) == {"lcd", "reward", "loss"}
    assert torch.allclose(values["loss"], values["lcd"] - values["reward"])
    values["reward"].backward()
    grads = [p.grad for g in module.groups for _, p in g.params]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in module.target.parameters())
    reward = module.terms[1].reward
    assert all(p.grad is None for p in reward.model.parameters())


def test_reward_classifier_is_not_the_evaluator():
    rc = load_reward_classifier()
    assert isinstance(rc, DigitRewardClassifier) and not isinstance(rc, DigitClassifier)
    from lowbit.data.digits import load_digits_tensors, split_indices

    x, y = load_digits_tensors()
    _, va = split_indices(len(x))
    with torch.no_grad():
        acc = (rc(x[va]).argmax(1) == y[va]).float().mean()
    assert acc > 0.95
    assert sum(p.numel() for p in rc.parameters()) < 1_000_000


def test_unimplemented_rewards_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="not implemented"):
        build_reward(make_cfg("method=rglcd", "reward=hpsv2").reward)
    assert build_reward(make_cfg("method=rglcd", "reward=none").reward) is None


# -- whole prepare runs -----------------------------------------------------------------------------
def _prepare(make_cfg, out: Path, *overrides: str, seed: int = 0, callbacks=()):
    cfg = make_cfg(*TINY, *overrides, output_dir=out)
    torch.manual_seed(seed)  # a draw from the global RNG would make runs differ
    model = load_digits_model()
    ctx = MethodContext(cfg=cfg, output_dir=out, cache_dir=Path(cfg.paths.cache_dir),
                        model=model, dataset=build_dataset(cfg))
    return build_method(cfg.method).prepare(model.net, ctx), ctx


def _same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_beta_zero_is_plain_lcd(make_cfg, tmp_path):
    a, ctx = _prepare(make_cfg, tmp_path / "a", "reward=digits", "method.beta=0", seed=1)
    b, _ = _prepare(make_cfg, tmp_path / "b", "reward=none", "method.beta=0", seed=2)
    assert not _same(a, b)
    assert ctx.cost["finetune_s"] > 0 and ctx.cost["trainable_params"] > 0
    c, _ = _prepare(make_cfg, tmp_path / "c", "reward=digits", "method.beta=1", seed=1)
    assert _same(a, c)  # the reward changes the student


class _Interrupt(RuntimeError):
    pass


class _StopAt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise _Interrupt


def test_interrupted_fit_resumes_bit_exact(make_cfg, tmp_path, monkeypatch):
    full, _ = _prepare(make_cfg, tmp_path / "full", "method.beta=0.5", "resume=false", seed=1)
    build_trainer = fit_mod.build_trainer

    def stopping(trainer_cfg, ckpt_dir, max_steps, loggers=False, callbacks=(), **kw):
        return build_trainer(trainer_cfg, ckpt_dir, max_steps, loggers, [*callbacks, _StopAt()],
                             **kw)

    monkeypatch.setattr(fit_mod, "build_trainer", stopping)
    out = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        _prepare(make_cfg, out, "method.beta=0.5", "resume=false", seed=2)
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and any(k.startswith("target.") for k in saved["state_dict"])
    monkeypatch.setattr(fit_mod, "build_trainer", build_trainer)
    resumed, ctx = _prepare(make_cfg, out, "method.beta=0.5", "resume=true", seed=3)
    assert ctx.report["finetune"]["fit"]["resumed"]
    assert not _same(full, resumed)


def test_lcm_sampler_refuses_another_skip_grid(make_cfg, tmp_path):
    """LCMScheduler samples on a 50-step skip grid: a student distilled on 10 is refused before
    any compute."""
    with pytest.raises(ConfigError, match="num_ddim_timesteps=50"):
        _prepare(make_cfg, tmp_path / "r", "sampler=lcm4")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_reward_metric_scores_samples_against_their_labels(make_cfg):
    """reward_digits is the reward classifier's mean log p(requested class): real digits score
    near 0 with their own labels and far lower with the labels shifted by one class."""
    from hydra.utils import instantiate

    from lowbit.data.digits import load_digits_tensors, split_indices
    from lowbit.metrics import MetricInputs, RewardScore

    item = instantiate(make_cfg().metrics["items"]["reward"])
    assert isinstance(item, RewardScore)
    item.check()
    x, y = load_digits_tensors()
    _, va = split_indices(len(x))
    u8 = ((x[va] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    own = item(MetricInputs(sample_dir=Path("."), images=u8, conditions=y[va]))
    wrong = item(MetricInputs(sample_dir=Path("."), images=u8, conditions=(y[va] + 1) % 10))
    assert -0.5 < own["reward_digits"] < 0 and wrong["reward_digits"] < own["reward_digits"] - 3
    with pytest.raises(ConfigError, match="metrics.reward"):
        RewardScore(reward="digits").check()


def test_lcm_presets_compare_with_the_teacher_on_ddim20(make_cfg):
    from lowbit.pipeline import reference_sampler
    from lowbit.sampling import SamplerConfig

    cfg = make_cfg("experiment=digits/rglcd", "sampler=lcm4", "sampler.guidance_scale=3")
    ref = reference_sampler(cfg)
    assert ref == SamplerConfig(kind="ddim", steps=20, guidance_scale=3.0, batch_size=250)
    plain = make_cfg("sampler=ddim50")
    assert reference_sampler(plain) == SamplerConfig.from_cfg(plain.sampler)
    with pytest.raises(ConfigError, match="sampler.reference"):
        reference_sampler(make_cfg("sampler=lcm4", "~sampler.reference.kind"))


# -- the run path -----------------------------------------------------------------------------------
def test_lcm_presets_compose(make_cfg):
    for n in (1, 2, 4, 8):
        cfg = make_cfg("method=rglcd", f"sampler=lcm{n}")
        assert cfg.sampler.kind == "lcm" and cfg.sampler.steps == n
        assert cfg.reward.name == "digits"
    cfg = make_cfg("experiment=digits/rglcd", "sampler=lcm2")
    assert cfg.method.name == "rglcd"
    assert "reward" not in make_cfg()  # other methods' configs (and fingerprints) unchanged


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["fp", "w8a8"])
def test_tiny_run_through_the_pipeline(make_cfg, tmp_path, bits):
    from lowbit.export import load_student
    from lowbit.pipeline import run_experiment

    cfg = make_cfg(*TINY, "sampler=lcm4", f"bits={bits}", "method.beta=0.5",
                   "method.num_ddim_timesteps=50", "method.calib_n=8",
                   "method.calib_batch_size=4", "metrics.num_samples=20",
                   "sampler.batch_size=20", output_dir=tmp_path / "run")
    r = run_experiment(cfg)
    assert r["status"] == "done" and r["sampler"] == "lcm4"
    # paired fidelity against the teacher on its own sampler; no ε error for an LCM student
    assert r["fp_sampler"] == "ddim20" and "eps_mse" not in r["metrics"]
    assert r["metrics"]["reward_digits"] < 0 and "psnr" in r["metrics"]
    assert r["method"] == "rglcd(digits,β=0.5)"
    assert r["cost"]["finetune_s"] > 0 and r["cost"]["trainable_params"] > 0
    assert 0.0 <= r["metrics"]["cond_acc"] <= 1.0
    assert (tmp_path / "run" / "train_logs").is_dir()
    if bits != "fp":  # a quantized student reloads from its map with its w-embedding
        student = load_student(tmp_path / "run")
        assert guidance_embedding(student) is not None


# -- the latent proxy reward ------------------------------------------------------------------------
def test_latent_proxy_reward_is_wired_without_decode(make_cfg, tmp_path):
    """reward=latent_proxy loads a saved proxy, scores latents against their class (the
    reward term skips the decode; its gradient reaches the latents), refuses a missing file
    before any compute, and is refused as a metric of decoded samples."""
    from lowbit.metrics import RewardScore
    from lowbit.proxy_reward import LatentRewardNet, ProxyConfig, save_proxy

    torch.manual_seed(0)
    net = LatentRewardNet(ProxyConfig(channels=1, num_classes=10, width=8))
    path = save_proxy(net, {"config": {"channels": 1, "num_classes": 10, "text_dim": 0,
                                       "width": 8}}, tmp_path / "proxy")
    cfg = make_cfg("method=rglcd", "reward=latent_proxy", f"reward.checkpoint={path}")
    reward = build_reward(cfg.reward)
    assert reward.latent and reward.name == "latent_proxy"
    model = load_digits_model()
    term = RewardTerm(reward, model, beta=1.0)
    z = torch.randn(3, 1, 16, 16, requires_grad=True)
    batch = {"cond": torch.tensor([1, 2, 10])}  # the null class scores as the class mean
    from lowbit.methods.rglcd import ConsistencyOutputs

    value = term(ConsistencyOutputs(batch, z, z.detach()))
    value.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        s = net(z, batch["cond"])
        assert torch.allclose(value, s.mean())
    with pytest.raises(ConfigError, match="reward.checkpoint"):
        build_reward(make_cfg("method=rglcd", "reward=latent_proxy").reward)
    with pytest.raises(ConfigError, match="latent proxy scores latents"):
        RewardScore(reward=reward).check()


@pytest.mark.slow
def test_latent_proxy_learns_the_experts_preferences():
    """Fitted with the Bradley–Terry loss to the digits reward classifier's scores of teacher
    one-step predictions under random labels, the proxy orders held-out pairs as the expert
    does far more often than chance (an untrained proxy: ~0.5)."""
    from lowbit.data.digits import load_digits_tensors
    from lowbit.proxy_reward import train_proxy_reward

    model = load_digits_model()
    x, y = load_digits_tensors()
    net, record = train_proxy_reward(model, DigitsReward(), x, torch.arange(10), n_train=1024,
                                     n_val=512, steps=200, batch_size=128, seed=0)
    assert abs(record["val_agreement_init"] - 0.5) < 0.1
    assert record["val_agreement"] > 0.8, record


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_student(make_cfg, tmp_path, monkeypatch):
    """trainer.gradient_checkpointing=true (the SD recipe's setting) recomputes the student's
    blocks in backward: the consistency step and its reward gradient are unchanged."""
    enabled = []
    real = fit_mod.set_gradient_checkpointing_

    def spy(net, on):
        real(net, on)
        enabled.append(bool(on) and bool(getattr(net, "is_gradient_checkpointing", False)))

    monkeypatch.setattr(fit_mod, "set_gradient_checkpointing_", spy)
    a, _ = _prepare(make_cfg, tmp_path / "a", "method.beta=0.5", seed=1)
    b, _ = _prepare(make_cfg, tmp_path / "b", "method.beta=0.5",
                    "trainer.gradient_checkpointing=true", seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if sa[k].is_floating_point():
            assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7), k
    assert enabled == [False, True]  # the second fit ran with its blocks recomputed
