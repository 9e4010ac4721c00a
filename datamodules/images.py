"""Image classification data: scikit-learn's bundled digits offline, or any Hugging Face `datasets` source.

`dataset="digits"` (the default) needs no download: 1,797 8x8 grayscale digits, 10 classes, split once
into train / val / test (70 / 15 / 15 %, stratified, fixed seed). Any other value is a Hugging Face hub
name (e.g. `imagenet-1k`), a local image folder (one subfolder per class, read with the `imagefolder`
builder) or a parquet file or folder of parquet files. Every image goes through the DINOv2 evaluation
preprocessing: RGB conversion, bicubic resize of the short side, centre crop, ImageNet normalisation.
Batches are `(images (B, 3, H, W) float32, labels (B,) int64)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset, TensorDataset

from datamodules.base import make_loader, resolve_data_dir

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SPLIT_SEED = 0  # the digits split is fixed, independent of every other seed
DIGITS_FRACTIONS = (0.70, 0.15, 0.15)


def default_resize(image_size: int) -> int:
    """Return the short-side resize before the centre crop: 256 for a 224 crop, the DINOv2 ratio."""
    return int(round(image_size * 256 / 224))


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return the fixed stratified train / val / test split of scikit-learn's digits as (images, labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    train_frac, val_frac, test_frac = DIGITS_FRACTIONS
    x_train, x_rest, y_train, y_rest = train_test_split(
        images, labels, train_size=train_frac, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest,
        y_rest,
        test_size=test_frac / (val_frac + test_frac),
        stratify=y_rest,
        random_state=DIGITS_SPLIT_SEED,
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def preprocess_tensor(images: torch.Tensor, image_size: int, resize_size: int) -> torch.Tensor:
    """Apply the DINOv2 preprocessing to (B, C, H, W) images in [0, 1]: RGB, resize, crop, normalise."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = torch.nn.functional.interpolate(
        images, size=(resize_size, resize_size), mode="bicubic", align_corners=False
    )
    offset = (resize_size - image_size) // 2
    images = images[:, :, offset : offset + image_size, offset : offset + image_size].clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()


def pil_transform(image_size: int, resize_size: int):
    """Return the PIL transform: RGB, bicubic resize, centre crop, ImageNet normalisation."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Lambda(lambda image: image.convert("RGB")),
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class HFImageDataset(Dataset):
    """A split of a Hugging Face dataset as (image tensor, label) pairs."""

    def __init__(self, split, image_column: str, label_column: str, label_map: dict | None, transform):
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.label_map = label_map
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            row = self.split[int(index)]  # `datasets` decodes the image here
        except OSError as error:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            raise ValueError(
                f"image {index} of column {self.image_column!r} could not be decoded ({error}): replace or "
                "remove that file in the data set."
            ) from error
        label = row[self.label_column]
        if self.label_map is not None:
            label = self.label_map[label]
        return self.transform(row[self.image_column]), int(label)


def describe_feature(feature) -> str:
    """Describe a Hugging Face `datasets` feature in words for an error message, e.g. "lists of float64 values"."""
    import datasets

    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    if isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
        return f"{feature.dtype} arrays of shape {feature.shape}"
    inner = getattr(feature, "feature", None)
    if inner is not None:  # List, LargeList and Sequence wrap the feature of their items
        return f"lists of {describe_feature(inner)}"
    return repr(feature)


def class_folder_names(root: Path) -> set[str]:
    """Return the names of the folders that directly contain the files of an image folder."""
    return {path.parent.name for path in root.rglob("*") if path.is_file() and path.parent != root}


def hub_offline() -> bool:
    """Tell whether HF_HUB_OFFLINE or HF_DATASETS_OFFLINE sets the Hugging Face libraries offline."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


