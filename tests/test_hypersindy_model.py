"""HyperSINDy parts: library, hard-concrete gate, KL, loss, schedules, threshold mask, sampling, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.hypersindy import HyperSINDyModule, PolynomialLibrary
from lightning_modules.hypersindy.metrics import FD_ATTENUATION, format_equations, score_coefficients
from lightning_modules.hypersindy.model import HardConcreteGate, kl_standard_normal
from lightning_modules.hypersindy.schedule import LossWeights, advance, is_threshold_epoch, scale_epochs


@pytest.mark.parametrize(
    "dim,degree,bias,expected_len",
    [
        (2, 3, True, 10),
        (3, 3, False, 19),
        (3, 3, True, 20),
        (10, 3, True, 286),
        (3, 2, True, 10),
        (4, 1, False, 4),
    ],
)
def test_library_matches_pysindy(dim, degree, bias, expected_len):
    import pysindy as ps

    names = ["x", "y", "z"][:dim] if dim <= 3 else [f"x{i}" for i in range(dim)]
    ours = PolynomialLibrary(dim, degree, bias, names)
    x = np.random.RandomState(dim).uniform(-2, 2, size=(64, dim))
    theirs = ps.PolynomialLibrary(degree=degree, include_bias=bias).fit(x)
    assert ours.num_features == expected_len
    assert ours.feature_names == theirs.get_feature_names(names)
    values = ours(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(values, np.asarray(theirs.transform(x)), rtol=1e-12, atol=1e-12)


def test_library_degree_below_one_rejected():
    with pytest.raises(ValueError, match="library degree=0 is invalid"):
        PolynomialLibrary(3, 0)
    with pytest.raises(ValueError, match="library degree=0 is invalid"):
        HyperSINDyModule(state_dim=3, library_degree=0)


def test_gate_expected_l0_matches_monte_carlo():
    torch.manual_seed(0)
    gate = HardConcreteGate(19, 3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 57).view(19, 3))
    samples = gate.sample(40_000)
    monte_carlo = (samples > 0).float().mean(0)
    expected = torch.sigmoid(gate.log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.max(torch.abs(monte_carlo - expected)) < 0.015
    mask = torch.ones(19, 3)
    assert gate.expected_l0(mask).item() == pytest.approx(expected.sum().item(), rel=1e-6)
    assert samples.min() >= 0
    assert samples.max() <= 1
    assert not torch.equal(samples[0], samples[1])  # an independent gate per batch element


def test_gate_l0_at_init_and_masked():
    torch.manual_seed(0)
    gate = HardConcreteGate(19, 3)
    mask = torch.ones(19, 3)
    assert gate.expected_l0(mask).item() / 57 == pytest.approx(0.832, abs=0.002)
    mask[:10] = 0
    per_entry = torch.sigmoid(gate.log_alpha + 1.5986)
    assert gate.expected_l0(mask).item() == pytest.approx(per_entry[10:].sum().item(), rel=1e-4)


def test_eval_gate_is_deterministic_closed_form():
    gate = HardConcreteGate(4, 2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([[-5.0, 0.0], [1.0, 2.0], [3.0, -1.0], [10.0, -10.0]]))
    gate.eval()
    first, second = gate(8), gate(8)
    assert torch.equal(first, second)
    expected = (torch.sigmoid(gate.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(first[0], expected)
    assert first[0, 0, 0] == 0.0
    assert first[0, 3, 0] == 1.0
    assert 0 < first[0, 1, 0] < 1  # fractional gates exist in eval mode


def test_kl_closed_form():
    mu = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    log_var = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]])
    by_hand = 0.5 * ((0.25 + 0 + 1 - 1) + (1 + 2 - math.log(2) - 1) + (4 + 0.5 - math.log(0.5) - 1) + 0) / 2
    assert kl_standard_normal(mu, log_var).item() == pytest.approx(by_hand, rel=1e-6)
    assert kl_standard_normal(torch.zeros(3, 6), torch.zeros(3, 6)).item() == 0.0
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    reference = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    assert kl_standard_normal(mu, log_var).item() == pytest.approx(reference.item(), rel=1e-6)


def test_loss_is_recon_plus_weighted_terms():
    torch.manual_seed(0)
    model = HyperSINDyModule(state_dim=3, variable_names=["x", "y", "z"], include_constant=False)
    x, dx = torch.randn(16, 3), torch.randn(16, 3) * 10
    torch.manual_seed(1)
    recon, kl, l0 = model.loss_terms(x, dx, dx)
    torch.manual_seed(1)
    mu, log_var = model.encoder(x, dx)
    z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    xi = model.hypernet(z) * model.gate(16) * model.threshold_mask
    theta = model.library(x)
    prediction = torch.einsum("bl,bld->bd", theta, xi)
    torch.testing.assert_close(recon, ((prediction - dx) ** 2).sum(1).mean())
    model.loss_weights.beta, model.loss_weights.lam = 2.0, 0.5
    torch.manual_seed(1)
    loss = model.training_step((x, dx, dx), 0)
    torch.testing.assert_close(loss, recon + 2.0 * kl + 0.5 * l0)


def test_nan_loss_stops_with_message():
    model = HyperSINDyModule(state_dim=3, variable_names=["x", "y", "z"])
    x = torch.randn(8, 3)
    dx = torch.full((8, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0") as info:
        model.training_step((x, dx, dx), 0)
    assert "--ckpt_path=last" in str(info.value)
    assert "\n" not in str(info.value)


def run_schedule(
    epochs: int,
    warmup: int = 100,
    beta_spike=None,
    beta_spike_epoch=None,
    lambda_spike=None,
    lambda_spike_epoch=None,
) -> list[tuple[float, float]]:
    """(beta, lambda) in effect during epochs 0 .. epochs - 1."""
    weights = LossWeights(0.01, 0.01, 10.0, 0.01)
    values = []
    for epoch in range(epochs):
        values.append((weights.beta, weights.lam))
        advance(weights, epoch, warmup, beta_spike, beta_spike_epoch, lambda_spike, lambda_spike_epoch)
    return values


def test_beta_schedule_values():
    values = run_schedule(
        500, beta_spike=400.0, beta_spike_epoch=400, lambda_spike=10.0, lambda_spike_epoch=400
    )
    assert values[0] == (0.01, 0.01)
    assert values[99][0] == pytest.approx(9.91)
    assert values[100][0] == 10.0
    assert values[399] == (10.0, 0.01)
    assert values[400] == (400.0, 10.0)
    assert values[499] == (400.0, 10.0)


def test_spikes_at_different_epochs():
    values = run_schedule(
        400, beta_spike=100.0, beta_spike_epoch=200, lambda_spike=0.1, lambda_spike_epoch=300
    )
    assert values[199] == (10.0, 0.01)
    assert values[200] == (100.0, 0.01)
    assert values[299][1] == 0.01
    assert values[300][1] == 0.1


def test_threshold_epochs_and_scaling():
    due = [e for e in range(999) if is_threshold_epoch(e, 100)]
    assert due == [100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert len([e for e in range(600) if is_threshold_epoch(e, 100)]) == 5
    scaled = scale_epochs({"a": 100, "b": 400, "c": None}, 999, 10)
    assert scaled == {"a": 1, "b": 4, "c": None}
    assert scale_epochs({"a": 100}, 999, 999) == {"a": 100}
    assert scale_epochs({"a": 100}, None, 10) == {"a": 100}


def test_threshold_mask_prunes_permanently():
    torch.manual_seed(0)
    model = HyperSINDyModule(
        state_dim=3, variable_names=["x", "y", "z"], include_constant=False, threshold=0.05
    )
    with torch.no_grad():
        last = model.hypernet.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-0.2, 0.2, 57))
        model.gate.log_alpha.fill_(10.0)  # gates fully open
    model.update_threshold_mask()
    kept = model.threshold_mask.flatten().bool()
    assert torch.equal(kept, torch.linspace(-0.2, 0.2, 57).abs() >= 0.05)
    with torch.no_grad():
        last.bias.fill_(5.0)  # every coefficient is large now
    model.update_threshold_mask()
    assert torch.equal(model.threshold_mask.flatten().bool(), kept)  # pruned entries stay pruned
    assert "threshold_mask" in model.state_dict()
    coefficients = model.sample_coefficients(50)
    assert torch.all(coefficients[:, ~kept.view(19, 3)] == 0)


def test_sampler_counts_and_freezes_diverged():
    torch.manual_seed(0)
    model = HyperSINDyModule(state_dim=2, variable_names=["x", "y"], dt=0.1, include_constant=True)
    with torch.no_grad():
        last = model.hypernet.layers[-1]
        last.weight.zero_()
        bias = torch.zeros(10, 2)
        bias[3, 0] = 5.0  # dx/dt = 5 x^2 blows up from x0 = 1
        last.bias.copy_(bias.flatten())
        model.gate.log_alpha.fill_(10.0)
    model.eval()
    out = model.sample_trajectories(np.array([1.0, 1.0]), 40, n_samples=4, bound=1e6)
    assert out.num_diverged == 4
    assert out.diverged_fraction == 1.0
    assert torch.isfinite(out.states).all()
    step = int(out.diverged_step[0])
    assert 0 < step < 40
    assert torch.equal(out.states[0, step:], out.states[0, step - 1].expand(40 - step, 2))
    calm = model.sample_trajectories(np.array([-0.01, 0.0]), 20, n_samples=3)
    assert calm.num_diverged == 0


def test_score_and_equation_text():
    true_mean = np.array([[-10.0, 28.0], [10.0, 0.0], [0.0, -1.0]])
    true_std = np.array([[2.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    mean = np.array([[-9.0, 28.0], [10.0, 0.5], [0.0, 0.0]])
    std = np.array([[2.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    scores = score_coefficients(mean, std, true_mean, true_std)
    assert scores["mean_rmse"] == pytest.approx(math.sqrt((1 + 0.25 + 1) / 6))
    assert scores["std_rmse_vs_s"] == pytest.approx(math.sqrt((1 + 1) / 6))
    expected = math.sqrt(((2 - 2 * FD_ATTENUATION) ** 2 + (1 - 2 * FD_ATTENUATION) ** 2 * 2) / 6)
    assert scores["std_rmse_vs_attenuated"] == pytest.approx(expected)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3.0, 1.0, 1.0)
    lines = format_equations(mean, std, ["x", "y", "x y"], ["x", "y"], precision=1)
    assert lines[0] == "ẋ = -9.0(±2.0) x + 10.0(±1.0) y"
    assert lines[1] == "ẏ = 28.0(±1.0) x + 0.5(±0.0) y"
