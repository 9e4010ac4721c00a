"""MNIST segmentation (56 x 56, 11 classes) and Multi-MNIST (128 x 128, 11 classes) from local MNIST files.

Nothing is downloaded. The MNIST files are read from `mnist_dir`, else `<data_dir>/mnist`, else
`<data_dir>/MNIST/raw` (the torchvision layout), in one of two forms:
- the four IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
  `t10k-labels-idx1-ubyte`, each optionally gzipped;
- a Hugging Face `datasets` copy saved with `save_to_disk` (a DatasetDict with `train` and `test` splits
  and columns `image` and `label`).

MNIST segmentation: the 60k training images are split 51,000 / 9,000 by a seeded permutation (seed 42),
the official 10k test images are the test set. Each digit is upsampled bilinearly to 56 x 56 (in [0, 1]),
and the mask is (upsampled > 0.5) * (digit + 1), so 0 is background and 1..10 are the digits 0..9.

Multi-MNIST: 128 x 128 binary canvases, splits 10,000 / 1,000 / 1,000 generated in that order with seed 50.
Every split draws its digits from the MNIST training set. Per image 1..4 digits (uniform); each is resized
to 42 x 42, binarized (> 50 of 255), placed at a random position fully inside the canvas where none of its
foreground pixels lands on a labelled pixel (at most 200 tries, else the digit is skipped), and only its
foreground pixels are written. The mask is digit + 1.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from datamodules.base import load_cached_arrays, make_loader, resolve_data_dir

log = logging.getLogger(__name__)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    n_dims = data[3]
    header_size = 4 + 4 * n_dims
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    expected = int(np.prod(shape))
    if len(data) < header_size or len(data) - header_size != expected:
        raise ValueError(
            f"{path} is truncated or damaged: its header declares shape {shape} ({expected} bytes of data) "
            f"but the file has {len(data)} bytes in all. Download the MNIST file again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(folders: list[Path]) -> dict[str, np.ndarray]:
    """Return train/test images (N, 28, 28) uint8 and labels (N,) from the first folder that has MNIST."""
    for folder in folders:
        if (folder / "dataset_dict.json").is_file():
            import datasets

            copy = datasets.load_from_disk(str(folder))
            arrays = {}
            for split in ("train", "test"):
                arrays[f"{split}_images"] = np.stack(
                    [np.asarray(image, dtype=np.uint8) for image in copy[split]["image"]]
                )
                arrays[f"{split}_labels"] = np.asarray(copy[split]["label"], dtype=np.uint8)
            return arrays
        paths = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
        if all(paths.values()):
            return {key: read_idx(path) for key, path in paths.items()}
    searched = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"MNIST files not found in {searched}: put the four IDX files ({', '.join(IDX_FILES.values())}, "
        "optionally .gz) or a Hugging Face `datasets` copy saved with save_to_disk into one of these "
        "folders, "
        "or pass --data.init_args.mnist_dir=<folder>."
    )


def upsample_digits(images: np.ndarray, size: int, batch: int = 4096) -> np.ndarray:
    """Bilinear resize (align_corners=False) of uint8 (N, 28, 28) to float32 (N, size, size), values kept."""
    out = np.empty((images.shape[0], size, size), dtype=np.float32)
    for start in range(0, images.shape[0], batch):
        chunk = torch.from_numpy(images[start : start + batch].astype(np.float32))[:, None]
        out[start : start + batch] = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False
        )[:, 0].numpy()
    return out


class ArrayDataset(Dataset):
    """Float images (1, S, S) and int64 masks (S, S)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.masks = torch.from_numpy(np.ascontiguousarray(masks))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index][None].float(), self.masks[index].long()


class _MNISTBase(LightningDataModule):
    num_classes = 11
    in_channels = 1

    def __init__(self, data_dir, mnist_dir, seed, subset, batch_size, num_workers):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)
        self.mnist_dir = Path(mnist_dir).expanduser() if mnist_dir else None
        self.seed, self.subset, self.batch_size, self.num_workers = seed, subset, batch_size, num_workers
        self.splits: dict[str, ArrayDataset] = {}

    def mnist_folders(self) -> list[Path]:
        if self.mnist_dir is not None:
            return [self.mnist_dir]
        return [self.data_dir / "mnist", self.data_dir / "MNIST" / "raw"]

    def build(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, (images, masks) in self.build().items():
            if self.subset is not None:
                images, masks = images[: self.subset], masks[: self.subset]
            self.splits[split] = ArrayDataset(images, masks)

    def train_dataloader(self):
        return make_loader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
            num_workers=self.num_workers,
            split="train",
        )

    def val_dataloader(self):
        return make_loader(
            self.splits["val"], self.batch_size, shuffle=False, num_workers=self.num_workers, split="val"
        )

    def test_dataloader(self):
        return make_loader(
            self.splits["test"], self.batch_size, shuffle=False, num_workers=self.num_workers, split="test"
        )


