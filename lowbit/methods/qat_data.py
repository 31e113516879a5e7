"""QAT on the real training images (the digits set): the training loop shared by BinaryDM, BiDM and
the binary baselines.

BinaryDM and BiDM are quantization-aware *training* methods: the student starts from the FP
weights and is trained with the standard diffusion loss ``‖ε − ε_θ(x_t, t, y)‖²`` on real images
(label dropout to the null class keeps classifier-free guidance working), plus each method's
distillation term against the frozen FP teacher (BinaryDM: LRM; BiDM: SPD). Methods plug their
terms in as :class:`QATExtension` modules; extensions are submodules of the Lightning module, so
their state (LRM's PCA bases, …) is saved in the checkpoint and restored on resume.

Also here, because every binary method needs them: :func:`timestep_blocks` (the U-Net's "timestep
blocks" — LDM's input/middle/output blocks — as diffusers module names), :class:`FeatureTap`
(forward hooks that capture block outputs), :func:`build_binary_student` (quantize → binarize →
calibrate on real data) and :func:`fit` (Lightning Trainer from ``cfg.trainer`` with checkpoints in
``<run dir>/checkpoints`` and ``resume``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.data.digits import load_digits_tensors
from lowbit.methods.base import MethodContext
from lowbit.quant import QuantConfig, calibrate_, quantize_
from lowbit.quant.binary import SpecFn, binarize_

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------------
# U-Net structure
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimestepBlock:
    """One LDM-style timestep block of a diffusers U-Net: ``output`` is the module whose output is
    the block output (the attention after a resnet, else the resnet; the mid block as a whole),
    ``prefixes`` the module names that belong to it (resnet, attention, a following resampler)."""

    output: str
    prefixes: tuple[str, ...]
    stage: str  # down | mid | up

    def contains(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)


def timestep_blocks(unet: nn.Module) -> list[TimestepBlock]:
    """The U-Net's timestep blocks in forward order: down path, mid block, up path."""
    out: list[TimestepBlock] = []
    for stage in ("down", "up"):
        blocks = getattr(unet, f"{stage}_blocks", None) or []
        for b, block in enumerate(blocks):
            resnets = getattr(block, "resnets", None) or []
            attns = getattr(block, "attentions", None)
            for j in range(len(resnets)):
                base = f"{stage}_blocks.{b}"
                prefixes = [f"{base}.resnets.{j}"]
                output = f"{base}.resnets.{j}"
                if attns is not None and j < len(attns):
                    prefixes.append(f"{base}.attentions.{j}")
                    output = f"{base}.attentions.{j}"
                if j == len(resnets) - 1:  # LDM folds the resampler into the last block
                    for rs in ("downsamplers", "upsamplers"):
                        if getattr(block, rs, None) is not None:
                            prefixes.append(f"{base}.{rs}")
                out.append(TimestepBlock(output, tuple(prefixes), stage))
        if stage == "down" and getattr(unet, "mid_block", None) is not None:
            out.append(TimestepBlock("mid_block", ("mid_block",), "mid"))
    return out


def as_tensor(out: object) -> Tensor:
    """A module output as a tensor (diffusers blocks return tensors, tuples or BaseOutputs)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


class FeatureTap:
    """Forward hooks that keep the outputs of named modules while ``active``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self.active = False
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                         for n in names]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            if self.active:
                self.features[name] = as_tensor(out)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------------------------------------
# the Lightning module
# ------------------------------------------------------------------------------------------------
@dataclass
class QATBatch:
    """One training batch: clean images, noise, timesteps, labels (after dropout) and x_t."""

    x0: Tensor
    noise: Tensor
    t: Tensor
    y: Tensor
    xt: Tensor


class QATExtension(nn.Module):
    """A method's part of the QAT step. ``feature_names``: block outputs it needs from student and
    teacher; ``before_student``: runs before the student's forward (BiDM's t+k pass);
    ``loss``: its weighted term (or None); ``on_step``: called at each step's start."""

    name = "ext"
    feature_names: tuple[str, ...] = ()
    needs_teacher = False

    def on_step(self, step: int, max_steps: int) -> None:  # noqa: B027
        """Called at the start of every training step."""

    def before_student(self, module: QATDiffusionModule, batch: QATBatch) -> None:  # noqa: B027
        """Called before the student's forward pass."""

    def loss(self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor]
             ) -> Tensor | None:
        return None


