"""HyperSINDy as a LightningModule: a generative model of sparse stochastic governing equations.

dx/dt = Theta(x) Xi(z) with a polynomial library Theta and a coefficient matrix Xi(z) = H(z) * gate * M from a
hypernetwork H, a hard-concrete gate and a permanent threshold mask M. Training maximises a beta-VAE ELBO
with an encoder q(z | x, dx/dt) plus an expected-L0 penalty; afterwards z ~ N(0, I) gives a distribution over
equations and, with a fresh z per Euler step, stochastic trajectories.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch import LightningModule

from lightning_modules.hypersindy.library import PolynomialLibrary
from lightning_modules.hypersindy.metrics import format_equations, score_coefficients
from lightning_modules.hypersindy.model import (
    Encoder,
    HardConcreteGate,
    HyperNetwork,
    kl_standard_normal,
    xavier_init,
)
from lightning_modules.hypersindy.schedule import LossWeights, advance, is_threshold_epoch, scale_epochs

log = logging.getLogger(__name__)


@dataclass
class SampledTrajectories:
    """Trajectories generated from the prior.

    states: (B, n_steps, D), states[:, 0] = x0. A diverged sample is frozen at its last finite state within
    the bound from `diverged_step` on. diverged: (B,) bool. diverged_step: (B,) first step index whose state
    was non-finite or out of bounds, -1 when the sample stayed bounded.
    """

    states: torch.Tensor
    diverged: torch.Tensor
    diverged_step: torch.Tensor

    @property
    def num_diverged(self) -> int:
        return int(self.diverged.sum())

    @property
    def diverged_fraction(self) -> float:
        return self.num_diverged / max(1, self.diverged.numel())


class HyperSINDyModule(LightningModule):
    """HyperSINDy on one simulated system.

    `state_dim`, `variable_names` and `dt` come from the DataModule through the CLI links; the derivative
    mean and std and the ground-truth coefficients are copied from `trainer.datamodule` in `setup` into
    buffers, so a checkpoint can be evaluated on its own.
    """

    def __init__(
        self,
        state_dim: int = 3,
        variable_names: list[str] | None = None,
        dt: float = 0.01,
        library_degree: int = 3,
        include_constant: bool = True,
        hidden: int = 64,
        z_dim: int | None = None,
        num_hidden: int = 5,
        learning_rate: float = 5e-3,
        weight_decay: float = 1e-2,
        lr_gamma: float = 0.999,
        beta_init: float = 0.01,
        beta_max: float = 10.0,
        beta_warmup_epochs: int = 100,
        beta_spike: float | None = None,
        beta_spike_epoch: int | None = None,
        lambda_init: float = 0.01,
        lambda_max: float = 0.01,
        lambda_spike: float | None = None,
        lambda_spike_epoch: int | None = None,
        threshold: float = 0.05,
        threshold_interval: int = 100,
        threshold_samples: int = 250,
        schedule_reference_epochs: int | None = None,
        eval_samples: int = 2000,
        eval_seed: int = 5281998,
    ):
        """
        Args:
            state_dim: dimension D of the state (linked from the data).
            variable_names: names of the state variables, used for the library terms (linked from the data).
            dt: time step of the data, used to generate trajectories (linked from the data).
            library_degree: highest monomial degree of the polynomial library (3 in the published HyperSINDy runs).
            include_constant: put the constant term in the library (the paper drops it for Lorenz).
            hidden: width H of the encoder and hypernetwork (64; 128 for Lorenz-96).
            z_dim: latent size; None uses 2 D.
            num_hidden: hidden layers of the hypernetwork (5).
            learning_rate: AdamW learning rate.
            weight_decay: AdamW weight decay, applied to every parameter including the gate's log alpha.
            lr_gamma: ExponentialLR decay per epoch.
            beta_init: KL weight in epoch 0.
            beta_max: KL weight cap reached after the warm-up.
            beta_warmup_epochs: epochs for beta to grow to beta_max, in steps of beta_max / this value.
            beta_spike: KL weight (and new cap) from `beta_spike_epoch` on; None for no spike.
            beta_spike_epoch: 0-based epoch from which beta_spike holds.
            lambda_init: L0 weight in epoch 0.
            lambda_max: L0 weight cap.
            lambda_spike: L0 weight (and new cap) from `lambda_spike_epoch` on; None for no spike.
            lambda_spike_epoch: 0-based epoch from which lambda_spike holds.
            threshold: coefficients whose mean magnitude falls below this are pruned for good.
            threshold_interval: the mask is updated at the end of epochs interval, 2 interval, ...
            threshold_samples: prior samples averaged for the threshold update.
            schedule_reference_epochs: run length the schedule epochs are written for; when the trainer's
                max_epochs differs, warm-up, threshold interval and spike epochs scale by max_epochs / this.
                None never scales.
            eval_samples: prior samples for the coefficient mean and std in validation, test and reports.
            eval_seed: seed of those prior samples, so reports are reproducible.
        """
        super().__init__()
        if dt <= 0:
            raise ValueError(f"dt={dt} is invalid: the time step must be positive, e.g. 0.01.")
        for name, value in (
            ("beta_warmup_epochs", beta_warmup_epochs),
            ("threshold_interval", threshold_interval),
            ("threshold_samples", threshold_samples),
            ("eval_samples", eval_samples),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} is invalid: use a positive integer.")
        self.save_hyperparameters()
        names = list(variable_names) if variable_names else [f"x{i}" for i in range(state_dim)]
        self.variable_names = names
        self.library = PolynomialLibrary(state_dim, library_degree, include_constant, names)
        self.feature_names = self.library.feature_names
        num_features = self.library.num_features
        z_dim = z_dim or 2 * state_dim
        self.z_dim = z_dim
        self.encoder = Encoder(state_dim, z_dim, hidden)
        self.hypernet = HyperNetwork(z_dim, num_features, state_dim, hidden, num_hidden)
        self.gate = HardConcreteGate(num_features, state_dim)
        xavier_init(self.encoder)
        xavier_init(self.hypernet)

        self.register_buffer("threshold_mask", torch.ones(num_features, state_dim))
        self.register_buffer("derivative_mean", torch.zeros(state_dim))
        self.register_buffer("derivative_std", torch.ones(state_dim))
        self.register_buffer("true_mean", torch.zeros(num_features, state_dim))
        self.register_buffer("true_std", torch.zeros(num_features, state_dim))
        self.register_buffer("has_truth", torch.zeros((), dtype=torch.bool))

        self.loss_weights = LossWeights(beta_init, lambda_init, beta_max, lambda_max)
        self.schedule_epochs = scale_epochs(self._configured_epochs(), None, None)
        self.system: str | None = None
        self.noise_scale: float | None = None
        self._epoch_sums = torch.zeros(3)
        self._epoch_batches = 0
        self._eval_sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def _configured_epochs(self) -> dict[str, int | None]:
        hp = self.hparams
        return {
            "beta_warmup": hp.beta_warmup_epochs,
            "threshold_interval": hp.threshold_interval,
            "beta_spike_epoch": hp.beta_spike_epoch,
            "lambda_spike_epoch": hp.lambda_spike_epoch,
        }

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        self.schedule_epochs = scale_epochs(
            self._configured_epochs(), self.hparams.schedule_reference_epochs, trainer.max_epochs
        )
        if self.schedule_epochs != self._configured_epochs():
            log.info("schedule scaled to %s epochs: %s", trainer.max_epochs, self.schedule_epochs)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        if getattr(datamodule, "derivative_mean", None) is None and hasattr(datamodule, "setup"):
            datamodule.setup(stage)
        if getattr(datamodule, "derivative_mean", None) is not None:
            self.derivative_mean.copy_(datamodule.derivative_mean)
            self.derivative_std.copy_(datamodule.derivative_std)
        if hasattr(datamodule, "true_coefficients"):
            mean, std = datamodule.true_coefficients(self.feature_names)
            self.true_mean.copy_(torch.from_numpy(mean))
            self.true_std.copy_(torch.from_numpy(std))
            self.has_truth.fill_(True)
        self.system = getattr(datamodule, "system", None)
        self.noise_scale = getattr(datamodule, "noise_scale", None)

    # ---------------------------------------------------------------- forward
    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """Xi(z) = H(z) * gate * M, shape (B, L, D); the gate is stochastic in train mode."""
        return self.hypernet(z) * self.gate(z.shape[0]) * self.threshold_mask

    def standardise(self, dx: torch.Tensor) -> torch.Tensor:
        return (dx - self.derivative_mean) / self.derivative_std

    def loss_terms(self, x: torch.Tensor, dx_standardised: torch.Tensor, dx: torch.Tensor):
        """Return (recon, kl, l0): recon and KL averaged over the batch, the expected-L0 sum over entries."""
        mu, log_var = self.encoder(x, dx_standardised)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        xi = self.coefficients(z)
        prediction = torch.bmm(self.library(x).unsqueeze(1), xi).squeeze(1)
        recon = (prediction - dx).pow(2).sum(-1).mean()
        kl = kl_standard_normal(mu, log_var)
        l0 = self.gate.expected_l0(self.threshold_mask)
        return recon, kl, l0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        recon, kl, l0 = self.loss_terms(*batch)
        kl_weighted = self.loss_weights.beta * kl
        l0_weighted = self.loss_weights.lam * l0
        loss = recon + kl_weighted + l0_weighted
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(recon={recon.item():.4g}, beta*KL={kl_weighted.item():.4g}, "
                f"lambda*L0={l0_weighted.item():.4g}), "
                "so training stopped before this step's update and the last checkpoint is the last good one: "
                "lower model.init_args.learning_rate or data.init_args.noise_scale "
                "and resume with --ckpt_path=last."
            )
        self._epoch_sums += torch.stack([recon.detach(), kl_weighted.detach(), l0_weighted.detach()])
        self._epoch_batches += 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = torch.zeros(3, device=self.device)
        self._epoch_batches = 0

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch
        if self._epoch_batches:
            recon, kl_w, l0_w = (self._epoch_sums / self._epoch_batches).tolist()
            self.log_dict(
                {
                    "train/recon": recon,
                    "train/kl_weighted": kl_w,
                    "train/l0_weighted": l0_w,
                    "train/loss": recon + kl_w + l0_w,
                    "train/beta": self.loss_weights.beta,
                    "train/lambda": self.loss_weights.lam,
                    "train/active_terms": float(self.threshold_mask.sum()),
                },
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )
        if is_threshold_epoch(epoch, self.schedule_epochs["threshold_interval"]):
            self.update_threshold_mask()
        advance(
            self.loss_weights,
            epoch,
            self.schedule_epochs["beta_warmup"],
            self.hparams.beta_spike,
            self.schedule_epochs["beta_spike_epoch"],
            self.hparams.lambda_spike,
            self.schedule_epochs["lambda_spike_epoch"],
        )

    @torch.no_grad()
    def update_threshold_mask(self) -> None:
        """Prune for good the entries whose prior-sample mean (train-mode gates) is under the threshold."""
        was_training = self.gate.training
        self.gate.train()
        z = torch.randn(self.hparams.threshold_samples, self.z_dim, device=self.device)
        mean = self.coefficients(z).mean(0)
        self.gate.train(was_training)
        self.threshold_mask[mean.abs() < self.hparams.threshold] = 0.0
        log.info(
            "epoch %d: threshold mask keeps %d of %d terms",
            self.current_epoch,
            int(self.threshold_mask.sum()),
            self.threshold_mask.numel(),
        )

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, batch, stage: str) -> None:
        recon, kl, l0 = self.loss_terms(*batch)
        n = batch[0].shape[0]
        loss = recon + self.loss_weights.beta * kl + self.loss_weights.lam * l0
        for key, value in (("loss", loss), ("recon", recon), ("kl", kl)):
            self._eval_sums[key] = self._eval_sums.get(key, 0.0) + value.detach() * n
        self._eval_sums["n"] = self._eval_sums.get("n", 0) + n

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = {}

    on_test_epoch_start = on_validation_epoch_start

    def _eval_epoch_end(self, stage: str) -> None:
        n = self._eval_sums.pop("n", 0)
        values = {f"{stage}/{k}": float(v) / n for k, v in self._eval_sums.items()} if n else {}
        if bool(self.has_truth):
            scores = self.score(self.hparams.eval_samples)
            values.update({f"{stage}/coef_{k}": v for k, v in scores.items()})
        if values:
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def sample_coefficients(self, n_samples: int, seed: int | None = None) -> torch.Tensor:
        """Coefficient matrices (n, L, D) from z ~ N(0, I) with the deterministic (eval) gate."""
        generator = torch.Generator(device="cpu").manual_seed(
            self.hparams.eval_seed if seed is None else seed
        )
        z = torch.randn(n_samples, self.z_dim, generator=generator).to(self.device)
        gate = self.gate.deterministic()
        return self.hypernet(z) * gate * self.threshold_mask

    def coefficient_stats(self, n_samples: int | None = None, seed: int | None = None):
        """Return the per-entry mean and unbiased std over prior samples as (L, D) numpy arrays."""
        xi = self.sample_coefficients(n_samples or self.hparams.eval_samples, seed).double()
        return xi.mean(0).cpu().numpy(), xi.std(0).cpu().numpy()

    def score(self, n_samples: int | None = None) -> dict[str, float]:
        mean, std = self.coefficient_stats(n_samples)
        return score_coefficients(
            mean, std, self.true_mean.double().cpu().numpy(), self.true_std.double().cpu().numpy()
        )

    def equations(self, n_samples: int | None = None, precision: int = 2) -> list[str]:
        mean, std = self.coefficient_stats(n_samples)
        return format_equations(mean, std, self.feature_names, self.variable_names, precision)

    @torch.no_grad()
    def sample_trajectories(
        self,
        x0: torch.Tensor | np.ndarray,
        n_steps: int,
        n_samples: int = 10,
        dt: float | None = None,
        seed: int = 5281998,
        bound: float = 1e6,
    ) -> SampledTrajectories:
        """Euler trajectories x <- x + dt Theta(x) Xi(z) with a fresh z per sample and per step.

        A sample whose next state is non-finite or has a component beyond `bound` in magnitude is marked
        diverged and frozen at its last good state; the caller reports the count.
        """
        dt = float(self.hparams.dt if dt is None else dt)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.as_tensor(np.asarray(x0, dtype=np.float32), device=self.device).reshape(1, -1)
        x = x.expand(n_samples, -1).clone()
        states = torch.empty(n_samples, n_steps, x.shape[1], device=self.device)
        states[:, 0] = x
        diverged = torch.zeros(n_samples, dtype=torch.bool, device=self.device)
        diverged_step = torch.full((n_samples,), -1, dtype=torch.long, device=self.device)
        gate = self.gate.deterministic() * self.threshold_mask
        for k in range(1, n_steps):
            z = torch.randn(n_samples, self.z_dim, generator=generator).to(self.device)
            xi = self.hypernet(z) * gate
            step = torch.bmm(self.library(x).unsqueeze(1), xi).squeeze(1)
            candidate = x + dt * step
            bad = ~torch.isfinite(candidate).all(-1) | (candidate.abs() > bound).any(-1)
            newly = bad & ~diverged
            diverged_step[newly] = k
            diverged |= bad
            x = torch.where(diverged.unsqueeze(-1), x, candidate)
            states[:, k] = x
        return SampledTrajectories(states.cpu(), diverged.cpu(), diverged_step.cpu())

    @torch.no_grad()
    def mean_trajectory(
        self, x0, n_steps: int, n_samples: int | None = None, bound: float = 1e6
    ) -> SampledTrajectories:
        """Euler trajectory of the deterministic ODE whose coefficients are the mean over prior samples."""
        mean = self.sample_coefficients(n_samples or 250).mean(0, keepdim=True)
        x = torch.as_tensor(np.asarray(x0, dtype=np.float32), device=self.device).reshape(1, -1)
        states = torch.empty(1, n_steps, x.shape[1], device=self.device)
        states[:, 0] = x
        diverged_step = torch.full((1,), -1, dtype=torch.long)
        for k in range(1, n_steps):
            candidate = x + self.hparams.dt * torch.bmm(self.library(x).unsqueeze(1), mean).squeeze(1)
            if not torch.isfinite(candidate).all() or candidate.abs().max() > bound:
                diverged_step[0] = k
                states[:, k:] = x.unsqueeze(1)
                break
            x = candidate
            states[:, k] = x
        return SampledTrajectories(states.cpu(), diverged_step >= 0, diverged_step)

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        # The fused kernel updates all 30 k parameters in one call; the default per-tensor loop costs about
        # twice as much per step on a CPU for this small model.
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
            amsgrad=True,
            fused=self.device.type in ("cpu", "cuda"),
        )
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hypersindy_loss_weights"] = self.loss_weights.state_dict()
        checkpoint["hypersindy_data"] = {"system": self.system, "noise_scale": self.noise_scale}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "hypersindy_loss_weights" in checkpoint:
            self.loss_weights.load_state_dict(checkpoint["hypersindy_loss_weights"])
        data = checkpoint.get("hypersindy_data") or {}
        self.system = data.get("system", self.system)
        self.noise_scale = data.get("noise_scale", self.noise_scale)

    # ----------------------------------------------------------------- report
    def final_report(self) -> dict[str, float | str]:
        """Headline numbers for the CLI summary: scores against the truth and the learned equations."""
        report: dict[str, float | str] = {}
        if self.system is not None:
            report["system"] = self.system
            report["noise_scale"] = float(self.noise_scale)
        report["epochs_trained"] = float(self.current_epoch)
        if bool(self.has_truth):
            scores = self.score()
            report.update(
                {
                    "coef_mean_rmse": scores["mean_rmse"],
                    "coef_std_rmse_vs_s": scores["std_rmse_vs_s"],
                    "coef_std_rmse_vs_0.833s": scores["std_rmse_vs_attenuated"],
                    "support_tp": scores["tp"],
                    "support_fp": scores["fp"],
                    "support_fn": scores["fn"],
                }
            )
        report["equations"] = "\n" + "\n".join(self.equations())
        return report
