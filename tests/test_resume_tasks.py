"""Crash-safe resume of every task: a run killed by SIGKILL mid-epoch resumes to the uninterrupted weights.

Each test trains three runs of one task on CPU in deterministic mode with shuffled loaders: an uninterrupted
run, a run in a subprocess that `tests.toy.kill.KillAtStep` kills mid-epoch after `--checkpoint_every_n_steps`
wrote last.ckpt, and the same run resumed with `--ckpt_path=last`. The final weights must match bit for bit.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, killed_fit
from tests.test_scale import SMOKE, tiny_teacher_args

# The smoke preset limits an epoch to 4 batches, so three epochs run steps 1-12. last.ckpt is refreshed every
# 2 steps and the process dies after step 7, so the resume starts after step 6, half-way through epoch 1.
EPOCHS = 3
CHECKPOINT_EVERY = 2
KILL_AT_STEP = 7
LAST_SAVED_STEP = 6

COMMON = [
    "--config",
    str(SMOKE),
    f"--trainer.max_epochs={EPOCHS}",
    "--trainer.accelerator=cpu",
    "--trainer.deterministic=true",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
]

# hypersindy: 128 states in batches of 32 give 4 shuffled batches per epoch. Pruning after every epoch and a
# 2-epoch beta warm-up make the resumed run depend on the restored mask and schedule.
HYPERSINDY = [
    "--data.init_args.n_steps=1000",
    "--data.init_args.noise_scale=1.0",
    "--data.init_args.batch_size=32",
    "--model.init_args.schedule_reference_epochs=null",
    "--model.init_args.beta_warmup_epochs=2",
    "--model.init_args.threshold_interval=1",
    "--model.init_args.eval_samples=50",
    "--checkpoint.every_n_epochs=1",
]
IMAGES = ["--data.init_args.batch_size=16"]
WAVES = ["--data.init_args.batch_size=16", "--model.init_args.steps=8", "--trainer.callbacks.num_images=1"]
# The raptor task runs the dynamical analyses at the end of fit; these keep them small.
RAPTOR_ANALYSIS = ["--trainer.callbacks.probe_size=16", "--trainer.callbacks.perturb_seeds=1"]


def task_args(task: str, tmp_path: Path) -> list[str]:
    if task == "hypersindy":
        return HYPERSINDY
    if task == "waves":
        return WAVES
    if task == "raptor":
        return [*IMAGES, *tiny_teacher_args(tmp_path), *RAPTOR_ANALYSIS]
    return IMAGES


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def killed_run(task: str, runs_root: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Run fit in a subprocess that KillAtStep ends with SIGKILL after step KILL_AT_STEP."""
    configs = [CONFIGS / "base.yaml", CONFIGS / "tasks" / f"{task}.yaml"]
    extra = [*args, f"--runs_root={runs_root}", "--run_name=killed", f"--checkpoint_every_n_steps={CHECKPOINT_EVERY}"]
    return killed_fit(configs, extra, KILL_AT_STEP)


def check_kill_and_resume(task: str, run_cli, tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    args = [*COMMON, *task_args(task, tmp_path)]
    straight_dir = run_cli("fit", task, *args, "--run_name=straight", runs_root=runs_root)

    killed = killed_run(task, runs_root, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = runs_root / task / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == LAST_SAVED_STEP

    run_cli("fit", task, *args, "--run_name=killed", "--ckpt_path=last", runs_root=runs_root)
    resumed_ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed_ckpt["global_step"] == EPOCHS * 4
    straight = weights(straight_dir / "checkpoints" / "last.ckpt")
    resumed = resumed_ckpt["state_dict"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_vit_sigkill_resume_exact(run_cli, tmp_path):
    check_kill_and_resume("vit", run_cli, tmp_path)


def test_hypersindy_sigkill_resume_exact(run_cli, tmp_path):
    check_kill_and_resume("hypersindy", run_cli, tmp_path)


def test_waves_sigkill_resume_exact(run_cli, tmp_path):
    check_kill_and_resume("waves", run_cli, tmp_path)


@pytest.mark.slow  # about a minute: a tiny teacher is trained first and the dynamical analyses run twice
def test_raptor_sigkill_resume_exact(run_cli, tmp_path):
    check_kill_and_resume("raptor", run_cli, tmp_path)