class QATDiffusionModule(L.LightningModule):
    """ε-prediction diffusion loss on real images for a quantized student, plus extensions.

    The frozen teacher runs only when an extension needs it (or ``kd_weight > 0``: output MSE to
    the teacher's ε, off by default as in the papers) and is left out of checkpoints.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, noise_schedule: dict,
                 null_class: int | None, extensions: list[QATExtension] | None = None, *,
                 lr: float = 1e-4, scale_lr: float | None = None, weight_decay: float = 0.0,
                 max_steps: int = 1000, p_uncond: float = 0.1, kd_weight: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.extensions = nn.ModuleList(extensions or [])
        sched = DDPMScheduler(**noise_schedule)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(),
                             persistent=False)
        self.null_class = null_class
        self.lr, self.weight_decay, self.max_steps = lr, weight_decay, max_steps
        self.scale_lr = scale_lr
        self.p_uncond, self.kd_weight = p_uncond, kd_weight
        self.strict_loading = False  # the teacher is not in the checkpoint
        names = sorted({n for e in self.extensions for n in e.feature_names})
        self.student_tap = FeatureTap(student, names)
        self.teacher_tap = FeatureTap(self.teacher, names)
        self.needs_teacher = kd_weight > 0 or any(e.needs_teacher for e in self.extensions)

    # -- data ----------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].reshape(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def make_batch(self, x0: Tensor, y: Tensor) -> QATBatch:
        if self.null_class is not None and self.p_uncond > 0:
            drop = torch.rand(y.shape, device=y.device) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        return QATBatch(x0, noise, t, y, self.add_noise(x0, noise, t))

    def run(self, model: nn.Module, xt: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return model(xt, t, class_labels=y if self.null_class is not None else None).sample

    # -- training ------------------------------------------------------------------------------
    def losses(self, b: QATBatch) -> dict[str, Tensor]:
        """Every loss term of one step (``total`` is what is optimised)."""
        for e in self.extensions:
            e.before_student(self, b)
        self.student_tap.features.clear()
        self.student_tap.active = True
        try:
            eps = self.run(self.student, b.xt, b.t, b.y)
        finally:
            self.student_tap.active = False
        out = {"task": F.mse_loss(eps, b.noise)}
        teacher_feats: dict[str, Tensor] = {}
        if self.needs_teacher:
            self.teacher_tap.features.clear()
            self.teacher_tap.active = True
            try:
                with torch.no_grad():
                    eps_t = self.run(self.teacher, b.xt, b.t, b.y)
            finally:
                self.teacher_tap.active = False
            teacher_feats = dict(self.teacher_tap.features)
            if self.kd_weight > 0:
                out["kd"] = self.kd_weight * F.mse_loss(eps, eps_t)
        for e in self.extensions:
            term = e.loss(dict(self.student_tap.features), teacher_feats)
            if term is not None:
                out[e.name] = term
        out["total"] = sum(v for k, v in out.items())
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], _idx: int) -> Tensor:
        for e in self.extensions:
            e.on_step(int(self.global_step), self.max_steps)
        x0, y = batch
        out = self.losses(self.make_batch(x0, y))
        self.log("train/loss", out["total"], prog_bar=True)
        for k, v in out.items():
            if k != "total":
                self.log(f"train/{k}", v, prog_bar=k != "task")
        return out["total"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        seen = {id(p) for p in params}
        params += [p for p in self.extensions.parameters() if p.requires_grad and id(p) not in seen]
        return params

    def scale_parameters(self) -> list[nn.Parameter]:
        """Quantizer step sizes and binarizer scales (roles weight_scale, act_scale): values of
        ~1e-2 that Adam would move by ``lr`` per step, so they get ``scale_lr``. EBB's σ₂ keeps
        ``lr``: its regulariser must be able to drive it to 0 before the stage switch."""
        from lowbit.quant import quant_params
        from lowbit.quant.binary import EBBWeightBinarizer

        sigma2 = {id(m.sigma2) for m in self.student.modules() if isinstance(m, EBBWeightBinarizer)}
        out, seen = [], set()
        for role in ("weight_scale", "act_scale"):
            for _, p in quant_params(self.student, role):
                if p.requires_grad and id(p) not in sigma2 and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def configure_optimizers(self):
        params = self.trainable_parameters()
        groups: list[dict] = [{"params": params}]
        if self.scale_lr is not None:
            scales = {id(p) for p in self.scale_parameters()}
            groups = [{"params": [p for p in params if id(p) not in scales]},
                      {"params": [p for p in params if id(p) in scales], "lr": self.scale_lr}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr,
                                weight_decay=self.weight_decay)
        # cosine decay to 0: short QAT runs end on a settled model
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("teacher.")}


# ------------------------------------------------------------------------------------------------
# data, student, fit
# ------------------------------------------------------------------------------------------------
def digits_loader(batch_size: int, seed: int) -> DataLoader:
    """The real digits (all 1,797 images, as the FP model was trained on), shuffled."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=g)


