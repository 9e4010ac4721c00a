"""HyperSINDy speed: one Lorenz s=10 epoch (batch 250, 40 steps) through Lightning vs a bare PyTorch loop.

Both sides train the same model on the same in-memory data with the same step (forward, loss, backward,
gradient clipping at norm 1.0, AdamW with amsgrad), timed in alternation in one process. The reference
figure is the public HyperSINDy package on a 2-core CPU with 2 threads: 0.68-0.74 s per epoch, of which
0.35 s is the training step itself and the rest its per-sample data loader.

    python -c "from benchmarks.hypersindy import run; [print(r) for r in run(quick=True)]"
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import BenchRow, bench_trainer, loader_rate, loader_row, peak_rss_in_fresh_process

REFERENCE_EPOCH = "0.68-0.74 s/epoch (public package, 2-core EPYC, 2 threads)"


def _build(seed: int = 0):
    from datamodules.sde import SDEDataModule
    from lightning_modules.hypersindy import HyperSINDyModule

    data = SDEDataModule(system="lorenz", noise_scale=10.0, cache=False)
    data.setup("fit")
    torch.manual_seed(seed)
    model = HyperSINDyModule(
        state_dim=3, variable_names=data.variable_names, dt=data.dt, include_constant=False
    )
    model.derivative_mean.copy_(data.derivative_mean)
    model.derivative_std.copy_(data.derivative_std)
    return data, model


def bare_epochs(model, data, n_epochs: int) -> list[float]:
    """Seconds per epoch of a plain PyTorch loop with the same step as the LightningModule."""
    optimizer = model.configure_optimizers()["optimizer"]
    loader = data.train_dataloader()
    model.train()
    times = []
    for epoch in range(n_epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            recon, kl, l0 = model.loss_terms(*batch)
            loss = recon + model.loss_weights.beta * kl + model.loss_weights.lam * l0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def lightning_epochs(model, data, n_epochs: int) -> list[float]:
    """Seconds per training epoch under a Lightning Trainer with the task's settings, minus validation."""
    from lightning.pytorch import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._start)

    timer = EpochTimer()
    trainer = bench_trainer(n_epochs, gradient_clip_val=1.0, callbacks=[timer], deterministic=True)
    trainer.fit(model, datamodule=data)
    return timer.times


def training_epoch() -> None:
    """Train one epoch in a bare loop (called in a fresh process to measure its peak memory)."""
    data, model = _build()
    bare_epochs(model, data, 1)


def trajectory_rate(model, n_samples: int, n_steps: int) -> float:
    """Sampled trajectory steps per second (samples x steps / s), fresh z per sample and step."""
    model.eval()
    x0 = torch.tensor([0.0, 1.0, 1.05])
    start = time.perf_counter()
    model.sample_trajectories(x0, n_steps, n_samples)
    return n_samples * n_steps / (time.perf_counter() - start)


def run(quick: bool = False) -> list[BenchRow]:
    """Time both loops with the process's torch threads (`python -m benchmarks --threads N`; all cores by default)."""
    n_epochs, rounds = (4, 3) if quick else (10, 5)
    bare, framework = [], []
    for _ in range(rounds):  # alternate so drifts of a shared machine hit both sides alike
        data, model = _build()
        bare += bare_epochs(model, data, n_epochs)[1:]
        data, model = _build()
        framework += lightning_epochs(model, data, n_epochs)[1:]
    bare_s = statistics.median(bare)
    framework_s = statistics.median(framework)
    data, model = _build()
    rate_10 = trajectory_rate(model, 10, 500 if quick else 2000)
    rate_250 = trajectory_rate(model, 250, 200 if quick else 1000)
    loader = loader_rate(data.train_dataloader(), max_batches=len(data.train_dataloader()) - 1)
    samples_per_epoch = len(data.train_dataloader()) * data.batch_size
    memory = peak_rss_in_fresh_process(training_epoch)
    return [
        loader_row(
            "hypersindy", loader, samples_per_epoch / framework_s, "samples/s", "in-memory tensors, index batches"
        ),
        BenchRow("hypersindy", "peak resident memory, one training epoch", memory, "MiB", note="fresh process"),
        BenchRow(
            "hypersindy",
            "epoch time, Lightning (Lorenz s=10, batch 250, 40 steps)",
            framework_s,
            "s",
            reference=REFERENCE_EPOCH,
            goal="<= 0.25 s",
        ),
        BenchRow(
            "hypersindy",
            "epoch time, bare PyTorch loop (same model and data)",
            bare_s,
            "s",
            reference="0.35 s/epoch (reference training step alone)",
        ),
        BenchRow(
            "hypersindy", "bare / Lightning epoch-time ratio", bare_s / framework_s, "x", goal=">= 0.95"
        ),
        BenchRow(
            "hypersindy",
            "trajectory sampling, 10 samples",
            rate_10,
            "sample-steps/s",
            note="fresh z per sample and step; no reference figure published",
        ),
        BenchRow("hypersindy", "trajectory sampling, 250 samples", rate_250, "sample-steps/s"),
    ]


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
