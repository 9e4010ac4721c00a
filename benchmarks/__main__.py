"""`make bench`: run every task's benchmark, print the figures and write docs/BENCHMARKS.md.

python -m benchmarks [--task waves] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import BenchRow, hardware_line
from cli import skip_repeated_gpu_probe

TASKS = ("waves", "hypersindy", "raptor")
OUTPUT = Path("docs/BENCHMARKS.md")
EXTRA_SECTIONS = (Path("docs/benchmarks_speed.md"), Path("docs/benchmarks_dynamics.md"))


def format_rows(rows: list[BenchRow]) -> str:
    lines = ["| task | figure | ours | reference | goal | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.task} | {row.name} | {row.value:.4g} {row.unit} | {row.reference} | {row.goal} | {row.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task", choices=TASKS, action="append", help="benchmark only this task (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, about a minute per task")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {OUTPUT} unchanged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    skip_repeated_gpu_probe()  # as the CLI does, so Lightning and bare loops both run as in training
    if args.threads:
        torch.set_num_threads(args.threads)

    hardware = hardware_line()
    print(hardware, flush=True)
    rows: list[BenchRow] = []
    missing = []
    for task in args.task or TASKS:
        try:
            module = importlib.import_module(f"benchmarks.{task}")
        except ModuleNotFoundError:
            missing.append(task)
            continue
        start = time.perf_counter()
        task_rows = module.run(quick=args.quick)
        print(f"\n{task} ({time.perf_counter() - start:.0f} s)")
        print(format_rows(task_rows), flush=True)
        rows.extend(task_rows)
    if missing:
        print(f"no benchmark module for: {', '.join(missing)}", file=sys.stderr)

    if args.no_write or not rows:
        return
    command = "make bench" if not args.task else f"python -m benchmarks --task {' --task '.join(args.task)}"
    text = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks`). Every ratio is measured side by side in one run;",
        "absolute times hold only for the hardware below.",
        "",
        f"- command: `{command}{' BENCH_ARGS=--quick' if args.quick and not args.task else ''}`"
        f"{' (--quick)' if args.quick and args.task else ''}, torch threads: {torch.get_num_threads()}",
        f"- hardware: {hardware}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        format_rows(rows),
        "",
    ]
    for extra in EXTRA_SECTIONS:
        if extra.is_file():
            text += [extra.read_text().strip(), ""]
    OUTPUT.write_text("\n".join(text))
    print(f"\nwrote {OUTPUT}")


if __name__ == "__main__":
    main()
