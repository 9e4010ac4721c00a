"""Small-scale study: how the teacher's stochastic-depth rate shapes its phases and Raptor's fit.

For each drop_path_rate, train a vit teacher on the default data, distil it with the raptor task
(k = 2) and collect teacher accuracy, the phase contrast (mean within-phase minus mean cross-phase
similarity), Raptor's fidelity R^2 and the probe ratio. Writes a markdown table (runs_root/study.md)
and a plot, and prints the table:

    make study
    .venv/bin/python -m lightning_modules.raptor.study --runs_root runs/study --teacher_args "..."
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from pathlib import Path

from scipy.stats import spearmanr

log = logging.getLogger("dynlab.study")
REPO_ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [
    ("drop_path_rate", "drop path", "{:.1f}"),
    ("teacher_acc", "teacher test acc (head)", "{:.3f}"),
    ("teacher_probe_acc", "teacher probe acc", "{:.3f}"),
    ("raptor_probe_acc", "Raptor probe acc", "{:.3f}"),
    ("probe_ratio", "probe ratio", "{:.3f}"),
    ("phase_contrast", "phase contrast", "{:.4f}"),
    ("phases", "phases", "{}"),
    ("r2_mean", "R^2 mean", "{:.5f}"),
    ("r2_cls_mean", "R^2 cls", "{:.3f}"),
    ("r2_patch_mean", "R^2 patch", "{:.3f}"),
]


def run_cli(args: list[str]) -> None:
    """Run one dynlab command in this process (imports are paid once for the whole study)."""
    import cli

    os.environ.pop(cli.RUN_NAME_ENV, None)
    cli.run(args)


def run_pipeline(rate: float, runs_root: Path, raptor_args: list[str], teacher_args: list[str]) -> dict:
    """Train the teacher for one drop-path rate, distil it with the raptor task, and return the numbers."""
    name = f"dp{rate:.1f}"
    configs = REPO_ROOT / "configs"
    teacher_dir = runs_root / "vit" / name
    common = [f"--runs_root={runs_root}", f"--run_name={name}", "--trainer.enable_progress_bar=false"]
    if not (teacher_dir / "metrics.json").is_file():
        log.info("training the teacher with drop_path_rate=%s into %s", rate, teacher_dir)
        run_cli(
            [
                "fit",
                "--config",
                str(configs / "base.yaml"),
                "--config",
                str(configs / "tasks" / "vit.yaml"),
                *common,
                f"--model.init_args.drop_path_rate={rate}",
                *teacher_args,
            ]
        )
    raptor_metrics = runs_root / "raptor" / name / "metrics.json"
    if not raptor_metrics.is_file():
        log.info("distilling the teacher with drop_path_rate=%s", rate)
        run_cli(
            [
                "fit",
                "--config",
                str(configs / "base.yaml"),
                "--config",
                str(configs / "tasks" / "raptor.yaml"),
                *common,
                f"--model.init_args.teacher={teacher_dir}",
                "--model.init_args.train_teacher=false",
                *raptor_args,
            ]
        )
    report = json.loads(raptor_metrics.read_text())["report"]
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    row = {"drop_path_rate": rate, "teacher_acc": teacher_metrics["test"].get("test/acc", float("nan"))}
    row.update({key: report.get(key, float("nan")) for key, _, _ in COLUMNS if key not in row})
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def correlations(rows: list[dict]) -> str:
    """Return the Spearman correlations of the phase contrast with R^2, probe ratio and teacher accuracy."""
    contrast = [row["phase_contrast"] for row in rows]
    parts = []
    for key in ("r2_cls_mean", "r2_mean", "probe_ratio", "teacher_acc"):
        rho = spearmanr(contrast, [row[key] for row in rows]).statistic
        parts.append(f"Spearman(contrast, {key}) = {rho:+.2f}")
    return f"{'; '.join(parts)} (n = {len(rows)} rates)."


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [row["drop_path_rate"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(rates, [row["phase_contrast"] for row in rows], "o-")
    axes[0].set_ylabel("phase contrast")
    axes[1].plot(rates, [row["r2_mean"] for row in rows], "o-", label="all tokens")
    axes[1].plot(rates, [row["r2_cls_mean"] for row in rows], "s--", label="cls")
    axes[1].plot(rates, [row["r2_patch_mean"] for row in rows], "^--", label="patch")
    axes[1].set_ylabel("Raptor fidelity R^2 (mean over layers)")
    axes[1].legend(fontsize=8)
    axes[2].plot(rates, [row["probe_ratio"] for row in rows], "o-", label="probe ratio")
    axes[2].plot(rates, [row["teacher_acc"] for row in rows], "s--", label="teacher acc")
    axes[2].set_ylabel("accuracy / ratio")
    axes[2].legend(fontsize=8)
    for axis in axes:
        axis.set_xlabel("teacher drop_path_rate")
    figure.suptitle("Raptor k = 2 on digits: teachers trained with stochastic depth", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5], help="drop_path_rate values"
    )
    parser.add_argument(
        "--runs_root", type=Path, default=Path("runs/study"), help="folder for the teacher and Raptor runs"
    )
    parser.add_argument(
        "--figure", type=Path, default=Path("docs/figures/raptor_study.png"), help="where the plot goes"
    )
    parser.add_argument(
        "--raptor_args", default="", help="extra dynlab flags for every raptor run, as one string"
    )
    parser.add_argument(
        "--teacher_args", default="", help="extra dynlab flags for every teacher run, as one string"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs_root = args.runs_root.resolve()
    raptor_args, teacher_args = shlex.split(args.raptor_args), shlex.split(args.teacher_args)
    rows = [run_pipeline(rate, runs_root, raptor_args, teacher_args) for rate in args.rates]
    table = markdown_table(rows) + "\n\n" + correlations(rows) + "\n"
    (runs_root / "study.md").write_text(table)
    plot(rows, args.figure)
    print(table)
    print(f"plot: {args.figure}")


if __name__ == "__main__":
    main()
