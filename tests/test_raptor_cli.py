"""The raptor task end to end through the CLI: teacher training, the DINOv2-register path, resume."""

from __future__ import annotations

import json

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_raptor_data import make_image_folder

from callbacks.rng import RNGStateCallback
from datamodules.images import ImageClassificationDataModule
from lightning_modules.raptor.module import RaptorDistill

SMOKE = "configs/presets/smoke.yaml"


def test_smoke_run_trains_small_teacher(run_cli, tmp_path):
    teacher_dir = tmp_path / "teachers" / "vit" / "tiny"
    teacher_args = (
        f"[--config, {SMOKE}, --model.init_args.depth=4, --model.init_args.embed_dim=16, "
        "--model.init_args.num_heads=2]"
    )
    run_dir = run_cli(
        "fit",
        "raptor",
        "--config",
        SMOKE,
        f"--model.init_args.teacher={teacher_dir}",
        f"--model.init_args.teacher_train_args={teacher_args}",
        "--model.init_args.phase_images=64",
    )
    assert (teacher_dir / "metrics.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = metrics["report"]
    assert report["k"] == 2
    assert 0.0 <= report["raptor_probe_acc"] <= 1.0
    assert report["probe_ratio"] == report["raptor_probe_acc"] / report["teacher_probe_acc"]
    assert len(report["r2_per_layer"].split()) == 4
    assert report["teacher"].endswith(".ckpt")
    assert "test/probe_ratio" in metrics["test"]
    assert (run_dir / "figures" / "phases.png").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])


def test_dinov2_registers_on_image_folder(run_cli, tmp_path):
    folder = make_image_folder(tmp_path / "shapes", per_class=8)
    run_dir = run_cli(
        "fit",
        "raptor",
        "--config",
        SMOKE,
        f"--data.init_args.dataset={folder}",
        "--data.init_args.image_size=28",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        "--model.init_args.teacher=vit_small_patch14_reg4_dinov2",
        "--model.init_args.teacher_pretrained=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    report = json.loads((run_dir / "metrics.json").read_text())["report"]
    assert report["teacher"] == "timm:vit_small_patch14_reg4_dinov2 random"
    assert "r2_reg_mean" in report
    assert len(report["r2_per_layer"].split()) == 12
    assert 0.0 <= report["teacher_probe_acc"] <= 1.0


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def fit_raptor(tmp_path, name: str, callbacks=(), ckpt_path=None) -> RaptorDistill:
    torch.manual_seed(0)
    model = RaptorDistill(
        teacher="vit_tiny_patch16_224",
        image_size=16,
        k=2,
        phase_images=64,
        stage1_fraction=0.5,
        teacher_kwargs={"patch_size": 4, "depth": 4, "embed_dim": 32, "num_heads": 2},
    )
    data = ImageClassificationDataModule(subset=64, batch_size=16)
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / name),
        callbacks=[
            ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True),
            RNGStateCallback(),
            *callbacks,
        ],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_resume_equals_straight_run(tmp_path):
    straight = fit_raptor(tmp_path, "straight")
    fit_raptor(tmp_path, "resumed", callbacks=[StopAfterFirstEpoch()])
    resumed = fit_raptor(tmp_path, "resumed", ckpt_path=str(tmp_path / "resumed" / "last.ckpt"))
    assert resumed.global_step == straight.global_step == 6
    assert resumed.boundaries == straight.boundaries
    resumed_state = resumed.blocks.state_dict()
    for name, value in straight.blocks.state_dict().items():
        a, b = value, resumed_state[name]
        assert torch.allclose(a, b, atol=1e-6), name
