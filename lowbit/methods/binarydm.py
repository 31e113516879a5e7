"""``method=binarydm``: BinaryDM (Zheng et al., ICLR 2025) — 1-bit weights (W1A4, also W1A8/W1A32).

- **EBB** (Evolvable-Basis Binarizer, :class:`~lowbit.quant.binary.EBBWeightBinarizer`) on the
  layers of the first and last ``ebb_blocks`` timestep blocks (head and tail, the highest
  resolutions); the central blocks use the plain learnable ``σ₁·sign(w)``. Regulariser
  ``τ·mean|σ₂|`` (τ = 9e-2) drives the second basis to 0; at ``ebb_switch`` (fraction of the
  training steps) every EBB switches to one basis, so the trained model is purely 1-bit.
- **LRM** (Low-rank Representation Mimicking): the FP teacher's timestep-block outputs are
  analysed once by PCA over the **channel** axis (every spatial position of every sample is one
  C-dimensional observation); student and teacher outputs are projected on the top ``C/4``
  principal directions and their MSE, weight 1e-4, is added to the task loss. The bases are
  buffers of the Lightning module, so the checkpoint stores them and resume reuses them.
- QAT from the FP weights with the diffusion loss on real images (:mod:`lowbit.methods.qat_data`);
  activations at the bits' quantizer (4-bit LSQ for W1A4), input/output layers at 8 bits.

Not copied from the reference code: the activation quantizer that re-initialised its step every
forward, PCA over the width axis, the missing σ₂ regulariser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.qat_data import (
    QATDiffusionModule,
    QATExtension,
    TimestepBlock,
    as_tensor,
    build_binary_student,
    fit,
    real_calibration_batches,
    record_training,
    timestep_blocks,
)
from lowbit.quant.binary import BinarySpec, EBBWeightBinarizer, ebb_binarizers


def ebb_block_set(blocks: list[TimestepBlock], n: int) -> list[TimestepBlock]:
    """The first ``n`` and the last ``n`` timestep blocks (head and tail)."""
    n = max(0, min(n, len(blocks)))
    return blocks[:n] + [b for b in blocks[len(blocks) - n:] if b not in blocks[:n]]


class EBBExtension(QATExtension):
    """σ₂ regulariser ``τ·mean|σ₂|`` over all EBB binarizers, and the stage switch."""

    name = "ebb_reg"

    def __init__(self, binarizers: list[EBBWeightBinarizer], tau: float, switch_at: float) -> None:
        super().__init__()
        self._binarizers = binarizers  # plain list: they belong to the student, not to this term
        self.tau, self.switch_at = tau, switch_at

    def on_step(self, step: int, max_steps: int) -> None:
        if step >= self.switch_at * max_steps and any(int(b.stage) == 1 for b in self._binarizers):
            for b in self._binarizers:
                b.switch_stage()

    def loss(self, student_feats, teacher_feats) -> Tensor | None:
        active = [b.sigma2 for b in self._binarizers if int(b.stage) == 1]
        if not active:
            return None
        return self.tau * torch.cat([s.abs() for s in active]).mean()


@torch.no_grad()
def channel_pca(features: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Mean [C] and top-``rank`` principal directions [C, rank] of features [N, C, *spatial],
    PCA over the channel axis (each position of each sample is one observation)."""
    c = features.shape[1]
    x = features.movedim(1, -1).reshape(-1, c).double()
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    basis = evecs[:, torch.argsort(evals, descending=True)[:rank]]
    return mean.float(), basis.float()


