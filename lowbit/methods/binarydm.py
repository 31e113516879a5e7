"""``method=binarydm``: BinaryDM (Zheng et al., ICLR 2025) — 1-bit weights (W1A4, also W1A8/W1A32).

- **EBB** (Evolvable-Basis Binarizer, :class:`EBBWeightBinarizer`, weight binarizer kind ``ebb``
  of :mod:`lowbit.quant.binary`) on the layers of the head and tail timestep blocks — those at
  the highest resolutions (:func:`ebb_block_set`: the upper half of the resolution levels, or
  ``ebb_levels``); the central blocks use the plain learnable ``σ₁·sign(w)``. Regulariser
  ``τ·mean|σ₂|`` (τ = 9e-2) drives the second basis to 0; at ``ebb_switch`` (fraction of the
  training steps) every EBB switches to one basis, so the trained model is purely 1-bit.
- **LRM** (Low-rank Representation Mimicking): the FP teacher's timestep-block outputs are
  analysed once by PCA over the **channel** axis (every spatial position of every sample is one
  C-dimensional observation); student and teacher outputs are projected on the top ``C/4``
  principal directions and their MSE, weight 1e-4, is added to the task loss. The bases are
  buffers of the loss term, so the checkpoint stores them and resume reuses them.
- QAT from the FP weights with the diffusion loss on real images
  (:mod:`lowbit.methods.binary_qat`); activations at the bits' quantizer (4-bit LSQ for W1A4),
  input/output layers at 8 bits.

Not copied from the reference code: the activation quantizer that re-initialised its step every
forward, PCA over the width axis, the missing σ₂ regulariser.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.methods.base import MethodContext
from lowbit.methods.binary_qat import BinaryQAT, BinaryQATParams, real_images
from lowbit.models.adapter import Denoiser
from lowbit.quant.binary import (
    Binarizer,
    BinarySpec,
    binarizers,
    per_channel_mean_abs,
    register_weight_binarizer,
    sign_clip_ste,
)
from lowbit.quant.qmap import register_module_class
from lowbit.train import (
    LossTerm,
    StepOutputs,
    TimestepBlock,
    as_tensor,
    real_calibration_batches,
    tapped,
    timestep_blocks,
)
from lowbit.train.hparams import HParamError


# ------------------------------------------------------------------------------------------------
# EBB
# ------------------------------------------------------------------------------------------------
def _channel_view(p: Tensor, ndim: int) -> Tensor:
    return p.reshape(-1, *[1] * (ndim - 1))


class EBBWeightBinarizer(Binarizer):
    """BinaryDM's Evolvable-Basis Binarizer (EBB), per output channel.

    Stage 1: ``w_b = σ₁·sign(w) + σ₂·sign(w − σ₁·sign(w))`` (two bases); stage 2 (after
    :meth:`switch_stage`): ``w_b = σ₁·sign(w)``. σ₁ = mean|w|, σ₂ = mean|w − σ₁ sign w| at init,
    both learnable. :meth:`regularizer` is ``mean|σ₂|`` — BinaryDM's τ·mean(σ₂) (τ applied by
    :class:`EBBRegularizer`) written with |·| so that it drives σ₂ to 0 from either side, making
    the switch to one basis smooth. The stage is a buffer, so a checkpoint restores it.
    """

    def __init__(self, weight: Tensor, name: str = "") -> None:
        super().__init__(name)
        s1 = per_channel_mean_abs(weight)
        self.sigma1 = nn.Parameter(s1)
        self.sigma2 = nn.Parameter(self._residual_scale(weight.detach(), s1))
        self.register_buffer("stage", torch.ones((), dtype=torch.long))

    @staticmethod
    def _residual_scale(w: Tensor, s1: Tensor) -> Tensor:
        r = w - _channel_view(s1, w.dim()) * torch.where(w < 0, -1.0, 1.0).to(w.dtype)
        return r.abs().reshape(w.shape[0], -1).mean(dim=1)

    @property
    def bits(self) -> int:
        return 2 if int(self.stage) == 1 else 1

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.sigma1, self.sigma2], "zero_point": []}

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        s1 = per_channel_mean_abs(x)
        self.sigma1.copy_(s1)
        self.sigma2.copy_(self._residual_scale(x.detach(), s1))

    def regularizer(self) -> Tensor:
        if int(self.stage) != 1:
            return self.sigma2.new_zeros(())
        return self.sigma2.abs().mean()

    @torch.no_grad()
    def switch_stage(self) -> None:
        """Stage 2: one basis σ₁·sign(w) from now on (BinaryDM's evolution to pure binary)."""
        self.stage.fill_(2)
        self.sigma2.requires_grad_(False)

    def binarize(self, w: Tensor) -> Tensor:
        s1 = _channel_view(self.sigma1, w.dim())
        b1 = s1 * sign_clip_ste(w)  # BinaryDM Eq. (EBB), first basis
        if int(self.stage) != 1:
            return b1
        s2 = _channel_view(self.sigma2, w.dim())
        return b1 + s2 * sign_clip_ste(w - b1)  # second basis on the residual

    def extra_repr(self) -> str:
        return f"stage={int(self.stage)}"


def _build_ebb(_existing, spec: dict, _ctx) -> EBBWeightBinarizer:
    q = EBBWeightBinarizer(torch.zeros(int(spec["out_channels"]), 1), str(spec["name"]))
    q.enabled = bool(spec.get("enabled", True))
    return q


register_weight_binarizer("ebb", lambda w, name: EBBWeightBinarizer(w, name))
register_module_class(
    EBBWeightBinarizer,
    describe=lambda q: {"out_channels": int(q.sigma1.numel()), "name": q.name,
                        "enabled": q.enabled},
    build=_build_ebb)


def ebb_binarizers(model: nn.Module) -> list[EBBWeightBinarizer]:
    return binarizers(model, EBBWeightBinarizer)


def ebb_block_set(blocks: list[TimestepBlock], resolutions: list[int],
                  levels: int | None = None) -> list[TimestepBlock]:
    """BinaryDM's head and tail: the timestep blocks that work at the ``levels`` highest
    resolutions (``resolutions``: each block's output H·W); ``None`` = the upper half of the
    U-Net's resolution levels (at least one). On LDM-4 (four levels, 64² … 8²) that is the 64² and
    32² blocks — the paper's first and last six timestep blocks; on the digits U-Net (16², 8², 4²)
    the 16² blocks."""
    distinct = sorted(set(resolutions), reverse=True)
    n = max(1, len(distinct) // 2) if levels is None else max(0, min(levels, len(distinct)))
    top = set(distinct[:n])
    return [b for b, r in zip(blocks, resolutions, strict=True) if r in top]


class EBBRegularizer(LossTerm):
    """σ₂ regulariser ``mean|σ₂|`` over all EBB binarizers (weight τ), and the stage switch at
    ``switch_at`` · max_steps."""

    name = "ebb_reg"

    def __init__(self, binarizers: list[EBBWeightBinarizer], tau: float, switch_at: float) -> None:
        super().__init__(tau)
        self._binarizers = binarizers  # plain list: they belong to the student, not to this term
        self.switch_at = switch_at

    @property
    def tau(self) -> float:
        return self.weight

    def on_step(self, step: int, max_steps: int) -> None:
        if step >= self.switch_at * max_steps and any(int(b.stage) == 1 for b in self._binarizers):
            for b in self._binarizers:
                b.switch_stage()

    def forward(self, out: StepOutputs) -> Tensor | None:
        active = [b.sigma2 for b in self._binarizers if int(b.stage) == 1]
        if not active:
            return None
        return torch.cat([s.abs() for s in active]).mean()


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


class LRMLoss(LossTerm):
    """BinaryDM's Low-rank Representation Mimicking (PCA bases as buffers ``mean_i``/``basis_i``):
    the MSE between projected student and teacher features, averaged over the blocks (so the
    weight 1e-4 means the same for any number of blocks)."""

    name = "lrm"
    needs_teacher = True

    def __init__(self, block_names: list[str], channels: list[int], weight: float,
                 rank_div: int = 4) -> None:
        super().__init__(weight)
        self.feature_names = tuple(block_names)
        for i, c in enumerate(channels):
            r = max(1, c // rank_div)
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            self.register_buffer(f"basis_{i}", torch.zeros(c, r))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_pca(self, denoiser: Denoiser, teacher: nn.Module,
                batches: Iterable[dict[str, Tensor]]) -> None:
        """Compute the bases once from the teacher's block outputs on ``batches`` (network
        kwargs, e.g. :func:`~lowbit.train.data.real_calibration_batches`)."""
        feats: dict[str, list[Tensor]] = {n: [] for n in self.feature_names}
        with tapped(teacher, self.feature_names) as tap:
            for b in batches:
                denoiser.output_eps(teacher(**b))
                for n in self.feature_names:
                    feats[n].append(tap.features[n].detach())
        for i, n in enumerate(self.feature_names):
            basis = getattr(self, f"basis_{i}")
            mean, v = channel_pca(torch.cat(feats[n]), basis.shape[1])
            getattr(self, f"mean_{i}").copy_(mean)
            basis.copy_(v)
        self.fitted.fill_(True)

    def forward(self, out: StepOutputs) -> Tensor:
        terms = []
        for i, n in enumerate(self.feature_names):
            mean, basis = getattr(self, f"mean_{i}"), getattr(self, f"basis_{i}")
            terms.append(F.mse_loss(project(out.student_features[n], mean, basis),
                                    project(out.teacher_features[n], mean, basis)))
        return torch.stack(terms).mean()


@torch.no_grad()
def block_shapes(denoiser: Denoiser, net: nn.Module, names: list[str]) -> list[tuple[int, ...]]:
    """Output shapes [C, *spatial] of the named blocks, from one one-sample forward of ``net``."""
    device = next(net.parameters()).device
    x = torch.zeros((1, *denoiser.sample_shape), device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    cond = denoiser.make_cond(None, 1) if denoiser.conditioning != "text" else \
        denoiser.null_cond(1, device)
    cond = cond.to(device) if cond is not None else None
    with tapped(net, names) as tap:
        denoiser.call(net, x, t, cond)
    return [tuple(as_tensor(tap.features[n]).shape[1:]) for n in names]


def block_channels(denoiser: Denoiser, net: nn.Module, names: list[str]) -> list[int]:
    """Output channels of the named blocks."""
    return [s[0] for s in block_shapes(denoiser, net, names)]


def block_resolutions(denoiser: Denoiser, net: nn.Module, names: list[str]) -> list[int]:
    """Output resolution (number of spatial positions) of the named blocks."""
    return [math.prod(s[1:]) for s in block_shapes(denoiser, net, names)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryDMParams(BinaryQATParams):
    ebb: bool = True
    ebb_levels: int | None = None
    ebb_tau: float = 0.09
    ebb_switch: float = 0.5
    lrm: bool = True
    lrm_weight: float = 1.0e-4
    lrm_rank_div: int = 4
    lrm_samples: int = 256

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if not 0.0 <= self.ebb_switch <= 1.0:
            raise HParamError(f"{prefix}.ebb_switch={self.ebb_switch}: a fraction of the steps")
        if self.ebb_levels is not None and self.ebb_levels < 1:
            raise HParamError(f"{prefix}.ebb_levels={self.ebb_levels}: a positive number of "
                              f"resolution levels, or null for the upper half")
        for key in ("lrm_rank_div", "lrm_samples"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


class BinaryDM(BinaryQAT):
    name = "binarydm"
    params_class = BinaryDMParams
    families = ("unet", "unet_text")
    family_reason = ("BinaryDM is defined for U-Nets: EBB takes the highest-resolution timestep "
                     "blocks and LRM the channel PCA of the U-Net blocks' feature maps; a DiT has "
                     "no such blocks (method=binary_baseline binarizes a DiT)")

    @property
    def label(self) -> str:
        p, parts = self.params, []
        if not p.ebb:
            parts.append("no-ebb")
        elif p.ebb_levels is not None:
            parts.append(f"ebb_levels={p.ebb_levels}")
        if not p.lrm:
            parts.append("no-lrm")
        return self.name if not parts else f"{self.name}({','.join(parts)})"

    def ebb_blocks(self, denoiser: Denoiser, net: nn.Module, blocks: list[TimestepBlock]
                   ) -> list[TimestepBlock]:
        """The blocks whose layers get EBB (none with ``ebb=false``)."""
        if not self.params.ebb:
            return []
        res = block_resolutions(denoiser, net, [b.output for b in blocks])
        return ebb_block_set(blocks, res, self.params.ebb_levels)

    def spec_for(self, head_tail: list[TimestepBlock]):

        def fn(name: str, _m: nn.Module) -> BinarySpec:
            ebb = any(b.contains(name) for b in head_tail)
            return BinarySpec(weight="ebb" if ebb else "sign", act="keep")
        return fn

    def lrm_term(self, teacher: nn.Module, ctx: MethodContext,
                 blocks: list[TimestepBlock]) -> LRMLoss:
        """LRM with its bases fitted on ``lrm_samples`` noised real images (seed stream
        ``binarydm/lrm_pca``)."""
        p = self.params
        names = [b.output for b in blocks]
        lrm = LRMLoss(names, block_channels(ctx.model, teacher, names), p.lrm_weight,
                      p.lrm_rank_div)
        images, labels = real_images(ctx, p.train_split)
        lrm.fit_pca(ctx.model, teacher, real_calibration_batches(
            ctx.model, images, labels, p.lrm_samples, 64, seed=int(ctx.cfg.seed),
            stream="binarydm/lrm_pca"))
        return lrm

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        blocks = timestep_blocks(teacher)
        student = self.binary_student(teacher, ctx,
                                      self.spec_for(self.ebb_blocks(ctx.model, teacher, blocks)))
        terms: list[LossTerm] = []
        ebbs = ebb_binarizers(student)
        if p.ebb:
            terms.append(EBBRegularizer(ebbs, p.ebb_tau, p.ebb_switch))
        if p.lrm:
            terms.append(self.lrm_term(teacher, ctx, blocks))
        # EBB's σ₂ keeps lr: its regulariser must drive it to 0 before the stage switch
        self.train(student, teacher, ctx, terms, keep_lr=[b.sigma2 for b in ebbs])
        for b in ebbs:  # a run shorter than the switch point still ends purely 1-bit
            b.switch_stage()
        ctx.report["ebb_layers"] = sum(isinstance(q, EBBWeightBinarizer)
                                       for q in student.modules())
        student.requires_grad_(False)
        return student.eval()
