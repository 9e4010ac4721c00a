"""pysindy baselines of the hypersindy task: E-SINDy on Lotka-Volterra and the fresh-optimizer rule."""

from __future__ import annotations

import numpy as np

from datamodules.sde import finite_difference, simulate
from lightning_modules.hypersindy.baselines import fit_esindy, fit_sindy, make_ensemble_optimizer


def test_esindy_lotka_volterra_reproduces_printed_mean():
    import pysindy as ps

    sim = simulate("lotka_volterra", 5.0)
    x_dot = finite_difference(sim.x, sim.dt)
    optimizer = ps.SR3(
        reg_weight_lam=ps.SR3.calculate_l0_weight(2.5, 1.0),
        regularizer="L0",
        relax_coeff_nu=1.0,
        max_iter=2000,
        tol=0.1,
    )
    np.random.seed(5281998)
    fit = fit_esindy(
        sim.x, x_dot, 0.005, ["x", "y"], degree=2, include_bias=True, n_models=1000, optimizer=optimizer
    )
    assert fit.feature_names == ["1", "x", "y", "x^2", "x y", "y^2"]
    assert fit.n_models == 1000
    # Printed ensemble mean of the published figure (features 1, x, y, x^2, x y, y^2), to the printed digits.
    np.testing.assert_array_equal(np.round(fit.mean[:, 0], 3), [-0.510, 4.131, 1.946, 0.0, -5.448, 0.0])
    np.testing.assert_array_equal(np.round(fit.mean[:, 1], 3), [2.119, -0.827, -8.645, 0.0, 6.416, 0.0])
    np.testing.assert_allclose(fit.std[[0, 1, 2, 4], 0], [1.222, 0.848, 2.450, 0.863], atol=6e-4)


def test_refit_of_one_ensemble_optimizer_doubles_coef_list():
    import pysindy as ps

    sim = simulate("lorenz", 1.0, n_steps=2000)
    x_dot = finite_difference(sim.x, sim.dt)
    ensemble = make_ensemble_optimizer(ps.STLSQ(threshold=0.5), n_models=5)
    model = ps.SINDy(optimizer=ensemble, feature_library=ps.PolynomialLibrary(degree=2))
    model.fit(sim.x, t=sim.dt, x_dot=x_dot)
    assert len(ensemble.coef_list) == 5
    model.fit(sim.x, t=sim.dt, x_dot=x_dot)
    assert len(ensemble.coef_list) == 10  # why fit_esindy builds a fresh optimizer per fit
    np.random.seed(0)
    first = fit_esindy(sim.x, x_dot, sim.dt, ["x", "y", "z"], degree=2, n_models=5)
    second = fit_esindy(sim.x, x_dot, sim.dt, ["x", "y", "z"], degree=2, n_models=5)
    assert first.n_models == second.n_models == 5


def test_sindy_finds_lorenz_at_low_noise():
    sim = simulate("lorenz", 1.0)
    x_dot = finite_difference(sim.x, sim.dt)
    fit = fit_sindy(sim.x, x_dot, sim.dt, ["x", "y", "z"], include_bias=False, threshold=0.5)
    index = {name: i for i, name in enumerate(fit.feature_names)}
    assert abs(fit.mean[index["x"], 0] + 10) < 1.0
    assert abs(fit.mean[index["y"], 0] - 10) < 1.0
    assert abs(fit.mean[index["x z"], 1] + 1) < 0.1
    assert abs(fit.mean[index["x y"], 2] - 1) < 0.1
