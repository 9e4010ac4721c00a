"""DynamicsAnalysis on a small residual token model: files, contents, CLI attachment, validate runs, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.dynamics import DynamicsAnalysis
from lightning_modules.trajectory import Trajectory

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ("similarity", "convergence", "basins", "perturbation", "speed", "coherence", "rank")


class ToyTokenData(LightningDataModule):
    """Gaussian clusters in 12 dimensions, one per class; the validation split is fixed by `seed`."""

    def __init__(
        self,
        num_classes: int = 3,
        n_samples: int = 96,
        batch_size: int = 16,
        subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        n = min(n_samples, subset) if subset else n_samples
        centres = 2.0 * torch.randn(num_classes, 12, generator=generator)
        labels = torch.arange(n) % num_classes
        inputs = centres[labels] + torch.randn(n, 12, generator=generator)
        half = n // 2
        self.train_set = TensorDataset(inputs[:half], labels[:half])
        self.val_set = TensorDataset(inputs[half:], labels[half:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ToyTokenModel(LightningModule):
    """A cls token and patch tokens updated by `depth` residual tanh layers, with a linear head on cls.

    Every layer also adds a per-sample drive computed from the input, so a rollout is valid only for the
    samples of the batch it came from, as in the wave network.
    """

    def __init__(
        self, num_classes: int = 3, dim: int = 8, n_tokens: int = 5, depth: int = 6, lr: float = 1e-2
    ):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(12, n_tokens * dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def step(self, state: torch.Tensor, layer: int, drive: torch.Tensor) -> torch.Tensor:
        mixed = state + state.mean(dim=1, keepdim=True)
        return state + 0.5 * torch.tanh(self.layers[layer](mixed)) + drive

    def run_layers(self, state: torch.Tensor, start: int, drive: torch.Tensor) -> torch.Tensor:
        states = [state]
        for layer in range(start, self.hparams.depth):
            states.append(self.step(states[-1], layer, drive))
        return torch.stack(states, dim=1)

    def classify(self, final: torch.Tensor) -> torch.Tensor:
        return self.head(final[:, 0])

    def trajectory(self, batch) -> Trajectory:
        inputs, labels = batch
        start = self.embed(inputs).view(inputs.shape[0], self.hparams.n_tokens, self.hparams.dim)
        drive = 0.2 * start.detach()

        def rollout(state: torch.Tensor, layer: int) -> torch.Tensor:
            return self.run_layers(state, layer, drive)

        return Trajectory(
            states=rollout(start, 0),
            token_groups={"cls": torch.tensor([0]), "patch": torch.arange(1, self.hparams.n_tokens)},
            labels=labels,
            rollout=rollout,
            classify=self.classify,
        )

    def forward(self, inputs):
        return self.classify(self.trajectory((inputs, None)).states[:, -1])

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def check_outputs(folder: Path, expected=EXPECTED) -> dict[str, dict]:
    """Assert that every measure wrote a non-blank PNG and a JSON with finite numbers; return the JSONs."""
    numbers = {}
    for name in expected:
        png, data = folder / f"{name}.png", folder / f"{name}.json"
        assert png.is_file(), f"missing {png}"
        assert data.is_file(), f"missing {data}"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 100
        assert pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05, f"{png} looks blank"
        numbers[name] = json.loads(data.read_text())
        assert numbers[name]["measure"] == name
    assert (folder / "summary.json").is_file()
    return numbers


def small_callback(**overrides) -> DynamicsAnalysis:
    settings = dict(probe_size=24, batch_size=8, perturb_seeds=2, perturb_alphas=(0.01, 0.1), num_phases=2)
    settings.update(overrides)
    return DynamicsAnalysis(**settings)


def toy_trainer(tmp_path: Path, callback: DynamicsAnalysis, **trainer_args) -> Trainer:
    """Return a one-epoch Trainer of two training batches with only `callback` attached."""
    settings = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    return Trainer(**{**settings, **trainer_args})


def fit_toy(tmp_path: Path, callback: DynamicsAnalysis, lr: float = 1e-2, **trainer_args) -> Trainer:
    trainer = toy_trainer(tmp_path, callback, **trainer_args)
    torch.manual_seed(0)
    trainer.fit(ToyTokenModel(lr=lr), datamodule=ToyTokenData())
    return trainer


def test_callback_writes_every_measure(tmp_path):
    callback = small_callback()
    fit_toy(tmp_path, callback)
    numbers = check_outputs(tmp_path / "figures" / "dynamics")

    assert numbers["convergence"]["cls"][-1] == pytest.approx(1.0, abs=1e-6)
    assert len(numbers["speed"]["patch"]) == 6
    assert numbers["basins"]["probe_size"] == 24
    assert len(numbers["similarity"]["matrix"]) == 6
    boundaries = numbers["similarity"]["boundaries_from_similarity"]
    assert len(boundaries) == 1
    assert 0 < boundaries[0] < 6
    assert numbers["convergence"]["boundaries"] == boundaries
    depths = sorted({record["depth"] for record in numbers["perturbation"]["records"]})
    assert depths == [1, 2, 3, 4]
    ranks = numbers["rank"]
    assert all(1.0 <= r <= 8.0 for r in ranks["effective_per_image"])  # at most D = 8
    assert callback.ran_after_fit


def test_numbers_match_direct_measures(tmp_path):
    # The callback's numbers equal the measures applied to the model's trajectory on the same probe samples.
    from callbacks.dynamics import measures

    callback = small_callback(measures=("convergence", "rank"))
    trainer = fit_toy(tmp_path, callback)
    model, data = trainer.lightning_module, trainer.datamodule
    probe = callback.probe_indices(len(data.val_set))
    inputs, labels = data.val_set[probe]
    model.eval()
    with torch.no_grad():
        trajectory = model.trajectory((inputs, labels))
    expected = measures.directional_convergence(trajectory.states, trajectory.token_groups)
    written = json.loads((tmp_path / "figures" / "dynamics" / "convergence.json").read_text())
    torch.testing.assert_close(torch.tensor(written["patch"]), expected["patch"], atol=1e-6, rtol=0)


def test_zero_noise_rollout_uses_each_batch(tmp_path):
    # The probe spans three batches whose rollouts hold their own drive: with alpha = 0 every perturbed
    # path must reproduce the clean one exactly.
    callback = small_callback(measures=("perturbation",), perturb_alphas=(0.0,), perturb_depths=[1, 4])
    fit_toy(tmp_path, callback)
    records = json.loads((tmp_path / "figures" / "dynamics" / "perturbation.json").read_text())["records"]
    assert [r["depth"] for r in records] == [1, 4]
    for record in records:
        assert record["agreement"] == 1.0
        for group in ("cls", "patch"):
            assert max(record["groups"][group]["curve"]) == pytest.approx(0.0, abs=1e-6)


def test_validate_on_same_trainer_after_fit_is_skipped(tmp_path):
    callback = small_callback(measures=("convergence",))
    trainer = fit_toy(tmp_path, callback)
    written = tmp_path / "figures" / "dynamics" / "convergence.json"
    stamp = written.stat().st_mtime_ns
    trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule)
    assert written.stat().st_mtime_ns == stamp


def test_sources_write_folders_and_comparison(tmp_path):
    class TwoSourceModel(ToyTokenModel):
        def trajectory(self, batch, source: str = "student") -> Trajectory:
            trajectory = super().trajectory(batch)
            if source == "teacher":
                trajectory.states = trajectory.states * 2.0 + 0.1
            return trajectory

    callback = small_callback(measures=("convergence", "speed", "rank"), sources=["teacher", "student"])
    trainer = toy_trainer(tmp_path, callback, limit_train_batches=1)
    trainer.fit(TwoSourceModel(), datamodule=ToyTokenData())
    folder = tmp_path / "figures" / "dynamics"
    check_outputs(folder / "teacher", ("convergence", "speed", "rank"))
    check_outputs(folder / "student", ("convergence", "speed", "rank"))
    assert (folder / "comparison.png").stat().st_size > 10_000


def test_model_without_trajectory_is_rejected(tmp_path):
    class Plain(ToyTokenModel):
        trajectory = None

    trainer = toy_trainer(tmp_path, small_callback(), limit_train_batches=1)
    with pytest.raises(TypeError, match="trajectory"):
        trainer.fit(Plain(), datamodule=ToyTokenData())


def test_invalid_settings_listed_together():
    with pytest.raises(ValueError) as error:
        DynamicsAnalysis(probe_size=1, measures=("speed", "curvature"), perturb_alphas=(-0.1,))
    message = str(error.value)
    assert "probe_size=1" in message
    assert "curvature" in message
    assert "perturb_alphas" in message


TOY_CONFIG = """
task: toy
model:
  class_path: test_dynamics_callback.ToyTokenModel
