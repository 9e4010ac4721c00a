"""Dynamical analyses: a model's depth (or a recurrent model's time) measured as a trajectory.

`measures` holds pure functions on tensors, `plotting` the figures, and `DynamicsAnalysis` the Lightning
callback that runs them on a fixed probe set. Attach it from the command line with

    dynlab fit ... --trainer.callbacks+=callbacks.dynamics.DynamicsAnalysis --trainer.callbacks.probe_size=64
"""

from callbacks.dynamics.callback import ALL_MEASURES, DynamicsAnalysis

__all__ = ["ALL_MEASURES", "DynamicsAnalysis"]
