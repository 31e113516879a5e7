"""lowbit.quant — quantizers, quantized layers, ``quantize_``, ``calibrate_``, AdaRound, size.

Life cycle (optimum-quanto style)::

    report = quantize_(model, QuantConfig.preset("w4a4"))        # swap modules in place
    calibrate_(model, batches)                                   # activation Δ per timestep bucket
    adaround_(model, batches, iters=20000)                       # optional: Q-Diffusion weight PTQ
    model(sample, t, ...)                                        # runs quantized; hook sets t

No method logic lives here; methods ask modules for parameters by role (:func:`quant_params`).
"""

from .adaround import AdaRoundConfig, AdaRoundResult, adaround_
from .attention import AttentionQuantizers, QuantAttnProcessor
from .calibrate import CalibrationResult, calibrate_
from .config import (
    LayerOverride,
    LayerPlan,
    QuantConfig,
    QuantSpec,
    bits_label,
    preset_names,
    run_bits,
)
from .modules import ROLES, QuantConv2d, QuantLinear, QuantModuleMixin
from .quantize import (
    FPRecord,
    LayerRecord,
    QuantReport,
    TimestepHook,
    act_quantizers,
    concat_split_points,
    is_quantized,
    named_quantizers,
    quant_disabled,
    quant_params,
    quantize_,
    register_timestep_hook,
    remove_timestep_hook,
    set_quant_state_,
    set_timestep,
    timestep_aware_quantizers,
    weight_quantizers,
)
from .quantizers import TimestepActQuantizer, UniformQuantizer, fake_quantize
from .size import SizeReport, model_size

__all__ = [
    "ROLES",
    "AdaRoundConfig",
    "AdaRoundResult",
    "AttentionQuantizers",
    "CalibrationResult",
    "FPRecord",
    "LayerOverride",
    "LayerPlan",
    "LayerRecord",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantModuleMixin",
    "QuantReport",
    "QuantSpec",
    "SizeReport",
    "TimestepActQuantizer",
    "TimestepHook",
    "UniformQuantizer",
    "act_quantizers",
    "adaround_",
    "bits_label",
    "run_bits",
    "calibrate_",
    "concat_split_points",
    "fake_quantize",
    "is_quantized",
    "model_size",
    "named_quantizers",
    "preset_names",
    "quant_disabled",
    "quant_params",
    "quantize_",
    "register_timestep_hook",
    "remove_timestep_hook",
    "set_quant_state_",
    "set_timestep",
    "timestep_aware_quantizers",
    "weight_quantizers",
]
