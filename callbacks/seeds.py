"""Train one config under several seeds and aggregate the test metrics the way the waves paper reports them.

    python -m callbacks.seeds --task waves --seeds 0 1 2 -- --trainer.max_epochs=20

Each seed runs `dynlab fit` in its own process and run folder (`<task>/seeds-<stamp>/seed<k>`); the
summary (mean, sd with ddof 1, median, min, max, and the number of collapsed runs whose FG-IoU is 0) is
printed and written as `aggregate.json` beside the seed folders.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

COLLAPSE_METRIC = "test/fg_iou"


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Summarise each metric over seeds: mean, sd (ddof 1), median, min, max, n, and collapsed runs."""
    metrics = sorted({key for values in per_seed.values() for key in values})
    summary: dict[str, dict[str, float]] = {}
    for metric in metrics:
        values = [v[metric] for v in per_seed.values() if metric in v and math.isfinite(v[metric])]
        if not values:
            continue
        summary[metric] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    if COLLAPSE_METRIC in summary:
        collapsed = sum(1 for v in per_seed.values() if v.get(COLLAPSE_METRIC, 1.0) == 0.0)
        summary[COLLAPSE_METRIC]["collapsed"] = collapsed
    return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'metric':<24} {'mean':>8} {'sd':>8} {'median':>8} {'min':>8} {'max':>8} {'n':>3} {'coll.':>5}"
    ]
    for metric, s in summary.items():
        collapsed = str(s["collapsed"]) if "collapsed" in s else ""
        lines.append(
            f"{metric:<24} {s['mean']:>8.4f} {s['sd']:>8.4f} {s['median']:>8.4f} {s['min']:>8.4f} "
            f"{s['max']:>8.4f} {s['n']:>3} {collapsed:>5}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, help="task name: configs/tasks/<task>.yaml")
    parser.add_argument(
        "--seeds", type=int, nargs="+", required=True, help="seed_everything values, one run each"
    )
    parser.add_argument("--runs_root", default="runs", help="folder that contains runs/<task>/")
    parser.add_argument("extra", nargs="*", help="flags passed on to every `dynlab fit` (after --)")
    args = parser.parse_args(argv)

    task_config = Path("configs/tasks") / f"{args.task}.yaml"
    if not task_config.is_file():
        known = ", ".join(sorted(p.stem for p in Path("configs/tasks").glob("*.yaml")))
        raise SystemExit(f"error: task {args.task!r} has no config {task_config}: choose one of {known}.")

    group = f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    group_dir = Path(args.runs_root) / args.task / group
    per_seed: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        command = [
            sys.executable,
            "-m",
            "cli",
            "fit",
            "--config",
            "configs/base.yaml",
            "--config",
            str(task_config),
            *args.extra,
            f"--seed_everything={seed}",
            f"--run_name={group}-seed{seed}",
            f"--runs_root={args.runs_root}",
        ]
        print(" ".join(command), flush=True)
        completed = subprocess.run(command, check=False)
        metrics_file = Path(args.runs_root) / args.task / f"{group}-seed{seed}" / "metrics.json"
        if completed.returncode != 0 or not metrics_file.is_file():
            print(
                f"seed {seed} failed (exit code {completed.returncode}); it is left out of the summary",
                file=sys.stderr,
            )
            continue
        per_seed[seed] = json.loads(metrics_file.read_text()).get("test", {})

    summary = aggregate(per_seed)
    group_dir.mkdir(parents=True, exist_ok=True)
    (group_dir / "aggregate.json").write_text(json.dumps({"seeds": per_seed, "summary": summary}, indent=2))
    print(format_summary(summary))
    print(group_dir / "aggregate.json")


if __name__ == "__main__":
    main()
