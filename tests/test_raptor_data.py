"""Image classification data: the digits split, image folders and parquet through `datasets`, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import IMAGENET_MEAN, IMAGENET_STD, ImageClassificationDataModule


def make_image_folder(root: Path, per_class: int = 6) -> Path:
    """Write a two-class image folder with grayscale, RGBA and RGB images of different sizes."""
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "RGB"]
    for label, name in enumerate(["circle", "square"]):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            mode = modes[index % 3]
            size = 20 + 4 * index
            pixels = rng.integers(
                0, 255, size=(size, size, {"L": 1, "RGBA": 4, "RGB": 3}[mode]), dtype=np.uint8
            )
            pixels[..., 0] = 255 * label
            image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode=mode)
            image.save(folder / f"{name}_{index}.png")
    return root


def test_digits_fixed_stratified_split():
    data = ImageClassificationDataModule(image_size=16)
    data.setup()
    sizes = {split: len(dataset) for split, dataset in data.splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert sum(sizes.values()) == 1797
    labels = data.splits["test"].tensors[1]
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 26
    assert counts.max() <= 28
    other_seed = ImageClassificationDataModule(image_size=16, seed=5)
    other_seed.setup()
    assert torch.equal(other_seed.splits["test"].tensors[1], labels)


def test_digits_links_and_preprocessing():
    data = ImageClassificationDataModule(image_size=16)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 16)
    data.setup()
    images, _ = data.splits["train"][:8]
    assert images.shape == (8, 3, 16, 16)
    background = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert images[:, 0, 0, 0].tolist() == pytest.approx([background] * 8, abs=0.05)


def test_digits_subset():
    data = ImageClassificationDataModule(subset=100)
    data.setup()
    assert len(data.splits["train"]) == 100
    assert len(data.splits["val"]) == 100


def test_image_folder_modes_converted(tmp_path):
    folder = make_image_folder(tmp_path / "shapes")
    data = ImageClassificationDataModule(dataset=str(folder), image_size=28, batch_size=4, val_fraction=0.25)
    assert data.num_classes == 2
    data.setup()
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 28, 28)
    assert labels.dtype == torch.int64
    assert len(data.splits["train"]) + len(data.splits["val"]) == 12


def test_parquet_file(tmp_path):
    import datasets

    folder = make_image_folder(tmp_path / "shapes", per_class=3)
    files = sorted(folder.rglob("*.png"))
    table = datasets.Dataset.from_dict(
        {"picture": [str(f) for f in files], "kind": [f.parent.name for f in files]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")}),
    )
    path = tmp_path / "shapes.parquet"
    table.to_parquet(str(path))
    data = ImageClassificationDataModule(
        dataset=str(path),
        image_column="picture",
        label_column="kind",
        image_size=14,
        batch_size=2,
        val_fraction=0.5,
    )
    assert data.num_classes == 2
    data.setup()
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 14, 14)
    assert set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("role", ["image_column", "label_column"])
def test_missing_column_is_named(tmp_path, role):
    folder = make_image_folder(tmp_path / "shapes", per_class=2)
    with pytest.raises(
        ValueError, match=rf"{role}='nope' is not a column of dataset .*: set --data.init_args.{role}"
    ):
        ImageClassificationDataModule(dataset=str(folder), **{role: "nope"})


def test_offline_hub_name_points_to_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="local copy instead: an image folder"):
        ImageClassificationDataModule(dataset="imagenet-1k")


def test_declared_num_classes_defers_loading(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = ImageClassificationDataModule(dataset="imagenet-1k", num_classes=1000, image_size=224)
    assert data.num_classes == 1000
    with pytest.raises(ConnectionError, match="hub is set offline"):
        data.setup()


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="was not found"):
        ImageClassificationDataModule(dataset=str(tmp_path / "absent"))
