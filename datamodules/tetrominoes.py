"""Tetrominoes segmentation: randomly coloured tetris pieces on a black canvas, one class per piece shape.

Rules (defaults give the published 64x64 set):
- Splits of 10,000 / 1,000 / 1,000 images drawn in that order from one numpy generator seeded with `seed`
  (42); no test image may equal a train or validation image.
- Per image the piece count n is uniform on 1..5. The shapes are the first n of a shuffled list that holds
  each of the 5 shapes ceil((n + 1) / 5) times, so n <= 4 gives distinct shapes and n = 5 can repeat one.
- Classes: 0 background, 1 I, 2 O, 3 T, 4 S/Z, 5 J/L (mirror pairs share a class). Each piece is rotated by
  k * 90 degrees; S/Z and J/L are also mirrored left-right with probability 0.5.
- Every block of a piece is `block_scale` x `block_scale` pixels (7: an I piece is 28 x 7 px). A piece has
  one colour c (each RGB channel uniform on 0..255); a block's interior is c and its 1-px outer ring is
  (c + c // 2) mod 256 per channel, the wrap-around of uint8 arithmetic (c = 200 gives a ring of 44).
- The top-left corner (r, q) of a piece with an h x w bounding box is uniform on 0 <= r < S - h,
  0 <= q < S - w (exclusive bounds, so the last row and column stay empty). A position is accepted only if
  the whole bounding box holds no labelled pixel yet, else it is drawn again, so pieces never overlap.
  After 2,000 rejected draws the piece is dropped; this happens only on tiny canvases (never at 64 px
  with 7-px blocks), where retrying forever could hang.
- The mask labels every pixel of every block, ring included. About 85.6% of the pixels are background.

Images are stored as uint8 (N, S, S, 3) and masks as class indices; the loader yields float images in
[0, 1], channels first, with no augmentation. A generated set is cached under `<data_dir>/tetrominoes/`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from datamodules.base import CachedSplitsMixin, resolve_data_dir

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "I", "O", "T", "S/Z", "J/L")
BASE_SHAPES = {
    1: [[1, 1, 1, 1]],
    2: [[1, 1], [1, 1]],
    3: [[1, 1, 1], [0, 1, 0]],
    4: [[0, 1, 1], [1, 1, 0]],
    5: [[1, 0, 0], [1, 1, 1]],
}
MIRRORED_CLASSES = (4, 5)
MAX_PIECES = 5
MAX_PLACEMENT_ROUNDS = 2_000


def shape_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block masks of every (class, rotation, mirror) variant, padded to 4 x 4, and their heights/widths.

    Returns masks (6, 4, 2, 4, 4) bool, heights (6, 4, 2) and widths (6, 4, 2) in blocks. Index 0 of the
    class axis is unused; classes that are not mirrored repeat the unmirrored variant under mirror = 1.
    """
    masks = np.zeros((6, 4, 2, 4, 4), dtype=bool)
    heights = np.ones((6, 4, 2), dtype=np.int64)
    widths = np.ones((6, 4, 2), dtype=np.int64)
    for label, base in BASE_SHAPES.items():
        base = np.array(base, dtype=bool)
        for mirror in (0, 1):
            shape = np.fliplr(base) if mirror and label in MIRRORED_CLASSES else base
            for k in range(4):
                rotated = np.rot90(shape, k)
                h, w = rotated.shape
                masks[label, k, mirror, :h, :w] = rotated
                heights[label, k, mirror], widths[label, k, mirror] = h, w
    return masks, heights, widths


def draw_piece_labels(rng: np.random.Generator, n_images: int) -> np.ndarray:
    """Piece classes per image as (n_images, 5) with 0 for unused slots (piece-count rule above)."""
    counts = rng.integers(1, MAX_PIECES + 1, size=n_images)
    labels = np.zeros((n_images, MAX_PIECES), dtype=np.int64)
    for count in range(1, MAX_PIECES + 1):
        rows = np.flatnonzero(counts == count)
        if rows.size == 0:
            continue
        copies = math.ceil((count + 1) / 5)
        pool = np.tile(np.arange(1, 6), copies)
        order = np.argsort(rng.random((rows.size, pool.size)), axis=1)  # one shuffle per image
        labels[rows, :count] = pool[order[:, :count]]
    return labels


