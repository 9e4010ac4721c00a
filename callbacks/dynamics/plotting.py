"""Figures for the dynamical measures: one PNG per measure, with the phase boundaries on every depth axis.

The x axis is the step (layer or time step): a state value sits at step l (the state after l steps) and
an update or speed value sits at the step that produced it, l + 1. A phase boundary b, which separates
steps 1..b from b+1..S, is drawn as a dashed line at b + 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

GROUP_STYLES = {"cls": "tab:red", "reg": "tab:green", "patch": "tab:blue"}


def draw_boundaries(ax, boundaries: Sequence[int]) -> None:
    for index, boundary in enumerate(boundaries):
        ax.axvline(
            boundary + 0.5,
            color="0.4",
            linestyle="--",
            linewidth=1,
            label="phase boundary" if index == 0 else None,
        )


def group_color(name: str, index: int) -> str:
    return GROUP_STYLES.get(name, f"C{index % 10}")


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_similarity(similarity: np.ndarray, boundaries: Sequence[int], path: Path, title: str) -> Path:
    """Heat map of the step-by-step cosine similarity of steps 1..S, with the phase boundaries."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    num_steps = similarity.shape[0]
    extent = (0.5, num_steps + 0.5, num_steps + 0.5, 0.5)
    image = ax.imshow(
        similarity, cmap="viridis", extent=extent, vmin=min(0.0, float(similarity.min())), vmax=1.0
    )
    for boundary in boundaries:
        ax.axvline(boundary + 0.5, color="white", linestyle="--", linewidth=1)
        ax.axhline(boundary + 0.5, color="white", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    return save(fig, path)


def plot_curves(
    series: dict[str, Sequence[float]],
    boundaries: Sequence[int],
    path: Path,
    *,
    title: str,
    ylabel: str,
    first_step: int = 0,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Line plot of one curve per group against the step; `first_step` is the step of the first value."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for index, (name, values) in enumerate(series.items()):
        steps = np.arange(first_step, first_step + len(values))
        ax.plot(steps, values, marker="o", markersize=3, color=group_color(name, index), label=name)
    draw_boundaries(ax, boundaries)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_coherence(
    results: dict[str, Sequence[float]], boundaries: Sequence[int], path: Path, title: str
) -> Path:
    """Coherence of states (at steps 0..S) and of updates (at steps 1..S), to the mean and pairwise."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(
        np.arange(len(results["state"])),
        results["state"],
        marker="o",
        markersize=3,
        color="tab:blue",
        label="states, to mean",
    )
    ax.plot(
        np.arange(len(results["state_pairwise"])),
        results["state_pairwise"],
        linestyle=":",
        color="tab:blue",
        label="states, pairwise",
    )
    ax.plot(
        np.arange(1, len(results["update"]) + 1),
        results["update"],
        marker="s",
        markersize=3,
        color="tab:orange",
        label="updates, to mean",
    )
    ax.plot(
        np.arange(1, len(results["update_pairwise"]) + 1),
        results["update_pairwise"],
        linestyle=":",
        color="tab:orange",
        label="updates, pairwise",
    )
    draw_boundaries(ax, boundaries)
    ax.set_xlabel("step")
    ax.set_ylabel("mean cosine")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_rank(results: dict[str, Sequence[float]], boundaries: Sequence[int], path: Path, title: str) -> Path:
    """Stable and effective rank of the update matrices per step, per image and pooled, on a log axis."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, kind in zip(axes, ("per_image", "pooled"), strict=True):
        for measure, color in (("stable", "tab:purple"), ("effective", "tab:olive")):
            values = results[f"{measure}_{kind}"]
            ax.plot(
                np.arange(1, len(values) + 1),
                values,
                marker="o",
                markersize=3,
                color=color,
                label=f"{measure} rank",
            )
        draw_boundaries(ax, boundaries)
        ax.set_yscale("log")
        plain_numbers = ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain_numbers)
        ax.yaxis.set_minor_formatter(plain_numbers)
        ax.set_xlabel("step (update l-1 -> l)")
        ax.set_ylabel("rank")
        ax.set_title(f"{title}: {kind.replace('_', ' ')}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_basins(
    results: dict[str, Sequence[float]], boundaries: Sequence[int], path: Path, title: str
) -> Path:
    """Nearest-class-mean accuracy, cosine to the true class's final mean, and angular silhouette per step."""
    panels = (
        ("ncm_accuracy", "nearest-class-mean accuracy"),
        ("cos_true_final", "cos to final class mean"),
        ("silhouette", "silhouette (angular)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = np.asarray(results[key], dtype=float)
        ax.plot(np.arange(len(values)), values, marker="o", markersize=3, color="tab:red")
        draw_boundaries(ax, boundaries)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(fig, path)


def plot_perturbation(
    results: dict, boundaries: Sequence[int], path: Path, title: str, groups: Sequence[str]
) -> Path:
    """Plot the angle to the clean path after perturbations: one panel per noise size, one line per depth.

    The first group is drawn solid and the second (if any) dashed.
    """
    records = results["records"]
    alphas = sorted({record["alpha"] for record in records})
    depths = sorted({record["depth"] for record in records})
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.2 * len(alphas), 3.6), squeeze=False)
    styles = ("-", "--", ":")
    for ax, alpha in zip(axes[0], alphas, strict=True):
        for depth_index, depth in enumerate(depths):
            record = next(r for r in records if r["depth"] == depth and r["alpha"] == alpha)
            for group_index, name in enumerate(groups[:2]):
                if name not in record["groups"]:
                    continue
                curve = record["groups"][name]["curve"]
                ax.plot(
                    np.arange(depth, depth + len(curve)),
                    curve,
                    linestyle=styles[group_index],
                    color=f"C{depth_index}",
                    label=f"l0={depth} {name}",
                )
        draw_boundaries(ax, boundaries)
        ax.set_xlabel("step")
        ax.set_ylabel("angle to clean path (rad)")
        ax.set_title(f"{title}: alpha={alpha:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def plot_comparison(
    per_source: dict[str, dict], boundaries: dict[str, Sequence[int]], path: Path, group: str
) -> Path:
    """Plot several sources side by side (e.g. teacher, Raptor): convergence, speed, pooled update rank."""
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.6))
    for index, (source, results) in enumerate(per_source.items()):
        color = f"C{index}"
        if "convergence" in results and group in results["convergence"]:
            values = results["convergence"][group]
            axes[0].plot(np.arange(len(values)), values, marker="o", markersize=3, color=color, label=source)
        if "speed" in results and group in results["speed"]:
            values = results["speed"][group]
            axes[1].plot(
                np.arange(1, len(values) + 1), values, marker="o", markersize=3, color=color, label=source
            )
        if "rank" in results:
            values = results["rank"]["effective_pooled"]
            axes[2].plot(
                np.arange(1, len(values) + 1), values, marker="o", markersize=3, color=color, label=source
            )
    first_boundaries = next(iter(boundaries.values()), [])
    labels = (f"convergence ({group})", f"angular speed ({group}, rad)", "effective rank of updates (pooled)")
    for ax, label in zip(axes, labels, strict=True):
        draw_boundaries(ax, first_boundaries)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)
