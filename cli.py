"""The `dynlab` command: LightningCLI with one run folder per run, wandb logging and a final summary.

    dynlab fit --config configs/base.yaml --config configs/tasks/waves.yaml --model.init_args.readout=fft

Each run writes `runs/<task>/<run_name>/` with the resolved `config.yaml`, `checkpoints/` (last and best),
`figures/`, `metrics.json` and the wandb run. `--ckpt_path=last` without `--run_name` resumes the newest
run of the task that has a `last.ckpt`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.checkpoint import SafeModelCheckpoint, check_checkpoint_file
from callbacks.rng import RNGStateCallback

log = logging.getLogger("dynlab")

# Values the data decides and the model needs: DataModule attribute -> model argument. A link applies only
# where both sides exist, so each task picks up the pairs that concern it.
DATA_TO_MODEL_LINKS = {
    "num_classes": "num_classes",
    "in_channels": "in_channels",
    "image_size": "image_size",
    "state_dim": "state_dim",
    "variable_names": "variable_names",
    "dt": "dt",
}

RUN_NAME_ENV = "DYNLAB_RUN_NAME"
WandbMode = Literal["auto", "online", "offline", "disabled"]


def wandb_has_credentials() -> bool:
    """Tell whether wandb could log live: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_wandb_mode(mode: str) -> str:
    """Map `auto` to online or offline; `$WANDB_MODE` wins over `auto` so tests can disable wandb."""
    valid = ("auto", "online", "offline", "disabled")
    if mode not in valid:
        raise ValueError(f"wandb_mode={mode!r} is invalid: choose one of {', '.join(valid)}.")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


def infer_task(model_class_path: str | None) -> str:
    """Name the task after the model's subpackage (`lightning_modules.waves.module.X` -> `waves`)."""
    parts = (model_class_path or "").split(".")
    if len(parts) >= 2 and parts[0] == "lightning_modules":
        return parts[1]
    return parts[-1].lower() if parts and parts[-1] else "default"


def latest_resumable_run(task_dir: Path) -> Path | None:
    """Return the newest run folder under `task_dir` that contains `checkpoints/last.ckpt`."""
    candidates = [p.parent.parent for p in task_dir.glob("*/checkpoints/last.ckpt")]
    return max(candidates, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime, default=None)


def flatten_metrics(results: list[dict[str, float]] | None) -> dict[str, float]:
    """Merge the per-dataloader dicts that `trainer.validate` and `trainer.test` return."""
    merged: dict[str, float] = {}
    for entry in results or []:
        for key, value in entry.items():
            merged[key] = float(value)
    return merged


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------- one-line config errors
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_SUBCOMMAND_OPTION = re.compile(r"Subcommand '(\w+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
_EXPECTED = re.compile(r"Expected an? (.+?)\.? Got value: (.+)")
_GIVEN_VALUE = re.compile(r"Given value: (.+)")
_EXPECTED_TYPE = re.compile(r"- Expected an? (<class '(\w+)'>|typing\.Literal\[.+?\]|\S+)")
_STRUCTURAL = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
)


