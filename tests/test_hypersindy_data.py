"""Simulated systems, derivative targets and the SDE DataModule of the HyperSINDy task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.sde import (
    SDEDataModule,
    SimulationDivergedError,
    finite_difference,
    simulate,
    simulate_sde,
    true_coefficients,
)


def scalar_reference(system: str, s: float, n_steps: int, seed: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-step generator with one scalar RandomState call per coefficient."""
    from scipy.stats import halfnorm

    rng = np.random.RandomState(seed)
    if system == "lotka_volterra":
        np.random.seed(seed)
    x0 = {"lorenz": [0.0, 1.0, 1.05], "rossler": [0.0, 1.0, 1.05], "lotka_volterra": [4.0, 2.0]}.get(system)
    if system == "lorenz96":
        x0 = [8.0] * 10
        x0[0] += 0.01
    x = np.zeros((n_steps, len(x0)))
    x[0] = x0
    params = []
    for k in range(n_steps):
        if system == "lorenz":
            p, q, r = x[k]
            sig, rho = rng.normal(10, s), rng.normal(28, s)
            u1, u2, u3 = rng.normal(1, 0), rng.normal(1, 0), rng.normal(1, 0)
            beta = rng.normal(8.0 / 3, s)
            f = np.array([sig * (q - p), rho * p - u1 * q - u2 * p * r, u3 * p * q - beta * r])
            params.append([sig, rho, beta])
        elif system == "rossler":
            p, q, r = x[k]
            a, b, c = rng.normal(0.2, min(1.0, s)), rng.normal(0.2, min(1.0, s)), rng.normal(5.7, s)
            f = np.array([-q - r, p + a * q, b + r * (p - c)])
            params.append([a, b, c])
        elif system == "lotka_volterra":
            p, q = x[k]
            a, b, c, d = (halfnorm.rvs(1.0, s) for _ in range(4))
            f = np.array([a * p - b * p * q, c * p * q - d * q])
            params.append([a, b, c, d])
        else:
            n = 10
            forcing = np.zeros(n)
            f = np.zeros(n)
            for i in range(n):
                forcing[i] = rng.normal(8, s)
                f[i] = (x[k][(i + 1) % n] - x[k][i - 2]) * x[k][i - 1] - x[k][i] + forcing[i]
            params.append(forcing)
        if k < n_steps - 1:
            x[k + 1] = x[k] + f * dt_of(system)
    return x, np.array(params)


def dt_of(system: str) -> float:
    return 0.005 if system == "lotka_volterra" else 0.01


@pytest.mark.parametrize(
    "system,scale",
    [("lorenz", 10.0), ("lorenz", 0.0), ("rossler", 5.0), ("lotka_volterra", 5.0), ("lorenz96", 10.0)],
)
def test_generator_bit_exact_vs_scalar_draws(system, scale):
    x_ref, params_ref = scalar_reference(system, scale, 400)
    sim = simulate(system, scale, n_steps=400)
    assert np.array_equal(sim.x, x_ref)
    assert np.array_equal(sim.coefficients, params_ref)


def test_forward_difference_equals_stored_derivative():
    sim = simulate("lorenz", 10.0, n_steps=3000)
    forward = (sim.x[1:] - sim.x[:-1]) / sim.dt
    assert np.max(np.abs(forward - sim.x_dot[:-1])) < 1e-9 * max(1.0, np.abs(sim.x_dot).max())
    assert sim.x.dtype == np.float64
    assert np.array_equal(sim.t, np.arange(3000) * 0.01)
    assert np.array_equal(sim.x[0], [0.0, 1.0, 1.05])


def test_lotka_volterra_draws_halfnormal():
    sim = simulate("lotka_volterra", 5.0)
    assert sim.coefficients.min() >= 1.0
    means = sim.coefficients.mean(0)
    stds = sim.coefficients.std(0)
    # Empirical values of the published regenerated data set (seed 1000).
    np.testing.assert_allclose(means, [4.969, 4.977, 4.974, 5.024], atol=5e-4)
    np.testing.assert_allclose(stds, [3.016, 2.979, 3.049, 3.014], atol=5e-4)


def test_lorenz_scale_zero_still_consumes_normals():
    zero = simulate("lorenz", 0.0, n_steps=50)
    one = simulate("lorenz", 1.0, n_steps=50)
    normals = np.random.RandomState(1000).standard_normal((50, 6))
    assert np.all(zero.coefficients == [10.0, 28.0, 8.0 / 3])
    # sigma and beta of step k are normals 6k and 6k + 5: the three unit draws sit between rho and beta.
    np.testing.assert_array_equal(one.coefficients[:, 0], 10.0 + normals[:, 0])
    np.testing.assert_array_equal(one.coefficients[:, 2], 8.0 / 3 + normals[:, 5])


