"""Tetrominoes, Polygons and MNIST data modules: generation rules and loading from local files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from datamodules.mnist_seg import MNISTSegDataModule, MultiMNISTDataModule, load_mnist
from datamodules.polygons import PolygonsDataModule, generate_polygons
from datamodules.tetrominoes import TetrominoesDataModule, generate_tetrominoes


@pytest.fixture(scope="module")
def tetrominoes():
    return generate_tetrominoes(1000, np.random.default_rng(42), return_pieces=True)


def test_tetrominoes_class_set_and_shapes(tetrominoes):
    images, masks, _ = tetrominoes
    assert images.shape == (1000, 64, 64, 3)
    assert images.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4, 5}


def test_tetrominoes_background_share(tetrominoes):
    _, masks, _ = tetrominoes
    assert abs((masks == 0).mean() - 0.8556) < 0.01


def test_tetrominoes_last_row_and_column_empty(tetrominoes):
    images, masks, _ = tetrominoes
    assert not masks[:, -1, :].any()
    assert not masks[:, :, -1].any()
    assert not images[:, -1, :].any()


def test_tetrominoes_pieces_never_overlap(tetrominoes):
    _, masks, pieces = tetrominoes
    # Every piece labels 4 blocks of 49 px; an overlap would leave fewer labelled pixels.
    n_pieces = (pieces > 0).sum(1)
    assert np.array_equal((masks > 0).sum((1, 2)), n_pieces * 4 * 49)
    for label in range(1, 6):
        assert np.array_equal((masks == label).sum((1, 2)), (pieces == label).sum(1) * 4 * 49)


def test_tetrominoes_piece_count_rule(tetrominoes):
    _, _, pieces = tetrominoes
    counts = (pieces > 0).sum(1)
    assert set(np.unique(counts)) == {1, 2, 3, 4, 5}
    assert np.all(np.abs(np.bincount(counts)[1:] / 1000 - 0.2) < 0.05)
    for row in pieces[counts <= 4]:
        used = row[row > 0]
        assert len(set(used)) == len(used)  # n <= 4 gives distinct shapes


def test_tetrominoes_ring_colour_wraps_mod_256():
    images, masks = generate_tetrominoes(50, np.random.default_rng(3), return_pieces=True)[:2]
    colours = images.astype(np.int64)
    # Block centres: labelled pixels whose whole 5 x 5 neighbourhood (the block interior) has their colour.
    same = np.ones(masks.shape, dtype=bool)
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            shifted = np.roll(colours, (dr, dc), axis=(1, 2))
            same &= (shifted == colours).all(-1)
    n, rows, cols = np.nonzero(same & (masks > 0))
    assert len(n) == (masks > 0).sum() // 49  # one centre per 7 x 7 block
    interior = colours[n, rows, cols]
    expected_ring = (interior + interior // 2) % 256
    for dr, dc in ((-3, 0), (3, 0), (0, -3), (0, 3), (-3, -3), (3, 3)):
        assert np.array_equal(colours[n, rows + dr, cols + dc], expected_ring)
    assert (interior > 170).any()  # some colours wrap around
    assert int((np.uint16(200) + 100) % 256) == 44


def test_tetrominoes_tiny_variant_and_cache(tmp_path):
    module = TetrominoesDataModule(
        data_dir=str(tmp_path), canvas_size=16, block_scale=2, n_train=64, n_val=16, n_test=16, batch_size=8
    )
    assert (module.num_classes, module.in_channels, module.image_size) == (6, 3, 16)
    module.setup()
    assert module.cache_file.is_file()
    images, masks = next(iter(module.train_dataloader()))
    assert images.shape == (8, 3, 16, 16)
    assert images.dtype == torch.float32
    assert masks.dtype == torch.int64
    assert 0.0 <= images.min()
    assert images.max() <= 1.0


def test_tetrominoes_rejects_small_canvas():
    with pytest.raises(ValueError, match="canvas_size=20 is too small"):
        TetrominoesDataModule(canvas_size=20, block_scale=5)


def test_polygons_rules():
    images, masks = generate_polygons(200, np.random.default_rng(0))
    assert images.shape == (200, 32, 32)
    assert set(np.unique(masks)) == set(range(7))
    assert np.array_equal(images > 0, masks > 0)
    foreground = images[masks > 0]
    assert foreground.min() >= 0.3
    assert foreground.max() <= 1.0
    # Shapes never touch: 8-neighbours that are both labelled belong to one shape (same class and grey).
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        here = (slice(None), slice(0, 32 - dr), slice(max(0, -dc), 32 - max(0, dc)))
        there = (slice(None), slice(dr, 32), slice(max(0, dc), 32 - max(0, -dc)))
        both = (masks[here] > 0) & (masks[there] > 0)
        assert np.array_equal(masks[here][both], masks[there][both])
        assert np.array_equal(images[here][both], images[there][both])
    squares = generate_polygons(20, np.random.default_rng(1), variant="squares")[1]
    assert set(np.unique(squares)) == {0, 2}


def test_polygons_module_attributes():
    module = PolygonsDataModule(n_train=8, n_val=8, n_test=8)
    assert (module.num_classes, module.in_channels, module.image_size) == (7, 1, 32)
    with pytest.raises(ValueError, match="variant='circles' is invalid"):
        PolygonsDataModule(variant="circles")


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for prefix, n in (("train", 100), ("t10k", 20)):
        digits = np.zeros((n, 28, 28), dtype=np.uint8)
        digits[:, 8:20, 10:18] = 255  # a bright block standing in for a digit
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", digits)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


def test_mnist_missing_files_error(tmp_path):
    module = MNISTSegDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        module.setup()
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "mnist") in message
    assert "train-images-idx3-ubyte" in message


def test_mnist_segmentation_from_idx(mnist_dir):
    module = MNISTSegDataModule(data_dir=str(mnist_dir.parent), batch_size=4)
    assert (module.num_classes, module.in_channels, module.image_size) == (11, 1, 56)
    module.setup()
    assert [len(module.splits[s]) for s in ("train", "val", "test")] == [85, 15, 20]
    image, mask = module.splits["train"][0]
    assert image.shape == (1, 56, 56)
    assert mask.shape == (56, 56)
    labels = set(mask.unique().tolist())
    assert 0 in labels
    assert len(labels) == 2
    assert torch.equal(mask > 0, image[0] > 0.5)


def test_multi_mnist_from_idx(mnist_dir):
    module = MultiMNISTDataModule(
        mnist_dir=str(mnist_dir), data_dir=str(mnist_dir.parent), n_train=6, n_val=2, n_test=2, batch_size=2
    )
    module.setup()
    image, mask = module.splits["train"][0]
    assert image.shape == (1, 128, 128)
    assert torch.equal(mask > 0, image[0] > 0)
    assert mask.max() <= 10


def test_mnist_from_hf_datasets_copy(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    digits = [Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)) for _ in range(4)]
    split = datasets.Dataset.from_dict(
        {"image": digits, "label": [1, 2, 3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    arrays = load_mnist([tmp_path / "hf"])
    assert arrays["train_images"].shape == (4, 28, 28)
    assert arrays["test_labels"].tolist() == [1, 2, 3, 4]
