"""Save and restore the RNG states and the position in the epoch, so a resumed run is bit-identical."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.base import ResumableDataLoader


def numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    """Convert numpy's legacy RNG state to plain values that weights-only checkpoint loading accepts."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def numpy_state_from_plain(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


class RNGStateCallback(Callback):
    """Store the torch, CUDA, numpy and Python RNG states in checkpoints; restore them when training resumes.

    Lightning checkpoints hold no RNG state. The state is applied in `on_train_start`, after the sanity
    check, so the validation loaders that the sanity check creates do not shift the stream.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # Record the position in the epoch on resumable loaders; Lightning saves it with the checkpoint.
        combined = trainer.fit_loop._combined_loader
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for loader in combined.flattened if combined is not None else []:
            if isinstance(loader, ResumableDataLoader):
                loader.batches_consumed = consumed
                loader.epoch_of_count = trainer.current_epoch

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning 2.6 applies the loaders' saved positions only when it builds the train loader after the
        # checkpoint was restored. A model that reads `trainer.estimated_stepping_batches` in
        # `configure_optimizers` makes it build the loader before that, and the positions would be dropped.
        # The call is a no-op when the positions were already applied or the run is not a resume.
        # NOTE: a private Lightning method (2.6); tests/test_resume_tasks.py fails if a release changes it.
        trainer.fit_loop._load_combined_loader_states()
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        np.random.set_state(numpy_state_from_plain(state["numpy"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
