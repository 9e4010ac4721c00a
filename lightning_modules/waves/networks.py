"""The segmentation networks as plain nn.Modules: the wave network and its three baselines.

Every network maps images (B, c_in, H, W) to logits (B, classes, H, W). Layer shapes follow the published
models so parameter counts match: wave network C=2 on Tetrominoes 176,124 (linear or fft readout),
ConvLSTM C=2, T=20 151,046, local CNN L=2 159,502, U-Net c=2 with 11 classes 30,745.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.waves.cell import WaveCell
from lightning_modules.waves.layers import PixelHead, TemporalReadout, channels_last, conv_stack

BACKBONES = ("wave", "convlstm", "cnn", "unet")


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is invalid: choose one of {', '.join(BACKBONES)}.")


class WaveNetwork(nn.Module):
    """Encoders for y0, omega and alpha, the wave cell, a temporal readout and the per-pixel head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int,
        steps: int,
        dt: float,
        readout: str,
        head_widths: list[int],
        encoder_width: int = 16,
        rollout_chunk: int = 10,
    ):
        super().__init__()
        self.omega_encoder = conv_stack(in_channels, encoder_width, channels, 3, nn.ReLU())
        self.alpha_encoder = conv_stack(in_channels, encoder_width, channels, 3, nn.ReLU())
        self.y0_encoder = conv_stack(in_channels, encoder_width, channels, 4, nn.Tanh())
        self.cell = WaveCell(channels, steps, dt, chunk=rollout_chunk)
        self.readout = TemporalReadout(readout, steps, channels)
        self.head = PixelHead(self.readout.out_features, head_widths, num_classes)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return y0 in (-1, 1), omega >= 0 and alpha >= 0, each (B, C, H, W)."""
        images = channels_last(images)
        return self.y0_encoder(images), self.omega_encoder(images), self.alpha_encoder(images)

    def rollout(self, images: torch.Tensor) -> torch.Tensor:
        """Positions y_1 .. y_T, time-major (T, B, C, H, W), float32."""
        return self.cell(*self.encode(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        return self.head(self.readout(self.rollout(images)), batch, height, width)


class ConvLSTMNetwork(nn.Module):
    """Autonomous ConvLSTM baseline: encoded initial state, T steps with no input, same readouts and head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int,
        steps: int,
        readout: str,
        head_widths: list[int],
        encoder_width: int = 16,
    ):
        super().__init__()
        self.steps = steps
        self.hy0_encoder = conv_stack(in_channels, encoder_width, channels, 4, nn.Tanh())
        self.hz0_encoder = conv_stack(in_channels, encoder_width, channels, 3, None)
        self.c0_encoder = conv_stack(in_channels, encoder_width, channels, 3, None)
        self.gates = nn.Conv2d(2 * channels, 4 * channels, kernel_size=3, bias=True)  # padded circularly
        self.output_mlp = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1), nn.ReLU(), nn.Conv2d(2 * channels, channels, 1)
        )
        self.readout = TemporalReadout(readout, steps, channels)
        self.head = PixelHead(self.readout.out_features, head_widths, num_classes)

    def rollout(self, images: torch.Tensor) -> torch.Tensor:
        """hy_1 .. hy_T, time-major (T, B, C, H, W)."""
        images = channels_last(images)
        hy, hz, cell = self.hy0_encoder(images), self.hz0_encoder(images), self.c0_encoder(images)
        history = []
        for _ in range(self.steps):
            gates = self.gates(F.pad(torch.cat([hy, hz], dim=1), (1, 1, 1, 1), mode="circular"))
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hz = torch.sigmoid(o) * torch.tanh(cell)
            hy = self.output_mlp(hz)
            history.append(hy)
        return torch.stack(history)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        return self.head(self.readout(self.rollout(images)), batch, height, width)


class LocalCNN(nn.Module):
    """L 3x3 convolutions (receptive field 2L + 1), a 1x1 projection 2 -> `features`, then the pixel head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        layers: int,
        head_widths: list[int],
        width: int = 16,
        features: int = 98,
    ):
        super().__init__()
        if layers < 2:
            raise ValueError(f"cnn_layers={layers} is invalid: the local CNN needs at least 2 layers.")
        self.stack = conv_stack(in_channels, width, 2, layers, nn.ReLU())
        self.projection = nn.Conv2d(2, features, kernel_size=1)
        self.head = PixelHead(features, head_widths, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        features = self.projection(self.stack(channels_last(images)))
        rows = features.permute(0, 2, 3, 1).reshape(batch * height * width, -1)
        return self.head(rows, batch, height, width)


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class UNet(nn.Module):
    """Four-level U-Net with widths c, 2c, 4c, 8c, 16c, max-pool down and transposed-conv up.

    Image sides must be divisible by 16.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        widths = [width * 2**level for level in range(5)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in reversed(range(4))
        )
        self.up_convs = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % 16 or images.shape[-2] % 16:
            raise ValueError(f"the U-Net needs image sides divisible by 16; got {tuple(images.shape[-2:])}.")
        skips = [self.inc(images)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.outc(x)
