"""Timing and hardware helpers that every task's benchmark shares.

Each task module in this package defines `run(quick: bool) -> list[BenchRow]`; `python -m benchmarks`
collects the rows, prints them and writes docs/BENCHMARKS.md. Ratios are always measured side by side in
one process, so machine noise affects both sides alike.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BenchRow:
    """One measured figure, with what it is compared against where there is a reference."""

    task: str
    name: str
    value: float
    unit: str
    reference: str = ""  # the figure this one is compared with, as text (e.g. "6.2 img/s, reference code")
    goal: str = ""  # the target, as text (e.g. ">= 0.95")
    note: str = ""


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5
) -> dict[str, float]:
    """Median wall time per function, timed in alternation so slow drifts of the machine hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_trainer(max_epochs: int = 1, **overrides: Any):
    """Return a CPU Lightning Trainer that only trains: no logger, checkpoints, progress bar or validation."""
    from lightning.pytorch import Trainer

    settings: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return Trainer(**{**settings, **overrides})


def loader_rate(loader: Iterable, max_batches: int = 20) -> float:
    """Return the samples per second that `loader` yields over up to `max_batches` batches, after one untimed batch.

    The batch size is read from the first tensor of each batch, so the loader must yield tuples or lists
    whose first element has the samples along dimension 0.
    """
    batches = iter(loader)
    next(batches)
    samples, start = 0, time.perf_counter()
    for batch in itertools.islice(batches, max_batches):
        samples += len(batch[0])
    return samples / (time.perf_counter() - start)


def loader_row(task: str, loader_samples_per_s: float, model_samples_per_s: float, unit: str, note: str) -> BenchRow:
    """Return a row with the data loader's rate over the training step's; above 1 the loader keeps up."""
    return BenchRow(
        task,
        "data loader / training consumption",
        loader_samples_per_s / model_samples_per_s,
        "x",
        reference=f"{loader_samples_per_s:.4g} vs {model_samples_per_s:.4g} {unit}",
        goal="> 1 (never the bottleneck)",
        note=note,
    )


def copy_bandwidth_gbs(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured memory copy bandwidth in GB/s (read + write bytes per second) for a large tensor copy."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), warmup=1, repeats=repeats)
    src = dst = None  # free the buffers before the caller's own measurements
    gc.collect()
    return 2 * n_bytes / seconds / 1e9


def peak_rss_mib() -> float:
    """Return the peak resident memory of this process so far, in MiB.

    Linux's VmHWM starts afresh in each new program, whereas ru_maxrss of a spawned child starts from the
    parent's peak, so a child would report at least its parent's figure.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_and_measure(fn: Callable[..., object], args: tuple) -> float:
    fn(*args)
    return peak_rss_mib()


def peak_rss_in_fresh_process(fn: Callable[..., object], *args: object) -> float:
    """Run `fn(*args)` in a new Python process and return that process's peak resident MiB.

    `fn` must be importable by name (a module-level function), as multiprocessing's spawn requires.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_run_and_measure, (fn, args))


def hardware_line() -> str:
    """One line naming the CPU or GPU, the thread count and the torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {device}, "
        f"torch {torch.__version__}"
    )
