"""Attention-matmul quantization for diffusers ``Attention`` modules.

The two matmuls inside attention, ``Q·Kᵀ`` and ``softmax(·)·V``, have activations on both sides, so
they get their own quantizers (Q-Diffusion §3.3; PTQ4DM): Q, K, V (signed) and the softmax output
(unsigned, ``sm_bits``, 8 by default; FP bits leave it unquantized). The quantizers live in an
``AttentionQuantizers`` submodule named ``matmul_quantizers`` on the ``Attention`` module (so they
are in its ``state_dict``); the stateless :class:`QuantAttnProcessor` replaces the stock
``AttnProcessor``/``AttnProcessor2_0`` and computes attention explicitly,
``softmax(Q Kᵀ · scale + mask) · V``, whenever a quantizer is active. When quantization is disabled
it calls ``AttnProcessor2_0`` unchanged, so the FP path stays bit-identical.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import Tensor, nn

from .config import QuantSpec
from .modules import check_role
from .quantizers import UniformQuantizer

MATMUL_ATTR = "matmul_quantizers"
REPLACEABLE_PROCESSORS: tuple[type, ...] = (AttnProcessor, AttnProcessor2_0)


def softmax_spec(act: QuantSpec, sm_bits: int | None) -> QuantSpec:
    """Softmax output: per-tensor, unsigned grid [0, 2^b-1] (asymmetric; its min is 0 so z = 0)."""
    return dataclasses.replace(act, bits=sm_bits, symmetric=False, granularity="tensor")


class AttentionQuantizers(nn.Module):
    """Quantizers of one attention module's matmul inputs: ``q``, ``k``, ``v``, ``softmax``."""

    def __init__(self, attn: Attention, qkv: QuantSpec, sm_bits: int | None, name: str = "") -> None:
        super().__init__()
        kv_dim = attn.to_k.out_features if attn.to_k is not None else attn.inner_kv_dim
        self.q = UniformQuantizer.for_act(qkv, attn.inner_dim, -1, f"{name}.q")
        self.k = UniformQuantizer.for_act(qkv, kv_dim, -1, f"{name}.k")
        self.v = UniformQuantizer.for_act(qkv, kv_dim, -1, f"{name}.v")
        self.softmax = UniformQuantizer.for_act(softmax_spec(qkv, sm_bits), 1, -1, f"{name}.softmax")
        self.qualname = name

    def quantizers(self) -> list[UniformQuantizer]:
        return [self.q, self.k, self.v, self.softmax]

    @property
    def active(self) -> bool:
        """Whether any quantizer would change or observe its input."""
        return any(not q.passthrough and q.enabled for q in self.quantizers())

    @property
    def qk_quantized(self) -> bool:
        return not (self.q.passthrough or self.k.passthrough)

    @property
    def pv_quantized(self) -> bool:
        return not (self.v.passthrough or self.softmax.passthrough)

    def quant_params(self, role: str) -> list[nn.Parameter]:
        check_role(role)
        if not role.startswith("act_"):
            return []
        key = "scale" if role == "act_scale" else "zero_point"
        return [p for q in self.quantizers() for p in q.params_by_role()[key]]


def _quant_heads(quantizer: UniformQuantizer, x: Tensor) -> Tensor:
    """Quantize [B, H, N, d] head-split tensors with channels = H·d (the projection's outputs)."""
    if quantizer.passthrough or quantizer.kind == "tensor":
        return quantizer(x)
    b, h, n, d = x.shape
    y = quantizer(x.transpose(1, 2).reshape(b, n, h * d))
    return y.reshape(b, n, h, d).transpose(1, 2)


def quantized_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None,
                        mq: AttentionQuantizers, upcast_softmax: bool = False) -> Tensor:
    """softmax(Q̂ K̂ᵀ · scale + mask) quantized, times V̂; inputs [B, H, N, d]."""
    q, k, v = _quant_heads(mq.q, q), _quant_heads(mq.k, k), _quant_heads(mq.v, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if upcast_softmax:
        scores = scores.float()
    probs = mq.softmax(scores.softmax(dim=-1)).to(v.dtype)
    return torch.matmul(probs, v)


class QuantAttnProcessor:
    """``AttnProcessor2_0`` with quantized attention matmuls (reads ``attn.matmul_quantizers``);
    with quantization off it calls the processor it replaced (``fp_processor``)."""

    def __init__(self, fp_processor: AttnProcessor | AttnProcessor2_0 | None = None) -> None:
        self.fp_processor = fp_processor if fp_processor is not None else AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                 temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        mq: AttentionQuantizers | None = getattr(attn, MATMUL_ATTR, None)
        if mq is None or not mq.active:
            return self.fp_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                            *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.upcast_attention:
            query, key = query.float(), key.float()

        hidden_states = quantized_attention(query, key, value, attn.scale, attention_mask, mq,
                                            attn.upcast_softmax)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(value.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attach_attention_quantizers(attn: Attention, qkv: QuantSpec, sm_bits: int | None,
                                name: str) -> AttentionQuantizers | str:
    """Install quantizers and the processor on ``attn``; returns them or why it was not possible."""
    proc = attn.processor
    if type(proc) not in REPLACEABLE_PROCESSORS:
        return f"unsupported attention processor {type(proc).__name__}"
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return "attention without to_k/to_v/to_out (added-KV or pre-only) is not supported"
    mq = AttentionQuantizers(attn, qkv, sm_bits, name).to(attn.to_q.weight.device)
    setattr(attn, MATMUL_ATTR, mq)
    attn.set_processor(QuantAttnProcessor(proc))
    return mq
