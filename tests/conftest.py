"""Shared test setup: no wandb traffic, a data folder per session, and guards against leaked state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory):
    """Keep wandb off and cache generated data sets once per test session."""
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("DYNLAB_DATA", str(tmp_path_factory.mktemp("data")))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Fail nothing, but undo what a test changes in process-wide state that other tests read."""
    env_before = dict(os.environ)
    cwd_before = os.getcwd()
    yield
    os.chdir(cwd_before)
    for key in set(os.environ) - set(env_before):
        del os.environ[key]
    for key, value in env_before.items():
        os.environ[key] = value


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run the dynlab CLI in-process with a task config, returning the run folder.

    Usage: run_dir = run_cli("fit", "waves", "--config", "configs/presets/smoke.yaml", ...)
    """
    import cli

    def _run(subcommand: str, task: str, *extra: str, runs_root: Path | None = None) -> Path:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.delenv(cli.RUN_NAME_ENV, raising=False)
        root = runs_root or tmp_path / "runs"
        args = [
            subcommand,
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / "tasks" / f"{task}.yaml"),
            *extra,
            "--runs_root",
            str(root),
        ]
        result = cli.run(args)
        return result.run_dir

    return _run


def killed_fit(configs: list[Path], args: list[str], kill_at_step: int) -> subprocess.CompletedProcess:
    """Run `dynlab fit` in a subprocess that tests.toy.kill.KillAtStep ends with SIGKILL after a step."""
    import cli

    # The same thread count as this process, so both compute with the same kernels and reduction order.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    env.pop(cli.RUN_NAME_ENV, None)
    command = [sys.executable, "-m", "cli", "fit"]
    for config in configs:
        command += ["--config", str(config)]
    command += [*args, "--trainer.callbacks+=tests.toy.kill.KillAtStep", f"--trainer.callbacks.step={kill_at_step}"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
