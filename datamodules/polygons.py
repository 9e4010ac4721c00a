"""Polygons: filled polygons on a dark 32 x 32 canvas, one class per polygon type (our own design).

Dataset card
- Purpose: a small segmentation set where a pixel's class depends only on the global shape of the object
  it belongs to, not on its colour or on a local texture.
- Classes: 0 background, 1 triangle, 2 square, 3 pentagon, 4 hexagon, 5 five-pointed star (concave
  10-gon, inner radius 0.45 of the outer), 6 plus-shaped cross (concave 12-gon, arm width 0.5 of the
  outer radius).
- Per image: 1 to `max_shapes` shapes (uniform). Each has a random class (uniform), circumradius
  uniform in [`min_radius`, `max_radius`] px, rotation uniform in [0, 2 pi), centre uniform over positions
  that keep the circumscribed circle inside the canvas, and intensity uniform in [0.3, 1.0] (one grey
  level per shape, background 0). A pixel belongs to a shape when its centre lies inside the polygon.
- Non-overlap: a placement is accepted only if no pixel of the new shape, grown by one pixel in each
  direction, is already labelled (so shapes never touch); at most 100 tries per shape, then it is skipped.
- Variant `squares`: every shape is a square (class 2) with its circumradius drawn from the same range
  (area 2 r^2), for probing how the wave spectrum relates to area.
- Splits: `n_train` / `n_val` / `n_test` (default 10,000 / 1,000 / 1,000) drawn in that order from one numpy
  generator seeded with `seed`; the arrays are cached under `<data_dir>/polygons/`.
- Not the published polygon set, which was never released; these rules are this project's choice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from matplotlib.path import Path as PolygonPath
from torch.utils.data import Dataset

from datamodules.base import CachedSplitsMixin, resolve_data_dir

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "triangle", "square", "pentagon", "hexagon", "star", "cross")
VARIANTS = ("mixed", "squares")
MAX_TRIES = 100


def polygon_vertices(label: int, radius: float, angle: float) -> np.ndarray:
    """Vertices (n, 2) of a class-`label` polygon with circumradius `radius`, centred at the origin."""
    if label in (1, 2, 3, 4):
        n = label + 2
        theta = angle + 2 * math.pi * np.arange(n) / n
        return radius * np.stack([np.cos(theta), np.sin(theta)], 1)
    if label == 5:
        theta = angle + math.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    if label == 6:
        a, h = (
            radius / math.sqrt(1 + 0.25**2),
            0.25 * radius / math.sqrt(1 + 0.25**2),
        )  # arm tip corners on the circle
        corners = np.array(
            [
                [a, -h],
                [a, h],
                [h, h],
                [h, a],
                [-h, a],
                [-h, h],
                [-a, h],
                [-a, -h],
                [-h, -h],
                [-h, -a],
                [h, -a],
                [h, -h],
            ]
        )
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        return corners @ rotation.T
    raise ValueError(f"polygon class {label} is invalid: use 1..6.")


def rasterize(vertices: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """Bool (size, size) map of the pixels whose centres lie inside the polygon placed at `centre`."""
    rows, cols = np.mgrid[0:size, 0:size]
    points = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1)
    return PolygonPath(vertices + centre).contains_points(points).reshape(size, size)


def grow(mask: np.ndarray) -> np.ndarray:
    """Dilate a bool map by one pixel (8-neighbourhood); the output is 2 px larger on each axis."""
    padded = np.pad(mask, 2)
    out = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)
    for dr in range(3):
        for dc in range(3):
            out |= padded[dr : dr + out.shape[0], dc : dc + out.shape[1]]
    return out


def generate_polygons(
    n_images: int,
    rng: np.random.Generator,
    size: int = 32,
    max_shapes: int = 3,
    min_radius: float = 5.0,
    max_radius: float = 9.0,
    variant: str = "mixed",
):
    """Draw images (N, S, S) float32 in [0, 1] and masks (N, S, S) uint8.

    Each shape is rasterized once on a local square of side ceil(2 r) + 1 around a random sub-pixel
    centre; placements then differ by whole pixels, which keeps the circumscribed circle on the canvas.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}.")
    images = np.zeros((n_images, size, size), dtype=np.float32)
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    padded_masks = np.zeros((size + 2, size + 2), dtype=np.uint8)
    for index in range(n_images):
        padded_masks[:] = 0
        for _ in range(rng.integers(1, max_shapes + 1)):
            label = 2 if variant == "squares" else int(rng.integers(1, 7))
            radius = rng.uniform(min_radius, max_radius)
            angle = rng.uniform(0, 2 * math.pi)
            intensity = rng.uniform(0.3, 1.0)
            side = math.ceil(2 * radius) + 1
            centre = radius + rng.uniform(0, side - 2 * radius, size=2)
            shape = rasterize(polygon_vertices(label, radius, angle), centre, side)
            halo = grow(shape)
            for _ in range(MAX_TRIES):
                r, q = rng.integers(0, size - side + 1, size=2)
                if not (halo & (padded_masks[r : r + side + 2, q : q + side + 2] > 0)).any():
                    masks[index, r : r + side, q : q + side][shape] = label
                    images[index, r : r + side, q : q + side][shape] = intensity
                    padded_masks[r + 1 : r + side + 1, q + 1 : q + side + 1][shape] = label
                    break
    return images, masks


