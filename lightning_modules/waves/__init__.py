"""Traveling-wave segmentation: a conv RNN of coupled oscillators, its readouts, baselines and metrics."""

from lightning_modules.waves.module import WaveSegmenter

__all__ = ["WaveSegmenter"]
