"""WaveSegmenter: semantic segmentation where spatial context travels as waves through an oscillator grid."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.trajectory import Trajectory
from lightning_modules.waves.layers import check_readout
from lightning_modules.waves.metrics import SegmentationMetrics
from lightning_modules.waves.networks import ConvLSTMNetwork, LocalCNN, UNet, WaveNetwork, check_backbone

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


class WaveSegmenter(LightningModule):
    """Per-pixel classifier on top of a wave rollout (or a baseline backbone), trained with pixel-wise CE.

    Args:
        num_classes: classes including background (from the DataModule).
        in_channels: image channels (from the DataModule).
        image_size: image side in pixels (from the DataModule); used for figures only.
        backbone: `wave` (the oscillator network), `convlstm`, `cnn` (local CNN) or `unet`.
        channels: hidden channels C of the wave grid or the ConvLSTM.
        steps: rollout length T (the ConvLSTM baseline uses 20 in the published runs).
        dt: Euler time step of the wave cell.
        readout: temporal readout `fft`, `linear`, `last`, `mean` or `max` (wave and convlstm).
        head_widths: hidden widths of the per-pixel MLP head (wave, convlstm, cnn).
        encoder_width: width of the 3x3 conv encoders.
        cnn_layers: depth L of the local CNN (receptive field 2L + 1 px).
        cnn_features: width of the local CNN's 1x1 projection in front of the head.
        unet_width: base width c of the U-Net.
        lr: Adam learning rate.
        rollout_chunk: steps per recomputation chunk in the wave cell's backward pass.
    """

    def __init__(
        self,
        num_classes: int = 6,
        in_channels: int = 3,
        image_size: int = 64,
        backbone: str = "wave",
        channels: int = 2,
        steps: int = 100,
        dt: float = 0.1,
        readout: str = "linear",
        head_widths: list[int] = (256, 256, 256),
        encoder_width: int = 16,
        cnn_layers: int = 8,
        cnn_features: int = 98,
        unet_width: int = 2,
        lr: float = 1e-3,
        rollout_chunk: int = 10,
    ):
        super().__init__()
        check_backbone(backbone)
        check_readout(readout)
        head_widths = [int(w) for w in head_widths]  # saved as this plain list, not the tuple default
        # No argument: Lightning then also records the CLI's class path, which `--ckpt_path` runs need.
        self.save_hyperparameters()
        if backbone == "wave":
            self.net: nn.Module = WaveNetwork(
                in_channels,
                num_classes,
                channels,
                steps,
                dt,
                readout,
                head_widths,
                encoder_width,
                rollout_chunk,
            )
        elif backbone == "convlstm":
            self.net = ConvLSTMNetwork(
                in_channels, num_classes, channels, steps, readout, head_widths, encoder_width
            )
        elif backbone == "cnn":
            self.net = LocalCNN(
                in_channels, num_classes, cnn_layers, head_widths, encoder_width, cnn_features
            )
        else:
            self.net = UNet(in_channels, num_classes, unet_width)
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.metrics = nn.ModuleDict({stage: SegmentationMetrics(num_classes) for stage in ("val", "test")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # ------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = F.cross_entropy(self(images), masks)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                "the run stops here and checkpoints/last.ckpt contains the last good state. Lower "
                "--model.init_args.lr or --model.init_args.dt and start again."
            )
        self.log("train/loss", loss, prog_bar=True)
        if isinstance(self.net, WaveNetwork) and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/coupling_norm", self.net.cell.coupling.detach().norm())
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, masks = batch
        logits = self(images)
        self.losses[stage].update(F.cross_entropy(logits, masks, reduction="none").flatten(1).mean(1))
        self.metrics[stage].update(logits, masks)

    def _eval_epoch_end(self, stage: str) -> None:
        values = {f"{stage}/loss": self.losses[stage].compute()}
        values.update({f"{stage}/{name}": value for name, value in self.metrics[stage].compute().items()})
        fg_iou = values.pop(f"{stage}/fg_iou")
        self.log_dict(values, sync_dist=True)
        self.log(f"{stage}/fg_iou", fg_iou, prog_bar=True, sync_dist=True)
        self.losses[stage].reset()
        self.metrics[stage].reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------ analysis
    def final_report(self) -> dict[str, float | str]:
        report: dict[str, float | str] = {
            "backbone": self.hparams.backbone,
            "parameters": float(sum(p.numel() for p in self.parameters())),
        }
        if isinstance(self.net, WaveNetwork):
            report["coupling_norm"] = float(self.net.cell.coupling.detach().norm())
            report["coupling_norm_at_init"] = 2.0 * math.sqrt(
                5.0 * self.hparams.channels
            )  # |Laplacian| per channel
        return report

    @torch.no_grad()
    def hidden_states(self, images: torch.Tensor) -> torch.Tensor:
        """States y_0 .. y_T (wave) or hy_0 .. hy_T (ConvLSTM), time-major (T + 1, B, C, H, W)."""
        if isinstance(self.net, WaveNetwork):
            y0, omega, alpha = self.net.encode(images)
            return torch.cat([y0.float()[None], self.net.cell(y0, omega, alpha)])
        if isinstance(self.net, ConvLSTMNetwork):
            return torch.cat([self.net.hy0_encoder(images)[None], self.net.rollout(images)])
        raise TypeError(
            f"backbone={self.hparams.backbone!r} has no hidden states over time; use wave or convlstm."
        )

    @torch.no_grad()
    def trajectory(self, batch) -> Trajectory:
        """Wave state y_0 .. y_T with pixels as tokens and hidden channels as features.

        `rollout(state, l)` continues from a position field at step l, keeping the velocity z_l and the
        encoded omega and alpha of the unperturbed run, so it measures how a position perturbation spreads.
        """
        if not isinstance(self.net, WaveNetwork):
            raise TypeError(
                f"trajectory needs backbone='wave'; this model has backbone={self.hparams.backbone!r}."
            )
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        batch_size, _, height, width = images.shape
        cell = self.net.cell
        y0, omega, alpha = (t.float() for t in self.net.encode(images))
        y, z = y0, torch.zeros_like(y0)
        positions, velocities = [y], [z]
        for _ in range(cell.steps):
            y, z = cell.step(y, z, omega, alpha)
            positions.append(y)
            velocities.append(z)

        def to_tokens(field: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H*W, C)
            return field.flatten(2).transpose(1, 2)

        def from_tokens(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.transpose(1, 2).reshape(batch_size, cell.channels, height, width)

        def rollout(state: torch.Tensor, start: int) -> torch.Tensor:
            y_state, z_state = from_tokens(state), velocities[start]
            out = [state]
            for _ in range(start, cell.steps):
                y_state, z_state = cell.step(y_state, z_state, omega, alpha)
                out.append(to_tokens(y_state))
            return torch.stack(out, dim=1)

        states = torch.stack([to_tokens(p) for p in positions], dim=1)
        return Trajectory(
            states=states,
            token_groups={"pixel": torch.arange(height * width)},
            rollout=rollout,
        )
