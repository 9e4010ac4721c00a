"""Training throughput per task in fp32, bf16-mixed and compiled, side by side in one process.

    python -m benchmarks.precision                      # every task on the GPU (CUDA required)
    python -m benchmarks.precision --accelerator cpu --task vit --steps 5   # a check on a CPU

Each variant trains the task's default config through a real Trainer for `--steps` steps after
`--warmup` untimed steps, and reports samples per second. The table goes to stdout and, with
--write, into docs/BENCHMARKS.md's "Precision" section.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

import cli
from benchmarks.common import hardware_line

CONFIGS = Path("configs")
TASKS = ("waves", "hypersindy", "raptor", "vit")
VARIANTS = (("fp32", "32-true", False), ("bf16", "bf16-mixed", False), ("bf16+compile", "bf16-mixed", True))


class StepTimer(Callback):
    """Time training steps after a warm-up and count the samples they processed."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.samples = 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
            self.samples += len(first)

    def samples_per_second(self) -> float:
        self._sync()
        if self.start is None:
            return float("nan")
        return self.samples / (time.perf_counter() - self.start)


def measure(
    task: str,
    precision: str,
    compile_model: bool,
    accelerator: str,
    steps: int,
    warmup: int,
    extra: list[str],
) -> float:
    args = [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "tasks" / f"{task}.yaml"),
        "--wandb_mode=disabled",
        "--runs_root=runs/benchmarks",
        *extra,
    ]
    os.environ.pop(cli.RUN_NAME_ENV, None)
    built = cli.DynlabCLI(args=args, run=False)
    if compile_model:
        cli.compile_in_place(built.model)
    timer = StepTimer(warmup)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=built.run_dir,
    )
    trainer.fit(built.model, datamodule=built.datamodule)
    return timer.samples_per_second()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, action="append", help="only this task (repeatable)")
    parser.add_argument("--accelerator", default="gpu", help="gpu (default) or cpu for a functional check")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    parser.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    parser.add_argument(
        "extra", nargs="*", help="flags for every run after --, e.g. -- --config <experiment>"
    )
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device found: run on a GPU machine, or pass --accelerator cpu.")

    rows = []
    for task in args.task or TASKS:
        rates = {
            name: measure(task, precision, compiled, args.accelerator, args.steps, args.warmup, args.extra)
            for name, precision, compiled in VARIANTS
        }
        base = rates["fp32"]
        rows.append(
            f"| {task} | "
            + " | ".join(f"{rates[n]:.1f} ({rates[n] / base:.2f}×)" for n, _, _ in VARIANTS)
            + " |"
        )
        print(rows[-1], flush=True)

    table = "\n".join(
        [
            "## Precision and compile (samples/s, ratio to fp32)",
            "",
            f"- command: `python -m benchmarks.precision --accelerator {args.accelerator} --steps {args.steps}`",
            f"- hardware: {hardware_line()}",
            "",
            "| task | " + " | ".join(name for name, _, _ in VARIANTS) + " |",
            "|---|" + "---|" * len(VARIANTS),
            *rows,
            "",
        ]
    )
    print(table)
    if args.write:
        with Path("docs/BENCHMARKS.md").open("a") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()
