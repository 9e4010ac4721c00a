"""Classical baselines through pysindy 2.x on the same states and derivatives: SINDy (STLSQ) and E-SINDy.

pysindy's `coefficients()` is (D, L); everything here returns HyperSINDy's (L, D) layout. A fresh
EnsembleOptimizer is built for every fit because its `coef_list` is never cleared, so a second fit on the
same optimizer appends to the first one's models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# STLSQ thresholds of the published baseline comparison (alpha 0.05 everywhere).
SINDY_THRESHOLDS = {"lorenz": 0.5, "lotka_volterra": 0.5, "rossler": 0.05, "lorenz96": 0.5}


@dataclass
class BaselineFit:
    """Coefficient mean and std as (L, D) arrays; std is zero for the SINDy point estimate."""

    mean: np.ndarray
    std: np.ndarray
    feature_names: list[str]
    n_models: int = 1


def _library(degree: int, include_bias: bool):
    import pysindy as ps

    return ps.PolynomialLibrary(degree=degree, include_bias=include_bias)


def fit_sindy(
    x: np.ndarray,
    x_dot: np.ndarray,
    dt: float,
    variable_names: list[str],
    *,
    degree: int = 3,
    include_bias: bool = True,
    threshold: float = 0.5,
    alpha: float = 0.05,
) -> BaselineFit:
    """SINDy with STLSQ on the given derivative (passed as x_dot, so pysindy differentiates nothing)."""
    import pysindy as ps

    model = ps.SINDy(
        optimizer=ps.STLSQ(threshold=threshold, alpha=alpha), feature_library=_library(degree, include_bias)
    )
    model.fit(x, t=dt, x_dot=x_dot, feature_names=list(variable_names))
    mean = np.asarray(model.coefficients()).T.copy()
    return BaselineFit(mean, np.zeros_like(mean), list(model.get_feature_names()))


def make_ensemble_optimizer(optimizer, n_models: int):
    """Build a new bagging EnsembleOptimizer around `optimizer` (never reuse one across fits)."""
    import pysindy as ps

    return ps.EnsembleOptimizer(optimizer, bagging=True, n_models=n_models)


def fit_esindy(
    x: np.ndarray,
    x_dot: np.ndarray,
    dt: float,
    variable_names: list[str],
    *,
    degree: int = 3,
    include_bias: bool = True,
    threshold: float = 0.5,
    alpha: float = 0.05,
    n_models: int = 100,
    optimizer=None,
) -> BaselineFit:
    """E-SINDy: bagging (bootstrap of size N with replacement) around STLSQ, or around `optimizer` if given.

    Mean and std (ddof 0) are taken over `coef_list`, the per-bag models; the bootstrap draws come from
    numpy's global RNG, so seed it with np.random.seed for a reproducible fit.
    """
    import pysindy as ps

    inner = optimizer if optimizer is not None else ps.STLSQ(threshold=threshold, alpha=alpha)
    ensemble = make_ensemble_optimizer(inner, n_models)
    model = ps.SINDy(optimizer=ensemble, feature_library=_library(degree, include_bias))
    model.fit(x, t=dt, x_dot=x_dot, feature_names=list(variable_names))
    coefs = np.stack([np.asarray(c).T for c in ensemble.coef_list])
    return BaselineFit(coefs.mean(0), coefs.std(0), list(model.get_feature_names()), n_models=len(coefs))