def real_calibration_batches(noise_schedule: dict, null_class: int | None, n_batches: int = 8,
                             batch_size: int = 64, seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """Noised real images for activation-range calibration, one timestep per batch (spread over
    the schedule) so that timestep-aware quantizers calibrate too."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(seed)
    ac = DDPMScheduler(**noise_schedule).alphas_cumprod.float()
    ts = torch.linspace(0, len(ac) - 1, n_batches).round().long()
    for t in ts:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        noise = torch.randn(x[idx].shape, generator=g)
        xt = ac[t].sqrt() * x[idx] + (1 - ac[t]).sqrt() * noise
        batch = {"sample": xt, "timestep": t.expand(batch_size)}
        if null_class is not None:
            batch["class_labels"] = y[idx]
        yield batch


def quant_config(ctx: MethodContext) -> QuantConfig:
    return QuantConfig.from_dict(OmegaConf.to_container(ctx.cfg.bits, resolve=True))


def build_binary_student(teacher: nn.Module, ctx: MethodContext, spec_for: SpecFn,
                         calib_batches: int = 8) -> nn.Module:
    """Quantize a copy of the teacher with the ``bits`` config, binarize its 1-bit layers with
    ``spec_for`` and calibrate the remaining static activation quantizers on noised real images.
    Records what was done in ``ctx.report``."""
    qcfg = quant_config(ctx)  # bad bits fail here, before any compute
    if qcfg.weight.bits != 1:
        raise ValueError(f"bits={qcfg.name}: binary methods need 1-bit weights (bits=w1a*)")
    student = copy.deepcopy(teacher)
    # weight quantizers are initialised by calibrate_ below: the 1-bit uniform ones that the
    # binarizers replace never need their (MSE-searched) grid
    report = quantize_(student, qcfg, init_weights=False)
    binarized = binarize_(student, spec_for)
    t0 = time.perf_counter()
    calib = calibrate_(student, real_calibration_batches(
        ctx.loaded.noise_schedule, ctx.loaded.null_class, n_batches=calib_batches,
        seed=int(ctx.cfg.seed) + 10_000))
    ctx.cost["calib_s"] = time.perf_counter() - t0
    ctx.report["quant"] = report.to_dict()
    ctx.report["binarized"] = binarized
    ctx.report["calibration"] = calib.to_dict()
    log.info("%s\n  %d layers binarized", report.summary(), len(binarized))
    return student


def fit(module: QATDiffusionModule, ctx: MethodContext, steps: int, batch_size: int,
        checkpoint_every: int = 100) -> dict:
    """Train ``module`` for ``steps`` steps on the real digits with ``cfg.trainer``; checkpoints in
    ``<run dir>/checkpoints`` (``last.ckpt``), resumed from there when ``resume=true``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = Path(ctx.output_dir) / CHECKPOINT_DIR
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                           every_n_train_steps=checkpoint_every)
    trainer = instantiate(ctx.cfg.trainer, max_steps=steps, default_root_dir=str(ctx.output_dir),
                          logger=False, callbacks=[ckpt])
    last = ckpt_dir / "last.ckpt"
    resume = bool(ctx.cfg.get("resume", False)) and last.is_file()
    if resume:
        log.info("resuming from %s", last)
    loader = digits_loader(batch_size, int(ctx.cfg.seed))
    t0 = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=str(last) if resume else None)
    train_s = time.perf_counter() - t0
    module.student_tap.remove()
    module.teacher_tap.remove()
    return {"train_s": train_s, "steps": int(trainer.global_step), "resumed": resume,
            "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
            "last_losses": {k: float(v) for k, v in trainer.callback_metrics.items()}}


def record_training(ctx: MethodContext, info: dict, student: nn.Module, teacher: nn.Module) -> None:
    """Training time, trainable parameters, size and OPs into ``ctx.cost``/``ctx.report``."""
    from lowbit.metrics.cost import model_costs

    ctx.cost["train_s"] = info["train_s"]
    ctx.cost["finetune_s"] = info["train_s"]  # the name lowbit-report's table shows
    ctx.cost["trainable_params"] = info["trainable_params"]
    ctx.cost.update(model_costs(student, ctx.loaded, reference=teacher))
    ctx.report["training"] = {k: v for k, v in info.items() if k not in ("train_s",)}
