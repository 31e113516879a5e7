"""``method=ptq``: post-training quantization, naive (min–max / MSE) or with Q-Diffusion's
AdaRound/BRECQ block reconstruction (``method.recon=adaround``).

The student is quantized with ``quantize_``, its activation steps are calibrated on FP sampling
trajectories of the evaluation sampler (timestep-stratified, cond + uncond halves), and with
``recon=adaround`` the weight rounding is learnt block by block against the FP block outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from torch import nn

from lowbit.data.trajectories import TrajectorySet, fp_trajectories
from lowbit.methods.base import Method, MethodContext
from lowbit.quant import QuantConfig, adaround_, run_bits
from lowbit.quant.act_recon import ActReconConfig, act_reconstruct_
from lowbit.quant.adaround import AdaRoundConfig
from lowbit.sampling import SamplerConfig
from lowbit.train import build_student, derive_seed
from lowbit.train.hparams import HParamError, MethodParams

log = logging.getLogger(__name__)

RECON = ("none", "adaround", "qdiff")


def sampler_config(cfg) -> SamplerConfig:
    return SamplerConfig.from_cfg(cfg.sampler)


def quant_config(cfg) -> QuantConfig:
    """The run's quantization config: ``bits`` with the method's ``bits_rules`` (:func:`run_bits`)."""
    return QuantConfig.from_dict(run_bits(cfg))


def calibration_set(ctx: MethodContext, teacher: nn.Module, calib_n: int, calib_steps: int,
                    sampler: SamplerConfig | None = None) -> TrajectorySet:
    """FP trajectories of ``sampler`` (default: the evaluation sampler) from the seed stream
    ``calibration`` (never the evaluation noise), cached under ``paths.cache_dir``; conditions
    from the dataset when there is one."""
    conditions = ctx.dataset.conditions(calib_n) if ctx.dataset is not None else None
    return fp_trajectories(ctx.model.with_net(teacher), sampler or sampler_config(ctx.cfg),
                           n=calib_n, calib_steps=calib_steps,
                           seed=derive_seed(int(ctx.cfg.seed), "calibration"),
                           cache_dir=ctx.cache_dir, conditions=conditions)


def prompt_pool(ctx: MethodContext, n: int = 1024) -> list[str] | None:
    """The prompts a text-conditioned model's data-free training draws from (None otherwise)."""
    if ctx.model.conditioning != "text" or ctx.dataset is None:
        return None
    return list(ctx.dataset.conditions(n))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibParams(MethodParams):
    """Calibration on FP trajectories: ``calib_n`` samples at ``calib_steps`` kept steps, in
    batches of ``calib_batch_size``; ``max_samples`` values per quantizer and bucket for the
    MSE/percentile inits."""

    calib_n: int
    calib_steps: int
    calib_batch_size: int
    max_samples: int = 4096

    def check(self, prefix: str) -> None:
        for key in ("calib_n", "calib_steps", "calib_batch_size", "max_samples"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")
        super().check(prefix)


def weight_reconstruction(adaround: dict, traj: TrajectorySet, batch_size: int,
                          ctx: MethodContext):
    """``build_student``'s transform for Q-Diffusion's weight PTQ: BRECQ/AdaRound block
    reconstruction of the weight rounding on FP activations, before the activation steps are
    calibrated (BRECQ's order). Resumable: finished units are kept under ``<run>/adaround``;
    the per-unit losses go into the run's report (``adaround``)."""

    def reconstruct(student: nn.Module):
        result = adaround_(student, traj.batches(batch_size), dict(adaround),
                           state_dir=ctx.output_dir / "adaround")
        ctx.report["adaround"] = result.to_dict()
        return result
    return reconstruct


def check_adaround(adaround: dict, prefix: str) -> None:
    """A bad ``adaround`` key or value fails at config time, not after calibration."""
    try:
        AdaRoundConfig.from_dict(adaround, key=f"{prefix}.adaround")
    except (TypeError, ValueError) as e:
        raise HParamError(f"{prefix}.adaround: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQParams(CalibParams):
    recon: str = "none"
    adaround: dict = dataclasses.field(default_factory=dict)
    act_recon: dict = dataclasses.field(default_factory=dict)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.recon not in RECON:
            raise HParamError(f"{prefix}.recon={self.recon!r}: choose one of {', '.join(RECON)}")
        check_adaround(self.adaround, prefix)
        try:  # fails now, not after the weight reconstruction
            ActReconConfig.from_dict(self.act_recon, key=f"{prefix}.act_recon")
        except ValueError as e:
            raise HParamError(str(e)) from e


class PTQ(Method):
    name = "ptq"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = PTQParams.from_cfg(cfg)

    @property
    def label(self) -> str:
        recon = self.params.recon
        return self.name if recon == "none" else f"{self.name}+{recon}"

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        qcfg = quant_config(ctx.cfg)  # bad bits fail here, before any compute
        if p.recon == "qdiff" and not qcfg.act.enabled:
            raise HParamError(f"method.recon=qdiff reconstructs activation steps, but bits="
                              f"{qcfg.name} keeps activations FP: use method.recon=adaround")
        t0 = time.perf_counter()
        traj = calibration_set(ctx, teacher, p.calib_n, p.calib_steps)
        ctx.cost["trajectory_s"] = time.perf_counter() - t0

        reconstruct = (weight_reconstruction(p.adaround, traj, p.calib_batch_size, ctx)
                       if p.recon in ("adaround", "qdiff") else None)
        student, info = build_student(teacher, qcfg, traj.batches(p.calib_batch_size),
                                      max_samples=p.max_samples, transform=reconstruct)
        if p.recon == "qdiff":  # Q-Diffusion: then the activation Δ, block by block (LSQ)
            t1 = time.perf_counter()
            act = act_reconstruct_(student, traj.batches(p.calib_batch_size), dict(p.act_recon),
                                   state_dir=ctx.output_dir / "adaround")
            info.calib_s += time.perf_counter() - t1
            ctx.report["act_recon"] = act.to_dict()
        ctx.cost["calib_s"] = info.calib_s
        ctx.cost["trainable_params"] = 0
        ctx.report.update(info.report())
        return student
