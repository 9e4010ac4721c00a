"""Every task under bf16 autocast, torch.compile and DDP on CPU (the DDP and compile tests are slow tier)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

import cli
from tests.conftest import CONFIGS, REPO_ROOT

TASKS = ("waves", "hypersindy", "raptor", "vit")
SMOKE = CONFIGS / "presets" / "smoke.yaml"

# bf16 keeps 8 bits of mantissa, so one forward pass agrees with float32 to about 1e-2 relative. Losses
# near zero (Raptor's distillation loss at its LayerScale init is about 1e-7) are compared absolutely.
BF16_RELATIVE_TOLERANCE = 0.05
BF16_ABSOLUTE_TOLERANCE = 1e-5


# Validation metrics that are one-sample Monte Carlo estimates: HyperSINDy's loss and reconstruction draw
# z with torch.randn_like, and the single-process and DDP runs draw different z. On the untrained smoke
# model the two values differed by a factor of 2.2, so these keys are only checked for being finite.
STOCHASTIC_METRICS = {"hypersindy": ("val/loss", "val/recon")}


def tiny_teacher_args(tmp_path: Path) -> list[str]:
    """Raptor flags that train a 4-layer smoke teacher under tmp_path instead of the default teacher."""
    teacher_args = (
        f"[--config, {SMOKE}, --model.init_args.depth=4, --model.init_args.embed_dim=16, "
        "--model.init_args.num_heads=2]"
    )
    return [
        f"--model.init_args.teacher={tmp_path / 'teachers' / 'tiny'}",
        f"--model.init_args.teacher_train_args={teacher_args}",
        "--model.init_args.phase_images=64",
    ]


def task_flags(task: str, tmp_path: Path) -> list[str]:
    return tiny_teacher_args(tmp_path) if task == "raptor" else []


def smoke_args(task: str, tmp_path: Path) -> list[str]:
    """Return the CLI arguments of a task's smoke run with its runs under tmp_path/runs."""
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "tasks" / f"{task}.yaml"),
        "--config",
        str(SMOKE),
        f"--runs_root={tmp_path / 'runs'}",
        *task_flags(task, tmp_path),
    ]


def build_task(task: str, tmp_path: Path, *extra: str) -> cli.DynlabCLI:
    """Instantiate a task's model and data with the smoke preset, without running anything."""
    args = [*smoke_args(task, tmp_path), *extra]
    os.environ.pop(cli.RUN_NAME_ENV, None)
    return cli.DynlabCLI(args=args, run=False)


def validation_loss(built: cli.DynlabCLI, precision: str) -> float:
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=built.run_dir,
    )
    results = trainer.validate(built.model, datamodule=built.datamodule, verbose=False)
    return float(results[0]["val/loss"])


@pytest.mark.parametrize("task", TASKS)
def test_bf16_loss_matches_fp32(task, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    built = build_task(task, tmp_path)
    torch.manual_seed(0)
    fp32 = validation_loss(built, "32-true")
    torch.manual_seed(0)
    bf16 = validation_loss(built, "bf16-mixed")
    assert torch.isfinite(torch.tensor(bf16))
    assert abs(bf16 - fp32) <= BF16_RELATIVE_TOLERANCE * abs(fp32) + BF16_ABSOLUTE_TOLERANCE, (task, fp32, bf16)


def test_compile_flag_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """compile_in_place leaves parameter names unchanged, so checkpoints load with or without compile."""
    from tests.toy.task import ToyClassifier

    plain = ToyClassifier()
    compiled = ToyClassifier()
    cli.compile_in_place(compiled)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_compiled_run_checkpoint_loads_both_ways(task, run_cli, tmp_path):
    """A checkpoint of a compiled run validates without --compile and with it, to the same loss."""
    flags = ("--config", str(SMOKE), *task_flags(task, tmp_path))
    run_dir = run_cli("fit", task, *flags, "--compile=true", "--run_name=compiled")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)

    losses = []
    for compiled in ("false", "true"):
        validated = run_cli("validate", task, *flags, f"--ckpt_path={ckpt}", f"--compile={compiled}")
        losses.append(json.loads((validated / "metrics.json").read_text())["validate"]["val/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


def dynlab_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled"}
    env.pop(cli.RUN_NAME_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_ddp_two_processes_match_single(task, tmp_path):
    """DDP with 2 CPU processes (gloo): one set of files, and synced validation metrics equal 1 process."""
    runs_root = tmp_path / "runs"
    common = [*smoke_args(task, tmp_path), "--trainer.accelerator=cpu"]

    ddp_fit = dynlab_subprocess(
        "fit", *common, "--run_name=ddp", "--trainer.strategy=ddp", "--trainer.devices=2"
    )
    assert ddp_fit.returncode == 0, ddp_fit.stderr[-3000:]
    run_dir = runs_root / task / "ddp"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert not [name for name in checkpoints if "-v1" in name or name.endswith(".tmp")], checkpoints
    assert not list(run_dir.parent.glob("ddp?*")), "a second run folder was created by another rank"
    # Figure names repeat across figures/dynamics/<source>/, so only versioned copies (-v1) count as duplicates.
    figures = [p for p in (run_dir / "figures").rglob("*") if p.is_file()]
    if task != "vit":  # the vit task attaches no figure-writing callback
        assert figures
    assert not [p for p in figures if re.search(r"-v\d+\.\w+$", p.name)], figures

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    single = dynlab_subprocess(
        "validate", *common, f"--ckpt_path={ckpt}", "--run_name=single", "--trainer.devices=1"
    )
    assert single.returncode == 0, single.stderr[-3000:]
    single_metrics = json.loads((runs_root / task / "single" / "metrics.json").read_text())["validate"]
    double = dynlab_subprocess(
        "validate",
        *common,
        f"--ckpt_path={ckpt}",
        "--run_name=double",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
    )
    assert double.returncode == 0, double.stderr[-3000:]
    double_metrics = json.loads((runs_root / task / "double" / "metrics.json").read_text())["validate"]

    # DistributedSampler pads the last batch with repeated samples, so allow a small difference.
    assert single_metrics.keys() == double_metrics.keys()
    for key, value in single_metrics.items():
        if key in STOCHASTIC_METRICS.get(task, ()):
            assert math.isfinite(double_metrics[key]), key
            continue
        assert double_metrics[key] == pytest.approx(value, rel=0.05, abs=1e-3), key
