"""Scores of an estimated coefficient distribution against the ground truth, and equation printing."""

from __future__ import annotations

import math
import unicodedata

import numpy as np

# A 4th-order central finite difference of an Euler random ODE is a weighted sum (-1, 7, 7, -1)/12 of four
# consecutive exact derivatives, so independent per-step coefficient noise of std s reaches the target
# with std sqrt(1 + 49 + 49 + 1)/12 * s = 0.833 s. A perfect model trained on FD targets learns this std.
FD_ATTENUATION = math.sqrt(100.0) / 12.0


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)))


def score_coefficients(
    mean: np.ndarray, std: np.ndarray, true_mean: np.ndarray, true_std: np.ndarray
) -> dict[str, float]:
    """Mean-RMSE and std-RMSE over every (L, D) entry, zeros included, and the support counts.

    std_rmse_vs_s compares with the per-step std of the true coefficients; std_rmse_vs_attenuated with that
    std times 0.833, the std a model trained on 4th-order FD targets should learn. An entry is selected when
    its estimated mean is nonzero.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != true_mean.shape:
        raise ValueError(f"estimated coefficients have shape {mean.shape}, the truth {true_mean.shape}.")
    selected = mean != 0
    true_support = true_mean != 0
    return {
        "mean_rmse": rmse(mean, true_mean),
        "std_rmse_vs_s": rmse(std, true_std),
        "std_rmse_vs_attenuated": rmse(std, FD_ATTENUATION * true_std),
        "tp": float(np.sum(selected & true_support)),
        "fp": float(np.sum(selected & ~true_support)),
        "fn": float(np.sum(~selected & true_support)),
    }


def derivative_label(name: str) -> str:
    """'x' -> 'ẋ' (a combining dot above single letters), 'x0' -> 'dx0/dt'."""
    return unicodedata.normalize("NFC", f"{name}\u0307") if len(name) == 1 else f"d{name}/dt"


def format_equations(
    mean: np.ndarray,
    std: np.ndarray | None,
    feature_names: list[str],
    variable_names: list[str],
    precision: int = 2,
) -> list[str]:
    """Format one line per state dimension, e.g. 'ẋ = -9.90(±0.28) x + 10.04(±0.22) y'.

    Terms whose mean is exactly zero are left out.
    """
    lines = []
    for d, var in enumerate(variable_names):
        terms = []
        for l, feature in enumerate(feature_names):
            value = float(mean[l, d])
            if value == 0.0:
                continue
            magnitude = f"{abs(value):.{precision}f}"
            spread = f"(±{float(std[l, d]):.{precision}f})" if std is not None else ""
            term = f"{magnitude}{spread}" + ("" if feature == "1" else f" {feature}")
            if not terms:
                terms.append(("-" if value < 0 else "") + term)
            else:
                terms.append(("- " if value < 0 else "+ ") + term)
        lines.append(f"{derivative_label(var)} = " + (" ".join(terms) if terms else "0"))
    return lines
