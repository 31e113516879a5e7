"""``method=irqlora``: IR-QLoRA (Qin et al., ICML 2024) applied to a low-bit diffusion model.

An LLM method: frozen low-bit base weights (NF or integer grid, blocks of 64) plus a LoRA trained
on top, with two information-retention parts. Here the LoRA is trained by data-free distillation
on FP sampling trajectories exactly as EfficientDM's QALoRA is (:mod:`lowbit.train`:
MSE to the FP model's guided ε along FP trajectories, one optimiser step per denoising step), so
the two are comparable at the same weight bits.

- **ICQ** (Information Calibration Quantization): per block of 64 weights the quantizer centre τ
  is searched around the block median — NF grids: ``τ = τ₀ + f``, f in ``[−0.1σ, 0.1σ]`` (σ the
  block's standard deviation), 201 candidates, scale = max|w − τ|; integer grids: a range factor
  p ∈ [0.9, 1.1] on the block's half range — keeping the candidate whose codes have the highest
  entropy (IR-QLoRA Eq. 6–7). τ is stored double-quantized (8 bits, one FP scale per layer).
- **IEC** (Information Elastic Connection): ``z = A(x) + β₁·groupmean_r(x)``,
  ``out = B(z) + β₂·repeat(z, o/r)``, β₁, β₂ learnable scalars initialised to 0; the parameter-free
  maps use :func:`~lowbit.quant.binary.channel_map` (gcd when r does not divide the widths).
- The LoRA stays a side branch (it cannot be merged into an NF/int grid): it is counted in the
  size and OPs. Layers the bits rules keep at 8 bits (input/output conv, time-embedding MLP) get
  no LoRA and keep their uniform quantizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.methods.base import Method, MethodContext
from lowbit.methods.ptq import prompt_pool, quant_config, sampler_config
from lowbit.quant import QuantConv2d, QuantLinear
from lowbit.quant.binary import channel_map
from lowbit.quant.qmap import register_module_class
from lowbit.train import (
    FPTrajectoryData,
    FPTrajectoryStream,
    StudentModule,
    TeacherMSE,
    build_student,
    fit,
    param_group,
    trainable_share,
)
from lowbit.train.hparams import HParamError, TrainParams

log = logging.getLogger(__name__)

GRIDS = ("nf", "int")


# ------------------------------------------------------------------------------------------------
# grids and ICQ
# ------------------------------------------------------------------------------------------------
def normal_float_levels(bits: int) -> Tensor:
    """QLoRA's NormalFloat grid of ``bits`` bits in [−1, 1]: quantiles of N(0, 1), 2^(b−1)
    positive and 2^(b−1) − 1 negative levels plus an exact 0 (bitsandbytes ``create_normal_map``
    with the offset generalised: ½(1 − 1/(2(2^b − 1)) + 1 − 1/(2·2^b)), 0.9677 at 4 bits)."""
    n = 2**bits
    offset = 0.5 * (1 - 1 / (2 * (n - 1)) + 1 - 1 / (2 * n))
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def int_levels(bits: int) -> Tensor:
    """An integer grid as 2^b evenly spaced levels on [−1, 1]."""
    return torch.linspace(-1.0, 1.0, 2**bits)


def grid_codes(u: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level (``levels`` ascending) for normalised values ``u``."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(u, mids)


def code_entropy(codes: Tensor, n_levels: int) -> Tensor:
    """Entropy (bits) of the code histogram of each row of ``codes`` [B, M] → [B]."""
    counts = torch.zeros(codes.shape[0], n_levels, device=codes.device)
    counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=counts.dtype))
    p = counts / codes.shape[1]
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def _block_params(blocks: Tensor, center: Tensor, grid: str, half: Tensor | None = None
                  ) -> Tensor:
    """Scale of each block for centre ``center`` (NF: max|w − τ|; int: the given half range)."""
    if grid == "nf":
        return (blocks - center[:, None]).abs().amax(dim=1).clamp_min(1e-12)
    return half.clamp_min(1e-12)


@torch.no_grad()
def icq_search(blocks: Tensor, levels: Tensor, grid: str, candidates: int = 201,
               span: float = 0.1, calibrate: bool = True) -> tuple[Tensor, Tensor]:
    """ICQ: per block (rows of ``blocks`` [B, 64]) the centre τ and scale s whose codes have the
    highest entropy; ``calibrate=False`` gives the plain quantizer (NF: absmax about 0, QLoRA;
    int: min–max)."""
    b = blocks.float()
    if grid == "nf":
        if not calibrate:
            zero = torch.zeros(b.shape[0], device=b.device)
            return zero, _block_params(b, zero, grid)
        tau0 = b.median(dim=1).values
        sigma = b.std(dim=1)
        best_h = torch.full_like(tau0, -1.0)
        best_tau, best_s = tau0.clone(), _block_params(b, tau0, grid)
        # candidates ordered from the median outwards: ties keep the smallest shift
        fs = torch.linspace(-span, span, candidates)
        for f in fs[torch.argsort(fs.abs(), stable=True)]:
            tau = tau0 + f * sigma
            s = _block_params(b, tau, grid)
            h = code_entropy(grid_codes((b - tau[:, None]) / s[:, None], levels), len(levels))
            better = h > best_h + 1e-9
            best_h = torch.where(better, h, best_h)
            best_tau = torch.where(better, tau, best_tau)
            best_s = torch.where(better, s, best_s)
        return best_tau, best_s
    lo, hi = b.amin(dim=1), b.amax(dim=1)
    center, half = (hi + lo) / 2, (hi - lo) / 2
    if not calibrate:
        return center, _block_params(b, center, grid, half)
    best_h = torch.full_like(center, -1.0)
    best_s = half.clone()
    ps = torch.linspace(1 - span, 1 + span, candidates)
    for p in ps[torch.argsort((ps - 1).abs(), stable=True)]:
        s = _block_params(b, center, grid, half * p)
        u = ((b - center[:, None]) / s[:, None]).clamp(-1, 1)
        h = code_entropy(grid_codes(u, levels), len(levels))
        better = h > best_h + 1e-9
        best_h = torch.where(better, h, best_h)
        best_s = torch.where(better, s, best_s)
    return center, best_s


def double_quantize(x: Tensor, bits: int = 8) -> Tensor:
    """Symmetric ``bits``-bit quantization of a vector with one absmax scale (QLoRA's double
    quantization of the block constants)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max().clamp_min(1e-12) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax) * scale


