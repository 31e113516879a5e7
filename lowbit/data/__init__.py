"""Datasets, reference images and FP trajectories."""