class ImageClassificationDataModule(LightningDataModule):
    """Image classification batches for the `vit` and `raptor` tasks.

    Args:
        dataset: "digits" (bundled, offline), a Hugging Face hub name, a local image folder (class
            subfolders) or a parquet file or folder. A relative local path is looked up in `data_dir` too.
        data_dir: folder for local data sets (default $DYNLAB_DATA, else ./data).
        image_column: column that contains the images (PIL images or image dicts).
        label_column: column that contains the integer or string labels.
        train_split, val_split, test_split: split names of the Hugging Face dataset. A missing val split
            is carved out of train (stratified, `val_fraction`); a missing test split reuses val.
        val_fraction: share of train held out when the dataset has no val split.
        image_size: side of the centre crop fed to the model, in pixels.
        resize_size: short side after the bicubic resize (default: image_size x 256 / 224).
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes.
        subset: keep at most this many images per split (None keeps all).
        seed: seed of the shuffle order and of any split carved out here.
        num_classes: number of classes of a Hugging Face dataset. When given, the dataset is opened only in
            setup (cheap construction, e.g. 1000 for ImageNet-1k); when None it is opened at construction.
        hf_kwargs: extra keyword arguments for `datasets.load_dataset` (e.g. {"revision": "main"}).
    """

    in_channels = 3  # grayscale and RGBA images are converted to RGB

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = "test",
        val_fraction: float = 0.1,
        image_size: int = 16,
        resize_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        subset: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        hf_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        # num_classes stays out of hparams because Lightning merges them with the model's linked value.
        self.save_hyperparameters(ignore=["num_classes"])
        if image_size < 1:
            raise ValueError(f"image_size={image_size} is invalid: use a positive number of pixels.")
        self.image_size = image_size
        self.resize_size = resize_size or default_resize(image_size)
        if self.resize_size < image_size:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than image_size={image_size}: the centre crop "
                "needs "
                f"resize_size >= image_size."
            )
        self.dataset_name = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.subset = subset
        self.seed = seed
        self.splits: dict[str, Dataset] = {}
        self._hf = None
        self._image_folder: Path | None = None  # set when the data set is a local folder read by `imagefolder`
        self._label_map = None
        if dataset == "digits":
            self.num_classes = 10
        elif num_classes is not None:
            self.num_classes = num_classes  # the data set is opened in setup, so construction stays cheap
        else:
            self._open_hf()
            self.num_classes = self._num_labels

    def _open_hf(self) -> None:
        if self._hf is not None:
            return
        hp = self.hparams
        self._hf = self._load_hf(hp.dataset, hp.data_dir, hp.hf_kwargs or {})
        self._num_labels, self._label_map = self._label_info()
        declared = getattr(self, "num_classes", None)
        if declared is not None and self._num_labels != declared:
            raise ValueError(
                f"num_classes={declared} but dataset {hp.dataset!r} has {self._num_labels} classes in "
                f"column {hp.label_column!r}: set --data.init_args.num_classes={self._num_labels} or null."
            )

    # ---------------------------------------------------------------- Hugging Face
    def _load_hf(self, dataset: str, data_dir: str | None, hf_kwargs: dict[str, Any]):
        import datasets

        candidates = [Path(dataset).expanduser(), resolve_data_dir(data_dir) / dataset]
        local = next((path for path in candidates if path.exists()), None)
        if local is not None:
            parquet = sorted(local.rglob("*.parquet")) if local.is_dir() else [local]
            if local.is_file() or parquet:
                if not all(path.suffix == ".parquet" for path in parquet):
                    raise ValueError(
                        f"dataset={dataset!r} is a file but not a .parquet file: pass a parquet file or an "
                        "image folder."
                    )
                files = self._parquet_files(local, parquet)
                loaded = datasets.load_dataset("parquet", data_files=files, **hf_kwargs)
            else:
                loaded = datasets.load_dataset("imagefolder", data_dir=str(local), **hf_kwargs)
                self._image_folder = local
            return loaded
        looks_like_path = dataset.startswith((".", "/", "~")) or dataset.endswith(".parquet")
        if looks_like_path:
            raise FileNotFoundError(
                f"dataset={dataset!r} was not found (looked in {', '.join(str(c) for c in candidates)}): "
                "pass an "
                "existing image folder (one subfolder per class) or parquet file."
            )
        hint = (
            "point data.init_args.dataset at a local copy instead: an image folder with one subfolder per "
            "class "
            f"(or a parquet file), e.g. --data.init_args.dataset=/path/to/{dataset.split('/')[-1]}"
        )
        if hub_offline():
            raise ConnectionError(
                f"dataset={dataset!r} is a hub name but the Hugging Face hub is set offline: {hint}."
            )
        try:
            return datasets.load_dataset(dataset, **hf_kwargs)
        except Exception as error:  # the hub raises many types (connection, auth, not found)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConnectionError(
                f"loading dataset={dataset!r} from the Hugging Face hub failed ({first_line}): {hint}."
            ) from error

    @staticmethod
    def _parquet_files(root: Path, files: list[Path]) -> dict[str, list[str]]:
        """Group parquet files into splits by the split name in their path; everything else is train."""
        if root.is_file():
            return {"train": [str(root)]}
        grouped: dict[str, list[str]] = {}
        for path in files:
            parts = [p.lower() for p in path.relative_to(root).parts]
            split = next(
                (s for s in ("train", "validation", "val", "test") if any(p.startswith(s) for p in parts)),
                "train",
            )
            grouped.setdefault(split, []).append(str(path))
        return grouped

    def _label_info(self) -> tuple[int, dict | None]:
        import datasets

        first_split = next(iter(self._hf.values()))
        columns = first_split.column_names
        for role, column in (
            ("image_column", self.hparams.image_column),
            ("label_column", self.hparams.label_column),
        ):
            if column not in columns:
                if role == "label_column":
                    self._check_label_folders()
                raise ValueError(
                    f"{role}={column!r} is not a column of dataset {self.dataset_name!r} (columns: "
                    f"{', '.join(columns)}): set --data.init_args.{role} to one of them."
                )
        image_feature = first_split.features[self.hparams.image_column]
        if not isinstance(image_feature, datasets.Image):
            raise ValueError(
                f"image_column={self.hparams.image_column!r} of dataset {self.dataset_name!r} contains "
                f"{describe_feature(image_feature)}, not images: set --data.init_args.image_column to a column "
                "of images, or store the images as a datasets.Image feature (PIL images, image files or "
                "encoded bytes)."
            )
        label_column = self.hparams.label_column
        feature = first_split.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            # -1 marks an unlabelled example (the ImageNet-1k test split), not a class.
            present = sorted({value for split in self._hf.values() for value in split.unique(label_column)} - {-1})
            self._check_several_classes([feature.int2str(value) for value in present])
            return feature.num_classes, None
        values = sorted({value for split in self._hf.values() for value in split[label_column]})
        self._check_several_classes(values)
        return len(values), {value: index for index, value in enumerate(values)}

    def _check_several_classes(self, classes: list, split: str | None = None) -> None:
        """Raise a one-line error when the labels contain fewer than 2 classes (in `split`, else anywhere)."""
        if len(classes) >= 2:
            return
        found = f"a single class ({classes[0]!r})" if classes else "no class"
        column = self.hparams.label_column
        need = "a classifier and a linear probe need at least 2 classes"
        if split is not None:
            raise ValueError(
                f"subset={self.subset} leaves {found} in the {split} split of dataset {self.dataset_name!r} "
                f"(label column {column!r}): {need}, so raise --data.init_args.subset or set it to null."
            )
        raise ValueError(
            f"dataset {self.dataset_name!r} has {found} in label column {column!r}: {need}, so use a data set "
            "with 2 or more classes (an image folder needs one subfolder per class)."
        )

    def _check_label_folders(self) -> None:
        """Explain a missing label column of an image folder whose images sit in a single class folder.

        The `imagefolder` builder of `datasets` adds the "label" column only when the images lie in two or
        more folders, so a one-class folder reaches this point without labels.
        """
        if self._image_folder is None:
            return
        folders = class_folder_names(self._image_folder)
        if len(folders) == 1:
            self._check_several_classes(sorted(folders))

    def _hf_split(self, name: str):
        aliases = {"validation": ("validation", "val", "valid"), "val": ("validation", "val", "valid")}
        for candidate in aliases.get(name, (name,)):
            if candidate in self._hf:
                return self._hf[candidate]
        return None

    # ------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset_name == "digits":
            for split, (images, labels) in digits_splits().items():
                images, labels = self._take_subset(images, labels)
                if split == "train" and self.subset is not None:
                    self._check_several_classes(np.unique(labels).tolist(), split)
                tensor = preprocess_tensor(
                    torch.from_numpy(images)[:, None], self.image_size, self.resize_size
                )
                self.splits[split] = TensorDataset(tensor, torch.from_numpy(labels))
            return
        self._open_hf()
        transform = pil_transform(self.image_size, self.resize_size)
        hp = self.hparams
        train = self._hf_split(hp.train_split)
        if train is None:
            raise ValueError(
                f"train_split={hp.train_split!r} is not a split of dataset {self.dataset_name!r} (splits: "
                f"{', '.join(self._hf.keys())}): set --data.init_args.train_split to one of them."
            )
        val = self._hf_split(hp.val_split)
        if val is None:
            parts = train.train_test_split(test_size=hp.val_fraction, seed=self.seed)
            train, val = parts["train"], parts["test"]
        test = self._hf_split(hp.test_split) if hp.test_split else None
        if test is not None and -1 in set(test[:64][hp.label_column]):
            test = None  # unlabelled test split (ImageNet-1k): evaluate on val
        test = test if test is not None else val
        for split, data in (("train", train), ("val", val), ("test", test)):
            if self.subset is not None and len(data) > self.subset:
                data = data.shuffle(seed=self.seed).select(range(self.subset))
                if split == "train":
                    self._check_several_classes(sorted(set(data[hp.label_column])), split)
            self.splits[split] = HFImageDataset(
                data, hp.image_column, hp.label_column, self._label_map, transform
            )

    def _take_subset(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.subset is None or len(labels) <= self.subset:
            return images, labels
        order = np.random.default_rng(self.seed).permutation(len(labels))[: self.subset]
        return images[np.sort(order)], labels[np.sort(order)]

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self):
        return make_loader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
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

    def eval_loader(self, split: str):
        """Return an unshuffled loader over any split, for feature extraction (probes, phase discovery)."""
        self.setup()
        return make_loader(
            self.splits[split], self.batch_size, shuffle=False, num_workers=self.num_workers, split=split
        )