data:
  class_path: test_dynamics_callback.ToyTokenData
"""


def run_toy_cli(tmp_path, monkeypatch, *args: str) -> Path:
    import cli

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv(cli.RUN_NAME_ENV, raising=False)
    config = tmp_path / "toy.yaml"
    config.write_text(TOY_CONFIG)
    entry = getattr(cli, "run", None) or cli.main
    return entry(
        [
            args[0],
            "--config",
            "configs/base.yaml",
            "--config",
            str(config),
            "--config",
            "configs/presets/smoke.yaml",
            *args[1:],
            "--runs_root",
            str(tmp_path / "runs"),
        ]
    ).run_dir


def test_cli_append_flags_then_validate_checkpoint(tmp_path, monkeypatch):
    run_dir = run_toy_cli(
        tmp_path,
        monkeypatch,
        "fit",
        "--trainer.callbacks+=callbacks.dynamics.DynamicsAnalysis",
        "--trainer.callbacks.probe_size=20",
        "--trainer.callbacks.perturb_seeds=1",
        "--trainer.callbacks.perturb_alphas=[0.05]",
        "--trainer.callbacks.num_phases=2",
    )
    folder = run_dir / "figures" / "dynamics"
    numbers = check_outputs(folder)
    assert numbers["convergence"]["probe_size"] == 20

    for path in folder.iterdir():
        path.unlink()
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    run_toy_cli(
        tmp_path,
        monkeypatch,
        "validate",
        f"--ckpt_path={checkpoint}",
        "--trainer.callbacks+=callbacks.dynamics.DynamicsAnalysis",
        "--trainer.callbacks.probe_size=20",
        "--trainer.callbacks.measures=[convergence,rank]",
    )
    again = check_outputs(folder, ("convergence", "rank"))
    assert not (folder / "perturbation.json").exists()
    assert again["convergence"]["cls"] == pytest.approx(numbers["convergence"]["cls"], abs=1e-6)


class RecordingAnalysis(DynamicsAnalysis):
    """Appends the rank of every process that writes outputs to <root>/writers.txt."""

    def measure_and_write(self, trainer, trajectory, perturbation, source):
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(trainer.default_root_dir) / "writers.txt", "a") as log_file:
            log_file.write(f"{trainer.global_rank}\n")
        return super().measure_and_write(trainer, trajectory, perturbation, source)


@pytest.mark.slow
def test_ddp_spawn_writes_once_and_matches_single_process(tmp_path):
    # lr = 0 keeps the initial weights, so both runs analyse the same model although DDP splits the data.
    single = small_callback(probe_size=21)  # odd size: the two shares are padded to equal length
    fit_toy(tmp_path / "single", single, lr=0.0, accelerator="cpu", devices=1)
    ddp = RecordingAnalysis(
        probe_size=21, batch_size=8, perturb_seeds=2, perturb_alphas=(0.01, 0.1), num_phases=2
    )
    fit_toy(tmp_path / "ddp", ddp, lr=0.0, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert (tmp_path / "ddp" / "writers.txt").read_text().split() == ["0"]

    single_numbers = check_outputs(tmp_path / "single" / "figures" / "dynamics")
    ddp_numbers = check_outputs(tmp_path / "ddp" / "figures" / "dynamics")
    leftovers = sorted(
        p.name for p in (tmp_path / "ddp" / "figures" / "dynamics").iterdir() if p.suffix == ".tmp"
    )
    assert leftovers == []
    for name in EXPECTED:
        assert flatten(ddp_numbers[name]) == pytest.approx(
            flatten(single_numbers[name]), abs=1e-5, nan_ok=True
        )


def flatten(value) -> list[float]:
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in flatten(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in flatten(item)]
    if isinstance(value, bool) or isinstance(value, str):
        return []
    return [float("nan") if value is None else float(value)]


def test_wandb_rows_cover_curves_matrix_and_records():
    from callbacks.dynamics.callback import flatten_rows

    rows = flatten_rows(
        {
            "matrix": [[1.0, 0.5], [0.5, 1.0]],
            "cls": [0.2, 1.0],
            "records": [
                {"depth": 1, "alpha": 0.1, "groups": {"cls": {"curve": [0.1, 0.05], "contraction": 0.5}}}
            ],
        }
    )
    assert ["matrix/1", 0, 0.5] in rows
    assert ["cls", 1, 1.0] in rows
    assert ["l0=1 alpha=0.1 cls", 2, 0.05] in rows
    assert len(rows) == 8