class BlockwiseGridQuantizer(nn.Module):
    """Frozen base-weight quantizer: blocks of ``block`` weights (along the flattened weight),
    NF or integer levels, per-block centre τ (ICQ, double-quantized) and scale s. Follows the
    quantizer protocol of ``UniformQuantizer`` (``bits``, ``params_by_role`` …) so ``model_size``
    counts its weights at ``bits`` and τ, s as quantizer parameters. The dequantized weight is
    cached while the latent weight is unchanged (QLoRA trains only the adapters)."""

    timestep_aware = False
    passthrough = False
    dynamic = True  # nothing for calibrate_ to do
    kind = "group"
    note = ""

    def __init__(self, weight: Tensor, bits: int, grid: str = "nf", block: int = 64,
                 icq: bool = True, candidates: int = 201, span: float = 0.1,
                 name: str = "") -> None:
        super().__init__()
        if grid not in GRIDS:
            raise ValueError(f"grid={grid!r}: choose one of {GRIDS}")
        if weight.numel() % block:
            raise ValueError(f"{name}: {weight.numel()} weights are not a multiple of block={block}")
        self.bits, self.grid, self.block, self.name = int(bits), grid, int(block), name
        self.enabled = True
        levels = normal_float_levels(bits) if grid == "nf" else int_levels(bits)
        self.register_buffer("levels", levels.to(weight.device))
        tau, s = icq_search(weight.detach().reshape(-1, block), self.levels, grid, candidates,
                            span, calibrate=icq)
        # parameters (frozen) so that model_size counts them as quantizer state
        self.center = nn.Parameter(double_quantize(tau), requires_grad=False)
        self.scale = nn.Parameter(s, requires_grad=False)
        self._cache: tuple[tuple, Tensor] | None = None

    @classmethod
    def skeleton(cls, numel: int, bits: int, grid: str = "nf", block: int = 64, name: str = "",
                 enabled: bool = True) -> BlockwiseGridQuantizer:
        """Same parameter shapes, no ICQ search (values come from a state_dict next)."""
        q = cls(torch.zeros(int(numel)), bits, grid, block, icq=False, name=name)
        q.enabled = bool(enabled)
        return q

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def num_scales(self) -> int:
        return self.scale.numel() + self.center.numel()

    def params_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.scale], "zero_point": [self.center]}

    def set_learnable(self, scale: bool = True, zero_point: bool | None = None) -> None:
        """The base quantizer stays frozen (QLoRA); kept for the quantizer protocol."""

    def init_from_tensor(self, x: Tensor) -> None:  # noqa: D102 - set once, by ICQ
        pass

    def codes(self, w: Tensor) -> Tensor:
        """The code of every weight, [n_blocks, block]."""
        b = w.detach().reshape(-1, self.block).float()
        return grid_codes(((b - self.center[:, None]) / self.scale[:, None]).clamp(-1, 1),
                          self.levels)

    def entropy(self, w: Tensor) -> Tensor:
        """Mean code entropy (bits) over the blocks of ``w``."""
        return code_entropy(self.codes(w), len(self.levels)).mean()

    def dequantize(self, w: Tensor) -> Tensor:
        deq = self.levels[self.codes(w)] * self.scale[:, None] + self.center[:, None]
        return deq.reshape(w.shape).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        key = (w.data_ptr(), w._version, w.shape)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dequantize(w))
        return self._cache[1]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid={self.grid}, block={self.block}"


