"""Equation reports for HyperSINDy: learned equations as mean ± std per term, coefficient histograms
against the truth, and trajectories sampled from the prior against the data.

Equations are logged during training every `every_n_epochs` epochs and written, with the figures, to the run
folder after testing (`equations.txt`, `figures/coefficients.png`, `figures/trajectories.png`), and to wandb
as a table and images when the logger is a WandbLogger.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


class EquationReport(Callback):
    """Print, save and plot the equations a HyperSINDy model has learned."""

    def __init__(
        self,
        every_n_epochs: int = 50,
        histogram_samples: int = 1000,
        trajectory_samples: int = 10,
        trajectory_steps: int = 1000,
        seed: int = 5281998,
        precision: int = 2,
    ):
        """
        Args:
            every_n_epochs: log the equations every this many training epochs (0 turns it off).
            histogram_samples: prior samples for the coefficient histograms.
            trajectory_samples: trajectories sampled from the prior for the trajectory figure.
            trajectory_steps: Euler steps per sampled trajectory (capped at the data length).
            seed: seed of the prior samples in the figures.
            precision: decimals of the printed coefficients.
        """
        self.every_n_epochs = every_n_epochs
        self.histogram_samples = histogram_samples
        self.trajectory_samples = trajectory_samples
        self.trajectory_steps = trajectory_steps
        self.seed = seed
        self.precision = precision

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.every_n_epochs or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs - 1:
            lines = pl_module.equations(250, self.precision)
            log.info("epoch %d equations:\n  %s", epoch, "\n  ".join(lines))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.write_report(trainer, pl_module)

    def write_report(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        run_dir = Path(trainer.default_root_dir)
        figures = run_dir / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        mean, std = pl_module.coefficient_stats()
        lines = pl_module.equations(precision=self.precision)
        report = {"equations": lines}
        if bool(pl_module.has_truth):
            report["scores"] = pl_module.score()

        samples = pl_module.sample_coefficients(self.histogram_samples, self.seed).double().cpu().numpy()
        coefficient_png = figures / "coefficients.png"
        plot_coefficients(samples, pl_module, coefficient_png)

        trajectory_png = figures / "trajectories.png"
        datamodule = getattr(trainer, "datamodule", None)
        data_x = getattr(getattr(datamodule, "simulation", None), "x", None)
        if data_x is not None:
            steps = min(self.trajectory_steps, data_x.shape[0])
            sampled = pl_module.sample_trajectories(data_x[0], steps, self.trajectory_samples, seed=self.seed)
            plot_trajectories(
                data_x[:steps], sampled, pl_module.variable_names, pl_module.hparams.dt, trajectory_png
            )
            report["sampled_trajectories"] = {
                "samples": self.trajectory_samples,
                "steps": steps,
                "diverged": sampled.num_diverged,
                "diverged_fraction": sampled.diverged_fraction,
            }
            if sampled.num_diverged:
                log.warning(
                    "%d of %d sampled trajectories diverged within %d steps",
                    sampled.num_diverged,
                    self.trajectory_samples,
                    steps,
                )

        (run_dir / "equations.txt").write_text("\n".join(lines) + "\n")
        (run_dir / "equations.json").write_text(
            json.dumps(
                {
                    **report,
                    "feature_names": pl_module.feature_names,
                    "variable_names": pl_module.variable_names,
                    "mean": mean.tolist(),
                    "std": std.tolist(),
                },
                indent=2,
            )
            + "\n"
        )
        print("\n".join(["", "learned equations (mean ± std over prior samples):", *lines]), flush=True)
        self._log_wandb(trainer, pl_module, mean, std, [coefficient_png, trajectory_png])
        return report

    def _log_wandb(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        mean: np.ndarray,
        std: np.ndarray,
        images: list[Path],
    ) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        rows = []
        for d, var in enumerate(pl_module.variable_names):
            for l, feature in enumerate(pl_module.feature_names):
                if mean[l, d] != 0:
                    rows.append(
                        [
                            var,
                            feature,
                            float(mean[l, d]),
                            float(std[l, d]),
                            float(pl_module.true_mean[l, d]),
                            float(pl_module.true_std[l, d]),
                        ]
                    )
        payload = {
            "equations": wandb.Table(
                columns=["state", "term", "mean", "std", "true_mean", "true_std"], data=rows
            )
        }
        for path in images:
            if path.is_file():
                payload[f"figures/{path.stem}"] = wandb.Image(str(path))
        for logger in loggers:
            logger.experiment.log(payload)


def plot_coefficients(samples: np.ndarray, pl_module: LightningModule, path: Path) -> None:
    """Histogram of each active or true term's prior samples, with the true mean and ± std marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true_mean = pl_module.true_mean.double().cpu().numpy()
    true_std = pl_module.true_std.double().cpu().numpy()
    # True terms first, then the other active ones, at most 20 panels so the figure stays readable.
    active = (samples != 0).any(0) | (true_mean != 0)
    true_terms = list(zip(*np.nonzero(true_mean != 0), strict=True))
    others = [e for e in zip(*np.nonzero(active & (true_mean == 0)), strict=True)]
    entries = (true_terms + others)[:20]
    if not entries:
        return
    cols = min(5, len(entries))
    rows = (len(entries) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for ax, (l, d) in zip(axes.flat, entries, strict=False):
        ax.hist(samples[:, l, d], bins=40, color="tab:blue", alpha=0.7, density=True)
        if true_mean[l, d] != 0 or true_std[l, d] != 0:
            ax.axvline(true_mean[l, d], color="k", lw=1.5)
            if true_std[l, d] > 0:
                for sign in (-1, 1):
                    ax.axvline(true_mean[l, d] + sign * true_std[l, d], color="k", lw=0.8, ls="--")
        ax.set_title(f"{pl_module.feature_names[l]} in d{pl_module.variable_names[d]}/dt", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    fig.suptitle("coefficient samples (blue) vs truth mean (solid) and ± std (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trajectories(data_x: np.ndarray, sampled, variable_names: list[str], dt: float, path: Path) -> None:
    """Plot each state component over time: the data in black, prior-sampled trajectories in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = min(len(variable_names), 4)
    t = np.arange(data_x.shape[0]) * dt
    fig, axes = plt.subplots(dims, 1, figsize=(8, 1.8 * dims), sharex=True, squeeze=False)
    states = sampled.states.numpy()
    for d in range(dims):
        ax = axes[d, 0]
        for b in range(states.shape[0]):
            ax.plot(t, states[b, :, d], lw=0.6, alpha=0.6)
        ax.plot(t, data_x[:, d], color="k", lw=0.9)
        ax.set_ylabel(variable_names[d])
    axes[-1, 0].set_xlabel("t")
    axes[0, 0].set_title(
        f"data (black) and {states.shape[0]} sampled trajectories; {sampled.num_diverged} diverged",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
