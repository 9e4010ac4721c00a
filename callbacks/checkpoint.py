"""Checkpoints that are never left half-written, and a clear error for a bad checkpoint path."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class SafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes atomically and refreshes last.ckpt at every epoch end.

    Writing to a temporary file and renaming it means a kill leaves the previous file intact. Lightning
    2.6 writes last.ckpt only in epochs that also saved a top-k checkpoint, so a run whose validation
    loss stopped improving would resume from an old epoch; `save_last` here means the newest state.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        tmp_path = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp_path, self.save_weights_only)
        if trainer.is_global_zero and os.path.exists(tmp_path):
            os.replace(tmp_path, filepath)
        trainer.strategy.barrier("dynlab_checkpoint_rename")

        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def other_checkpoints(path: Path) -> list[Path]:
    """Return the loadable checkpoints beside `path`, newest first."""
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob("*.ckpt") if p != path and zipfile.is_zipfile(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def check_checkpoint_file(path: Path) -> None:
    """Raise a one-line error when `path` is missing or is not a complete torch checkpoint."""
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: pass the path of a .ckpt file, or --ckpt_path=last to resume "
            "the newest run of the task."
        )
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder: pass the path of a .ckpt file inside it.")
    if not zipfile.is_zipfile(path):
        previous = other_checkpoints(path)
        hint = f" The newest good checkpoint beside it is {previous[0]}." if previous else ""
        raise ValueError(
            f"checkpoint {path} is not a complete torch checkpoint (truncated or another file type).{hint}"
        )