# ------------------------------------------------------------------------------------------------
# LoRA with IEC
# ------------------------------------------------------------------------------------------------
class IECLoRA(nn.Module):
    """LoRA side branch with IR-QLoRA's Information Elastic Connection: an *output* adapter for
    the quantized layers' adapter slot (``layer.set_adapter``; parameters ``<layer>.lora.*``),
    added to the layer's output.

    ``z = A(x) + β₁·groupmean_r(x)``; ``out = B(z) + β₂·repeat(z)``; β₁ = β₂ = 0 and B = 0 at
    init (the student starts as the quantized base). Conv: A a k×k conv (stride/padding of the
    layer), B a 1×1 conv; the parameter-free paths are pooled to A's output grid."""

    adapts = "output"

    def __init__(self, layer: nn.Module, rank: int, scaling: float = 1.0, iec: bool = True
                 ) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        dev = layer.weight.device
        if self.is_conv:
            self.A = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride,
                               layer.padding, layer.dilation, bias=False, device=dev)
            self.B = nn.Conv2d(rank, layer.out_channels, 1, bias=False, device=dev)
            self.out_dim = layer.out_channels
        else:
            self.A = nn.Linear(layer.in_features, rank, bias=False, device=dev)
            self.B = nn.Linear(rank, layer.out_features, bias=False, device=dev)
            self.out_dim = layer.out_features
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.rank, self.scaling, self.iec = rank, scaling, iec
        self.beta1 = nn.Parameter(torch.zeros((), device=dev)) if iec else None
        self.beta2 = nn.Parameter(torch.zeros((), device=dev)) if iec else None

    def forward(self, x: Tensor) -> Tensor:
        axis = 1 if self.is_conv else -1
        z = self.A(x)
        if self.iec:  # IR-QLoRA IEC: parameter-free elastic paths around A and B
            g = channel_map(x, self.rank, axis)
            if self.is_conv and g.shape[-2:] != z.shape[-2:]:
                g = F.adaptive_avg_pool2d(g, z.shape[-2:])
            z = z + self.beta1 * g
        out = self.B(z)
        if self.iec:
            out = out + self.beta2 * channel_map(z, self.out_dim, axis)
        return self.scaling * out


register_module_class(
    IECLoRA,
    describe=lambda m: {"rank": m.rank, "scaling": m.scaling, "iec": m.iec},
    build=lambda _e, s, ctx: IECLoRA(ctx.parent, int(s["rank"]), float(s["scaling"]),
                                     bool(s["iec"])))
register_module_class(
    BlockwiseGridQuantizer,
    describe=lambda q: {"numel": int(q.center.numel()) * q.block, "bits": q.bits, "grid": q.grid,
                        "block": q.block, "name": q.name, "enabled": q.enabled},
    build=lambda _e, s, _c: BlockwiseGridQuantizer.skeleton(**s))


