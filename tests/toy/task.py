"""A tiny classification task used only to test the framework (CLI, run folders, resume)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import TensorDataset

from datamodules.base import make_loader


class ToyData(LightningDataModule):
    """Gaussian blobs in `dim` dimensions, one per class."""

    def __init__(
        self,
        num_classes: int = 3,
        dim: int = 4,
        n: int = 96,
        batch_size: int = 8,
        subset: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        n = min(n, subset) if subset else n
        labels = torch.arange(n) % num_classes
        centers = torch.randn(num_classes, dim, generator=generator) * 3
        x = centers[labels] + torch.randn(n, dim, generator=generator)
        self.train_set = TensorDataset(x, labels)
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self):
        return make_loader(self.train_set, self.batch_size, shuffle=True, seed=self.seed, drop_last=True)

    def val_dataloader(self):
        return make_loader(self.train_set, self.batch_size, shuffle=False, split="val")

    def test_dataloader(self):
        return make_loader(self.train_set, self.batch_size, shuffle=False, split="test")


class ToyClassifier(LightningModule):
    """An MLP with dropout, so that a resumed run only matches when the RNG state is restored."""

    def __init__(
        self,
        num_classes: int = 2,
        in_features: int = 4,
        hidden: int = 16,
        dropout: float = 0.2,
        lr: float = 0.05,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
