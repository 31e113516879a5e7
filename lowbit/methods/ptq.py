"""``method=ptq``: post-training quantization, naive (min–max / MSE) or with Q-Diffusion's
AdaRound/BRECQ block reconstruction (``method.recon=adaround``).

The student is quantized with ``quantize_``, its activation steps are calibrated on FP sampling
trajectories of the evaluation sampler (timestep-stratified, cond + uncond halves), and with
``recon=adaround`` the weight rounding is learnt block by block against the FP block outputs.
"""

from __future__ import annotations

import copy
import logging
import time

from omegaconf import OmegaConf
from torch import nn

from lowbit.data.trajectories import TrajectorySet, fp_trajectories
from lowbit.methods.base import Method, MethodContext
from lowbit.quant import QuantConfig, adaround_, calibrate_, model_size, quantize_
from lowbit.sampling import SamplerConfig

log = logging.getLogger(__name__)


def sampler_config(cfg) -> SamplerConfig:
    return SamplerConfig.from_cfg(cfg.sampler)


def quant_config(cfg) -> QuantConfig:
    return QuantConfig.from_dict(OmegaConf.to_container(cfg.bits, resolve=True))


def calibration_set(ctx: MethodContext, teacher: nn.Module, calib_n: int, calib_steps: int
                    ) -> TrajectorySet:
    """FP trajectories of the evaluation sampler, cached under ``paths.cache_dir``."""
    loaded = copy.copy(ctx.loaded)
    loaded.denoiser = teacher
    return fp_trajectories(loaded, sampler_config(ctx.cfg), n=calib_n, calib_steps=calib_steps,
                           seed=int(ctx.cfg.seed) + 10_000,  # never the evaluation noise
                           cache_dir=ctx.cache_dir)


class PTQ(Method):
    name = "ptq"

    @property
    def label(self) -> str:
        recon = self.cfg.get("recon", "none")
        return self.name if recon in (None, "none") else f"{self.name}+{recon}"

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        qcfg = quant_config(ctx.cfg)  # bad bits fail here, before any compute
        recon = self.cfg.get("recon", "none")
        if recon not in (None, "none", "adaround"):
            raise ValueError(f"method.recon={recon!r}: choose none or adaround")
        t0 = time.perf_counter()
        traj = calibration_set(ctx, teacher, int(self.cfg.calib_n), int(self.cfg.calib_steps))
        ctx.cost["trajectory_s"] = time.perf_counter() - t0

        student = copy.deepcopy(teacher)
        report = quantize_(student, qcfg)
        log.info("%s", report.summary())
        t0 = time.perf_counter()
        batch = int(self.cfg.calib_batch)
        if recon == "adaround":
            # BRECQ order: weights reconstructed first, on FP activations; then activation steps
            ar = adaround_(student, traj.batches(batch),
                           OmegaConf.to_container(self.cfg.adaround, resolve=True),
                           state_dir=ctx.output_dir / "adaround")
            ctx.report["adaround"] = ar.to_dict() if hasattr(ar, "to_dict") else str(ar)
        calib = calibrate_(student, traj.batches(batch), max_samples=int(self.cfg.max_samples))
        ctx.cost["calib_s"] = time.perf_counter() - t0
        ctx.cost["trainable_params"] = 0
        size = model_size(student)
        ctx.cost["size_mb"] = size.total_mb if hasattr(size, "total_mb") else size.to_dict()["total_mb"]
        ctx.report["quant"] = report.to_dict()
        ctx.report["calibration"] = calib.to_dict()
        ctx.report["size"] = size.to_dict()
        return student
