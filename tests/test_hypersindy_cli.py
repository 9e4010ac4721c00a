"""The hypersindy task through the dynlab CLI: smoke run, resume equality, NaN stop, checkpoint contents."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.hypersindy import HyperSINDyModule

# A short run: 1,000 states in batches of 100, a 2-epoch warm-up, pruning every epoch, spikes at epoch 3.
SHORT = [
    "--wandb_mode",
    "disabled",
    "--test_after_fit",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--checkpoint.every_n_epochs",
    "1",
    "--data.init_args.n_steps",
    "1000",
    "--data.init_args.noise_scale",
    "1.0",
    "--data.init_args.batch_size",
    "100",
    "--model.init_args.schedule_reference_epochs",
    "null",
    "--model.init_args.beta_warmup_epochs",
    "2",
    "--model.init_args.threshold_interval",
    "1",
    "--model.init_args.beta_spike_epoch",
    "3",
    "--model.init_args.lambda_spike_epoch",
    "3",
    "--model.init_args.eval_samples",
    "200",
    "--trainer.callbacks+=callbacks.equations.EquationReport",
    "--trainer.callbacks.every_n_epochs=0",
]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_smoke_run_writes_report(run_cli):
    run_dir = run_cli("fit", "hypersindy", "--config", "configs/presets/smoke.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = metrics["report"]
    assert report["system"] == "lorenz"
    assert report["noise_scale"] == 10.0
    for key in ("coef_mean_rmse", "coef_std_rmse_vs_0.833s", "support_tp", "support_fp", "support_fn"):
        assert key in report
    assert report["support_tp"] + report["support_fn"] == 7
    assert "ẋ =" in report["equations"]
    assert "test/coef_mean_rmse" in metrics["test"]
    assert all(v == v for v in metrics["test"].values())  # no NaN
    assert (run_dir / "equations.txt").read_text().startswith("ẋ =")
    assert (run_dir / "figures" / "coefficients.png").is_file()
    assert (run_dir / "figures" / "trajectories.png").is_file()
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert "threshold_mask" in ckpt["state_dict"]
    assert "derivative_std" in ckpt["state_dict"]
    assert ckpt["hypersindy_loss_weights"]["beta_max"] > 0


def test_resume_equals_straight_run(run_cli, tmp_path):
    straight = run_cli("fit", "hypersindy", *SHORT, "--trainer.max_epochs", "4", "--run_name", "straight")
    run_cli("fit", "hypersindy", *SHORT, "--trainer.max_epochs", "2", "--run_name", "halves")
    halves = run_cli(
        "fit",
        "hypersindy",
        *SHORT,
        "--trainer.max_epochs",
        "4",
        "--run_name",
        "halves",
        "--ckpt_path",
        "last",
    )
    a = load(straight / "checkpoints" / "last.ckpt")
    b = load(halves / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["hypersindy_loss_weights"] == b["hypersindy_loss_weights"]
    assert a["hypersindy_loss_weights"]["beta"] == 400.0  # the spike value applies from epoch 3 on
    assert a["state_dict"]["threshold_mask"].sum() < 57  # pruning happened and was carried across the resume
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_cli, monkeypatch, tmp_path):
    original = HyperSINDyModule.loss_terms

    def poisoned(self, *batch):
        recon, kl, l0 = original(self, *batch)
        if self.current_epoch == 2:
            recon = recon * float("nan")
        return recon, kl, l0

    monkeypatch.setattr(HyperSINDyModule, "loss_terms", poisoned)
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 2, batch 0"):
        run_cli("fit", "hypersindy", *SHORT, "--trainer.max_epochs", "4", "--run_name", "nan")
    ckpt = load(tmp_path / "runs" / "hypersindy" / "nan" / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


PUBLISHED = {  # mean-RMSE and std-RMSE vs 0.833 s of the public checkpoints (2,000 prior samples)
    "lorenz_s1": (0.353, 0.125),
    "lorenz_s5": (0.496, 0.239),
    "lorenz_s10": (0.968, 0.670),
    "rossler_s1": (0.012, 0.148),
    "rossler_s5": (0.096, 0.151),
    "rossler_s10": (0.367, 0.143),
    "lotka_volterra_s5": (0.175, 0.391),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PUBLISHED))
def test_full_schedule_meets_published(run_cli, case):
    run_dir = run_cli("fit", "hypersindy", "--config", f"configs/experiments/hypersindy/{case}.yaml",
                      "--wandb_mode", "disabled", "--trainer.enable_progress_bar", "false")
    report = json.loads((run_dir / "metrics.json").read_text())["report"]
    mean_rmse, std_rmse = PUBLISHED[case]
    assert report["support_fn"] == 0
    assert report["coef_mean_rmse"] <= mean_rmse
    assert report["coef_std_rmse_vs_0.833s"] <= std_rmse
