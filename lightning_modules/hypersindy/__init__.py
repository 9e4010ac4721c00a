"""HyperSINDy: a hypernetwork generative model of sparse stochastic governing equations."""

from lightning_modules.hypersindy.library import PolynomialLibrary
from lightning_modules.hypersindy.module import HyperSINDyModule, SampledTrajectories

__all__ = ["HyperSINDyModule", "PolynomialLibrary", "SampledTrajectories"]
