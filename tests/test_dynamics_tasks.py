"""DynamicsAnalysis attached from the command line to smoke runs of the raptor, vit and waves tasks."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

SMOKE = "configs/presets/smoke.yaml"
# Lean settings keep each run short: a small probe, one noise seed and one noise size. The raptor task
# config attaches the callback itself, so its run only sets these values.
SETTINGS = (
    "--trainer.callbacks.probe_size=16",
    "--trainer.callbacks.batch_size=16",
    "--trainer.callbacks.perturb_seeds=1",
    "--trainer.callbacks.perturb_alphas=[0.05]",
    "--trainer.callbacks.num_phases=2",
)
CALLBACK = ("--trainer.callbacks+=callbacks.dynamics.DynamicsAnalysis", *SETTINGS)
# One training batch and no test stage on top of the smoke preset: the callback, not training, is under test.
SHORT = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--test_after_fit=false",
)
CLASSIFIER_OUTPUTS = ("similarity", "convergence", "basins", "perturbation", "speed", "coherence", "rank")


def check_folder(folder, names):
    for name in names:
        pixels = matplotlib.image.imread(folder / f"{name}.png")
        assert pixels[..., :3].std() > 0.05, f"{folder / name}.png looks blank"
        numbers = json.loads((folder / f"{name}.json").read_text())
        assert numbers["measure"] == name
        assert numbers["probe_size"] == 16
    return json.loads((folder / "summary.json").read_text())


def test_vit_smoke_run_writes_all_outputs(run_cli):
    run_dir = run_cli("fit", "vit", "--config", SMOKE, *SHORT, *CALLBACK)
    folder = run_dir / "figures" / "dynamics"
    summary = check_folder(folder, CLASSIFIER_OUTPUTS)
    convergence = json.loads((folder / "convergence.json").read_text())
    assert convergence["cls"][-1] == pytest.approx(1.0, abs=1e-5)
    assert len(convergence["cls"]) == 13  # a_0 .. a_12 of the 12-layer vit
    assert 0.0 <= summary["basins"]["ncm_accuracy_last"] <= 1.0


def test_raptor_smoke_run_teacher_and_raptor(run_cli):
    run_dir = run_cli(
        "fit",
        "raptor",
        "--config",
        SMOKE,
        *SHORT,
        "--model.init_args.teacher=vit_tiny_patch16_224",
        "--model.init_args.teacher_pretrained=false",
        "--model.init_args.teacher_kwargs={patch_size: 4, depth: 4, embed_dim: 32, num_heads: 2}",
        "--model.init_args.phase_images=64",
        *SETTINGS,
    )
    folder = run_dir / "figures" / "dynamics"
    for source in ("teacher", "raptor"):
        check_folder(folder / source, CLASSIFIER_OUTPUTS)
    assert (folder / "comparison.png").is_file()
    # Raptor's trajectory brings its own phase boundaries, which every depth plot uses.
    raptor_similarity = json.loads((folder / "raptor" / "similarity.json").read_text())
    assert raptor_similarity["boundaries_drawn"] == raptor_similarity["boundaries_from_model"]
    assert len(raptor_similarity["boundaries_from_model"]) == 1  # k = 2 phases


def test_waves_smoke_run_writes_unlabelled_outputs(run_cli):
    run_dir = run_cli("fit", "waves", "--config", SMOKE, *SHORT, *CALLBACK, "--model.init_args.steps=12")
    folder = run_dir / "figures" / "dynamics"
    check_folder(folder, ("similarity", "convergence", "perturbation", "speed", "coherence", "rank"))
    assert not (folder / "basins.json").exists()  # segmentation has no class labels
    rank = json.loads((folder / "rank.json").read_text())
    assert max(rank["effective_per_image"]) <= 2.0 + 1e-6  # two hidden channels bound the rank
