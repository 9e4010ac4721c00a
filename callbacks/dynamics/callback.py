"""The Lightning callback that runs the dynamical measures on a fixed probe set and writes the outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.dynamics import measures, plotting
from lightning_modules.trajectory import Trajectory

log = logging.getLogger(__name__)

ALL_MEASURES = ("similarity", "convergence", "basins", "perturbation", "speed", "coherence", "rank")


class DynamicsAnalysis(Callback):
    """Measure a model's depth (or recurrent time) as a trajectory on a fixed probe set of validation samples.

    Runs once at the end of training and in a `dynlab validate` run. The model must define
    `trajectory(batch) -> Trajectory` (or `trajectory(batch, source=...)` when `sources` is set). Each
    measure writes `<name>.png` and `<name>.json` under `<run>/figures/<output_dir>/` (one folder per
    source when several are given), plus `summary.json` with headline numbers, and logs both to wandb
    when a WandbLogger is attached. Under DDP every rank computes the trajectory of its share of the probe
    set, the states are gathered, and rank 0 alone measures and writes.

    Args:
        probe_size: Number of validation samples in the probe set.
        probe_seed: Seed of the draw of the probe samples (independent of the global seed).
        batch_size: Samples per forward pass while collecting trajectories and rollouts.
        measures: Measures to run, any of similarity, convergence, basins, perturbation, speed, coherence,
            rank. Basins need labels and the perturbation test needs `Trajectory.rollout`; a measure whose
            inputs the model does not provide is skipped with a log message.
        num_phases: Number of phases found from the similarity matrix when the trajectory brings no
            boundaries of its own.
        perturb_depths: Steps l0 at which the perturbation test injects noise (default: 1/6, 2/6, 3/6 and
            4/6 of the depth, i.e. 2, 4, 6, 8 for 12 layers).
        perturb_alphas: Relative noise sizes |delta| / |x| of the perturbation test.
        perturb_seeds: Number of noise draws per depth and size.
        rank_pool_size: Images stacked into the pooled update matrix of the rank measure.
        tangential_rank: Keep only the part of each update orthogonal to its state in the rank measure.
        coherence_group: Token group whose coherence is measured (all tokens if the model has no such
            group).
        sources: Values passed as `trajectory(batch, source=...)`, one output folder each plus a side-by-side
            `comparison.png` (e.g. ["teacher", "student"] on Raptor). None calls `trajectory(batch)` once.
        output_dir: Folder under `<run>/figures/` for the outputs.
    """

    def __init__(
        self,
        probe_size: int = 64,
        probe_seed: int = 0,
        batch_size: int = 32,
        measures: Sequence[str] = ALL_MEASURES,
        num_phases: int = 3,
        perturb_depths: list[int] | None = None,
        perturb_alphas: Sequence[float] = (0.01, 0.05, 0.1),
        perturb_seeds: int = 5,
        rank_pool_size: int = 64,
        tangential_rank: bool = False,
        coherence_group: str = "patch",
        sources: list[str] | None = None,
        output_dir: str = "dynamics",
    ) -> None:
        unknown = sorted(set(measures) - set(ALL_MEASURES))
        problems = []
        if unknown:
            problems.append(f"measures {unknown} are unknown: choose from {', '.join(ALL_MEASURES)}")
        if probe_size < 2:
            problems.append(f"probe_size={probe_size} is invalid: use at least 2 samples")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} is invalid: use a positive integer")
        if num_phases < 1:
            problems.append(f"num_phases={num_phases} is invalid: use at least 1")
        if perturb_seeds < 1:
            problems.append(f"perturb_seeds={perturb_seeds} is invalid: use at least 1")
        if any(alpha < 0 for alpha in perturb_alphas):
            problems.append(f"perturb_alphas={list(perturb_alphas)} is invalid: sizes must be >= 0")
        if problems:
            raise ValueError("DynamicsAnalysis: " + "; ".join(problems) + ".")

        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.batch_size = batch_size
        self.measures = tuple(measures)
        self.num_phases = num_phases
        self.perturb_depths = perturb_depths
        self.perturb_alphas = tuple(perturb_alphas)
        self.perturb_seeds = perturb_seeds
        self.rank_pool_size = rank_pool_size
        self.tangential_rank = tangential_rank
        self.coherence_group = coherence_group
        self.sources = list(sources) if sources else None
        self.output_dir = output_dir
        self.ran_after_fit = False
        self.fit_started: float | None = None
        self.last_duration_s: float | None = None
        self.last_results: dict[str, dict] = {}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_model(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit_seconds = time.perf_counter() - self.fit_started if self.fit_started is not None else None
        self.run(trainer, pl_module)
        self.ran_after_fit = True
        if fit_seconds and trainer.is_global_zero:
            log.info(
                "dynamics analysis overhead: %.2f s on top of %.1f s of fitting (%.1f%%)",
                self.last_duration_s,
                fit_seconds,
                100 * self.last_duration_s / fit_seconds,
            )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A validate run analyses its checkpoint. The validation that the CLI runs right after fit on the
        # same trainer is skipped, because the end of training was analysed already.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.VALIDATING or self.ran_after_fit:
            return
        self.run(trainer, pl_module)

    # ------------------------------------------------------------------ main
    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Collect the probe trajectories on every rank, gather them, and measure and write on rank 0."""
        self.check_model(pl_module)
        started = time.perf_counter()
        dataset, collate = self.validation_data(trainer)
        probe = self.probe_indices(len(dataset))
        was_training = pl_module.training
        pl_module.eval()
        per_source: dict[str, dict] = {}
        boundaries: dict[str, list[int]] = {}
        try:
            with torch.no_grad():
                for source in self.sources or [None]:
                    collected = self.collect(trainer, pl_module, dataset, collate, probe, source)
                    if collected is not None:
                        name = source or ""
                        per_source[name], boundaries[name] = self.measure_and_write(trainer, *collected, name)
            if trainer.is_global_zero and len(per_source) > 1:
                group = "cls" if any("cls" in r.get("convergence", {}) for r in per_source.values()) else None
                group = group or next(iter(next(iter(per_source.values())).get("convergence", {"all": 0})))
                path = plotting.plot_comparison(
                    per_source, boundaries, self.folder(trainer) / "comparison.png", group
                )
                self.log_to_wandb(trainer, "comparison", path, None)
        finally:
            pl_module.train(was_training)
        trainer.strategy.barrier("dynamics-analysis")
        self.last_duration_s = time.perf_counter() - started
        self.last_results = per_source
        if trainer.is_global_zero:
            log.info(
                "dynamics analysis of %d probe samples took %.2f s; outputs in %s",
                len(probe),
                self.last_duration_s,
                self.folder(trainer),
            )

    @staticmethod
    def check_model(pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "trajectory", None)):
            raise TypeError(
                "DynamicsAnalysis needs a model with a `trajectory(batch)` method; "
                f"{type(pl_module).__name__} "
                "has none: remove the callback or implement the method (see lightning_modules/trajectory.py)."
            )

    def validation_data(self, trainer: Trainer):
        """Return the first validation dataset and its collate function."""
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is None:
            raise RuntimeError(
                "DynamicsAnalysis draws its probe set from the validation data, but there is no validation "
                "dataloader: give the DataModule a val_dataloader."
            )
        dataset = loaders.dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"DynamicsAnalysis needs a map-style validation dataset (with __len__ and __getitem__); "
                f"got {type(dataset).__name__}."
            )
        return dataset, loaders.collate_fn

    def probe_indices(self, n_samples: int) -> list[int]:
        """Draw min(probe_size, n_samples) dataset indices with the fixed probe seed, sorted."""
        generator = torch.Generator().manual_seed(self.probe_seed)
        chosen = torch.randperm(n_samples, generator=generator)[: self.probe_size]
        return sorted(chosen.tolist())

    def collect(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        dataset,
        collate,
        probe: list[int],
        source: str | None,
    ) -> tuple[Trajectory, dict[str, Any] | None] | None:
        """Compute this rank's share of the probe trajectories, gather all shares, return the whole on rank 0.

        Rank r takes probe positions r, r + W, ...; shares are padded to equal length by repeating a
        position so that `all_gather` gets equal shapes, and rank 0 puts the samples back in probe order. The
        perturbation test runs here, batch by batch, because a model's rollout may hold per-sample inputs
        of the batch it came from. Its per-sample distances are gathered like the states. Returns
        (trajectory, perturbation) on rank 0, where perturbation contains the per-sample distances, and
        None on the other ranks.
        """
        world, rank = trainer.world_size, trainer.global_rank
        share = probe[rank::world]
        share_length = math.ceil(len(probe) / world)
        share = share + [share[0]] * (share_length - len(share))
        want_perturbation = "perturbation" in self.measures

        pieces, labels, distances, agreements, template, depths = [], [], [], [], None, None
        for begin in range(0, len(share), self.batch_size):
            ids = share[begin : begin + self.batch_size]
            batch = trainer.strategy.batch_to_device(collate([dataset[i] for i in ids]))
            trajectory = (
                pl_module.trajectory(batch) if source is None else pl_module.trajectory(batch, source=source)
            )
            template = template or trajectory
            states = trajectory.states.detach().float()
            pieces.append(states)
            if trajectory.labels is not None:
                labels.append(trajectory.labels.detach().long().to(states.device))
            if want_perturbation and trajectory.rollout is not None and trajectory.num_steps > 1:
                if depths is None:
                    depths = self.perturb_depths or measures.default_perturbation_depths(trajectory.num_steps)
                distance, agreement = measures.perturbation_distances(
                    states,
                    trajectory.rollout,
                    self.groups(trajectory),
                    depths,
                    self.perturb_alphas,
                    list(range(self.perturb_seeds)),
                    classify=trajectory.classify,
                    sample_ids=ids,
                )
                distances.append(distance.to(states.device))
                agreements.append(agreement.to(states.device))

        gathered = {"states": torch.cat(pieces), "positions": torch.tensor(share, device=pieces[0].device)}
        if labels:
            gathered["labels"] = torch.cat(labels)
        if distances:
            gathered["distance"] = torch.cat(distances)
            gathered["agreement"] = torch.cat(agreements)
        if world > 1:
            gathered = {
                key: trainer.strategy.all_gather(value).flatten(0, 1) for key, value in gathered.items()
            }
        if not trainer.is_global_zero:
            return None

        first: dict[int, int] = {}
        for row, position in enumerate(gathered["positions"].tolist()):
            first.setdefault(position, row)
        order = torch.tensor([first[p] for p in sorted(first)], device=gathered["states"].device)
        ordered = {key: value.index_select(0, order) for key, value in gathered.items()}
        trajectory = Trajectory(
            states=ordered["states"],
            token_groups=template.token_groups,
            labels=ordered.get("labels"),
            boundaries=list(template.boundaries),
            rollout=template.rollout,
            classify=template.classify,
        )
        perturbation = None
        if "distance" in ordered:
            perturbation = {
                "distance": ordered["distance"].cpu(),
                "agreement": ordered["agreement"].cpu(),
                "depths": list(depths),
            }
        return trajectory, perturbation

    @staticmethod
    def groups(trajectory: Trajectory) -> dict[str, torch.Tensor]:
        """Token groups as flat index tensors, empty groups left out."""
        return {
            name: index.reshape(-1).long()
            for name, index in trajectory.token_groups.items()
            if index.numel() > 0
        }

    # ------------------------------------------------------------------ outputs
    def folder(self, trainer: Trainer, source: str = "") -> Path:
        folder = Path(trainer.default_root_dir) / "figures" / self.output_dir
        return folder / source if source else folder

    def measure_and_write(
        self, trainer: Trainer, trajectory: Trajectory, perturbation: dict[str, Any] | None, source: str
    ) -> tuple[dict, list[int]]:
        """Run the measures on the gathered trajectory, then write a PNG and a JSON each and summary.json."""
        folder = self.folder(trainer, source)
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{source} " if source else ""
        groups = self.groups(trajectory)
        num_steps = trajectory.num_steps

        boundaries = [int(b) for b in trajectory.boundaries]
        results: dict[str, dict] = {}
        if "similarity" in self.measures:
            similarity = measures.layer_similarity(trajectory.states, groups).double().cpu()
            from_similarity = measures.phase_boundaries(similarity, self.num_phases) if num_steps > 1 else []
            boundaries = boundaries or from_similarity
            results["similarity"] = {
                "matrix": similarity.tolist(),
                "boundaries_from_model": [int(b) for b in trajectory.boundaries],
                "boundaries_from_similarity": from_similarity,
                "boundaries_drawn": boundaries,
            }

        skipped = []
        if "basins" in self.measures and trajectory.labels is None:
            skipped.append("basins (the trajectory has no labels)")
        if "perturbation" in self.measures and trajectory.rollout is None:
            skipped.append("perturbation (the trajectory has no rollout)")
        if skipped:
            log.info("dynamics analysis skips %s", "; ".join(skipped))
        results.update(
            measures.analyse(
                trajectory,
                [m for m in self.measures if m not in ("similarity", "perturbation")],
                rank_pool_size=self.rank_pool_size,
                tangential_rank=self.tangential_rank,
                coherence_group=self.coherence_group,
            )
        )
        if perturbation is not None:
            records = measures.perturbation_records(
                perturbation["distance"],
                perturbation["agreement"],
                perturbation["depths"],
                self.perturb_alphas,
                list(groups),
            )
            results["perturbation"] = {"records": records, "num_steps": num_steps}

        for name, numbers in results.items():
            path = self.plot(name, numbers, boundaries, folder, title, list(groups))
            payload = {
                "measure": name,
                "num_steps": num_steps,
                "boundaries": boundaries,
                "probe_size": int(trajectory.states.shape[0]),
                **numbers,
            }
            write_json(folder / f"{name}.json", payload)
            self.log_to_wandb(trainer, f"{source}/{name}" if source else name, path, numbers)

        summary = summarise(results, boundaries, num_steps)
        summary["probe_size"] = int(trajectory.states.shape[0])
        summary["boundaries"] = boundaries
        write_json(folder / "summary.json", summary)
        self.log_summary(trainer, summary, source)
        return results, boundaries

    def plot(
        self, name: str, numbers: dict, boundaries: list[int], folder: Path, title: str, groups: list[str]
    ) -> Path:
        path = folder / f"{name}.png"
        if name == "similarity":
            return plotting.plot_similarity(
                torch.tensor(numbers["matrix"]).numpy(), boundaries, path, f"{title}step similarity"
            )
        if name == "convergence":
            return plotting.plot_curves(
                numbers, boundaries, path, title=f"{title}directional convergence", ylabel="cos(x_l, x_S)"
            )
        if name == "speed":
            return plotting.plot_curves(
                numbers,
                boundaries,
                path,
                title=f"{title}angular speed",
                ylabel="angle(x_l, x_(l-1)) (rad)",
                first_step=1,
            )
        if name == "coherence":
            return plotting.plot_coherence(
                numbers, boundaries, path, f"{title}{self.coherence_group} coherence"
            )
        if name == "rank":
            return plotting.plot_rank(numbers, boundaries, path, f"{title}update rank")
        if name == "basins":
            return plotting.plot_basins(numbers, boundaries, path, f"{title}class basins")
        if name == "perturbation":
            ordered = [g for g in ("cls", "patch") if g in groups] or groups
            return plotting.plot_perturbation(numbers, boundaries, path, f"{title}perturbation", ordered)
        raise ValueError(f"no figure for measure {name!r}")

    def wandb_loggers(self, trainer: Trainer) -> list[WandbLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    def log_to_wandb(self, trainer: Trainer, key: str, image: Path, numbers: dict | None) -> None:
        loggers = self.wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        for logger in loggers:
            logger.log_image(key=f"dynamics/{key}", images=[str(image)])
            if numbers is not None:
                rows = flatten_rows(numbers)
                table = wandb.Table(columns=["series", "step", "value"], data=rows)
                logger.experiment.log({f"dynamics/{key}_numbers": table})

    def log_summary(self, trainer: Trainer, summary: dict, source: str) -> None:
        loggers = self.wandb_loggers(trainer)
        if not loggers:
            return
        prefix = f"dynamics/{source}/" if source else "dynamics/"
        scalars = {prefix + key: value for key, value in flatten_scalars(summary).items()}
        for logger in loggers:
            logger.log_metrics(scalars)


# ---------------------------------------------------------------------- helpers
def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (non-finite floats become null)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(replace_non_finite(payload), indent=1) + "\n")
    os.replace(tmp, path)


