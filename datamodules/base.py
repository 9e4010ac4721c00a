"""Pieces every DataModule shares: the data folder, epoch-seeded shuffling and loader settings."""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Return the data folder: the argument, else $DYNLAB_DATA, else ./data."""
    if data_dir is None:
        data_dir = os.environ.get("DYNLAB_DATA", "data")
    return Path(data_dir).expanduser()


class EpochShuffleSampler(Sampler[int]):
    """Random permutation drawn from (seed, epoch) alone, so a resumed run replays the same order.

    Lightning calls `set_epoch` on any sampler that has it (and wraps this one for DDP), so the order
    depends neither on the global RNG nor on how many epochs ran in this process.
    """

    def __init__(self, data_source_len: int, seed: int = 0):
        self.length = data_source_len
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, n_consumed: int) -> None:
        """Make the next pass over `epoch` leave out its first `n_consumed` items (a mid-epoch resume)."""
        self._resume = (epoch, n_consumed)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        if self._resume is not None:
            epoch, n_consumed = self._resume
            self._resume = None
            if epoch == self.epoch:
                order = order[n_consumed:]
        return iter(order)

    def __len__(self) -> int:
        return self.length


class ResumableDataLoader(DataLoader):
    """DataLoader that records how many batches of the current epoch training consumed.

    Lightning stores `state_dict()` in the checkpoint and calls `load_state_dict` before the first
    iterator of a resumed run, so a run killed mid-epoch continues with the first unseen batch. The count
    is set by `RNGStateCallback` after each training batch (the loader itself runs one batch ahead
    because Lightning prefetches). Under DDP the sampler is wrapped and a resume restarts the epoch.
    """

    batches_consumed: int = 0
    epoch_of_count: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_of_count, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffleSampler):
            # With batch_size=None the sampler yields whole index batches, so one sampler item is one batch.
            items_per_batch = self.batch_size or 1
            self.sampler.resume_at(state["epoch"], state["batches_consumed"] * items_per_batch)


def check_batch_size(batch_size: int, n_samples: int, split: str, drop_last: bool) -> None:
    """Raise when a split is too small for one batch and drop_last would leave it empty."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use a positive integer.")
    if drop_last and n_samples < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {split} split ({n_samples} samples), so drop_last "
            f"would leave no batch: lower data.init_args.batch_size to at most {n_samples}."
        )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    split: str = "train",
) -> DataLoader:
    """Build a DataLoader whose shuffle order is reproducible across resumes."""
    check_batch_size(batch_size, len(dataset), split, drop_last)
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    # A loader-owned generator keeps iterator creation off the global torch RNG, which the checkpoint
    # restores. Drawing on it would shift every later random draw of a resumed run.
    loader_class = ResumableDataLoader if shuffle else DataLoader
    return loader_class(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


# Exceptions that np.load raises on a truncated or overwritten .npz file: for a broken zip directory, a
# short or corrupt member, a member of another format, or a missing array name.
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def load_cached_arrays(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Read the arrays `names` from a cached .npz file that the data module generated.

    Raises a one-line ValueError when the file cannot be read or a float array contains NaN or inf, so
    damaged data stops the run before it reaches a model as a NaN loss.
    """
    fix = "delete the file and the next run regenerates it"
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in names}
    except NPZ_READ_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cached data file {path} could not be read ({reason}): {fix}.") from error
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.inexact):
            n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if n_bad:
                raise ValueError(
                    f"cached data file {path} contains {n_bad} non-finite values (NaN or inf) in array "
                    f"{name!r}: {fix}."
                )
    return arrays


class CachedSplitsMixin:
    """Set-up and loaders for a DataModule whose three splits sit in one cached .npz file.

    The DataModule defines `cache_file`, `prepare_data` (which writes it), `dataset_class(images, masks)`
    and the hyperparameters `batch_size`, `seed`, `num_workers` and `subset`; arrays are named
    `<split>_images` and `<split>_masks`.
    """

    dataset_class: type[Dataset]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # a no-op when cached; covers use without a Trainer
        splits = ("train", "val", "test")
        names = [f"{split}_{kind}" for split in splits for kind in ("images", "masks")]
        arrays = load_cached_arrays(self.cache_file, names)
        for split in splits:
            images, masks = arrays[f"{split}_images"], arrays[f"{split}_masks"]
            if self.hparams.subset is not None:
                images, masks = images[: self.hparams.subset], masks[: self.hparams.subset]
            self.splits[split] = self.dataset_class(images, masks)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return make_loader(
            self.splits["train"],
            h.batch_size,
            shuffle=True,
            seed=h.seed,
            drop_last=True,
            num_workers=h.num_workers,
            split="train",
        )

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return make_loader(self.splits["val"], h.batch_size, shuffle=False, num_workers=h.num_workers, split="val")

    def test_dataloader(self) -> DataLoader:
        h = self.hparams
        return make_loader(self.splits["test"], h.batch_size, shuffle=False, num_workers=h.num_workers, split="test")
