"""The vit task: smoke run through the CLI, uniform stochastic depth, trajectory and rollout."""

from __future__ import annotations

import json

import pytest
import torch
from timm.layers import DropPath

from lightning_modules.vit.module import ViTClassifier, random_shift


def test_vit_smoke_run(run_cli):
    run_dir = run_cli("fit", "vit", "--config", "configs/presets/smoke.yaml", "--model.init_args.depth=4")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    assert "val/acc" in metrics["validate"]
    assert list((run_dir / "checkpoints").glob("best*.ckpt"))


def test_drop_path_uniform_over_blocks():
    model = ViTClassifier(depth=3, drop_path_rate=0.3)
    rates = [block.drop_path1.drop_prob for block in model.model.blocks]
    assert rates == [0.3, 0.3, 0.3]
    assert all(isinstance(block.drop_path2, DropPath) for block in model.model.blocks)


def test_drop_path_rate_out_of_range():
    with pytest.raises(ValueError, match="drop_path_rate=1.0 is invalid"):
        ViTClassifier(drop_path_rate=1.0)


def test_trajectory_rollout_and_head():
    torch.manual_seed(0)
    model = ViTClassifier(depth=3, embed_dim=16, num_heads=2, reg_tokens=2).eval()
    images = torch.randn(2, 3, 16, 16)
    trajectory = model.trajectory((images, torch.tensor([1, 2])))
    assert trajectory.states.shape == (2, 4, 19, 16)
    assert trajectory.token_groups["patch"].tolist() == list(range(3, 19))
    continued = trajectory.rollout(trajectory.states[:, 1], 1)
    assert torch.allclose(continued, trajectory.states[:, 1:], atol=1e-6)
    logits = trajectory.classify(trajectory.states[:, -1])
    assert torch.allclose(logits, model(images), atol=1e-5)


def test_random_shift_keeps_content():
    images = torch.zeros(4, 1, 8, 8)
    images[:, :, 3:5, 3:5] = 1.0
    shifted = random_shift(images, 1)
    assert shifted.shape == images.shape
    assert shifted.sum(dim=(1, 2, 3)).tolist() == [4.0] * 4