def block_pattern(block_scale: int) -> np.ndarray:
    """(s, s) bool map of one block: True on the 1-px outer ring, False on the interior."""
    ring = np.ones((block_scale, block_scale), dtype=bool)
    if block_scale > 2:
        ring[1:-1, 1:-1] = False
    return ring


def generate_tetrominoes(
    n_images: int,
    rng: np.random.Generator,
    canvas_size: int = 64,
    block_scale: int = 7,
    return_pieces: bool = False,
):
    """Draw `n_images` images (N, S, S, 3) uint8 and masks (N, S, S) uint8, vectorised over images.

    With `return_pieces`, also return the piece classes per image as (N, 5), 0 for unused slots.
    """
    masks_table, heights_table, widths_table = shape_table()
    span = 4 * block_scale
    if canvas_size <= span:
        raise ValueError(
            f"canvas_size={canvas_size} is too small for block_scale={block_scale}: an I piece is {span} px "
            f"long and needs a canvas of at least {span + 1} px; raise canvas_size or lower block_scale."
        )
    ring = block_pattern(block_scale)

    images = np.zeros((n_images, canvas_size, canvas_size, 3), dtype=np.uint8)
    masks = np.zeros((n_images, canvas_size, canvas_size), dtype=np.uint8)
    piece_labels = draw_piece_labels(rng, n_images)
    offsets = np.arange(span)

    for slot in range(MAX_PIECES):
        rows = np.flatnonzero(piece_labels[:, slot] > 0)
        if rows.size == 0:
            continue
        labels = piece_labels[rows, slot]
        rotation = rng.integers(0, 4, size=rows.size)
        mirror = (rng.random(rows.size) < 0.5).astype(np.int64)
        colour = rng.integers(0, 256, size=(rows.size, 3)).astype(np.uint8)
        height = heights_table[labels, rotation, mirror] * block_scale
        width = widths_table[labels, rotation, mirror] * block_scale

        # Rejection sampling of the top-left corner, all images at once: a summed-area table of the
        # occupancy gives in O(1) whether a bounding box is still empty.
        occupied = (masks[rows] > 0).astype(np.int32)
        summed = np.zeros((rows.size, canvas_size + 1, canvas_size + 1), dtype=np.int32)
        summed[:, 1:, 1:] = occupied.cumsum(1).cumsum(2)
        top = np.zeros(rows.size, dtype=np.int64)
        left = np.zeros(rows.size, dtype=np.int64)
        pending = np.arange(rows.size)
        for _ in range(MAX_PLACEMENT_ROUNDS):
            if pending.size == 0:
                break
            r = (rng.random(pending.size) * (canvas_size - height[pending])).astype(np.int64)
            q = (rng.random(pending.size) * (canvas_size - width[pending])).astype(np.int64)
            r2, q2 = r + height[pending], q + width[pending]
            s = summed[pending]
            idx = np.arange(pending.size)
            filled = s[idx, r2, q2] - s[idx, r, q2] - s[idx, r2, q] + s[idx, r, q]
            free = filled == 0
            top[pending[free]], left[pending[free]] = r[free], q[free]
            pending = pending[~free]
        if pending.size:
            # Only tiny canvases get here: drop the pieces that found no free box.
            log.warning(
                "dropped %d of %d pieces that found no free position in %d tries (canvas %d px)",
                pending.size,
                rows.size,
                MAX_PLACEMENT_ROUNDS,
                canvas_size,
            )
            piece_labels[rows[pending], slot] = 0
            keep = np.ones(rows.size, dtype=bool)
            keep[pending] = False
            rows, labels, rotation, mirror, colour = (
                rows[keep],
                labels[keep],
                rotation[keep],
                mirror[keep],
                colour[keep],
            )
            top, left = top[keep], left[keep]

        # Paint: expand each piece's 4 x 4 block mask to pixels and write label and colours.
        block_mask = masks_table[labels, rotation, mirror]  # (n, 4, 4)
        pixel_mask = block_mask.repeat(block_scale, axis=1).repeat(block_scale, axis=2)  # (n, span, span)
        ring_mask = np.tile(ring, (4, 4))
        ring_colour = colour + colour // 2  # uint8 arithmetic wraps modulo 256
        n_index, di, dj = np.nonzero(pixel_mask)
        image_index = rows[n_index]
        pr, pc = top[n_index] + offsets[di], left[n_index] + offsets[dj]
        masks[image_index, pr, pc] = labels[n_index]
        on_ring = ring_mask[di, dj]
        images[image_index, pr, pc] = np.where(on_ring[:, None], ring_colour[n_index], colour[n_index])
    if return_pieces:
        return images, masks, piece_labels
    return images, masks