class MNISTSegDataModule(_MNISTBase):
    """MNIST segmentation, 56 x 56, 11 classes; 51k / 9k / 10k (rules in the module docstring).

    Args:
        data_dir: data folder (default: $DYNLAB_DATA, else ./data); MNIST is looked for under it.
        mnist_dir: folder with the MNIST files, overriding the search under data_dir.
        seed: seed of the train/validation split.
        subset: keep at most this many images per split.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
    """

    image_size = 56

    def __init__(
        self,
        data_dir: str | None = None,
        mnist_dir: str | None = None,
        seed: int = 42,
        subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__(data_dir, mnist_dir, seed, subset, batch_size, num_workers)
        self.save_hyperparameters()

    def build(self):
        mnist = load_mnist(self.mnist_folders())
        order = np.random.default_rng(self.seed).permutation(len(mnist["train_images"]))
        n_train = int(round(0.85 * len(order)))
        splits = {
            "train": (mnist["train_images"][order[:n_train]], mnist["train_labels"][order[:n_train]]),
            "val": (mnist["train_images"][order[n_train:]], mnist["train_labels"][order[n_train:]]),
            "test": (mnist["test_images"], mnist["test_labels"]),
        }
        out = {}
        for split, (digits, labels) in splits.items():
            if self.subset is not None:
                digits, labels = digits[: self.subset], labels[: self.subset]
            images = upsample_digits(digits, self.image_size) / 255.0
            masks = (images > 0.5) * (labels.astype(np.int64)[:, None, None] + 1)
            out[split] = (images, masks.astype(np.uint8))
        return out


def compose_multi_mnist(
    n_images: int,
    digits: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    canvas_size: int = 128,
    digit_size: int = 42,
    max_tries: int = 200,
):
    """Draw `n_images` canvases: binary images (N, S, S) uint8, masks (N, S, S) uint8, digits placed (N,)."""
    images = np.zeros((n_images, canvas_size, canvas_size), dtype=np.uint8)
    masks = np.zeros((n_images, canvas_size, canvas_size), dtype=np.uint8)
    placed = np.zeros(n_images, dtype=np.int64)
    span = canvas_size - digit_size + 1
    for index in range(n_images):
        for _ in range(rng.integers(1, 5)):
            pick = rng.integers(len(digits))
            shape = digits[pick]  # bool (digit_size, digit_size)
            for _ in range(max_tries):
                r, q = rng.integers(0, span, size=2)
                window = masks[index, r : r + digit_size, q : q + digit_size]
                if not (window[shape] > 0).any():
                    window[shape] = labels[pick] + 1
                    images[index, r : r + digit_size, q : q + digit_size][shape] = 1
                    placed[index] += 1
                    break
    return images, masks, placed


class MultiMNISTDataModule(_MNISTBase):
    """Multi-MNIST, 128 x 128 binary canvases with 1..4 digits, 11 classes; cached under data_dir.

    Args:
        data_dir: data folder (default: $DYNLAB_DATA, else ./data); MNIST is looked for under it and the
            generated canvases are cached in `<data_dir>/multi_mnist/`.
        mnist_dir: folder with the MNIST files, overriding the search under data_dir.
        seed: seed of the canvas generator.
        n_train, n_val, n_test: split sizes.
        subset: keep at most this many images per split.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
    """

    image_size = 128

    def __init__(
        self,
        data_dir: str | None = None,
        mnist_dir: str | None = None,
        seed: int = 50,
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__(data_dir, mnist_dir, seed, subset, batch_size, num_workers)
        self.save_hyperparameters()
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def build(self):
        cache = (
            self.data_dir
            / "multi_mnist"
            / (f"n{self.sizes['train']}-{self.sizes['val']}-{self.sizes['test']}_seed{self.seed}.npz")
        )
        if not cache.is_file():
            mnist = load_mnist(self.mnist_folders())
            digits = upsample_digits(mnist["train_images"], 42) > 50
            rng = np.random.default_rng(self.seed)
            arrays = {}
            for split, n in self.sizes.items():
                images, masks, placed = compose_multi_mnist(n, digits, mnist["train_labels"], rng)
                arrays.update({f"{split}_images": images, f"{split}_masks": masks, f"{split}_placed": placed})
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(cache)
        names = [f"{split}_{kind}" for split in self.sizes for kind in ("images", "masks")]
        arrays = load_cached_arrays(cache, names)
        return {split: (arrays[f"{split}_images"], arrays[f"{split}_masks"]) for split in self.sizes}
