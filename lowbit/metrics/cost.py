"""Model cost as the binarization papers report it: size in MB and OPs of one denoiser call.

BinaryDM / BiDM (following XNOR-Net, Bi-Real Net, ReActNet): ``OPs = BOPs/64 + FLOPs`` where, for
a layer whose weights *and* input activations are quantized (``b_w``, ``b_a`` bits),
``BOPs = w·h·c_in·c_out·k²·b_w·b_a`` (w, h: the output's spatial size; for a linear layer w·h is
the number of tokens), and every other multiply-accumulate counts as one FLOP. Only the layers
with weights are counted (Conv2d, Linear — quantized or not — and the conv-like real-valued
extras of binary layers: BiDM's k×k scaling filter, a 1×1 shortcut conv) plus the two attention
matmuls ``QKᵀ`` and ``softmax·V`` (BOPs when both operands are quantized); norms, activations and
elementwise ops are not, as in the papers. A weight-only quantized layer (``a16``/``a32``) is
computed in floating point after dequantization, so it counts as FLOPs; so does a layer whose
activation scales vary along the reduction axis (per-input-channel activations: no integer GEMM
can apply them), whatever its nominal bits.

Counting runs one forward pass with batch size 1 through forward hooks, so it follows whatever the
model actually executes (time embedding, class embedding, attention at every resolution).
Size is :func:`lowbit.quant.model_size` (quantized weights at their bits, scales and everything
else at 32 bits; MB = 2²⁰ bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from lowbit.models.adapter import Denoiser
from lowbit.quant import model_size
from lowbit.quant.attention import MATMUL_ATTR
from lowbit.quant.modules import QuantModuleMixin
from lowbit.quant.quantizers import UniformQuantizer

FP_BITS = 32


@dataclass
class OpsReport:
    """BOPs and FLOPs of one denoiser call on one sample; ``ops = bops / 64 + flops``."""

    bops: float = 0.0
    flops: float = 0.0
    layers: list[dict] = field(default_factory=list)

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops

    def add(self, name: str, macs: float, b_w: int, b_a: int) -> None:
        """A layer of ``macs`` multiply-accumulates with weight/activation bits (32 = FP)."""
        if b_w < FP_BITS and b_a < FP_BITS:
            self.bops += macs * b_w * b_a
        else:
            self.flops += macs
        self.layers.append({"name": name, "macs": macs, "b_w": b_w, "b_a": b_a})

    def to_dict(self) -> dict:
        return {"ops": self.ops, "bops": self.bops, "flops": self.flops}


def _bits(q: nn.Module | None) -> int:
    """Effective bits of a quantizer (FP when absent, pass-through or disabled)."""
    if q is None or getattr(q, "passthrough", True) or not getattr(q, "enabled", True):
        return FP_BITS
    bits = getattr(q, "bits", None)
    return FP_BITS if bits is None or bits >= FP_BITS else int(bits)


def layer_macs(module: nn.Module, x: Tensor, y: Tensor) -> float:
    """MACs per sample of a Conv2d (``h'·w'·c_out·(c_in/groups)·k²``) or Linear layer."""
    batch = y.shape[0]
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return y.numel() / batch * (module.in_channels // module.groups) * k
    return y.numel() / batch * module.in_features  # tokens · c_out · c_in


def _attention_hook(report: OpsReport, name: str):
    def hook(attn: Attention, args: tuple, kwargs: dict, _out: object) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        tokens = h.shape[2] * h.shape[3] if h.dim() == 4 else h.shape[1]
        enc = kwargs.get("encoder_hidden_states")
        kv_tokens = tokens if enc is None else enc.shape[1]
        macs = float(tokens * kv_tokens * attn.inner_dim)  # per matmul, per sample
        mq = getattr(attn, MATMUL_ATTR, None)
        bq = bk = bv = bs = FP_BITS
        if mq is not None:
            bq, bk, bv, bs = (_bits(q) for q in (mq.q, mq.k, mq.v, mq.softmax))
        # QKᵀ has activations on both sides; softmax·V too (softmax output × V)
        report.add(f"{name}.qk", macs, bk, bq)
        report.add(f"{name}.pv", macs, bv, bs)
    return hook


def integer_gemm(module: nn.Module) -> bool:
    """Whether a quantized layer's products can run as an integer/binary GEMM: activation scales
    that vary along the reduction axis (per input channel or group; per position inside a conv's
    im2col row) cannot be applied to an integer accumulator, so such a layer dequantizes and
    computes in floating point — FLOPs, not BOPs."""
    kinds = {q.kind for q in getattr(module, "act_quantizers", lambda: [])()
             if isinstance(q, UniformQuantizer) and not q.passthrough}
    if kinds & {"channel", "group"}:
        return False
    return not ("token" in kinds and isinstance(module, nn.Conv2d))


def count_ops(model: nn.Module, example: dict) -> OpsReport:
    """OPs of ``model(**example)`` per sample (``example`` with batch size 1 is cheapest)."""
    report = OpsReport()
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            def hook(mod: nn.Module, args: tuple, y: Tensor, name: str = name) -> None:
                x = args[0]
                macs = layer_macs(mod, x, y)
                if isinstance(mod, QuantModuleMixin):
                    b_a = _bits(mod.input_quantizer) if integer_gemm(mod) else FP_BITS
                    report.add(name, macs, _bits(mod.weight_quantizer), b_a)
                else:
                    report.add(name, macs, FP_BITS, FP_BITS)
                extra = getattr(mod, "extra_macs", None)
                if extra is not None and getattr(mod, "binary_active", True):
                    e = extra(x, y)
                    if e:  # per sample already
                        report.add(f"{name}.extra", e, FP_BITS, FP_BITS)
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(_attention_hook(report, name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in handles:
            h.remove()
    return report


def example_inputs(denoiser: Denoiser, device: torch.device | str = "cpu",
                   timestep: int = 500) -> dict:
    """One sample's network kwargs for ``denoiser`` (conditional on class 0 / the empty prompt)."""
    x = torch.zeros((1, *denoiser.sample_shape), device=device)
    cond = None
    if denoiser.conditioning == "class":
        cond = torch.zeros(1, dtype=torch.long, device=device)
    elif denoiser.conditioning == "text":
        cond = denoiser.null_cond(1, torch.device(device))
    return denoiser.inputs(x, torch.tensor([timestep], device=device), cond)


def size_mb(model: nn.Module) -> float:
    return model_size(model).total_mb


def model_costs(model: nn.Module, denoiser: Denoiser, reference: nn.Module | None = None) -> dict:
    """``size_mb`` and ``ops`` (with ``bops``, ``flops``) of ``model``; with an FP ``reference``
    also its numbers and the savings (``size_x``, ``ops_x``: how many times smaller)."""
    device = next(model.parameters()).device
    ops = count_ops(model, example_inputs(denoiser, device))
    out = {"size_mb": size_mb(model), **ops.to_dict()}
    if reference is not None:
        ref_ops = count_ops(reference, example_inputs(denoiser, device)).ops
        ref_mb = size_mb(reference)
        out.update(ops_fp=ref_ops, size_fp_mb=ref_mb, ops_x=ref_ops / max(ops.ops, 1e-12),
                   size_x=ref_mb / max(out["size_mb"], 1e-12))
    return out
