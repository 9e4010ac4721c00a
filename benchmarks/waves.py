"""Wave segmenter benchmarks: Lightning vs a bare loop, the wave cell's memory traffic, fast vs naive cell.

Figures (all measured in this process unless noted):
- images/s of `trainer.fit` on fixed batches against a bare PyTorch loop (forward, cross-entropy,
  backward, Adam) on the same model and batches, timed in alternation. The ratio is the framework cost.
- the wave cell's achieved memory traffic during a forward + backward rollout, counting the bytes an ideal
  fused kernel must move (see `ideal_rollout_bytes`), against `copy_bandwidth_gbs()` measured in the same run;
- training images/s of the full model with the fast cell and with a naive step-by-step autograd cell at the
  published size (T = 100, C = 2, MLP 256-256-256) and at T = 50 with MLP 64-64-64, batch 64, 64 x 64 RGB,
  beside the reference figures of the published code on a 2-core CPU (6.2 and 19.2 images/s), and the peak
  resident memory of one training step of each, measured in a fresh subprocess.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    BenchRow,
    bench_trainer,
    copy_bandwidth_gbs,
    interleaved_medians,
    loader_rate,
    loader_row,
    peak_rss_in_fresh_process,
)
from lightning_modules.waves import WaveSegmenter
from lightning_modules.waves.cell import WaveRollout, circular_conv3x3
from lightning_modules.waves.native import fused_kernels

TASK = "waves"
# Published code, full training step, 2-core AMD EPYC, torch 2.14.1, 2 threads, batch 64 (images/s).
REFERENCE_IMAGES_PER_S = {"T=100, MLP 256^3": 6.2, "T=50, MLP 64^3": 19.2}
CONFIGS = {
    "T=100, MLP 256^3": dict(steps=100, head_widths=[256, 256, 256]),
    "T=50, MLP 64^3": dict(steps=50, head_widths=[64, 64, 64]),
}


def naive_rollout(y0, omega, alpha, weight, steps: int, dt: float) -> torch.Tensor:
    """Step-by-step rollout through autograd, time-major; the baseline the fast cell is compared with."""
    y, z = y0, torch.zeros_like(y0)
    history = []
    for _ in range(steps):
        z = z + dt * (torch.tanh(circular_conv3x3(y, weight)) - omega * y - alpha * z)
        y = y + dt * z
        history.append(y)
    return torch.stack(history)


def use_naive_cell(model: WaveSegmenter) -> WaveSegmenter:
    cell = model.net.cell
    cell.forward = lambda y0, omega, alpha: naive_rollout(
        y0, omega, alpha, cell.coupling, cell.steps, cell.dt
    )
    return model


def make_batches(n: int, batch: int, size: int, channels: int = 3, classes: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch, channels, size, size, generator=generator),
            torch.randint(0, classes, (batch, size, size), generator=generator),
        )
        for _ in range(n)
    ]


def bare_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for images, masks in batches:
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def lightning_vs_bare(quick: bool) -> list[BenchRow]:

    batch, size = (32, 32) if quick else (64, 32)
    batches = make_batches(3 if quick else 6, batch, size)
    torch.manual_seed(0)
    model = WaveSegmenter(steps=40, dt=0.2, head_widths=[64, 64, 64])
    bare_model = copy.deepcopy(model.net)
    optimizer = torch.optim.Adam(bare_model.parameters(), lr=1e-3)

    def lightning_epoch():
        trainer = bench_trainer()
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))  # yields the fixed batches

    times = interleaved_medians(
        {"lightning": lightning_epoch, "bare": lambda: bare_epoch(bare_model, optimizer, batches)},
        warmup=1,
        repeats=3 if quick else 5,
    )
    images = batch * len(batches)
    lightning_rate, bare_rate = images / times["lightning"], images / times["bare"]
    setting = f"T=40, MLP 64^3, {size}x{size}, batch {batch}, {len(batches)} batches per fit"

    from datamodules.tetrominoes import TetrominoesDataModule

    data = TetrominoesDataModule(canvas_size=size, block_scale=3, batch_size=batch)  # the task's default data
    data.prepare_data()
    data.setup("fit")
    loader = loader_rate(data.train_dataloader(), max_batches=10 if quick else 40)
    return [
        loader_row(TASK, loader, lightning_rate, "img/s", "default Tetrominoes loader against the fit above"),
        BenchRow(TASK, "Lightning fit throughput", lightning_rate, "img/s", note=setting),
        BenchRow(TASK, "bare PyTorch loop throughput", bare_rate, "img/s", note=setting),
        BenchRow(
            TASK,
            "Lightning / bare throughput",
            lightning_rate / bare_rate,
            "ratio",
            goal=">= 0.95",
            note="Trainer start-up is included in every fit",
        ),
    ]


def ideal_rollout_bytes(batch: int, channels: int, size: int, steps: int) -> int:
    """Return the bytes an ideal fused rollout must move, a lower bound on the real traffic.

    Per step the forward reads y, z, omega and alpha and writes y and z: 6 state-sized fp32 tensors. The
    backward reads y, z, omega, alpha, the incoming gradient and both adjoints, writes both adjoints and
    updates the omega and alpha gradients (12), and recomputes z (2 more): 14 tensors.
    """
    state = batch * channels * size * size * 4
    return (6 + 14) * steps * state


def cell_traffic(quick: bool) -> list[BenchRow]:
    batch, channels, size, steps = (16, 2, 64, 50) if quick else (64, 2, 64, 100)
    generator = torch.Generator().manual_seed(0)
    y0 = (torch.rand(batch, channels, size, size, generator=generator) * 2 - 1).requires_grad_()
    omega = torch.rand(batch, channels, size, size, generator=generator).requires_grad_()
    alpha = (0.2 * torch.rand(batch, channels, size, size, generator=generator)).requires_grad_()
    from lightning_modules.waves.cell import laplacian_kernel

    weight = laplacian_kernel(channels).requires_grad_()
    upstream = torch.randn(steps, batch, channels, size, size, generator=generator)

    def rollout(fused: bool):
        out = WaveRollout.apply(y0, omega, alpha, weight, steps, 0.1, 10, fused)
        torch.autograd.backward(out, upstream)

    def naive():
        out = naive_rollout(y0, omega, alpha, weight, steps, 0.1)
        torch.autograd.backward(out, upstream)

    bandwidth = copy_bandwidth_gbs()
    times = interleaved_medians(
        {"fast": lambda: rollout(True), "torch_ops": lambda: rollout(False), "naive": naive},
        warmup=1,
        repeats=2 if quick else 3,
    )
    achieved = ideal_rollout_bytes(batch, channels, size, steps) / times["fast"] / 1e9
    fused_note = "fused C++ kernels" if fused_kernels() is not None else "fused kernels unavailable: torch ops"
    setting = f"B={batch}, C={channels}, {size}x{size}, T={steps}, forward + backward"
    return [
        BenchRow(TASK, "copy bandwidth", bandwidth, "GB/s", note="one large tensor copy, read + write"),
        BenchRow(
            TASK,
            "wave cell memory traffic",
            achieved,
            "GB/s",
            reference=f"{bandwidth:.1f} GB/s copy",
            note=f"{achieved / bandwidth:.1%} of copy bandwidth; {setting}",
        ),
        BenchRow(
            TASK,
            "wave cell fwd+bwd speed-up over naive autograd cell",
            times["naive"] / times["fast"],
            "x",
            note=f"{fused_note}; {setting}",
        ),
        BenchRow(
            TASK,
            "torch-op cell (same algorithm, no C++) speed-up over naive autograd cell",
            times["naive"] / times["torch_ops"],
            "x",
            note=setting,
        ),
    ]


def training_step_fn(model: WaveSegmenter, batch):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, masks = batch

    def step():
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def head_step_fn(model: WaveSegmenter, batch):
    """Return a callable for the forward and backward of the per-pixel head alone, on rows of its input size."""
    images, masks = batch
    size = images.shape[-1]
    rows = torch.randn(len(images) * size * size, model.net.readout.out_features, requires_grad=True)

    def step():
        logits = model.net.head(rows, len(images), size, size)
        F.cross_entropy(logits, masks).backward()

    return step


def build_model(config: str, naive: bool) -> WaveSegmenter:
    torch.manual_seed(0)
    model = WaveSegmenter(**CONFIGS[config])
    return use_naive_cell(model) if naive else model


def memory_of_steps(config: str, naive: bool, batch: int, threads: int) -> None:
    """Run two training steps of a fresh model (called in a fresh process to measure its peak memory)."""
    torch.set_num_threads(threads)
    model = build_model(config, naive)
    step = training_step_fn(model, make_batches(1, batch, 64)[0])
    step()
    step()


def fast_vs_naive(quick: bool) -> list[BenchRow]:
    batch = 16 if quick else 64
    rows = []
    for config, reference in REFERENCE_IMAGES_PER_S.items():
        data = make_batches(1, batch, 64)[0]
        fast_model = build_model(config, False)
        steps = {
            "fast": training_step_fn(fast_model, data),
            "naive": training_step_fn(build_model(config, True), data),
            "head": head_step_fn(fast_model, data),
        }
        times = interleaved_medians(steps, warmup=1, repeats=1 if quick else 3)
        fast_rate, naive_rate = batch / times["fast"], batch / times["naive"]
        head_share = times["head"] / times["fast"]
        memory = {}
        if not quick:  # at batch 16, the batch of the published code's 2 GB figure
            for name in ("fast", "naive"):
                threads = torch.get_num_threads()
                memory[name] = peak_rss_in_fresh_process(memory_of_steps, config, name == "naive", 16, threads)
        note = f"batch {batch}, 64x64 RGB, linear readout; naive autograd cell {naive_rate:.2f} img/s"
        if memory:
            note += f"; peak RSS at batch 16: fast {memory['fast']:.0f} MiB, naive {memory['naive']:.0f} MiB"
        rows.append(
            BenchRow(
                TASK,
                f"training {config}",
                fast_rate,
                "img/s",
                reference=f"{reference} img/s (published code, batch 64)",
                goal=f">= {3 * reference:.1f} img/s",
                note=note,
            )
        )
        rows.append(
            BenchRow(
                TASK,
                f"per-pixel head alone (fwd+bwd), {config}",
                batch / times["head"],
                "img/s",
                goal=f">= {3 * reference:.1f} img/s",
                note=f"{head_share:.0%} of the training step; the ceiling if all else took no time",
            )
        )
    return rows


def run(quick: bool = False) -> list[BenchRow]:
    start = time.perf_counter()
    rows = lightning_vs_bare(quick) + cell_traffic(quick) + fast_vs_naive(quick)
    rows.append(BenchRow(TASK, "benchmark wall time", time.perf_counter() - start, "s"))
    return rows


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