def init_argument_names(class_path: str) -> list[str]:
    """Return the `__init__` argument names of the class at `class_path`, or [] if it cannot be imported."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if (
                name != "self"
                and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
                and name not in names
            ):
                names.append(name)
        break
    return names


def suggestion(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def readable_type(text: str) -> str:
    text = text.strip()
    match = re.fullmatch(r"<class '(\w+)'>", text)
    if match:
        return match.group(1)
    match = re.fullmatch(r"typing\.Literal\[(.+)\]", text)
    return f"one of {match.group(1)}" if match else text


def condense_parse_error(message: str, subcommand: str | None = None) -> str:
    """Rewrite a jsonargparse error message as one line with the key, the offending value and a fix."""
    help_hint = f"run `dynlab {subcommand or 'fit'} --help` for the valid keys"

    match = _SUBCOMMAND_OPTION.search(message)
    if match:
        key = match.group(2)
        return f"unknown config key {key!r} (check its spelling in the YAML file or flag; {help_hint})."

    match = _UNRECOGNIZED.search(message)
    if match:
        return f"unknown option {match.group(1).strip()} (check its spelling; {help_hint})."

    keys = _PARSER_KEY.findall(message)
    class_paths = _CLASS_PATH.findall(message)
    location = keys[0] if keys else "the configuration"
    if class_paths and len(keys) > 1:
        location = f"{keys[0]}.init_args.{'.'.join(keys[1:])}"

    match = _NOT_ACCEPTED.search(message)
    if match:
        option = match.group(1)
        class_path = class_paths[-1] if class_paths else ""
        valid = init_argument_names(class_path) if class_path else []
        listed = f"; valid: {', '.join(valid)}" if valid else ""
        return (
            f"unknown config key {keys[0] if keys else 'init_args'}.init_args.{option} for {class_path}"
            f"{suggestion(option, valid)}{listed}."
        )

    if "has no attribute" in message or "No module named" in message:
        target = class_paths[-1] if class_paths else location
        return (
            f"{location}: class {target!r} not found: give an importable class path such as "
            "lightning_modules.<task>.<Class>."
        )

    if "File does not exist" in message:
        path = message.split("File does not exist:", 1)[1].strip().strip("'")
        return f"config file {path!r} does not exist: check the path passed to --config."

    match = _EXPECTED.search(message)
    if match:
        return f"{location}={match.group(2).strip()!r} is invalid: expected {readable_type(match.group(1))}."

    given = _GIVEN_VALUE.search(message)
    expected = [readable_type(t) for t, _ in _EXPECTED_TYPE.findall(message) if "NoneType" not in t]
    if given and expected:
        return f"{location}={given.group(1).strip()!r} is invalid: expected {' or '.join(expected)}."

    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    useful = [
        line for line in lines if not line.startswith(_STRUCTURAL) and not line.startswith("Parser key")
    ]
    detail = message
    if useful:
        detail = useful[-1]
    elif lines:
        detail = lines[-1]
    return f"invalid configuration at {location}: {detail} ({help_hint})."


def state_dict_mismatch(message: str) -> str:
    """Reduce torch's multi-line load_state_dict error to its first problem and a count of the rest."""
    problems = [line.strip().rstrip(".") for line in message.splitlines()[1:] if line.strip()]
    if not problems:
        return message.splitlines()[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}."


def compile_in_place(model: LightningModule) -> None:
    """Compile the model's hot modules with torch.compile, in place so state-dict keys stay unchanged.

    A model may name its hot modules in `compile_targets()`; otherwise its direct children are compiled.
    Compiling a submodule by wrapping it would add `_orig_mod.` to every key and break checkpoint loading.
    """
    targets = model.compile_targets() if hasattr(model, "compile_targets") else list(model.children())
    for module in targets:
        module.compile()
    log.info("compiled %d module(s) of %s with torch.compile", len(targets), type(model).__name__)


