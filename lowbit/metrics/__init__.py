"""Metrics: FID (clean-fid), Inception-Score analogue and conditional accuracy."""

from lowbit.metrics.digits import DigitsFeatureExtractor, DigitsMetrics

__all__ = ["DigitsFeatureExtractor", "DigitsMetrics"]
