"""Encoders, temporal readouts and the per-pixel head shared by the wave model and its baselines."""

from __future__ import annotations

import torch
from torch import nn

READOUTS = ("fft", "linear", "last", "mean", "max")


def conv3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, stride 1, zero padding 1."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)


def conv_stack(
    in_channels: int, width: int, out_channels: int, depth: int, final: nn.Module | None
) -> nn.Sequential:
    """`depth` 3x3 convolutions in -> width -> ... -> out with ReLU between them and `final` at the end.

    Feed it channels-last images (`channels_last`): oneDNN's convolutions with 3 to 16 channels then
    skip a layout conversion per layer, which makes the encoders about a quarter faster on a CPU.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(depth - 1):
        layers += [conv3(channels, width), nn.ReLU(inplace=True)]
        channels = width
    layers.append(conv3(channels, out_channels))
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """Return (B, C, H, W) images stored channels-last, the layout `conv_stack` runs fastest on."""
    return images.contiguous(memory_format=torch.channels_last)


def check_readout(readout: str) -> None:
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r} is invalid: choose one of {', '.join(READOUTS)}.")


def frequency_bins(steps: int) -> int:
    """K = T // 2 + 1, the number of rfft bins and the width of the linear readout."""
    return steps // 2 + 1


class TemporalReadout(nn.Module):
    """Per-pixel features from a time-major rollout (T, B, C, H, W), as rows (B * H * W, features).

    `fft` and `linear` give K * C features ordered frequency-major (index k * C + c); `last`, `mean` and
    `max` give C. The Linear(T -> K, no bias) layer `fc_time` exists for every readout, as in the published
    model, so parameter counts match even where it is unused.
    """

    def __init__(self, readout: str, steps: int, channels: int):
        super().__init__()
        check_readout(readout)
        self.readout = readout
        self.steps, self.channels = steps, channels
        self.fc_time = nn.Linear(steps, frequency_bins(steps), bias=False)

    @property
    def out_features(self) -> int:
        if self.readout in ("fft", "linear"):
            return frequency_bins(self.steps) * self.channels
        return self.channels

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        steps, batch, channels, height, width = states.shape
        if self.readout == "linear":
            flat = states.reshape(steps, -1)
            features = (self.fc_time.weight @ flat).view(-1, batch, channels, height, width)
        elif self.readout == "fft":
            features = torch.fft.rfft(states.float(), dim=0).abs()
        else:
            if self.readout == "last":
                reduced = states[-1]
            elif self.readout == "mean":
                reduced = states.mean(0)
            else:
                reduced = states.amax(0)
            return reduced.permute(0, 2, 3, 1).reshape(-1, channels)
        # (K, B, C, H, W) -> (B, H, W, K, C) -> rows of K * C features, frequency-major.
        return features.permute(1, 3, 4, 0, 2).reshape(batch * height * width, -1)


class PixelHead(nn.Module):
    """MLP applied to every pixel's feature vector with shared weights (equivalent to 1x1 convolutions)."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        features = in_features
        for width in widths:
            # In place: a Linear needs only its input for the backward, so the ReLU may overwrite its output.
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """Map rows (B * H * W, features) to logits (B, classes, H, W)."""
        logits = self.mlp(rows)
        return logits.view(batch, height, width, -1).permute(0, 3, 1, 2)