def project(features: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """(F − μ)ᵀV over the channel axis: [N, *spatial, rank]."""
    f = features.movedim(1, -1)
    return (f - mean) @ basis


class LRMExtension(QATExtension):
    """BinaryDM's Low-rank Representation Mimicking (PCA bases as buffers ``mean_i``/``basis_i``)."""

    name = "lrm"
    needs_teacher = True

    def __init__(self, block_names: list[str], channels: list[int], weight: float,
                 rank_div: int = 4) -> None:
        super().__init__()
        self.feature_names = tuple(block_names)
        self.weight = weight
        for i, c in enumerate(channels):
            r = max(1, c // rank_div)
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            self.register_buffer(f"basis_{i}", torch.zeros(c, r))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_pca(self, teacher: nn.Module, batches) -> None:
        """Compute the bases once from the teacher's block outputs on ``batches``."""
        feats: dict[str, list[Tensor]] = {n: [] for n in self.feature_names}
        handles = [teacher.get_submodule(n).register_forward_hook(
            lambda _m, _a, out, n=n: feats[n].append(as_tensor(out).detach()))
            for n in self.feature_names]
        try:
            for b in batches:
                teacher(**b)
        finally:
            for h in handles:
                h.remove()
        for i, n in enumerate(self.feature_names):
            basis = getattr(self, f"basis_{i}")
            mean, v = channel_pca(torch.cat(feats[n]), basis.shape[1])
            getattr(self, f"mean_{i}").copy_(mean)
            basis.copy_(v)
        self.fitted.fill_(True)

    def loss(self, student_feats, teacher_feats) -> Tensor | None:
        terms = []
        for i, n in enumerate(self.feature_names):
            mean, basis = getattr(self, f"mean_{i}"), getattr(self, f"basis_{i}")
            terms.append(F.mse_loss(project(student_feats[n], mean, basis),
                                    project(teacher_feats[n], mean, basis)))
        return self.weight * torch.stack(terms).sum()


def _block_channels(unet: nn.Module, loaded, names: list[str]) -> list[int]:
    """Output channels of the named blocks, from one small teacher pass."""
    from lowbit.metrics.cost import example_inputs

    chans: dict[str, int] = {}
    handles = [unet.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: chans.__setitem__(n, as_tensor(out).shape[1])) for n in names]
    try:
        with torch.no_grad():
            unet(**example_inputs(loaded, next(unet.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [chans[n] for n in names]


class BinaryDM(Method):
    name = "binarydm"
    default_ebb_blocks = 2  # conf/method/binarydm.yaml; other values show in the label

    @property
    def label(self) -> str:
        c, parts = self.cfg, []
        if not c.get("ebb", True):
            parts.append("no-ebb")
        elif int(c.get("ebb_blocks", self.default_ebb_blocks)) != self.default_ebb_blocks:
            parts.append(f"ebb_blocks={int(c.ebb_blocks)}")
        if not c.get("lrm", True):
            parts.append("no-lrm")
        return self.name if not parts else f"{self.name}({','.join(parts)})"

    def spec_for(self, blocks: list[TimestepBlock]):
        head_tail = ebb_block_set(blocks, int(self.cfg.ebb_blocks)) if self.cfg.ebb else []

        def fn(name: str, _m: nn.Module) -> BinarySpec:
            ebb = any(b.contains(name) for b in head_tail)
            return BinarySpec(weight="ebb" if ebb else "sign", act="keep")
        return fn

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        c = self.cfg
        blocks = timestep_blocks(teacher)
        student = build_binary_student(teacher, ctx, self.spec_for(blocks),
                                       calib_batches=int(c.calib_batches))
        extensions: list = []
        ebbs = ebb_binarizers(student)
        if c.ebb:
            extensions.append(EBBExtension(ebbs, float(c.ebb_tau), float(c.ebb_switch)))
        if c.lrm:
            names = [b.output for b in blocks]
            lrm = LRMExtension(names, _block_channels(teacher, ctx.loaded, names),
                               float(c.lrm_weight), int(c.lrm_rank_div))
            n_batches = max(1, int(c.lrm_samples) // 64)
            lrm.fit_pca(teacher, real_calibration_batches(
                ctx.loaded.noise_schedule, ctx.loaded.null_class, n_batches=n_batches,
                batch_size=64, seed=int(ctx.cfg.seed) + 20_000))
            extensions.append(lrm)
        module = QATDiffusionModule(
            student, teacher, ctx.loaded.noise_schedule, ctx.loaded.null_class, extensions,
            lr=float(c.lr), scale_lr=float(c.scale_lr), max_steps=int(c.steps),
            p_uncond=float(c.p_uncond),
            kd_weight=float(c.kd_weight))
        info = fit(module, ctx, int(c.steps), int(c.batch_size), int(c.checkpoint_every))
        for b in ebbs:  # a run shorter than the switch point still ends purely 1-bit
            b.switch_stage()
        ctx.report["ebb_layers"] = sum(isinstance(q, EBBWeightBinarizer)
                                       for q in student.modules())
        record_training(ctx, info, student, teacher)
        return student.eval()
