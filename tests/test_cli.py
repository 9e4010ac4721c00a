"""The framework through the CLI on a toy task: run folders, summary, resume, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cli
from tests.conftest import CONFIGS, REPO_ROOT, killed_fit

TOY_TASK = """
task: toy
model:
  class_path: tests.toy.task.ToyClassifier
data:
  class_path: tests.toy.task.ToyData
trainer:
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Run the CLI on the toy task; returns (run function, runs root)."""
    monkeypatch.chdir(REPO_ROOT)
    task_file = tmp_path / "toy.yaml"
    task_file.write_text(TOY_TASK)
    runs_root = tmp_path / "runs"

    def _run(*extra: str, subcommand: str = "fit") -> cli.DynlabCLI:
        monkeypatch.delenv(cli.RUN_NAME_ENV, raising=False)
        args = [
            subcommand,
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(task_file),
            "--runs_root",
            str(runs_root),
            *extra,
        ]
        return cli.run(args)

    return _run, runs_root


def model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_writes_run_folder(toy, capsys):
    run, runs_root = toy
    result = run("--trainer.max_epochs=2", "--run_name=first")
    run_dir = runs_root / "toy" / "first"

    assert result.run_dir == run_dir
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    assert (run_dir / "figures").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    assert "val/loss" in metrics["validate"]
    assert "best-epoch" in metrics["best_checkpoint"]

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(run_dir)
    assert any(line.startswith("acc ") for line in printed)


def test_resolved_config_holds_run_folder(toy):
    run, runs_root = toy
    run("--trainer.max_epochs=1", "--run_name=cfg", "--model.init_args.hidden=8")
    saved = (runs_root / "toy" / "cfg" / "config.yaml").read_text()
    assert "hidden: 8" in saved
    assert f"default_root_dir: {runs_root / 'toy' / 'cfg'}" in saved


def test_data_value_reaches_model(toy):
    run, _ = toy
    result = run("--trainer.max_epochs=1", "--data.init_args.num_classes=5", "--test_after_fit=false")
    assert result.model.hparams.num_classes == 5
    assert result.model.net[-1].out_features == 5


def test_resume_equals_straight_run(toy):
    """4 epochs straight == 2 epochs, a resume from last, and 2 more: bit for bit, with dropout and shuffling."""
    run, runs_root = toy
    run("--trainer.max_epochs=4", "--run_name=straight", "--test_after_fit=false")
    run("--trainer.max_epochs=2", "--run_name=split", "--test_after_fit=false")
    run("--trainer.max_epochs=4", "--ckpt_path=last", "--test_after_fit=false")

    straight = model_weights(runs_root / "toy" / "straight" / "checkpoints" / "last.ckpt")
    resumed = model_weights(runs_root / "toy" / "split" / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_without_rng_state_differs(toy):
    """Guards the test above: without the saved RNG state the dropout masks differ after a resume."""
    run, runs_root = toy
    run("--trainer.max_epochs=4", "--run_name=straight", "--test_after_fit=false")
    run("--trainer.max_epochs=2", "--run_name=split", "--test_after_fit=false")
    ckpt = runs_root / "toy" / "split" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if "RNGState" not in k}
    torch.manual_seed(12345)
    torch.save(checkpoint, ckpt)
    run("--trainer.max_epochs=4", "--ckpt_path=last", "--run_name=split", "--test_after_fit=false")

    straight = model_weights(runs_root / "toy" / "straight" / "checkpoints" / "last.ckpt")
    resumed = model_weights(ckpt)
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_validate_writes_into_checkpoint_run(toy):
    run, runs_root = toy
    run("--trainer.max_epochs=1", "--run_name=evalme", "--test_after_fit=false")
    ckpt = runs_root / "toy" / "evalme" / "checkpoints" / "last.ckpt"
    result = run(f"--ckpt_path={ckpt}", subcommand="validate")
    assert result.run_dir == runs_root / "toy" / "evalme"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "val/loss" in metrics["validate"]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--model.init_args.hiden=3", "unknown config key model.init_args.hiden"),
        ("--model.init_args.hidden=abc", "model.init_args.hidden='abc' is invalid: expected int"),
        ("--trainer.max_epocs=3", "unknown option --trainer.max_epocs=3"),
        ("--wandb_mode=foo", "wandb_mode='foo' is invalid: expected one of 'auto'"),
        ("--model=tests.toy.task.Nope", "class 'tests.toy.task.Nope' not found"),
    ],
)
def test_bad_config_is_one_line(toy, flag, expected):
    run, _ = toy
    with pytest.raises(cli.ConfigError) as caught:
        run(flag)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_suggests_spelling(toy):
    run, _ = toy
    with pytest.raises(cli.ConfigError, match=r"did you mean 'hidden'\?"):
        run("--model.init_args.hiden=3")


def test_unknown_yaml_key(toy, tmp_path):
    run, _ = toy
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainr:\n  max_epochs: 2\n")
    with pytest.raises(cli.ConfigError, match="unknown config key 'trainr.max_epochs'"):
        run("--config", str(typo))


def test_missing_checkpoint_path(toy, tmp_path):
    run, _ = toy
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(f"--ckpt_path={tmp_path / 'nope.ckpt'}")


def test_not_a_checkpoint(toy, tmp_path):
    run, _ = toy
    fake = tmp_path / "fake.ckpt"
    fake.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a complete torch checkpoint"):
        run(f"--ckpt_path={fake}")


def test_truncated_checkpoint_names_previous(toy):
    run, runs_root = toy
    run("--trainer.max_epochs=1", "--run_name=trunc", "--test_after_fit=false")
    folder = runs_root / "toy" / "trunc" / "checkpoints"
    broken = folder / "broken.ckpt"
    broken.write_bytes((folder / "last.ckpt").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"newest good checkpoint beside it is .*\.ckpt"):
        run(f"--ckpt_path={broken}")


def test_resume_last_without_runs(toy):
    run, _ = toy
    with pytest.raises(FileNotFoundError, match="found no run of task 'toy'"):
        run("--ckpt_path=last")


def test_unwritable_runs_root(toy, tmp_path):
    run, _ = toy
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="--runs_root"):
        run("--trainer.max_epochs=1", f"--runs_root={blocker}")


def test_wandb_mode_auto_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cli.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.resolve_wandb_mode("auto") == "disabled"
    assert cli.resolve_wandb_mode("offline") == "offline"


def test_offline_wandb_run_is_written(toy, monkeypatch):
    run, runs_root = toy
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run("--trainer.max_epochs=1", "--run_name=offline", "--wandb_mode=offline", "--test_after_fit=false")
    offline_runs = list((runs_root / "toy" / "offline" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))


def test_every_yaml_builds(tmp_path, monkeypatch):
    """Every task config, alone, with each preset, and under each experiment, parses and instantiates."""
    monkeypatch.chdir(REPO_ROOT)
    tasks = sorted((CONFIGS / "tasks").glob("*.yaml"))
    experiments = sorted((CONFIGS / "experiments").glob("*/*.yaml"))
    presets = sorted(p for p in (CONFIGS / "presets").glob("*.yaml") if p.stem not in ("gpu", "ddp"))
    assert tasks, "no task configs found"

    def build(*files: Path) -> cli.DynlabCLI:
        monkeypatch.delenv(cli.RUN_NAME_ENV, raising=False)
        args = ["--config", str(CONFIGS / "base.yaml")]
        for path in files:
            args += ["--config", str(path)]
        args += ["--runs_root", str(tmp_path / "runs"), "--wandb_mode=disabled"]
        return cli.DynlabCLI(args=args, run=False)

    for task in tasks:
        built = build(task)
        assert built.model is not None and built.datamodule is not None, task
        for preset in presets:
            build(task, preset)
    for experiment in experiments:
        built = build(CONFIGS / "tasks" / f"{experiment.parent.name}.yaml", experiment)
        assert built.model is not None, experiment


def test_gpu_and_ddp_presets_parse(tmp_path):
    """The GPU presets cannot build on a CPU machine, but they must parse against the Trainer signature."""
    for preset in ("gpu", "ddp"):
        with pytest.raises(SystemExit) as done:
            cli.run(
                [
                    "fit",
                    "--config",
                    str(CONFIGS / "base.yaml"),
                    "--config",
                    str(CONFIGS / "presets" / f"{preset}.yaml"),
                    "--model=tests.toy.task.ToyClassifier",
                    "--data=tests.toy.task.ToyData",
                    "--print_config",
                ]
            )
        assert done.value.code in (0, None)


def test_sigkill_mid_epoch_resume_is_exact(toy, tmp_path):
    """A run killed by SIGKILL mid-epoch and resumed from last.ckpt ends with the uninterrupted weights."""
    import signal

    run, runs_root = toy
    run("--trainer.max_epochs=3", "--run_name=straight", "--test_after_fit=false")

    # 96 samples / batch 8 = 12 steps per epoch: checkpoint every 4 steps, die at step 18 (mid epoch 1).
    args = [
        "--runs_root",
        str(runs_root),
        "--run_name=killed",
        "--trainer.max_epochs=3",
        "--test_after_fit=false",
        "--checkpoint_every_n_steps=4",
    ]
    killed = killed_fit([CONFIGS / "base.yaml", tmp_path / "toy.yaml"], args, kill_at_step=18)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = runs_root / "toy" / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 16

    run("--trainer.max_epochs=3", "--ckpt_path=last", "--run_name=killed", "--test_after_fit=false")
    straight = model_weights(runs_root / "toy" / "straight" / "checkpoints" / "last.ckpt")
    resumed = model_weights(last)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_checkpoint_with_other_shapes(toy):
    run, runs_root = toy
    run("--trainer.max_epochs=1", "--run_name=three", "--test_after_fit=false")
    ckpt = runs_root / "toy" / "three" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        cli.ConfigError, match=r"does not match the model: .*size mismatch for net\.3\.weight"
    ) as caught:
        run(f"--ckpt_path={ckpt}", "--data.init_args.num_classes=5", subcommand="validate")
    assert "\n" not in str(caught.value)


def test_checkpoint_of_another_task(toy, tmp_path):
    run, runs_root = toy
    run("--trainer.max_epochs=1", "--run_name=toyrun", "--test_after_fit=false")
    ckpt = runs_root / "toy" / "toyrun" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        cli.ConfigError,
        match=r"was saved by tests.toy.task.ToyClassifier .* but this config builds lightning_modules.waves",
    ) as caught:
        cli.run(
            [
                "validate",
                "--config",
                str(CONFIGS / "base.yaml"),
                "--config",
                str(CONFIGS / "tasks" / "waves.yaml"),
                f"--ckpt_path={ckpt}",
                "--runs_root",
                str(tmp_path / "other"),
            ]
        )
    assert "\n" not in str(caught.value)


def test_batch_larger_than_data(toy):
    run, _ = toy
    with pytest.raises(ValueError, match=r"batch_size=500 is larger than the train split \(96 samples\)"):
        run("--trainer.max_epochs=1", "--data.init_args.batch_size=500")
