"""WaveSegmenter: parameter counts, readout shapes, errors, metrics identities and a CLI smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.waves import WaveSegmenter
from lightning_modules.waves.layers import TemporalReadout
from lightning_modules.waves.metrics import SegmentationMetrics, per_image_scores, pooled_iou


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


TETROMINOES = dict(num_classes=6, in_channels=3)
MNIST = dict(num_classes=11, in_channels=1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(**TETROMINOES, readout="linear"), 176_124),
        (dict(**TETROMINOES, readout="fft"), 176_124),
        (dict(**TETROMINOES, readout="last"), 150_524),
        (dict(**MNIST, readout="linear"), 176_545),
        (dict(**MNIST, readout="mean"), 150_945),
        (dict(**TETROMINOES, backbone="convlstm", steps=20), 151_046),
        (dict(**MNIST, backbone="convlstm", steps=20, readout="fft"), 151_467),
        (dict(**TETROMINOES, backbone="cnn", cnn_layers=2), 159_502),
        (dict(**TETROMINOES, backbone="cnn", cnn_layers=8), 173_422),
        (dict(**TETROMINOES, backbone="cnn", cnn_layers=32), 229_102),
        (dict(**MNIST, backbone="cnn", cnn_layers=16), 192_979),
        (dict(**MNIST, channels=16, head_widths=[32] * 5), 54_855),
        (dict(**MNIST, backbone="unet", unet_width=2), 30_745),
        (dict(**MNIST, backbone="unet", unet_width=5), 190_456),
    ],
)
def test_parameter_counts_match_published(kwargs, expected):
    assert count(WaveSegmenter(**kwargs)) == expected


def test_wave_parameter_breakdown():
    net = WaveSegmenter(**TETROMINOES).net
    encoders = sum(count(m) for m in (net.omega_encoder, net.alpha_encoder, net.y0_encoder))
    assert (encoders, count(net.cell), count(net.readout)) == (11_494, 36, 5_100)


def test_readout_shapes_and_values():
    states = torch.randn(100, 2, 2, 5, 6)
    fft = TemporalReadout("fft", 100, 2)
    rows = fft(states)
    assert rows.shape == (2 * 5 * 6, 102)
    assert fft.out_features == 102
    # Frequency-major features: index k * C + c; the DC bin is |sum_t y_t|.
    pixel = states[:, 1, :, 3, 4]  # (T, C) at image 1, row 3, column 4
    row = rows[1 * 30 + 3 * 6 + 4]
    torch.testing.assert_close(row[:2], pixel.sum(0).abs(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(row[2 * 5 + 1], torch.fft.rfft(pixel[:, 1]).abs()[5], rtol=1e-5, atol=1e-4)
    linear = TemporalReadout("linear", 100, 2)
    assert linear.fc_time.bias is None
    assert linear.fc_time.weight.shape == (51, 100)
    torch.testing.assert_close(linear(states)[1 * 30 + 3 * 6 + 4].view(51, 2), linear.fc_time.weight @ pixel)
    for name, reduce in (
        ("last", lambda s: s[-1]),
        ("mean", lambda s: s.mean(0)),
        ("max", lambda s: s.amax(0)),
    ):
        torch.testing.assert_close(TemporalReadout(name, 100, 2)(states)[1 * 30 + 3 * 6 + 4], reduce(pixel))


@pytest.mark.parametrize(("argument", "valid"), [("readout", "fft, linear"), ("backbone", "wave, convlstm")])
def test_unknown_choice_one_line_error(argument, valid):
    with pytest.raises(ValueError) as error:
        WaveSegmenter(**{argument: "spectral"})
    message = str(error.value)
    assert "\n" not in message
    assert f"{argument}='spectral' is invalid" in message
    assert valid in message


def test_nan_loss_stops_training(tmp_path):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    model = WaveSegmenter(steps=3, head_widths=[4])
    images = torch.full((2, 3, 8, 8), float("nan"))
    loader = DataLoader(TensorDataset(images, torch.zeros(2, 8, 8, dtype=torch.long)), batch_size=1)
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0, step 0"):
        trainer.fit(model, loader)


def test_trajectory_states_and_rollout():
    torch.manual_seed(0)
    model = WaveSegmenter(steps=6, head_widths=[4]).eval()
    images = torch.rand(2, 3, 8, 8)
    trajectory = model.trajectory((images, None))
    assert trajectory.states.shape == (2, 7, 64, 2)
    torch.testing.assert_close(
        trajectory.states[:, 1:], model.hidden_states(images)[1:].flatten(3).permute(1, 0, 3, 2)
    )
    resumed = trajectory.rollout(trajectory.states[:, 2], 2)
    torch.testing.assert_close(resumed, trajectory.states[:, 2:], rtol=1e-5, atol=1e-6)


def test_iou_identity_per_image():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 12, 12, generator=generator)
    target = torch.randint(0, 5, (6, 12, 12), generator=generator)
    target[:, :4] = 0
    scores = per_image_scores(logits, target)
    prediction = logits.argmax(1)
    for i in range(6):
        torch.testing.assert_close(
            scores["iou"][i], pooled_iou(prediction[i], target[i], 5), atol=1e-6, rtol=0
        )
        fg = target[i] != 0
        torch.testing.assert_close(
            scores["fg_iou"][i], pooled_iou(prediction[i][fg], target[i][fg], 5), atol=1e-6, rtol=0
        )
        acc = (prediction[i] == target[i]).float().mean()
        torch.testing.assert_close(scores["iou"][i], acc / (2 - acc), atol=1e-6, rtol=0)


def test_metrics_all_background_predictor_and_empty_images():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 3  # image 0: 4 of 16 pixels foreground; image 1: no foreground
    logits = torch.zeros(2, 4, 4, 4)
    logits[:, 0] = 1.0  # always background
    metrics = SegmentationMetrics(num_classes=4)
    metrics.update(logits, target)
    values = metrics.compute()
    assert values["acc"].item() == pytest.approx((12 / 16 + 1) / 2)
    assert values["iou"].item() == pytest.approx(((12 / 16) / (2 - 12 / 16) + 1) / 2)
    assert values["fg_acc"].item() == 0.0
    assert values["fg_iou"].item() == 0.0  # image 1 skipped, not 0/0
    assert values["miou_fg"].item() == 0.0
    assert values["miou"].item() == pytest.approx((28 / 32) / 4)


def test_cli_smoke_run_writes_metrics(run_cli):
    run_dir = run_cli(
        "fit",
        "waves",
        "--config",
        "configs/presets/smoke.yaml",
        "--data.init_args.canvas_size=16",
        "--data.init_args.n_train=256",
        "--data.init_args.n_val=64",
        "--data.init_args.n_test=64",
        "--data.init_args.block_scale=2",
        "--data.init_args.batch_size=16",
        "--model.init_args.steps=8",
        "--model.init_args.head_widths=[16]",
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/fg_iou"] <= 1.0
    assert {"test/acc", "test/iou", "test/miou", "test/miou_fg", "test/loss"} <= set(metrics["test"])
    assert metrics["report"]["backbone"] == "wave"
    assert (run_dir / "figures" / "wave_movie.gif").is_file()
    assert (run_dir / "figures" / "wave_spectrum.png").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))


def test_hidden_states_per_backbone():
    images = torch.rand(2, 3, 16, 16)
    assert WaveSegmenter(steps=4, head_widths=[4]).hidden_states(images).shape == (5, 2, 2, 16, 16)
    convlstm = WaveSegmenter(backbone="convlstm", steps=4, head_widths=[4])
    assert convlstm.hidden_states(images).shape == (5, 2, 2, 16, 16)
    with pytest.raises(TypeError, match="backbone='cnn' has no hidden states"):
        WaveSegmenter(backbone="cnn", head_widths=[4]).hidden_states(images)
