"""Model size at the chosen bits: what the weights would occupy once packed.

Quantized weights count ``bits × numel``; their scales and zero points count ``scale_bits`` each;
everything else (biases, norms, embeddings, layers kept FP) counts ``fp_bits``. MB = 2^20 bytes
(BinaryDM's 1045.4 MB for LDM-4 is 274 M parameters × 4 bytes / 2^20).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .attention import AttentionQuantizers
from .modules import QuantModuleMixin

MB = 2**20


@dataclass(frozen=True)
class SizeReport:
    total_params: int  # model parameters, quantizer state excluded
    quantized_params: int  # weights stored at low bits
    qparam_count: int  # scales + zero points
    fp_bits: int
    scale_bits: int
    weight_bits_total: int  # bits of the quantized weights
    qparam_bits_total: int
    other_bits_total: int  # bits of everything kept FP
    fp_mb: float  # the same model with every parameter at fp_bits

    @property
    def total_bytes(self) -> float:
        return (self.weight_bits_total + self.qparam_bits_total + self.other_bits_total) / 8

    @property
    def total_mb(self) -> float:
        return self.total_bytes / MB

    @property
    def compression(self) -> float:
        return self.fp_mb / self.total_mb if self.total_mb else 1.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, total_mb=self.total_mb,
                 compression=round(self.compression, 4))
        return d


def model_size(model: nn.Module, fp_bits: int = 32, scale_bits: int = 32) -> SizeReport:
    """Size of ``model`` with quantized weights packed at their bits (see module docstring)."""
    weight_bits: dict[int, int] = {}  # id(weight) -> bits per element
    qparam_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantModuleMixin):
            wq = m.weight_quantizer
            if not wq.passthrough:
                weight_bits[id(m.weight)] = wq.bits
            for q in m.quantizers():
                qparam_ids.update(id(p) for ps in q.params_by_role().values() for p in ps)
        elif isinstance(m, AttentionQuantizers):
            qparam_ids.update(id(p) for q in m.quantizers() for ps in q.params_by_role().values()
                              for p in ps)
    total = quantized = n_qparams = w_bits = q_bits = other = 0
    for p in model.parameters():
        n = p.numel()
        if id(p) in qparam_ids:
            n_qparams += n
            q_bits += n * scale_bits
            continue
        total += n
        if id(p) in weight_bits:
            quantized += n
            w_bits += n * weight_bits[id(p)]
        else:
            other += n * fp_bits
    return SizeReport(total_params=total, quantized_params=quantized, qparam_count=n_qparams,
                      fp_bits=fp_bits, scale_bits=scale_bits, weight_bits_total=w_bits,
                      qparam_bits_total=q_bits, other_bits_total=other,
                      fp_mb=total * fp_bits / 8 / MB)