class TetrominoesDataset(Dataset):
    """Float images (3, S, S) in [0, 1] and int64 masks (S, S) from uint8 arrays, fetched in batches."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images = torch.from_numpy(images)
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].permute(0, 3, 1, 2).float().div_(255.0)
        masks = self.masks[index].long()
        return list(zip(images, masks, strict=True))


def image_digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images}


class TetrominoesDataModule(CachedSplitsMixin, LightningDataModule):
    """Tetrominoes segmentation (6 classes) generated once and cached under `data_dir`.

    Args:
        data_dir: folder for the cache (default: $DYNLAB_DATA, else ./data).
        canvas_size: image side S in pixels (64 in the published set).
        block_scale: pixels per tetris block (7 in the published set); smaller values give tiny variants.
        n_train, n_val, n_test: split sizes.
        seed: seed of the data generator, independent of the global training seed.
        subset: keep at most this many images per split.
        batch_size: images per batch for every split.
        num_workers: DataLoader worker processes.
    """

    dataset_class = TetrominoesDataset

    num_classes = len(CLASS_NAMES)
    in_channels = 3

    def __init__(
        self,
        data_dir: str | None = None,
        canvas_size: int = 64,
        block_scale: int = 7,
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        seed: int = 42,
        subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if block_scale < 1:
            raise ValueError(
                f"block_scale={block_scale} is invalid: use a positive number of pixels per block."
            )
        if canvas_size <= 4 * block_scale:
            raise ValueError(
                f"canvas_size={canvas_size} is too small for block_scale={block_scale}: use a canvas larger "
                f"than {4 * block_scale} px (the length of an I piece)."
            )
        self.data_dir = resolve_data_dir(data_dir)
        self.image_size = canvas_size
        self.splits: dict[str, TetrominoesDataset] = {}

    @property
    def cache_file(self) -> Path:
        h = self.hparams
        name = f"s{h.canvas_size}_b{h.block_scale}_n{h.n_train}-{h.n_val}-{h.n_test}_seed{h.seed}.npz"
        return self.data_dir / "tetrominoes" / name

    def prepare_data(self) -> None:
        if self.cache_file.is_file():
            return
        h = self.hparams
        rng = np.random.default_rng(h.seed)
        arrays = {}
        for split, n in (("train", h.n_train), ("val", h.n_val), ("test", h.n_test)):
            arrays[f"{split}_images"], arrays[f"{split}_masks"] = generate_tetrominoes(
                n, rng, h.canvas_size, h.block_scale
            )
        seen = image_digests(arrays["train_images"]) | image_digests(arrays["val_images"])
        duplicates = len(image_digests(arrays["test_images"]) & seen)
        if duplicates:
            raise RuntimeError(
                f"{duplicates} test images equal a train or validation image: pick another data seed."
            )
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self.cache_file)
        log.info("generated Tetrominoes %s", self.cache_file)