def skip_repeated_gpu_probe() -> None:
    """Unset PYTORCH_NVML_BASED_CUDA_CHECK on a machine without a GPU, after one check.

    `import lightning` sets the variable so that CUDA checks go through NVML and do not poison forked
    workers. torch then reloads the NVML library in every optimizer step to look for a GPU, which costs
    about 0.2 ms per step where there is none (3 % of a HyperSINDy step on a CPU).
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


class ConfigError(ValueError):
    """A configuration the parser rejected; the message is one line with the key and the fix."""


class DynlabCLI(LightningCLI):
    """LightningCLI in subclass mode for models and data, with run folders and a metrics summary."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        skip_repeated_gpu_probe()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    # ------------------------------------------------------------------ parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--task", type=str | None, default=None, help="Task name; picks runs/<task>/.")
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Name of the run folder under runs/<task>/ (default: a time stamp). Reuse it to resume.",
        )
        parser.add_argument(
            "--runs_root", type=str, default="runs", help="Folder that contains runs/<task>/."
        )
        parser.add_argument(
            "--wandb_mode",
            type=WandbMode,
            default="auto",
            help="auto: online with an API key, else an offline run to upload later with `wandb sync`.",
        )
        parser.add_argument("--wandb_project", type=str, default="dynlab", help="wandb project name.")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="Also refresh checkpoints/last.ckpt every N training steps, so a killed run loses at most N steps.",
        )
        parser.add_argument(
            "--compile",
            type=bool,
            default=False,
            help="torch.compile the model in place (opt-in); checkpoints keep the same keys either way.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, validate and test the best checkpoint and write metrics.json.",
        )

        # Checkpointing is always on: last for resume, best by the task's monitored metric.
        parser.add_lightning_class_args(SafeModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                # A resumed run overwrites last.ckpt instead of writing last-v1.ckpt beside it.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(RNGStateCallback, "rng_state")

        for source, target in DATA_TO_MODEL_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, but report a bad config as `ConfigError` with a one-line message."""
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            subcommand = next((a for a in (args or sys.argv[1:]) if a in self.subcommands()), None)
            raise ConfigError(condense_parse_error(str(error), subcommand)) from None

    def _parse_ckpt_path(self) -> None:
        """Check an explicit checkpoint file before LightningCLI reads its hyperparameters."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            check_checkpoint_file(Path(ckpt_path))
            self._check_checkpoint_model(Path(ckpt_path), self.config[subcommand].model.class_path)
        try:
            super()._parse_ckpt_path()
        except ArgumentError as error:
            model = self.config[subcommand].model.class_path
            raise ConfigError(
                f"checkpoint {ckpt_path} does not fit model {model}: {condense_parse_error(str(error), subcommand)} "
                "Pass a checkpoint saved by this task's model, or the config it was trained with."
            ) from None

    @staticmethod
    def _check_checkpoint_model(ckpt_path: Path, model_class_path: str) -> None:
        """Raise when the checkpoint was saved by another model class than the config builds."""
        hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        saved_class = hparams.get("_class_path")
        if saved_class and saved_class != model_class_path:
            raise ConfigError(
                f"checkpoint {ckpt_path} was saved by {saved_class} (task {infer_task(saved_class)!r}) but this "
                f"config builds {model_class_path}: pass a checkpoint of this task, or that task's config."
            )

    # --------------------------------------------------------------- run folder
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_path = config.model.class_path if config.get("model") else None
        task = config.task or infer_task(model_path)
        config.task = task
        task_dir = Path(config.runs_root) / task

        ckpt_path = config.get("ckpt_path")
        run_name = config.run_name or os.environ.get(RUN_NAME_ENV)
        if ckpt_path == "last":
            if run_name is None:
                previous = latest_resumable_run(task_dir)
                if previous is None:
                    raise FileNotFoundError(
                        f"--ckpt_path=last found no run of task {task!r} with checkpoints/last.ckpt under "
                        f"{task_dir}: start a new run without --ckpt_path, or pass --run_name of the run."
                    )
                run_name = previous.name
            config.ckpt_path = str(task_dir / run_name / "checkpoints" / "last.ckpt")
        elif ckpt_path not in (None, "best") and run_name is None:
            # Evaluating a checkpoint of a run writes its figures and metrics into that run's folder.
            ckpt_file = Path(ckpt_path)
            if ckpt_file.parent.name == "checkpoints":
                run_name = ckpt_file.parent.parent.name
                task_dir = ckpt_file.parent.parent.parent
        if ckpt_path not in (None, "best"):
            check_checkpoint_file(Path(config.ckpt_path))

        if run_name is None:
            run_name = time.strftime("%Y%m%d-%H%M%S")
            while (task_dir / run_name).exists():
                run_name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        if not re.fullmatch(r"[\w.\-]+", run_name):
            raise ValueError(f"run_name={run_name!r} is invalid: use letters, digits, '.', '_' and '-' only.")
        os.environ[RUN_NAME_ENV] = run_name  # DDP workers re-run this command and must pick the same folder
        config.run_name = run_name

        run_dir = task_dir / run_name
        self.run_dir = run_dir
        try:
            (run_dir / "figures").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PermissionError(
                f"cannot create the run folder {run_dir}: {error.strerror}. Pass --runs_root=<writable folder>."
            ) from error
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(
                f"run folder {run_dir} is not writable: pass --runs_root=<writable folder>."
            )

        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
        self.wandb_mode = resolve_wandb_mode(config.wandb_mode)

    def after_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("compile"):
            compile_in_place(self.model)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_config.get("logger") in (None, True):
            trainer_config["logger"] = self.make_logger(config)

        extra_callbacks = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        every = config.get("checkpoint_every_n_steps")
        if every:
            # A second checkpoint callback that only refreshes last.ckpt mid-epoch; the main one keeps the best.
            extra_callbacks.append(
                SafeModelCheckpoint(
                    dirpath=config.checkpoint.dirpath,
                    save_last=True,
                    save_top_k=0,
                    every_n_train_steps=every,
                    enable_version_counter=False,
                )
            )
        return self._instantiate_trainer(trainer_config, extra_callbacks)

    def make_logger(self, config) -> WandbLogger:
        run_id = re.sub(r"[^\w\-]", "-", f"{config.task}-{config.run_name}")
        return WandbLogger(
            name=config.run_name,
            save_dir=str(self.run_dir),
            project=config.wandb_project,
            id=run_id,
            mode=self.wandb_mode,
            group=config.task,
            job_type=self.subcommand or "run",
        )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            ckpt_path = self.config[subcommand].get("ckpt_path")
            raise ConfigError(
                f"checkpoint {ckpt_path} does not match the model: {state_dict_mismatch(str(error))} "
                "Use the config the checkpoint was trained with (config.yaml in its run folder)."
            ) from None

    # ------------------------------------------------------------ after stages
    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if self.trainer.interrupted:
            log.warning(
                "training was interrupted; resume with --ckpt_path=last --run_name=%s", config.run_name
            )
            return
        if not config.test_after_fit:
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        ckpt = best if best and Path(best).is_file() else None
        results = {"best_checkpoint": ckpt or "(final weights)"}
        results["validate"] = flatten_metrics(
            self.trainer.validate(self.model, self.datamodule, ckpt_path=ckpt)
        )
        results["test"] = flatten_metrics(self.trainer.test(self.model, self.datamodule, ckpt_path=ckpt))
        self.finish(results)

    def after_validate(self) -> None:
        self.finish({"validate": flatten_metrics([dict(self.trainer.callback_metrics)])})

    def after_test(self) -> None:
        self.finish({"test": flatten_metrics([dict(self.trainer.callback_metrics)])})

    def finish(self, results: dict[str, Any]) -> None:
        """Write metrics.json (merged with what an earlier stage wrote) and print the summary."""
        if not self.trainer.is_global_zero:
            return
        results.update(self.model_summary_metrics())
        path = self.run_dir / "metrics.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        previous.update(results)
        write_json_atomic(path, previous)
        finish_wandb()  # wandb prints its own run summary on finish; the run folder must stay the last line
        print_summary(previous, self.run_dir)

    def model_summary_metrics(self) -> dict[str, Any]:
        """Extra task numbers a model reports at the end (for example Raptor's probe ratio)."""
        report = getattr(self.model, "final_report", None)
        return {"report": report()} if callable(report) else {}


@rank_zero_only
def print_summary(results: dict[str, Any], run_dir: Path) -> None:
    """Print the final metrics as a table, then the run folder as the last line."""
    stages = [s for s in ("validate", "test") if isinstance(results.get(s), dict)]
    keys = sorted({k.split("/", 1)[-1] for s in stages for k in results[s]})
    report = results.get("report")
    report_keys = list(report) if isinstance(report, dict) else []
    width = max([len(k) for k in keys + report_keys] + [10])
    lines = ["", f"{'metric':<{width}}  " + "  ".join(f"{s:>10}" for s in stages)]
    for key in keys:
        cells = []
        for stage in stages:
            value = next((v for k, v in results[stage].items() if k.split("/", 1)[-1] == key), None)
            cells.append(
                f"{value:>10.4f}" if isinstance(value, float) and math.isfinite(value) else f"{'-':>10}"
            )
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    if isinstance(report, dict):
        lines.append("")
        for key, value in report.items():
            if isinstance(value, float) and value.is_integer():
                shown = str(int(value))
            elif isinstance(value, float):
                shown = f"{value:.4f}"
            else:
                shown = str(value)
            lines.append(f"{key:<{width}}  {shown}")
    if "best_checkpoint" in results:
        lines.append(f"best checkpoint: {results['best_checkpoint']}")
    lines.append(f"metrics: {run_dir / 'metrics.json'}")
    lines.append(str(run_dir))
    print("\n".join(lines), flush=True)


def finish_wandb() -> None:
    """Close the wandb run so the next run in this process (a sweep, a test) starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run(args: list[str] | None = None) -> DynlabCLI:
    """Parse `args` (default: sys.argv), run the subcommand and return the CLI object."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    try:
        return DynlabCLI(args=args)
    finally:
        finish_wandb()


# Errors that bad input raises on purpose; the console shows their one-line message, not a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError)


def main() -> None:
    """Entry point of the `dynlab` console script; set DYNLAB_DEBUG=1 for full tracebacks."""
    try:
        run()
    except USER_ERRORS as error:
        if os.environ.get("DYNLAB_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
