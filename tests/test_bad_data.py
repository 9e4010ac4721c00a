"""Bad user data gets a one-line error: a single class, a column without images, damaged or non-finite files."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from datamodules.base import load_cached_arrays
from datamodules.images import ImageClassificationDataModule
from datamodules.mnist_seg import read_idx
from datamodules.sde import SDEDataModule
from datamodules.tetrominoes import TetrominoesDataModule

SINGLE_CLASS = "a classifier and a linear probe need at least 2 classes"


def write_pngs(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(np.full((8, 8, 3), 30 * index, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def write_parquet(path: Path, columns: dict, features: dict | None = None) -> str:
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features) if features else None)
    table.to_parquet(str(path))
    return str(path)


def test_image_folder_with_one_class(tmp_path):
    write_pngs(tmp_path / "cats" / "cat", 4)
    with pytest.raises(ValueError) as caught:
        ImageClassificationDataModule(dataset=str(tmp_path / "cats"))
    message = str(caught.value)
    assert f"dataset '{tmp_path / 'cats'}' has a single class ('cat') in label column 'label'" in message
    assert SINGLE_CLASS in message
    assert "one subfolder per class" in message
    assert "\n" not in message


def test_parquet_with_one_label_value(tmp_path):
    files = write_pngs(tmp_path / "images", 4)
    path = write_parquet(
        tmp_path / "one.parquet",
        {"picture": files, "kind": ["cat"] * 4},
        {"picture": datasets.Image(), "kind": datasets.Value("string")},
    )
    with pytest.raises(ValueError) as caught:
        ImageClassificationDataModule(dataset=path, image_column="picture", label_column="kind")
    message = str(caught.value)
    assert f"dataset '{path}' has a single class ('cat') in label column 'kind'" in message
    assert SINGLE_CLASS in message


def test_class_label_with_one_present_class(tmp_path):
    files = write_pngs(tmp_path / "images", 4)
    path = write_parquet(
        tmp_path / "one.parquet",
        {"image": files, "label": [1] * 4},
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])},
    )
    with pytest.raises(ValueError, match=r"has a single class \('dog'\) in label column 'label'"):
        ImageClassificationDataModule(dataset=path)


def test_subset_leaving_one_class():
    data = ImageClassificationDataModule(subset=1)
    with pytest.raises(ValueError) as caught:
        data.setup()
    message = str(caught.value)
    assert "subset=1 leaves a single class" in message
    assert "in the train split of dataset 'digits'" in message
    assert "raise --data.init_args.subset or set it to null" in message


@pytest.mark.parametrize(
    ("images", "described"),
    [
        ([np.full((4, 4), np.nan).tolist()] * 4, "lists of lists of float64 values"),
        (["a.png", "b.png", "c.png", "d.png"], "string values"),
    ],
    ids=["float-arrays", "file-names"],
)
def test_image_column_without_images(tmp_path, images, described):
    path = write_parquet(tmp_path / "arrays.parquet", {"pixels": images, "label": [0, 1, 0, 1]})
    with pytest.raises(ValueError) as caught:
        ImageClassificationDataModule(dataset=path, image_column="pixels")
    message = str(caught.value)
    assert f"image_column='pixels' of dataset '{path}' contains {described}, not images" in message
    assert "datasets.Image feature" in message
    assert "\n" not in message


def small_tetrominoes(tmp_path: Path) -> TetrominoesDataModule:
    return TetrominoesDataModule(
        data_dir=str(tmp_path), canvas_size=16, block_scale=1, n_train=8, n_val=4, n_test=4, batch_size=4
    )


def test_truncated_cache_file(tmp_path):
    small_tetrominoes(tmp_path).setup()
    cache = small_tetrominoes(tmp_path).cache_file
    cache.write_bytes(cache.read_bytes()[:300])
    with pytest.raises(ValueError) as caught:
        small_tetrominoes(tmp_path).setup()
    message = str(caught.value)
    assert message.startswith(f"cached data file {cache} could not be read (")
    assert message.endswith("delete the file and the next run regenerates it.")
    assert "\n" not in message


def test_non_finite_cached_simulation(tmp_path):
    settings = {"n_steps": 200, "noise_scale": 1.0, "data_dir": str(tmp_path), "batch_size": 50}
    SDEDataModule(**settings).setup()
    (cache,) = (tmp_path / "sde").glob("*.npz")
    with np.load(cache) as stored:
        arrays = dict(stored)
    arrays["x"][17, 1] = np.nan
    arrays["x"][18, 0] = np.inf
    np.savez(cache, **arrays)
    with pytest.raises(ValueError) as caught:
        SDEDataModule(**settings).setup()
    message = str(caught.value)
    assert f"cached data file {cache} contains 2 non-finite values (NaN or inf) in array 'x'" in message
    assert "delete the file and the next run regenerates it" in message


def test_cached_arrays_round_trip(tmp_path):
    path = tmp_path / "fine.npz"
    np.savez(path, a=np.arange(3.0), b=np.zeros(2, dtype=np.uint8))
    arrays = load_cached_arrays(path, ["a", "b"])
    assert arrays["a"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"fine.npz could not be read \('c is not a file in the archive'\)"):
        load_cached_arrays(path, ["c"])


def test_truncated_mnist_idx_file(tmp_path):
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(1000)))
    with pytest.raises(ValueError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert "is truncated or damaged: its header declares shape (10, 28, 28) (7840 bytes of data)" in message
    assert "the file has 1016 bytes in all. Download the MNIST file again." in message


def test_non_finite_sde_diffusion():
    with pytest.raises(ValueError, match=r"sde_diffusion=nan is invalid: use a finite value >= 0"):
        SDEDataModule(mode="sde", sde_diffusion=float("nan"))


def test_undecodable_image_file(tmp_path):
    write_pngs(tmp_path / "shapes" / "circle", 2)
    write_pngs(tmp_path / "shapes" / "square", 2)
    (tmp_path / "shapes" / "square" / "1.png").write_bytes(b"not a png")
    data = ImageClassificationDataModule(dataset=str(tmp_path / "shapes"), batch_size=4, val_fraction=0.25)
    data.setup()
    with pytest.raises(ValueError) as caught:
        list(data.train_dataloader())
    message = str(caught.value)
    assert "of column 'image' could not be decoded (cannot identify image file" in message
    assert "square/1.png" in message
    assert message.endswith("replace or remove that file in the data set.")


def test_raptor_channels_differ_from_teacher():
    from lightning_modules.raptor.module import RaptorDistill

    model = RaptorDistill(
        teacher="vit_tiny_patch16_224",
        image_size=16,
        in_channels=1,
        teacher_kwargs={"patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2},
    )
    with pytest.raises(ValueError) as caught:
        model.build()
    message = str(caught.value)
    assert message.startswith("in_channels=1 (from the data) does not match the 3 input channels of teacher")
    assert message.endswith("use data with 3 channels, or a teacher trained on this data.")
