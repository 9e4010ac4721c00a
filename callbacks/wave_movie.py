"""Wave movies: the hidden state of a few fixed validation images over time, and each pixel's spectrum.

At the end of training (and every `every_n_epochs` validation epochs when that is positive) the callback
rolls the model out on the first `num_images` validation images and writes
- `figures/wave_movie[_epochNNN].gif`: input, label map and channel 0 of the state at every step;
- `figures/wave_spectrum[_epochNNN].png`: |rfft| over time of each pixel, averaged per class, and the
  spectrum at one pixel of each class;
and logs both to wandb when the logger is a WandbLogger. It needs a model with `hidden_states(images)`
returning (T, B, C, H, W); models without it are skipped with one log line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def state_frames(states: np.ndarray, images: np.ndarray, masks: np.ndarray, scale: int) -> list[np.ndarray]:
    """RGB frames (H', W', 3) uint8: per image a column of input, label map and the state at step t."""
    from matplotlib import colormaps

    steps = states.shape[0]
    limit = float(np.abs(states).max()) or 1.0
    wave_map, label_map = colormaps["RdBu_r"], colormaps["tab10"]
    inputs = (
        images.transpose(0, 2, 3, 1)
        if images.shape[1] == 3
        else np.repeat(images.transpose(0, 2, 3, 1), 3, -1)
    )
    labels = label_map(masks % 10)[..., :3]
    frames = []
    for t in range(steps):
        wave = wave_map(0.5 + 0.5 * states[t] / limit)[..., :3]  # (B, H, W, 3)
        columns = [np.concatenate([inputs[b], labels[b], wave[b]], axis=0) for b in range(states.shape[1])]
        frame = (np.concatenate(columns, axis=1) * 255).astype(np.uint8)
        frames.append(frame.repeat(scale, 0).repeat(scale, 1))
    return frames


class WaveMovie(Callback):
    """Write a GIF of the hidden state and a spectrum figure for fixed validation images.

    Args:
        num_images: how many validation images (the first ones of the split).
        every_n_epochs: also write them every n validation epochs; 0 writes them only at the end of fit.
        channel: hidden channel shown in the movie.
        frame_ms: duration of one GIF frame in milliseconds.
        scale: pixel upscaling of the GIF frames.
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 0,
        channel: int = 0,
        frame_ms: int = 80,
        scale: int = 3,
    ):
        self.num_images, self.every_n_epochs, self.channel = num_images, every_n_epochs, channel
        self.frame_ms, self.scale = frame_ms, scale

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.render(trainer, pl_module, suffix=f"_epoch{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.render(trainer, pl_module, suffix="")

    @rank_zero_only
    def render(self, trainer: Trainer, pl_module: LightningModule, suffix: str) -> None:
        if not hasattr(pl_module, "hidden_states"):
            log.info("wave movie skipped: %s has no hidden_states()", type(pl_module).__name__)
            return
        images, masks = self.fixed_batch(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            states = pl_module.hidden_states(images.to(pl_module.device))
        except TypeError as error:  # a backbone without states over time (cnn, unet)
            log.info("wave movie skipped: %s", error)
            return
        finally:
            pl_module.train(was_training)
        states = states.float().cpu()
        figures = Path(trainer.default_root_dir) / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        movie = figures / f"wave_movie{suffix}.gif"
        spectrum = figures / f"wave_spectrum{suffix}.png"
        self.write_movie(states[:, :, self.channel].numpy(), images.numpy(), masks.numpy(), movie)
        self.write_spectrum(states, masks, spectrum)
        self.log_to_wandb(trainer, movie, spectrum)

    def fixed_batch(self, trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = trainer.datamodule.val_dataloader().dataset
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        return torch.stack([image for image, _ in items]), torch.stack([mask for _, mask in items])

    def write_movie(self, states: np.ndarray, images: np.ndarray, masks: np.ndarray, path: Path) -> None:
        from PIL import Image

        frames = [Image.fromarray(frame) for frame in state_frames(states, images, masks, self.scale)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=self.frame_ms, loop=0)

    @staticmethod
    def write_spectrum(states: torch.Tensor, masks: torch.Tensor, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # |rfft| over time of y_1..y_T per pixel, summed over channels: (K, B, H, W).
        spectra = torch.fft.rfft(states[1:], dim=0).abs().sum(2).numpy()
        labels = masks.numpy()
        fig, (ax_mean, ax_pixel) = plt.subplots(1, 2, figsize=(10, 3.5))
        for label in np.unique(labels):
            where = labels == label
            ax_mean.plot(spectra[:, where].mean(1), label=f"class {label}")
            b, r, q = np.argwhere(where)[len(np.argwhere(where)) // 2]
            ax_pixel.plot(spectra[:, b, r, q], label=f"class {label} at ({r}, {q}) of image {b}")
        ax_mean.set(title="mean |rfft| of the state per class", xlabel="frequency bin", yscale="log")
        ax_pixel.set(title="|rfft| at one pixel per class", xlabel="frequency bin", yscale="log")
        ax_mean.legend(fontsize=7)
        ax_pixel.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    @staticmethod
    def log_to_wandb(trainer: Trainer, movie: Path, spectrum: Path) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in loggers:
            import wandb

            logger.experiment.log(
                {
                    "waves/movie": wandb.Video(str(movie)),
                    "waves/spectrum": wandb.Image(str(spectrum)),
                    "trainer/global_step": trainer.global_step,
                }
            )
