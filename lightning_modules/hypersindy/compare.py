"""Regenerate the HyperSINDy vs SINDy vs E-SINDy table in docs/RESULTS.md.

    python -m lightning_modules.hypersindy.compare --runs_root runs      (or: make compare TASK=hypersindy)

For each of the seven published cases the script simulates the training set, fits SINDy (STLSQ) and
E-SINDy (bagging, 100 models) with pysindy on the 4th-order FD derivative, reads our HyperSINDy numbers from
the newest run of that case under `<runs_root>/hypersindy/*/metrics.json`, and writes them beside the
values computed from the public HyperSINDy checkpoints (github.com/mozesjacobs/hypersindy, commit 254e55d,
2,000 prior samples). Only the block between the two markers in the HyperSINDy section is replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.sde import SYSTEMS, finite_difference, simulate, true_coefficients
from lightning_modules.hypersindy.baselines import SINDY_THRESHOLDS, fit_esindy, fit_sindy
from lightning_modules.hypersindy.metrics import score_coefficients

log = logging.getLogger(__name__)

START = "<!-- hypersindy-compare:start -->"
END = "<!-- hypersindy-compare:end -->"


@dataclass(frozen=True)
class Case:
    system: str
    scale: float
    config: str
    # Public checkpoint values: mean-RMSE, std-RMSE vs s, std-RMSE vs 0.833 s, (TP, FP, FN).
    published: tuple[float, float, float, tuple[int, int, int]]


CASES = [
    Case("lorenz", 1.0, "lorenz_s1", (0.353, 0.165, 0.125, (6, 1, 1))),
    Case("lorenz", 5.0, "lorenz_s5", (0.496, 0.440, 0.239, (7, 0, 0))),
    Case("lorenz", 10.0, "lorenz_s10", (0.968, 0.959, 0.670, (7, 0, 0))),
    Case("rossler", 1.0, "rossler_s1", (0.012, 0.184, 0.148, (7, 0, 0))),
    Case("rossler", 5.0, "rossler_s5", (0.096, 0.248, 0.151, (7, 0, 0))),
    Case("rossler", 10.0, "rossler_s10", (0.367, 0.339, 0.143, (7, 0, 0))),
    Case("lotka_volterra", 5.0, "lotka_volterra_s5", (0.175, 0.591, 0.391, (4, 0, 0))),
]


def baseline_scores(case: Case, n_models: int, seed: int) -> dict[str, dict[str, float]]:
    """SINDy and E-SINDy scores on the case's training trajectory and FD derivative."""
    spec = SYSTEMS[case.system]
    sim = simulate(case.system, case.scale)
    x_dot = finite_difference(sim.x, sim.dt)
    names = list(spec.variable_names)
    threshold = SINDY_THRESHOLDS[case.system]
    sindy = fit_sindy(sim.x, x_dot, sim.dt, names, include_bias=spec.include_constant, threshold=threshold)
    np.random.seed(seed)  # E-SINDy draws its bootstrap indices from numpy's global generator
    esindy = fit_esindy(
        sim.x,
        x_dot,
        sim.dt,
        names,
        include_bias=spec.include_constant,
        threshold=threshold,
        n_models=n_models,
    )
    true_mean, true_std = true_coefficients(case.system, case.scale, sindy.feature_names, names)
    return {
        "sindy": score_coefficients(sindy.mean, sindy.std, true_mean, true_std),
        "esindy": score_coefficients(esindy.mean, esindy.std, true_mean, true_std),
    }


def newest_run(runs_root: Path, case: Case) -> dict | None:
    """Return the report of the newest finished hypersindy run of this system and scale, or None."""
    best, best_time = None, -1.0
    for path in (runs_root / "hypersindy").glob("*/metrics.json"):
        try:
            report = json.loads(path.read_text()).get("report") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if report.get("system") != case.system or report.get("noise_scale") != case.scale:
            continue
        if "coef_mean_rmse" not in report:
            continue
        mtime = path.stat().st_mtime
        if mtime > best_time:
            best, best_time = {**report, "run_dir": str(path.parent)}, mtime
    return best


def _support(scores: dict[str, float]) -> str:
    return f"{int(scores['tp'])}/{int(scores['fp'])}/{int(scores['fn'])}"


def build_table(runs_root: Path, n_models: int, seed: int) -> str:
    header = (
        "| system, s | HS ours: mean-RMSE | HS ours: std-RMSE vs s / vs 0.833s | HS ours: TP/FP/FN "
        "| epochs | "
        "HS published: mean / std vs s / vs 0.833s · TP/FP/FN | SINDy mean / std RMSE · TP/FP/FN | "
        "E-SINDy mean / std RMSE · TP/FP/FN |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for case in CASES:
        scores = baseline_scores(case, n_models, seed)
        run = newest_run(runs_root, case)
        if run is None:
            ours = "not run | - | - | -"
        else:
            ours = (
                f"{run['coef_mean_rmse']:.3f} | {run['coef_std_rmse_vs_s']:.3f} / "
                f"{run['coef_std_rmse_vs_0.833s']:.3f} | {int(run['support_tp'])}/{int(run['support_fp'])}/"
                f"{int(run['support_fn'])} | {int(run['epochs_trained'])}"
            )
        mean, std_s, std_att, (tp, fp, fn) = case.published
        sindy, esindy = scores["sindy"], scores["esindy"]
        rows.append(
            f"| {case.system} {case.scale:g} | {ours} "
            f"| {mean:.3f} / {std_s:.3f} / {std_att:.3f} · {tp}/{fp}/{fn} | "
            f"{sindy['mean_rmse']:.3f} / {sindy['std_rmse_vs_s']:.3f} · {_support(sindy)} | "
            f"{esindy['mean_rmse']:.3f} / {esindy['std_rmse_vs_s']:.3f} · {_support(esindy)} |"
        )
        log.info("%s s=%g done", case.system, case.scale)
    return "\n".join(rows)


def replace_block(document: str, block: str) -> str:
    """Put `block` between the markers inside the HyperSINDy section, adding the markers when missing."""
    wrapped = f"{START}\n{block}\n{END}"
    if START in document and END in document:
        return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: wrapped, document, flags=re.S)
    heading = re.search(r"^## HyperSINDy.*$", document, flags=re.M)
    if heading is None:
        return document.rstrip("\n") + "\n\n## HyperSINDy (`hypersindy`)\n\n" + wrapped + "\n"
    insert_at = heading.end()
    return document[:insert_at] + "\n\n" + wrapped + "\n" + document[insert_at:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_root", default="runs", help="folder that contains hypersindy/<run>/metrics.json")
    parser.add_argument("--results", default="docs/RESULTS.md", help="Markdown file whose table is replaced")
    parser.add_argument("--n_models", type=int, default=100, help="E-SINDy bootstrap models")
    parser.add_argument("--seed", type=int, default=0, help="numpy seed of the E-SINDy bootstrap")
    parser.add_argument("--print_only", action="store_true", help="print the table without writing the file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    table = build_table(Path(args.runs_root), args.n_models, args.seed)
    print(table)
    if not args.print_only:
        path = Path(args.results)
        document = path.read_text() if path.is_file() else "# Results\n"
        path.write_text(replace_block(document, table))
        log.info("wrote the table into %s", path)


if __name__ == "__main__":
    main()