def test_fd_stencil_matches_pysindy_interior():
    import pysindy as ps

    sim = simulate("rossler", 1.0, n_steps=500)
    ours = finite_difference(sim.x, sim.dt)
    theirs = np.asarray(ps.FiniteDifference(order=4)(sim.x, sim.dt))
    np.testing.assert_allclose(ours[2:-2], theirs[2:-2], rtol=0, atol=1e-10)
    # The end rows use the one-sided stencil: check row 0 by hand.
    x = sim.x
    row0 = (-11 / 6 * x[0] + 3 * x[1] - 1.5 * x[2] + x[3] / 3) / sim.dt
    np.testing.assert_allclose(ours[0], row0, rtol=1e-12)


def test_fd_attenuates_coefficient_noise():
    # dx/dt = a_k with a_k ~ N(0, 1) per step: the FD target's std is sqrt(100)/12 = 0.833 of the noise's.
    rng = np.random.RandomState(0)
    a = rng.standard_normal(200_000)
    x = np.concatenate([[0.0], np.cumsum(a * 0.01)])
    fd = finite_difference(x, 0.01)
    assert abs(fd[2:-2].std() - 10 / 12) < 0.01


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"system": "duffing", "noise_scale": 1.0}, "system='duffing' is unknown"),
        ({"system": "lorenz", "noise_scale": -1.0}, "noise_scale=-1.0 is invalid"),
        ({"system": "lorenz", "noise_scale": 1.0, "dt": 0.0}, "dt=0.0 is invalid"),
        ({"system": "lorenz", "noise_scale": 1.0, "dt": -0.01}, "dt=-0.01 is invalid"),
    ],
)
def test_bad_simulation_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**kwargs, n_steps=10)
    with pytest.raises(ValueError, match=match):
        SDEDataModule(**kwargs)


def test_diverging_simulation_names_step_and_fix():
    with pytest.raises(SimulationDivergedError) as info:
        simulate("lorenz", 10.0, n_steps=2000, dt=0.1)
    message = str(info.value)
    assert "diverged at step" in message
    assert "noise_scale" in message
    assert "dt" in message
    assert "\n" not in message


def test_sde_additive_noise_increments():
    zero = simulate_sde("lorenz", 0.0, (0.0, 1.0, 1.05), 0.01, n_steps=300)
    ode = simulate("lorenz", 0.0, n_steps=300)
    np.testing.assert_allclose(zero.x, ode.x, rtol=0, atol=1e-12)
    # Constant drift plus additive noise: increments minus drift are sqrt(dt) * g * N(0, 1).
    sde = simulate_sde(lambda x: np.ones(2), 0.5, (0.0, 0.0), 0.04, n_steps=5_001, seed=3)
    residual = np.diff(sde.x, axis=0) - 0.04
    np.testing.assert_allclose(residual.std(0), 0.5 * 0.2, rtol=0.05)


def test_sde_state_dependent_noise():
    sde = simulate_sde(lambda x: np.zeros(1), lambda x: 0.1 * x, (1.0,), 0.01, n_steps=2000, seed=0)
    assert np.all(sde.x > 0)  # linear multiplicative noise with small steps keeps the sign
    assert not np.allclose(sde.x, 1.0)


def test_datamodule_attributes_split_and_cache(tmp_path):
    dm = SDEDataModule(
        system="rossler", noise_scale=1.0, val_fraction=0.2, data_dir=str(tmp_path), batch_size=250
    )
    assert (dm.state_dim, dm.variable_names, dm.dt) == (3, ["x", "y", "z"], 0.01)
    dm.setup("fit")
    assert len(dm.train_set) == 8000
    assert len(dm.val_set) == 2000
    assert list((tmp_path / "sde").glob("rossler_s1_seed1000*.npz"))
    dx = dm.train_set.dx
    np.testing.assert_allclose(
        (dm.train_set.dx_standardised * dm.derivative_std + dm.derivative_mean).numpy(),
        dx.numpy(),
        rtol=1e-5,
        atol=1e-4,
    )
    again = SDEDataModule(system="rossler", noise_scale=1.0, val_fraction=0.2, data_dir=str(tmp_path))
    again.setup("fit")
    assert torch.equal(again.val_set.x, dm.val_set.x)
    loader = dm.train_dataloader()
    assert len(loader) == 32
    batch = next(iter(loader))
    assert [t.shape for t in batch] == [torch.Size([250, 3])] * 3


def test_shuffle_depends_on_epoch_only():
    dm = SDEDataModule(system="lorenz", noise_scale=1.0, cache=False, n_steps=1000, batch_size=100)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    first = torch.cat([b[0] for b in loader])
    loader.sampler.set_epoch(0)
    other = torch.cat([b[0] for b in loader])
    loader.sampler.set_epoch(3)
    again = torch.cat([b[0] for b in loader])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_true_coefficients_lotka_volterra():
    names = ["1", "x", "y", "x^2", "x y", "y^2"]
    mean, std = true_coefficients("lotka_volterra", 5.0, names, ["x", "y"])
    m = 1 + 5 * math.sqrt(2 / math.pi)
    assert mean[1, 0] == pytest.approx(m)
    assert mean[4, 0] == pytest.approx(-m)
    assert mean[4, 1] == pytest.approx(m)
    assert mean[2, 1] == pytest.approx(-m)
    assert std[1, 0] == pytest.approx(3.014, abs=1e-3)
    assert np.count_nonzero(mean) == 4