class PolygonsDataset(Dataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images = torch.from_numpy(images)
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index][None], self.masks[index].long()


class PolygonsDataModule(CachedSplitsMixin, LightningDataModule):
    """Polygon segmentation, 1 x 32 x 32, 7 classes (rules in the module's dataset card).

    Args:
        data_dir: folder for the cache (default: $DYNLAB_DATA, else ./data).
        image_size: canvas side in pixels.
        max_shapes: at most this many shapes per image.
        min_radius, max_radius: range of the circumradius in pixels.
        variant: `mixed` (all six classes) or `squares` (squares of varying size only).
        n_train, n_val, n_test: split sizes.
        seed: seed of the data generator, independent of the global training seed.
        subset: keep at most this many images per split.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
    """

    dataset_class = PolygonsDataset

    num_classes = len(CLASS_NAMES)
    in_channels = 1

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: int = 32,
        max_shapes: int = 3,
        min_radius: float = 5.0,
        max_radius: float = 9.0,
        variant: str = "mixed",
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        seed: int = 7,
        subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}.")
        if not 0 < min_radius <= max_radius < image_size / 2:
            raise ValueError(
                f"radius range [{min_radius}, {max_radius}] is invalid for a {image_size}-px canvas: use "
                f"0 < min_radius <= max_radius < {image_size / 2}."
            )
        self.save_hyperparameters()
        self.data_dir = resolve_data_dir(data_dir)
        self.image_size = image_size
        self.splits: dict[str, PolygonsDataset] = {}

    @property
    def cache_file(self) -> Path:
        h = self.hparams
        name = (
            f"{h.variant}_s{h.image_size}_k{h.max_shapes}_r{h.min_radius:g}-{h.max_radius:g}"
            f"_n{h.n_train}-{h.n_val}-{h.n_test}_seed{h.seed}.npz"
        )
        return self.data_dir / "polygons" / name

    def prepare_data(self) -> None:
        if self.cache_file.is_file():
            return
        h = self.hparams
        rng = np.random.default_rng(h.seed)
        arrays = {}
        for split, n in (("train", h.n_train), ("val", h.n_val), ("test", h.n_test)):
            arrays[f"{split}_images"], arrays[f"{split}_masks"] = generate_polygons(
                n, rng, h.image_size, h.max_shapes, h.min_radius, h.max_radius, h.variant
            )
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(self.cache_file)
