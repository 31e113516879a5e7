"""Block-wise grid weight quantizer: NormalFloat (QLoRA) or integer levels per block of weights,
with IR-QLoRA's Information Calibration Quantization (ICQ) of the block centres and QLoRA's double
quantization of the block constants.

- Grids: :func:`normal_float_levels` (bitsandbytes' NF, generalised to ``bits``) and
  :func:`int_levels` (2^b evenly spaced levels on [−1, 1]).
- ICQ (:func:`icq_search`, IR-QLoRA Eq. 6–7): per block of 64 weights the quantizer centre τ is
  searched around the block median — NF grids: ``τ = τ₀ + f``, f in ``[−0.1σ, 0.1σ]`` (σ the
  block's standard deviation), 201 candidates, scale = max|w − τ|; integer grids: a range factor
  p ∈ [0.9, 1.1] on the block's half range — keeping the candidate whose codes have the highest
  entropy. τ is stored double-quantized (8 bits, one FP scale per layer).
- :class:`BlockwiseGridQuantizer`: the frozen base-weight quantizer that uses them, following the
  quantizer protocol of :class:`~lowbit.quant.UniformQuantizer`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .qmap import register_module_class

__all__ = ["GRIDS", "BlockwiseGridQuantizer", "code_entropy", "double_quantize", "grid_codes",
           "icq_search", "int_levels", "normal_float_levels"]

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


# quantization map (lowbit.quant.qmap)
register_module_class(
    BlockwiseGridQuantizer,
    describe=lambda q: {"numel": int(q.center.numel()) * q.block, "bits": q.bits, "grid": q.grid,
                        "block": q.block, "name": q.name, "enabled": q.enabled},
    build=lambda _e, s, _c: BlockwiseGridQuantizer.skeleton(**s))
