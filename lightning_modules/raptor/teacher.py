"""Build the frozen teacher: a timm name, a local weights file, or a checkpoint of our own `vit` task.

`teacher` is read as
- a path ending in `.ckpt`: a checkpoint of the `vit` task;
- a run folder of the `vit` task (a path with a `/`, or an existing folder): its best checkpoint. When
  the folder has none and training is allowed, the `vit` task is first trained into it through the
  dynlab CLI in a child process;
- anything else: a timm model name, built with `pretrained` (hub download) or with `weights`, a local
  state-dict file (.pth / .pt / .bin / .safetensors).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from callbacks.checkpoint import check_checkpoint_file
from lightning_modules.vit.backbone import check_vit

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEACHER_RUN = "runs/vit/raptor-teacher"


def is_run_path(teacher: str) -> bool:
    """Tell whether `teacher` names a checkpoint or a run folder rather than a timm model."""
    if teacher.startswith("hf-hub:"):
        return False
    return teacher.endswith(".ckpt") or "/" in teacher or os.sep in teacher or Path(teacher).is_dir()


def best_checkpoint(run_dir: Path) -> Path | None:
    """Return the newest best-*.ckpt of a run folder, else its last.ckpt, else None."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


def train_teacher_run(run_dir: Path, image_size: int, extra_args: list[str]) -> Path:
    """Train the `vit` task into `run_dir` (runs_root/task/run_name) with the CLI; return its best .ckpt."""
    runs_root, task, run_name = run_dir.parent.parent, run_dir.parent.name, run_dir.name
    command = [
        sys.executable,
        "-m",
        "cli",
        "fit",
        "--config",
        str(REPO_ROOT / "configs" / "base.yaml"),
        "--config",
        str(REPO_ROOT / "configs" / "tasks" / "vit.yaml"),
        *extra_args,
        f"--data.init_args.image_size={image_size}",
        f"--runs_root={runs_root.resolve()}",
        f"--task={task}",
        f"--run_name={run_name}",
    ]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        command.append("--ckpt_path=last")
    log.info("no teacher checkpoint in %s: training the vit task first: %s", run_dir, " ".join(command))
    env = dict(os.environ)
    env.pop("DYNLAB_RUN_NAME", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=str(REPO_ROOT), env=env)
    checkpoint = best_checkpoint(run_dir)
    if result.returncode != 0 or checkpoint is None:
        raise RuntimeError(
            f"training the teacher into {run_dir} failed (exit code {result.returncode}): run "
            f'`make train TASK=vit ARGS="--run_name={run_name} --runs_root={runs_root}"` to see the error.'
        )
    return checkpoint


def find_or_train_teacher(
    run_dir: Path, image_size: int, train_if_missing: bool, train_args: list[str]
) -> Path:
    """Return the best checkpoint of a finished teacher run, training (or resuming) it first when allowed.

    A run counts as finished once the CLI has written its metrics.json. A file lock beside the run folder
    makes concurrent callers (several ranks, parallel jobs) wait for one training run instead of racing.
    """
    import fcntl

    if not train_if_missing:
        checkpoint = best_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"teacher run folder {run_dir} contains no checkpoint: train it with `make train TASK=vit "
                f"ARGS=--run_name={run_dir.name}` or set --model.init_args.train_teacher=true."
            )
        if not (run_dir / "metrics.json").is_file():
            log.warning("teacher run %s has no metrics.json, so its training may be unfinished", run_dir)
        return checkpoint
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            checkpoint = best_checkpoint(run_dir)
            if checkpoint is None or not (run_dir / "metrics.json").is_file():
                checkpoint = train_teacher_run(run_dir, image_size, train_args)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return checkpoint


def load_vit_checkpoint(path: Path) -> nn.Module:
    """Return the timm model of a `vit` task checkpoint."""
    from lightning_modules.vit.module import ViTClassifier

    check_checkpoint_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"checkpoint {path} is not a Lightning checkpoint of the vit task: pass a vit task .ckpt."
        )
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    try:
        module = ViTClassifier(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint {path} does not hold a vit task model ({str(error).splitlines()[0]}): pass a "
            "checkpoint "
            "written by `make train TASK=vit`."
        ) from error
    return module.model


def load_weights_file(model: nn.Module, path: str) -> None:
    """Load a local state-dict file into `model`, with one-line errors for a missing or broken file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"teacher weights file {file} was not found: pass an existing .pth/.safetensors file."
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise several types for a damaged file
        raise ValueError(
            f"teacher weights file {file} could not be read ({type(error).__name__}): the file is corrupt "
            "or not a "
            "state dict; download it again or export it with torch.save(model.state_dict(), path)."
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"teacher weights file {file} contains a {type(state).__name__}, not a state dict.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"teacher weights file {file} does not match the teacher architecture (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}): pick the timm name the weights were trained with."
        )


def build_timm_teacher(name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """Create a timm model by name, from the hub (`pretrained`) or from a local weights file."""
    base, _ = timm.models.split_model_name_tag(name.removeprefix("hf-hub:"))
    if not name.startswith("hf-hub:") and not timm.is_model(base):
        raise ValueError(
            f"teacher={name!r} is not a timm model name: list ViTs with `timm.list_models('vit_*')` (e.g. "
            "vit_base_patch14_reg4_dinov2.lvd142m), or pass a vit task checkpoint or run folder."
        )
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
        except TypeError as error:
            # Non-ViT architectures reject img_size; build them without it so the ViT check names the problem.
            if "img_size" not in str(error) or "img_size" not in kwargs:
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        if pretrained and weights is None:
            raise ConnectionError(
                f"downloading pretrained weights for teacher={name!r} failed "
                f"({str(error).splitlines()[0]}): pass "
                "a local copy with --model.init_args.teacher_weights=/path/to/weights.safetensors."
            ) from error
        raise
    if weights is not None:
        load_weights_file(model, weights)
    return model


def build_teacher(
    teacher: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    kwargs: dict[str, Any] | None = None,
    image_size: int | None = None,
    train_if_missing: bool = True,
    train_args: list[str] | None = None,
) -> tuple[nn.Module, str]:
    """Return (frozen teacher ViT in eval mode, description of where it came from)."""
    kwargs = dict(kwargs or {})
    if is_run_path(teacher):
        path = Path(teacher).expanduser()
        if path.suffix == ".ckpt":
            checkpoint = path
        else:
            checkpoint = find_or_train_teacher(
                path, image_size or 16, train_if_missing, list(train_args or [])
            )
        model, source = load_vit_checkpoint(checkpoint), str(checkpoint)
    else:
        if image_size is not None and "img_size" not in kwargs:
            kwargs["img_size"] = image_size
        model = build_timm_teacher(teacher, pretrained, weights, kwargs)
        if weights:
            source = f"timm:{teacher} weights={weights}"
        else:
            source = f"timm:{teacher} {'pretrained' if pretrained else 'random'}"
    model = check_vit(model)
    expected = model.patch_embed.img_size
    if image_size is not None and tuple(expected) != (image_size, image_size) and not model.dynamic_img_size:
        raise ValueError(
            f"the teacher expects {expected[0]}x{expected[1]} images but the data gives "
            f"image_size={image_size}: "
            f"set --data.init_args.image_size={expected[0]}."
        )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, source
