"""Metrics: one interface (:class:`Metric` called with :class:`MetricInputs`), a suite built from
the ``metrics`` config group, FID/KID/IS/conditional accuracy in the digits feature space, and
paired fidelity to the FP model."""

from lowbit.metrics.base import Metric, MetricInputs, MetricSuite, build_metrics
from lowbit.metrics.digits import DigitsFeatureExtractor, DigitsMetrics
from lowbit.metrics.fidelity import PairedFidelity, paired_mse, psnr_from_mse

__all__ = ["DigitsFeatureExtractor", "DigitsMetrics", "Metric", "MetricInputs", "MetricSuite",
           "PairedFidelity", "build_metrics", "paired_mse", "psnr_from_mse"]
