"""Raptor blocks, schedules, token weights, exact reconstruction and one-line errors for bad teachers."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import Block

from lightning_modules.raptor.blocks import DepthScale, RaptorBlock, count_parameters
from lightning_modules.raptor.evaluation import FidelityR2, fit_linear_probe, r2_score
from lightning_modules.raptor.module import RaptorDistill, tf_weight, weighted_mse
from lightning_modules.vit import backbone
from lightning_modules.vit.module import warmup_cosine


def make(**kwargs) -> RaptorDistill:
    return RaptorDistill(**kwargs).build()


TINY_TEACHER = {
    "teacher": "vit_tiny_patch16_224",
    "teacher_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": 32, "num_heads": 2, "reg_tokens": 2},
    "image_size": 16,
}


def test_raptor_block_params_at_768():
    assert count_parameters(RaptorBlock(768, 12, mlp="swiglu")) == 9_490_976


def test_teacher_block_params_at_768():
    assert count_parameters(Block(768, 12, qkv_bias=True, init_values=1e-5)) == 7_089_408


def test_depth_scale_zero_init_is_identity():
    scale = DepthScale(16, init="zero")
    s_attn, s_mlp, s_out = scale(torch.tensor([1.0, 7.0, 12.0]))
    for s in (s_attn, s_mlp, s_out):
        assert torch.equal(s, torch.ones(3, 1, 16))


def test_depth_scale_small_init_near_one():
    s_attn, _, _ = DepthScale(16, init="small")(torch.tensor([12.0]))
    deviation = (s_attn - 1).abs().max().item()
    assert 0 < deviation < 1e-2


def test_zero_depth_scaling_matches_unscaled_block():
    torch.manual_seed(0)
    scaled = RaptorBlock(16, 2, depth_scaling="zero", init_values=0.5)
    plain = RaptorBlock(16, 2, depth_scaling="none", init_values=0.5)
    plain.load_state_dict({k: v for k, v in scaled.state_dict().items() if not k.startswith("depth.")})
    x = torch.randn(3, 5, 16)
    t = torch.tensor([1.0, 5.0, 9.0])
    assert torch.allclose(scaled(x, t), plain(x, t), atol=1e-7)


def test_depth_scaling_depends_on_layer():
    torch.manual_seed(0)
    block = RaptorBlock(16, 2, depth_scaling="small", init_values=0.5)
    torch.nn.init.normal_(block.depth.net[2].weight, std=0.5)
    x = torch.randn(1, 5, 16).repeat(2, 1, 1)
    out = block(x, torch.tensor([1.0, 9.0]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("fraction,expected", [(0.0, 1.0), (0.125, 0.5), (0.25, 0.0), (0.6, 0.0)])
def test_tf_schedule(fraction, expected):
    total = 312_500
    assert tf_weight(int(fraction * total), total, 0.25) == pytest.approx(expected, abs=1e-4)


def test_lr_schedule_published_points():
    total, warmup, peak, final = 312_500, 10_000, 3e-4, 1e-6
    assert warmup_cosine(0, total, warmup, peak, final) == 0.0
    assert warmup_cosine(5_000, total, warmup, peak, final) == pytest.approx(1.5e-4)
    assert warmup_cosine(10_000, total, warmup, peak, final) == pytest.approx(3e-4)
    assert warmup_cosine(total, total, warmup, peak, final) == pytest.approx(1e-6)
    middle = warmup + (total - warmup) // 2
    assert warmup_cosine(middle, total, warmup, peak, final) == pytest.approx((peak + final) / 2, rel=1e-4)


def token_groups():
    return {"cls": torch.tensor([0]), "reg": torch.arange(1, 5), "patch": torch.arange(5, 21)}


def test_token_weights_cls_only():
    target = torch.zeros(2, 21, 8)
    pred = target.clone()
    pred[:, 5:] = 3.0  # error on patches only
    assert weighted_mse(pred, target, [1.0, 0.0, 0.0], token_groups()).item() == 0.0
    pred[:, 0] = 2.0  # error on cls
    assert weighted_mse(pred, target, [1.0, 0.0, 0.0], token_groups()).item() == pytest.approx(4.0)


def test_token_weights_combination():
    target = torch.zeros(1, 21, 4)
    pred = torch.zeros(1, 21, 4)
    pred[:, 0] = 1.0  # cls MSE 1
    pred[:, 1:5] = 2.0  # reg MSE 4
    pred[:, 5:] = 3.0  # patch MSE 9
    value = weighted_mse(pred, target, [0.45, 0.10, 0.45], token_groups()).item()
    assert value == pytest.approx(0.45 * 1 + 0.10 * 4 + 0.45 * 9)
    unweighted = weighted_mse(pred, target, None, token_groups()).item()
    assert unweighted == pytest.approx((1 + 4 * 4 + 16 * 9) / 21)


def test_exact_reconstruction_dinov2_architecture():
    torch.manual_seed(0)
    model = make(
        teacher="vit_small_patch14_reg4_dinov2",
        image_size=28,
        k=12,
        phase_boundaries=list(range(1, 13)),
        block="teacher",
        block_init="copy",
    )
    for param in model.teacher.parameters():  # random LayerScale 1e-5 would hide errors: make blocks matter
        if param.dim() == 1 and param.numel() == model.dim:
            param.data.normal_(0, 0.5)
    model._build_blocks(list(range(1, 13)))
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        targets = model.teacher_states(images)
        predictions = model.rollout(targets[0], 0, 12)
    assert len(predictions) == 12
    for layer, (p, y) in enumerate(zip(predictions, targets[1:], strict=False), 1):
        relative = ((p - y).norm() / y.norm()).item()
        assert relative < 1e-5, f"layer {layer}: relative error {relative}"
    assert r2_score(torch.stack(predictions), torch.stack(targets[1:])) == pytest.approx(1.0, abs=1e-6)


def test_routing_inside_model():
    model = make(**TINY_TEACHER, k=2, phase_boundaries=[3, 4])
    assert model.routing == [0, 0, 0, 1]
    assert len(model.blocks) == 2


def test_stage2_gradients_reach_every_block_only():
    torch.manual_seed(0)
    model = make(**TINY_TEACHER, k=2, phase_boundaries=[2, 4], init_values=0.1)
    states = model.teacher_states(torch.randn(2, 3, 16, 16))
    loss = model.segment_loss(states, 0, 4, 0.0, [0.45, 0.10, 0.45])
    loss.backward()
    for block in model.blocks:
        assert block.attn.qkv.weight.grad is not None
        assert block.attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_checkpoint_excludes_teacher():
    model = make(**TINY_TEACHER, k=2, phase_boundaries=[2, 4])
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    assert checkpoint["raptor_phase_bounds"] == [2, 4]
    fresh = make(**TINY_TEACHER, k=None)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.boundaries == [2, 4]
    assert torch.equal(fresh.blocks[1].gamma1, model.blocks[1].gamma1)


def test_fidelity_r2_reference_values():
    groups = token_groups()
    target = [torch.randn(4, 21, 8) for _ in range(2)]
    perfect = FidelityR2(2, groups)
    perfect.update(target, target)
    assert torch.allclose(perfect.per_layer(), torch.ones(2, dtype=torch.float64))
    mean_only = FidelityR2(2, groups)
    means = [t.reshape(-1, 8).mean(0).expand_as(t) for t in target]
    mean_only.update(means, target)
    assert torch.allclose(mean_only.per_layer(), torch.zeros(2, dtype=torch.float64), atol=1e-9)


def test_linear_probe_separable_data():
    torch.manual_seed(0)
    centers = torch.randn(3, 5) * 4
    labels = torch.arange(3).repeat(40)
    features = centers[labels] + 0.1 * torch.randn(120, 5)
    probe = fit_linear_probe(features[:90], labels[:90], features[90:], labels[90:], 3)
    assert probe.accuracy(features[90:], labels[90:]) == 1.0


def test_trajectory_groups_and_rollout():
    model = make(**TINY_TEACHER, k=2, phase_boundaries=[2, 4])
    batch = (torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    trajectory = model.trajectory(batch)
    assert trajectory.states.shape == (3, 5, 19, 32)
    assert trajectory.token_groups["reg"].tolist() == [1, 2]
    assert trajectory.boundaries == [2]
    continued = trajectory.rollout(trajectory.states[:, 2], 2)
    assert torch.allclose(continued, trajectory.states[:, 2:], atol=1e-6)
    teacher = model.trajectory(batch, source="teacher")
    expected = torch.stack(backbone.hidden_states(model.teacher, batch[0]), 1)
    assert torch.allclose(teacher.states, expected, atol=1e-6)
    assert trajectory.classify(trajectory.states[:, -1]).shape[0] == 3


def test_k_zero_is_rejected():
    with pytest.raises(ValueError, match="k=0 is invalid"):
        RaptorDistill(**TINY_TEACHER, k=0)


def test_k_above_depth_is_rejected():
    with pytest.raises(ValueError, match="k=5 is invalid for a teacher of depth 4"):
        make(**TINY_TEACHER, k=5)


def test_construction_is_lazy(tmp_path):
    model = RaptorDistill(teacher=str(tmp_path / "vit" / "never-built"))
    assert model.teacher is None
    assert not (tmp_path / "vit").exists()


def test_unknown_timm_name_is_rejected():
    with pytest.raises(ValueError, match="'vit_no_such_model' is not a timm model name"):
        make(teacher="vit_no_such_model", image_size=16)


def test_non_vit_teacher_is_rejected():
    with pytest.raises(TypeError, match="ResNet, not a timm VisionTransformer"):
        make(teacher="resnet18", image_size=16)


def test_missing_weights_file_is_rejected(tmp_path):
    missing = tmp_path / "nothing.pth"
    with pytest.raises(FileNotFoundError, match="nothing.pth was not found"):
        make(**TINY_TEACHER, teacher_weights=str(missing))


def test_corrupt_weights_file_is_rejected(tmp_path):
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="broken.pth could not be read"):
        make(**TINY_TEACHER, teacher_weights=str(corrupt))


def test_weights_file_round_trip(tmp_path):
    source = make(**TINY_TEACHER, k=1)
    path = tmp_path / "teacher.pth"
    torch.save(source.teacher.state_dict(), path)
    loaded = make(**TINY_TEACHER, k=1, teacher_weights=str(path))
    assert torch.equal(loaded.teacher.pos_embed, source.teacher.pos_embed)


def test_mismatched_weights_file_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="does not match the teacher architecture"):
        make(**TINY_TEACHER, teacher_weights=str(path))


def test_missing_teacher_run_without_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="contains no checkpoint"):
        make(teacher=str(tmp_path / "vit" / "none"), train_teacher=False)


def test_stage_one_losses_vanish_for_copied_blocks():
    model = make(
        teacher="vit_tiny_patch16_224",
        teacher_kwargs=TINY_TEACHER["teacher_kwargs"],
        image_size=16,
        k=4,
        phase_boundaries=[1, 2, 3, 4],
        block="teacher",
        block_init="copy",
    )
    states = model.teacher_states(torch.randn(2, 3, 16, 16))
    for lam in (1.0, 0.5, 0.0):
        assert model.segment_loss(states, 0, 4, lam, None).item() < 1e-10
    assert not math.isnan(model.segment_loss(states, 0, 4, 0.0, [0.34, 0.33, 0.33]).item())
