"""``method=rglcd``: reward-guided latent consistency distillation into a few-step student.

Latent consistency distillation (LCM, Luo et al. 2023; the diffusers LCM distillation script is
the reference) with the reward guidance of RG-LCD (Li et al. 2024), on lowbit's one training
stack. The student is a copy of the FP teacher — full precision, or quantized and calibrated as
every other method's student (``bits=w8a8`` …) — with a zero-initialised w-embedding
(:mod:`lowbit.models.guidance`), so it starts as exactly the teacher. Each step, for real images
x₀ (latents for latent models) and a batch of the step's draws:

- a point of the DDIM grid of ``num_ddim_timesteps`` steps: t = t_n, s = t − k (k = T / N;
  s clamped at 0), z_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε;
- a guidance scale w ~ U[w_min, w_max] per sample (lowbit's convention: ε_u + w·(ε_c − ε_u));
- the student's consistency function ``f(z, t) = c_skip(t)·z + c_out(t)·x̂₀(z, t, w)`` with LCM's
  boundary scalings at ``timestep_scaling``·t (σ_data = 0.5; c_skip(0) = 1, c_out(0) = 0, so
  f(z, 0) = z);
- the teacher's guided ε at (z_t, t) and one DDIM step to s: ẑ_s = √ᾱ_s·x̂₀ + √(1−ᾱ_s)·ε̂
  (with the model's ``clip_sample``, x̂₀ clamped and ε̂ re-derived from it, as the sampler's
  consistent clip does);
- the target f⁻(ẑ_s, s) of the EMA student (decay ``ema_decay``, updated after every
  optimiser step, saved in the checkpoint);
- L = pseudo-Huber(f(z_t, t), f⁻(ẑ_s, s); c) − β·R(decode(f(z_t, t)), cond) (RG-LCD), R from
  the ``reward`` group (:mod:`lowbit.rewards`); β = 0 leaves the reward out entirely (plain LCD).

Every draw comes from named seed streams indexed by the step (:class:`ConsistencyData`), so a
resumed fit equals an uninterrupted one. The student that is sampled is the EMA copy
(``sample_ema``, as the reference script saves its target network) or the online one; an LCM
sampler (``sampler=lcm4`` …) feeds it the sampler's guidance scale through its w-embedding.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.config import ConfigError
from lowbit.methods.base import Method, MethodContext
from lowbit.methods.binary_qat import real_images
from lowbit.methods.ptq import quant_config
from lowbit.models.adapter import Denoiser
from lowbit.models.guidance import add_guidance_embedding_, guidance_embedding
from lowbit.rewards import Reward, build_reward
from lowbit.train import (
    LossTerm,
    NoiseSchedule,
    ParamGroup,
    RealImageData,
    StepDataModule,
    StudentModule,
    build_student,
    fit,
    generator,
    qat_groups,
    real_calibration_batches,
    trainable_share,
)
from lowbit.train.hparams import HParamError, TrainParams
from lowbit.train.losses import total_loss

log = logging.getLogger(__name__)

__all__ = ["ConsistencyData", "DDIMGrid", "LCDModule", "PseudoHuber", "RGLCD", "RGLCDParams",
           "RewardTerm", "consistency_scalings"]

SIGMA_DATA = 0.5  # LCM's boundary-condition σ_data


# ------------------------------------------------------------------------------------------------
# consistency-model pieces
# ------------------------------------------------------------------------------------------------
def consistency_scalings(t: Tensor, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings of discrete timesteps: with τ = timestep_scaling·t,
    c_skip = σ²/(τ² + σ²), c_out = τ/√(τ² + σ²) (σ = σ_data = 0.5) — c_skip(0) = 1, c_out(0)
    = 0, and both reach their limits (0, 1) well before the largest timesteps."""
    tau = t.float() * float(timestep_scaling)
    c_skip = SIGMA_DATA**2 / (tau**2 + SIGMA_DATA**2)
    c_out = tau / (tau**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


@dataclasses.dataclass
class DDIMGrid:
    """The skip grid of consistency distillation: ``N`` DDIM timesteps t_n = (n+1)·k − 1
    (k = T // N, n = 0 … N−1, the grid LCMScheduler samples on with ``original_inference_steps
    = N``); one solver step goes from t_n to t_n − k (= t_{n−1}, or 0 for n = 0)."""

    alphas_cumprod: Tensor
    num_steps: int

    def __post_init__(self) -> None:
        T = len(self.alphas_cumprod)
        if not 1 <= self.num_steps <= T:
            raise ValueError(f"num_ddim_timesteps={self.num_steps}: between 1 and {T}")
        self.k = T // self.num_steps
        self.timesteps = torch.arange(1, self.num_steps + 1) * self.k - 1

    def start(self, index: Tensor) -> Tensor:
        return self.timesteps[index.cpu()].to(index.device)

    def target(self, index: Tensor) -> Tensor:
        return (self.start(index) - self.k).clamp(min=0)

    def alpha(self, t: Tensor, like: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        return a.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def predicted_x0(eps: Tensor, z: Tensor, a: Tensor, clip: float | None) -> Tensor:
    """x̂₀ = (z − √(1−ᾱ)·ε)/√ᾱ, clamped to ±``clip`` (None: not clamped)."""
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return x0 if clip is None else x0.clamp(-clip, clip)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """mean(√((a − b)² + c²) − c) (the LCM script's loss; c = 0.001)."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).mean()


@dataclasses.dataclass
class ConsistencyOutputs:
    """What the terms of one step see: the batch, the student's one-step prediction f(z_t, t)
    and the EMA target f⁻(ẑ_s, s)."""

    batch: dict[str, Any]
    prediction: Tensor
    target: Tensor


class PseudoHuber(LossTerm):
    """The consistency loss ``train/lcd``."""

    name = "lcd"

    def __init__(self, c: float = 0.001) -> None:
        super().__init__(1.0)
        self.c = float(c)

    def forward(self, out: ConsistencyOutputs) -> Tensor:
        return pseudo_huber(out.prediction, out.target, self.c)


class RewardTerm(LossTerm):
    """``train/reward``: the mean reward of the decoded one-step predictions; weight −β (the
    total loss is L_LCD − β·R). The reward model is not a submodule (never checkpointed)."""

    name = "reward"

    def __init__(self, reward: Reward, denoiser: Denoiser, beta: float) -> None:
        super().__init__(-float(beta))
        object.__setattr__(self, "reward", reward)
        object.__setattr__(self, "denoiser", denoiser)

    def forward(self, out: ConsistencyOutputs) -> Tensor:
        if getattr(self.reward, "latent", False):  # a latent proxy: no decode
            return self.reward(out.prediction, out.batch).mean()
        return self.reward(decode_with_grad(self.denoiser, out.prediction), out.batch).mean()


def decode_with_grad(denoiser: Denoiser, z: Tensor) -> Tensor:
    """Images of samples ``z`` with the gradient kept (the adapter's ``decode`` is no-grad):
    the VAE decoder for latent models, ``z`` itself for pixel models."""
    if not denoiser.latent:
        return z
    vae = denoiser.vae
    out = vae.decode(z.to(next(vae.parameters()).dtype) / denoiser.vae_scale)
    return (out.sample if hasattr(out, "sample") else out[0]).float()


# ------------------------------------------------------------------------------------------------
# data and module
# ------------------------------------------------------------------------------------------------
class ConsistencyData(StepDataModule):
    """Real images (latents), their noise and conditions from :class:`RealImageData` (no label
    dropout: the teacher's unconditional half comes from the null condition), plus per sample
    a DDIM grid index and a guidance scale w ~ U[w_min, w_max], drawn from ``(seed, stream +
    "/grid", step)`` — every batch a pure function of the step. ``image_idx``: which training
    images (the prompts of a prompt reward)."""

    def __init__(self, denoiser: Denoiser, images: Tensor, labels: Tensor | None,
                 batch_size: int, num_ddim_timesteps: int, w_min: float, w_max: float,
                 seed: int = 0, stream: str = "lcd") -> None:
        super().__init__()
        self.real = RealImageData(denoiser, images, labels, batch_size, seed=seed, p_uncond=0.0,
                                  stream=f"{stream}/images")
        self.num_ddim_timesteps = int(num_ddim_timesteps)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.seed, self.stream = int(seed), stream

    def batch(self, step: int) -> dict[str, Any]:
        b = self.real.batch(step)
        epoch, k = divmod(int(step), self.real.per_epoch)
        bs = self.real.batch_size
        idx = self.real._order(epoch)[k * bs : (k + 1) * bs]
        g = generator(self.seed, f"{self.stream}/grid", step)
        n = len(idx)
        index = torch.randint(0, self.num_ddim_timesteps, (n,), generator=g)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(n, generator=g)
        out = {"x": b["x0"], "noise": b["noise"], "index": index, "w": w, "image_idx": idx}
        if b["cond"] is not None:
            out["cond"] = b["cond"]
        return out


class LCDModule(StudentModule):
    """:class:`~lowbit.train.module.StudentModule` with the consistency-distillation step: the
    EMA target ``target`` (a submodule: saved in every checkpoint, never trained) and the loss
    of the module doc. ``terms``: :class:`PseudoHuber` (+ :class:`RewardTerm`)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, denoiser: Denoiser,
                 groups: list[ParamGroup], terms: list[LossTerm], *, grid: DDIMGrid,
                 ema_decay: float = 0.95, timestep_scaling: float = 10.0,
                 clip_x0: float | None = None, **kw: Any) -> None:
        super().__init__(student, teacher, denoiser, groups, terms, **kw)
        if guidance_embedding(student) is None:
            raise ValueError("the student needs a w-embedding (add_guidance_embedding_)")
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.grid = grid
        self.ema_decay = float(ema_decay)
        self.timestep_scaling = float(timestep_scaling)
        self.clip_x0 = clip_x0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.target.eval()

    def consistency(self, net: nn.Module, z: Tensor, t: Tensor, cond: Tensor | None,
                    w: Tensor) -> Tensor:
        """f(z, t) = c_skip(t)·z + c_out(t)·x̂₀ of ``net`` at guidance ``w`` (per sample)."""
        with guidance_embedding(net).at(w):
            eps = self.denoiser.call(net, z, t, cond)
        c_skip, c_out = consistency_scalings(t, self.timestep_scaling)
        shape = (-1, *[1] * (z.dim() - 1))
        x0 = predicted_x0(eps, z, self.grid.alpha(t, z), self.clip_x0)
        return c_skip.reshape(shape).to(z) * z + c_out.reshape(shape).to(z) * x0

    @torch.no_grad()
    def teacher_step(self, z: Tensor, t: Tensor, s: Tensor, cond: Tensor | None,
                     w: Tensor) -> Tensor:
        """ẑ_s: one DDIM step of the w-guided teacher from (z_t, t) to s (per-sample w)."""
        d = self.denoiser
        if cond is not None and d.uses_guidance(2.0):  # the scale only asks for both halves
            xb, tb, cb = d.guidance_batch(z, t, cond, 2.0)
            eps_c, eps_u = d.call(self.teacher, xb, tb, cb).chunk(2)
            eps = eps_u + w.reshape(-1, *[1] * (z.dim() - 1)).to(z) * (eps_c - eps_u)
        else:
            eps = d.call(self.teacher, z, t, cond)
        a_t, a_s = self.grid.alpha(t, z), self.grid.alpha(s, z)
        x0 = predicted_x0(eps, z, a_t, self.clip_x0)
        if self.clip_x0 is not None:  # ε consistent with the clamped x̂₀ (sampling's consistent clip)
            eps = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x0, noise, w = batch["x"], batch["noise"], batch["w"]
        cond = batch.get("cond")
        index = batch["index"]
        t, s = self.grid.start(index), self.grid.target(index)
        a_t = self.grid.alpha(t, x0)
        z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        prediction = self.consistency(self.student, z, t, cond, w)
        z_s = self.teacher_step(z, t, s, cond, w)
        with torch.no_grad():
            target = self.consistency(self.target, z_s, s, cond, w)
        out = ConsistencyOutputs(batch, prediction, target)
        values = {term.name: term(out) for term in self.terms}
        values["loss"] = total_loss(list(self.terms), values)
        return values

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA of the trained parameters: θ⁻ ← d·θ⁻ + (1 − d)·θ (the others never change)."""
        params = dict(self.target.named_parameters())
        for g in self.groups:
            for name, p in g.params:
                params[name].lerp_(p.detach(), 1.0 - self.ema_decay)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_target()


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RGLCDParams(TrainParams):
    lr: float = 1.0e-6
    scale_lr: float | None = 1.0e-6
    weight_decay: float = 0.0
    num_ddim_timesteps: int = 50
    w_min: float = 6.0
    w_max: float = 16.0
    w_embedding_dim: int = 256
    ema_decay: float = 0.95
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    clip_x0: bool | None = None
    beta: float = 0.0
    sample_ema: bool = True
    train_split: str = "train"
    calib_n: int = 256
    calib_batch_size: int = 64

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if not 0.0 <= self.ema_decay < 1.0:
            raise HParamError(f"{prefix}.ema_decay={self.ema_decay}: in [0, 1)")
        if self.w_min > self.w_max or self.w_min < 0:
            raise HParamError(f"{prefix}.w_min={self.w_min}, w_max={self.w_max}: need "
                              f"0 <= w_min <= w_max")
        if self.num_ddim_timesteps < 1:
            raise HParamError(f"{prefix}.num_ddim_timesteps={self.num_ddim_timesteps}: positive")
        if self.huber_c <= 0:
            raise HParamError(f"{prefix}.huber_c={self.huber_c}: positive")
        if self.beta < 0:
            raise HParamError(f"{prefix}.beta={self.beta}: the reward weight is >= 0")
        for key in ("calib_n", "calib_batch_size", "w_embedding_dim"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


class RGLCD(Method):
    name = "rglcd"
    families = ("unet", "unet_text")
    family_reason = ("the w-embedding enters a U-Net's TimestepEmbedding "
                     "(time_embedding.cond_proj); a DiT embeds its timestep elsewhere")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = RGLCDParams.from_cfg(cfg)

    def reward_cfg(self, ctx: MethodContext) -> Any:
        return ctx.cfg.get("reward")

    def label_for(self, reward_name: str) -> str:
        p = self.params
        if p.beta == 0 or reward_name == "none":
            return f"{self.name}(lcd)"
        return f"{self.name}({reward_name},β={p.beta:g})"

    @property
    def label(self) -> str:
        return getattr(self, "_label", f"{self.name}(β={self.params.beta:g})")

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        seed = int(ctx.cfg.seed)
        d = ctx.model
        prediction = d.noise_schedule.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ConfigError("model", d.name, f"prediction_type={prediction!r}: RG-LCD here "
                              f"distils ε-prediction models", "choose an ε-prediction model")
        sampler_cfg = ctx.cfg.get("sampler")
        if sampler_cfg is not None and sampler_cfg.get("kind") == "lcm":
            from diffusers import LCMScheduler

            grid = int(LCMScheduler.from_config(dict(d.noise_schedule))
                       .config.original_inference_steps)
            if grid != p.num_ddim_timesteps:
                raise ConfigError("method.num_ddim_timesteps", p.num_ddim_timesteps,
                                  f"the LCM sampler walks a skip grid of {grid} DDIM steps "
                                  f"(LCMScheduler's original_inference_steps); a student "
                                  f"distilled on another grid is sampled off its own",
                                  f"pass method.num_ddim_timesteps={grid}")
        reward_cfg = self.reward_cfg(ctx)
        reward_name = "none" if reward_cfg is None else str(reward_cfg.get("name", "none"))
        reward = None
        if p.beta > 0:
            if reward_cfg is None or reward_cfg.get("_target_") is None:
                raise ConfigError("method.beta", p.beta, "a reward weight without a reward",
                                  "choose reward=digits|clip, or method.beta=0 (plain LCD)")
            reward = build_reward(reward_cfg)  # loads (or refuses) before any compute
        self._label = self.label_for(reward_name)

        images, labels = real_images(ctx, p.train_split)
        quantized = str(ctx.cfg.bits.name) != "fp"
        if quantized:
            qcfg = quant_config(ctx.cfg)
            batches = real_calibration_batches(d, images, labels, p.calib_n, p.calib_batch_size,
                                               seed=seed)
            student, info = build_student(teacher, qcfg, batches)
            ctx.cost["calib_s"] = info.calib_s
            ctx.report.update(info.report())
        else:
            student = copy.deepcopy(teacher).requires_grad_(True)
        add_guidance_embedding_(student, p.w_embedding_dim)  # FP, zero: the student = the teacher
        groups = qat_groups(student, p.lr, p.scale_lr if quantized else None, p.weight_decay)

        sched = NoiseSchedule(d.noise_schedule)
        grid = DDIMGrid(sched.alphas_cumprod, p.num_ddim_timesteps)
        clip = p.clip_x0 if p.clip_x0 is not None else bool(d.noise_schedule.get("clip_sample"))
        clip_range = float(d.noise_schedule.get("clip_sample_range", 1.0)) if clip else None
        terms: list[LossTerm] = [PseudoHuber(p.huber_c)]
        if reward is not None:
            if hasattr(reward, "captions") and ctx.dataset is not None \
                    and d.conditioning == "text":
                reward.captions = list(ctx.dataset.captions(p.train_split))
            terms.append(RewardTerm(reward.to(d.device), d, p.beta))
        module = LCDModule(student, teacher, d, groups, terms, grid=grid,
                           ema_decay=p.ema_decay, timestep_scaling=p.timestep_scaling,
                           clip_x0=clip_range, max_steps=p.steps,
                           optimizer=p.build_optimizer(), scheduler=p.build_scheduler(),
                           grad_clip=p.grad_clip)
        data = ConsistencyData(d, images, labels, p.batch_size, p.num_ddim_timesteps, p.w_min,
                               p.w_max, seed=seed, stream="rglcd")
        stats = fit(module, data, ctx, max_steps=p.steps, checkpoint_every=p.checkpoint_every)
        n_train = module.trainable_params
        out = module.target if p.sample_ema else student
        out.requires_grad_(False)
        ctx.cost.update(finetune_s=stats.seconds, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        ctx.report["finetune"] = {"fit": stats.to_dict(), "reward": reward_name,
                                  "sampled": "ema" if p.sample_ema else "online",
                                  "w_embedding": "time_embedding.cond_proj (FP)",
                                  "config": p.to_dict()}
        return out.eval()