class _HasIECLoRA(type):
    """``isinstance(m, IRQLoRALinear)``: a quantized layer of that base class with an IEC LoRA
    side branch in its adapter slot (the layer's class itself never changes)."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, cls.base) and isinstance(getattr(obj, "adapter", None), IECLoRA)


class IRQLoRALinear(metaclass=_HasIECLoRA):
    base = QuantLinear


class IRQLoRAConv2d(metaclass=_HasIECLoRA):
    base = QuantConv2d


def apply_irqlora_(model: nn.Module, bits: int, grid: str, rank: int, *, block: int = 64,
                   icq: bool = True, iec: bool = True, scaling: float = 1.0,
                   candidates: int = 201, span: float = 0.1) -> list[str]:
    """Replace the ``bits``-bit weight quantizers of a ``quantize_``-d model by ICQ blockwise
    quantizers and attach IEC LoRAs to those layers, in place; returns the layer names."""
    names = []
    for name, m in list(model.named_modules()):
        if type(m) not in (QuantLinear, QuantConv2d) or m.weight_quantizer.passthrough \
                or m.weight_quantizer.bits != bits:
            continue
        if m.split or m.weight.numel() % block or getattr(m, "groups", 1) != 1:
            raise ValueError(f"{name}: IR-QLoRA needs an unsplit layer whose weight count is a "
                             f"multiple of block={block} (set split_shortcut: false)")
        m.weight_quantizer = BlockwiseGridQuantizer(m.weight, bits, grid, block, icq,
                                                    candidates, span, f"{name}.weight")
        m.set_adapter(IECLoRA(m, rank, scaling, iec))  # <layer>.lora: output side branch
        names.append(name)
    if not names:
        raise ValueError(f"apply_irqlora_: no {bits}-bit layer to quantize")
    return names


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class IRQLoRAParams(TrainParams):
    grid: str = "nf"
    block: int = 64
    icq: bool = True
    icq_candidates: int = 201
    icq_span: float = 0.1
    iec: bool = True
    rank: int = 8
    alpha: float | None = None
    lr: float
    weight_decay: float = 0.0

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.grid not in GRIDS:
            raise HParamError(f"{prefix}.grid={self.grid!r}: choose one of {', '.join(GRIDS)}")
        for key in ("block", "icq_candidates", "rank"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


class IRQLoRA(Method):
    name = "irqlora"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = IRQLoRAParams.from_cfg(cfg)

    @property
    def label(self) -> str:
        p = self.params
        parts = [p.grid]
        if not p.icq:
            parts.append("no-icq")
        if not p.iec:
            parts.append("no-iec")
        return f"{self.name}({','.join(parts)})"

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        qcfg = quant_config(ctx.cfg)
        if qcfg.act.enabled:
            raise ValueError(f"bits={qcfg.name}: IR-QLoRA quantizes weights only (use w4a16, "
                             f"w3a16 or w2a16)")
        # blocks of 64 run along the flattened weight, so the [h | skip] split is not used
        qcfg = qcfg.with_overrides({"split_shortcut": False})

        def icq(student: nn.Module) -> list[str]:
            return apply_irqlora_(student, int(qcfg.weight.bits), p.grid, p.rank, block=p.block,
                                  icq=p.icq, iec=p.iec, scaling=float(p.alpha or p.rank) / p.rank,
                                  candidates=p.icq_candidates, span=p.icq_span)

        # weights only: nothing to calibrate; calib_s is the ICQ search
        student, info = build_student(teacher, qcfg, None, transform=icq)
        layers = info.transform
        ctx.cost["calib_s"] = info.calib_s
        ctx.report.update(info.report())
        mods = dict(student.named_modules())
        ctx.report["code_entropy"] = float(torch.stack(
            [mods[n].weight_quantizer.entropy(mods[n].weight) for n in layers]).mean())

        groups = [param_group(student, "lora", "lora", p.lr, weight_decay=p.weight_decay)]
        sampler = sampler_config(ctx.cfg)
        module = StudentModule(student, teacher, ctx.model, groups,
                               [TeacherMSE(guidance_scale=sampler.guidance_scale)],
                               max_steps=p.steps, optimizer=p.build_optimizer(),
                               scheduler=p.build_scheduler(), grad_clip=p.grad_clip)
        # EfficientDM's data: the same stream of FP trajectories
        stream = FPTrajectoryStream(ctx.model.with_net(teacher), sampler, p.batch_size,
                                    seed=int(ctx.cfg.seed), stream="fp_trajectories",
                                    conditions=prompt_pool(ctx))
        stats = fit(module, FPTrajectoryData(stream), ctx, max_steps=p.steps,
                    checkpoint_every=p.checkpoint_every)
        student.requires_grad_(False)
        n_train = module.trainable_params
        ctx.cost.update(finetune_s=stats.seconds, trainable_params=n_train,
                        trainable_share=trainable_share(n_train, teacher))
        ctx.report["finetune"] = {"fit": stats.to_dict(), "lora_layers": len(layers),
                                  "config": p.to_dict()}
        return student.eval()
