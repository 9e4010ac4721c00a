"""`ViTClassifier`: a small timm ViT trained from scratch, with stochastic depth and LayerScale options."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.trajectory import Trajectory
from lightning_modules.vit import backbone


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Return the learning rate at `step`: linear from 0 to `peak` over `warmup` steps, cosine to `final`."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to `max_shift` pixels, filling with the edge values."""
    if max_shift <= 0:
        return images
    padded = F.pad(images, [max_shift] * 4, mode="replicate")
    height, width = images.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    shifted = [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets.tolist())]
    return torch.stack(shifted)


class ViTClassifier(LightningModule):
    """Image classifier on a timm VisionTransformer (cls-token pooling).

    Args:
        num_classes, image_size, in_channels: set by the DataModule through the CLI links.
        patch_size: side of the square patches in pixels.
        embed_dim, depth, num_heads, mlp_ratio: transformer width, number of blocks, heads and MLP ratio.
        reg_tokens: number of register tokens (DINOv2-style).
        init_values: LayerScale initial value (None disables LayerScale).
        drop_path_rate: stochastic depth. The same rate for every block, not timm's linear ramp, so that a
            study over this rate changes every layer alike.
        lr, weight_decay, warmup_fraction, min_lr: AdamW with linear warm-up over this fraction of the
            steps, then cosine decay to min_lr.
        label_smoothing: cross-entropy label smoothing.
        augment_shift: random translation of training images by up to this many pixels (0 disables).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 16,
        in_channels: int = 3,
        patch_size: int = 4,
        embed_dim: int = 48,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        reg_tokens: int = 0,
        init_values: float | None = 1e-2,
        drop_path_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.0,
        augment_shift: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}: pick a patch size "
                "that "
                "divides the image size."
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} is invalid: use a value in [0, 1).")
        self.model = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            reg_tokens=reg_tokens,
            init_values=init_values,
            global_pool="token",
            drop_path_rate=0.0,
        )
        self.set_drop_path(drop_path_rate)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def set_drop_path(self, rate: float) -> None:
        """Give every block the same stochastic-depth rate."""
        from timm.layers import DropPath

        for block in self.model.blocks:
            block.drop_path1 = DropPath(rate) if rate > 0 else torch.nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else torch.nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def _step(self, batch, stage: str) -> Tensor:
        images, labels = batch
        if stage == "train":
            images = random_shift(images, self.hparams.augment_shift)
        logits = self(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0
        )
        metric = getattr(self, f"{stage}_acc")
        metric(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.dim() < 2 or "token" in name or "pos_embed" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, hp.lr, hp.min_lr) / hp.lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def trajectory(self, batch) -> Trajectory:
        """Return the token states a_0..a_L of a batch, with a rollout from any layer and the model's head."""
        images, labels = batch
        images = images.to(self.device)
        states = torch.stack(backbone.hidden_states(self.model, images), dim=1)
        n_layers = backbone.depth(self.model)

        def rollout(state: Tensor, layer: int) -> Tensor:
            with torch.no_grad():
                rest = backbone.run_blocks(self.model, state, layer, n_layers)
            return torch.stack([state, *rest], dim=1)

        def classify(state: Tensor) -> Tensor:
            with torch.no_grad():
                return backbone.head_logits(self.model, state)

        return Trajectory(
            states=states,
            token_groups=backbone.token_groups(self.model, states.shape[2]),
            labels=labels,
            boundaries=[],
            rollout=rollout,
            classify=classify,
        )
