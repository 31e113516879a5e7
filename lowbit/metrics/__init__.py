"""Metrics: one interface (:class:`Metric` called with :class:`MetricInputs`), a suite built from
the ``metrics`` config group, FID/KID/IS/conditional accuracy and feature distances in the digits
feature space, the Inception metrics of the diffusion papers (FID, sFID, IS, precision/recall),
CLIP score, paired fidelity (PSNR, SSIM, LPIPS) to the FP model, the ε error on held-out FP
trajectories, and the reward of the samples."""

from lowbit.metrics.base import Metric, MetricInputs, MetricSuite, build_metrics
from lowbit.metrics.clip import ClipScore
from lowbit.metrics.digits import DigitsFeatureExtractor, DigitsMetrics
from lowbit.metrics.fidelity import (
    PSNR_IDENTICAL,
    EpsError,
    PairedFidelity,
    eps_error_by_step,
    eps_mse,
    paired_mse,
    psnr_from_mse,
)
from lowbit.metrics.inception import InceptionMetrics, InceptionV3Features, load_inception
from lowbit.metrics.paired import PairedLPIPS, PairedSSIM, paired_lpips, paired_ssim
from lowbit.metrics.reward import RewardScore

__all__ = ["PSNR_IDENTICAL", "DigitsFeatureExtractor", "DigitsMetrics", "EpsError", "Metric",
           "MetricInputs", "MetricSuite", "PairedFidelity", "build_metrics", "eps_error_by_step",
           "eps_mse", "paired_mse", "psnr_from_mse", "ClipScore", "PairedLPIPS", "PairedSSIM",
           "paired_lpips", "paired_ssim", "InceptionMetrics", "InceptionV3Features",
           "load_inception", "RewardScore"]