def replace_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: replace_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [replace_non_finite(item) for item in value]
    return value


def flatten_rows(numbers: dict, prefix: str = "") -> list[list]:
    """Turn nested measure numbers into (series, step, value) rows for a wandb table."""
    rows: list[list] = []
    for key, value in numbers.items():
        name = f"{prefix}{key}"
        if key == "records" and isinstance(value, list):
            for record in value:
                for group, numbers_of_group in record["groups"].items():
                    label = f"l0={record['depth']} alpha={record['alpha']:g} {group}"
                    rows += [[label, record["depth"] + i, v] for i, v in enumerate(numbers_of_group["curve"])]
        elif isinstance(value, dict):
            rows += flatten_rows(value, prefix=f"{name}/")
        elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
            rows += [[name, i, float(v)] for i, v in enumerate(value)]
        elif isinstance(value, list) and value and isinstance(value[0], list):  # a matrix: one series per row
            rows += [[f"{name}/{r}", i, float(v)] for r, row in enumerate(value) for i, v in enumerate(row)]
    return rows


def flatten_scalars(summary: dict, prefix: str = "") -> dict[str, float]:
    scalars = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            scalars.update(flatten_scalars(value, prefix=f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scalars[f"{prefix}{key}"] = float(value)
    return scalars


def phase_slices(boundaries: list[int], num_steps: int) -> list[tuple[int, int]]:
    """Phases as 1-based inclusive step ranges [(1, b1), (b1 + 1, b2), ..., (b_last + 1, S)]."""
    ends = [b for b in boundaries if 0 < b < num_steps] + [num_steps]
    starts = [1] + [b + 1 for b in ends[:-1]]
    return list(zip(starts, ends, strict=True))


def summarise(results: dict[str, dict], boundaries: list[int], num_steps: int) -> dict[str, Any]:
    """Compute headline numbers for the qualitative claims: S-shaped convergence, late reorientation of cls,
    low-rank late updates and self-correction after small perturbations.

    s_shaped is our operational reading of "S-shaped" (slow, fast, slow): the convergence curve never
    drops by more than 0.01, and its largest single-step rise falls in the middle half of the
    trajectory, S/4 < step <= 3S/4.
    """
    summary: dict[str, Any] = {}
    phases = phase_slices(boundaries, num_steps)
    if "convergence" in results:
        for group, curve in results["convergence"].items():
            rises = [b - a for a, b in zip(curve[:-1], curve[1:], strict=True)]
            steepest = max(range(len(rises)), key=rises.__getitem__) + 1 if rises else 0
            summary[f"convergence/{group}"] = {
                "gamma_0": curve[0],
                "gamma_mid": curve[num_steps // 2],
                "steepest_rise_step": steepest,
                "monotone": all(r >= -0.01 for r in rises),
                "s_shaped": all(r >= -0.01 for r in rises) and num_steps / 4 < steepest <= 3 * num_steps / 4,
            }
    if "speed" in results:
        for group, speeds in results["speed"].items():
            per_phase = [sum(speeds[s - 1 : e]) / (e - s + 1) for s, e in phases]
            earlier = per_phase[:-1]
            summary[f"speed/{group}"] = {
                "mean_per_phase": per_phase,
                "last_phase_over_earlier": per_phase[-1] / (sum(earlier) / len(earlier))
                if earlier
                else math.nan,
                "last_step": speeds[-1],
            }
    if "rank" in results:
        for key in ("effective_pooled", "stable_pooled", "effective_per_image", "stable_per_image"):
            values = results["rank"][key]
            per_phase = [sum(values[s - 1 : e]) / (e - s + 1) for s, e in phases]
            summary[f"rank/{key}"] = {
                "mean_per_phase": per_phase,
                "first_step": values[0],
                "last_step": values[-1],
                "min": min(values),
                "argmin_step": values.index(min(values)) + 1,
            }
    if "coherence" in results:
        coherence = results["coherence"]
        summary["coherence"] = {
            "state_first": coherence["state"][0],
            "state_last": coherence["state"][-1],
            "update_first": coherence["update"][0],
            "update_last": coherence["update"][-1],
        }
    if "basins" in results:
        basins = results["basins"]
        summary["basins"] = {
            "ncm_accuracy_first": basins["ncm_accuracy"][0],
            "ncm_accuracy_mid": basins["ncm_accuracy"][num_steps // 2],
            "ncm_accuracy_last": basins["ncm_accuracy"][-1],
            "silhouette_first": basins["silhouette"][0],
            "silhouette_last": basins["silhouette"][-1],
        }
    if "perturbation" in results:
        per_alpha: dict[str, dict[str, Any]] = {}
        for record in results["perturbation"]["records"]:
            entry = per_alpha.setdefault(f"alpha={record['alpha']:g}", {})
            for group, numbers in record["groups"].items():
                entry.setdefault(f"contraction/{group}", []).append(numbers["contraction"])
            if "agreement" in record:
                entry.setdefault("agreement", []).append(record["agreement"])
        summary["perturbation"] = {
            alpha: {
                key: {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
                for key, values in entry.items()
            }
            for alpha, entry in per_alpha.items()
        }
    return summary
