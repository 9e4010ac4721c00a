"""Simulated stochastic systems for HyperSINDy: random ODEs with per-step coefficients, and true SDEs.

The random-ODE generator redraws the coefficients at every explicit Euler step from numpy's legacy
RandomState stream (seed 1000 by default), in the same draw order as the HyperSINDy paper scripts
(github.com/mozesjacobs/hypersindy, `paper/scripts/generate_*.py`), so the published training sets are
reproduced bit for bit:

    x = simulate("lorenz", noise_scale=10.0)     # x.x (10000, 3), x.x_dot, x.t, x.coefficients

`simulate_sde` is an Euler-Maruyama integrator with a user-given diffusion for genuine SDEs, and
`SDEDataModule` turns either kind of trajectory into training batches with 4th-order finite-difference
derivative targets.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import EpochShuffleSampler, ResumableDataLoader, load_cached_arrays, resolve_data_dir

log = logging.getLogger(__name__)

# A state whose magnitude passes this bound counts as diverged even while it is still finite, because
# the next Euler steps of a cubic vector field overflow float64 within a few steps.
DEFAULT_DIVERGENCE_BOUND = 1e8


@dataclass(frozen=True)
class SystemSpec:
    """Static facts of one benchmark system."""

    name: str
    variable_names: tuple[str, ...]
    dt: float
    x0: tuple[float, ...]
    coefficient_names: tuple[str, ...]
    include_constant: bool  # whether the published runs put the constant term in the library
    test_x0: tuple[float, ...] | None = None


def _lorenz96_x0() -> tuple[float, ...]:
    x0 = [8.0] * 10
    x0[0] += 0.01
    return tuple(x0)


SYSTEMS: dict[str, SystemSpec] = {
    "lorenz": SystemSpec(
        "lorenz", ("x", "y", "z"), 0.01, (0.0, 1.0, 1.05), ("sigma", "rho", "beta"), False, (-1.0, 2.0, 0.5)
    ),
    "rossler": SystemSpec(
        "rossler", ("x", "y", "z"), 0.01, (0.0, 1.0, 1.05), ("a", "b", "c"), True, (-1.0, 2.0, 0.5)
    ),
    "lotka_volterra": SystemSpec(
        "lotka_volterra", ("x", "y"), 0.005, (4.0, 2.0), ("a", "b", "c", "d"), True, None
    ),
    "lorenz96": SystemSpec(
        "lorenz96",
        tuple(f"x{i}" for i in range(10)),
        0.01,
        _lorenz96_x0(),
        tuple(f"F{i}" for i in range(10)),
        True,
        None,
    ),
}


class SimulationDivergedError(ValueError):
    """A simulated state became non-finite or passed the divergence bound."""


@dataclass
class Simulation:
    """One simulated trajectory.

    x: (n_steps, dim) float64 states, x[0] the initial state, x[k] at time t[k] = k * dt.
    x_dot: (n_steps, dim) the exact per-step derivative f_k of the Euler step x[k+1] = x[k] + dt * x_dot[k];
        for an SDE it is the drift at x[k]. Never used as a training target by default.
    coefficients: (n_steps, n_coefficients) the coefficients drawn at each step (empty for an SDE).
    """

    system: str
    noise_scale: float
    seed: int
    dt: float
    x: np.ndarray
    x_dot: np.ndarray
    t: np.ndarray
    coefficients: np.ndarray
    coefficient_names: tuple[str, ...]
    variable_names: tuple[str, ...]
    extra: dict = field(default_factory=dict)


def check_system(system: str) -> SystemSpec:
    if system not in SYSTEMS:
        raise ValueError(f"system={system!r} is unknown: choose one of {', '.join(sorted(SYSTEMS))}.")
    return SYSTEMS[system]


def check_noise_scale(noise_scale: float) -> None:
    if not (math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(
            f"noise_scale={noise_scale} is invalid: the coefficient noise scale must be a finite number >= 0 "
            "(0 gives the deterministic system)."
        )


def check_dt(dt: float) -> None:
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt={dt} is invalid: the time step must be a positive number, e.g. 0.01.")


def _diverged(state: np.ndarray, bound: float) -> bool:
    return not np.all(np.isfinite(state)) or float(np.max(np.abs(state))) > bound


def _raise_diverged(
    system: str, step: int, state: np.ndarray, noise_scale: float, dt: float, kind: str
) -> None:
    shown = np.array2string(np.asarray(state), precision=4, max_line_width=200)
    raise SimulationDivergedError(
        f"the {system} {kind} diverged at step {step} (state {shown}) with noise_scale={noise_scale} "
        f"and dt={dt}: "
        "lower data.init_args.noise_scale or dt, shorten n_steps, or change data.init_args.seed."
    )


def simulate(
    system: str,
    noise_scale: float,
    n_steps: int = 10_000,
    seed: int = 1000,
    *,
    x0: tuple[float, ...] | np.ndarray | None = None,
    dt: float | None = None,
    divergence_bound: float = DEFAULT_DIVERGENCE_BOUND,
) -> Simulation:
    """Integrate a random ODE with explicit Euler, redrawing its coefficients at every step.

    Draws come from `np.random.RandomState(seed)`, which is the stream `np.random.seed(seed)` gives the
    global generator, one scalar at a time in this order per step:
    Lorenz sigma ~ N(10, s), rho ~ N(28, s), three N(1, 0) (unit coefficients that still use a normal),
    beta ~ N(8/3, s); Rossler a, b ~ N(0.2, min(1, s)), c ~ N(5.7, s); Lotka-Volterra a, b, c, d each
    1 + s * |N(0, 1)| (scipy's halfnorm with loc 1); Lorenz-96 F_0 .. F_9 ~ N(8, s).
    The arithmetic follows the published scripts term by term so that the float64 results match exactly.
    Raises SimulationDivergedError when a state is non-finite or passes `divergence_bound`.
    """
    spec = check_system(system)
    check_noise_scale(noise_scale)
    dt = spec.dt if dt is None else float(dt)
    check_dt(dt)
    if n_steps < 2:
        raise ValueError(f"n_steps={n_steps} is invalid: a trajectory needs at least 2 states.")
    start = np.asarray(spec.x0 if x0 is None else x0, dtype=np.float64)
    dim = len(spec.variable_names)
    if start.shape != (dim,):
        raise ValueError(f"x0 has shape {start.shape}, but the {system} state has {dim} components.")

    rng = np.random.RandomState(seed)
    s = float(noise_scale)
    draws = _draw_coefficients(system, s, rng, n_steps)
    x = np.zeros((n_steps, dim))
    x_dot = np.zeros((n_steps, dim))
    x[0] = start
    step = _EULER_STEPS[system]
    step(x, x_dot, draws, dt, divergence_bound)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1) | (np.abs(x).max(axis=1) > divergence_bound))
    if bad.size:
        _raise_diverged(system, int(bad[0]), x[bad[0]], noise_scale, dt, "random ODE")
    coefficients = draws[:, _KEPT_COEFFICIENTS[system]] if system == "lorenz" else draws
    return Simulation(
        system=system,
        noise_scale=s,
        seed=seed,
        dt=dt,
        x=x,
        x_dot=x_dot,
        t=np.arange(n_steps) * dt,
        coefficients=np.ascontiguousarray(coefficients),
        coefficient_names=spec.coefficient_names,
        variable_names=spec.variable_names,
    )


# Mean and std (as a function of the noise scale s) of each normal drawn per step, in draw order.
_DRAW_PARAMETERS: dict[str, list[tuple[float, Callable[[float], float]]]] = {
    "lorenz": [
        (10.0, lambda s: s),
        (28.0, lambda s: s),
        (1.0, lambda s: 0.0),
        (1.0, lambda s: 0.0),
        (1.0, lambda s: 0.0),
        (8.0 / 3, lambda s: s),
    ],
    "rossler": [(0.2, lambda s: min(1.0, s)), (0.2, lambda s: min(1.0, s)), (5.7, lambda s: s)],
    "lorenz96": [(8.0, lambda s: s)] * 10,
}
# Lorenz stores sigma, rho and beta; the three unit draws are not kept.
_KEPT_COEFFICIENTS = {"lorenz": [0, 1, 5]}


def _draw_coefficients(system: str, s: float, rng: np.random.RandomState, n_steps: int) -> np.ndarray:
    """All per-step coefficients at once, (n_steps, draws per step), in the scalar-call order.

    The legacy RandomState gives the same normals whether drawn one scalar at a time or as one vector,
    and `loc + scale * N(0, 1)` here is the same float64 arithmetic as `RandomState.normal(loc, scale)`.
    """
    if system == "lotka_volterra":
        # scipy.stats.halfnorm.rvs(loc=1, scale=s) computes |N(0, 1)| * s + 1 from the global stream.
        return np.abs(rng.standard_normal((n_steps, 4))) * s + 1.0
    params = _DRAW_PARAMETERS[system]
    loc = np.array([p[0] for p in params])
    scale = np.array([p[1](s) for p in params])
    return loc + scale * rng.standard_normal((n_steps, len(params)))


# The Euler loops below run on Python floats, which is float64 arithmetic like numpy's, term by term in
# the order of the published scripts. A loop stops early once a state is non-finite or out of bounds;
# the caller then reports that step.
def _euler_lorenz(x, x_dot, draws, dt, bound):
    n = x.shape[0]
    px, py, pz = (float(v) for v in x[0])
    for k, (sigma, rho, unit_y, unit_xz, unit_xy, beta) in enumerate(draws.tolist()):
        fx = sigma * (py - px)
        fy = rho * px - unit_y * py - unit_xz * px * pz
        fz = unit_xy * px * py - beta * pz
        x_dot[k] = (fx, fy, fz)
        if k == n - 1:
            break
        px, py, pz = px + fx * dt, py + fy * dt, pz + fz * dt
        x[k + 1] = (px, py, pz)
        if not (abs(px) <= bound and abs(py) <= bound and abs(pz) <= bound):
            break


def _euler_rossler(x, x_dot, draws, dt, bound):
    n = x.shape[0]
    px, py, pz = (float(v) for v in x[0])
    for k, (a, b, c) in enumerate(draws.tolist()):
        fx = -py - pz
        fy = px + a * py
        fz = b + pz * (px - c)
        x_dot[k] = (fx, fy, fz)
        if k == n - 1:
            break
        px, py, pz = px + fx * dt, py + fy * dt, pz + fz * dt
        x[k + 1] = (px, py, pz)
        if not (abs(px) <= bound and abs(py) <= bound and abs(pz) <= bound):
            break


def _euler_lotka_volterra(x, x_dot, draws, dt, bound):
    n = x.shape[0]
    px, py = (float(v) for v in x[0])
    for k, (a, b, c, d) in enumerate(draws.tolist()):
        fx = a * px - b * px * py
        fy = c * px * py - d * py
        x_dot[k] = (fx, fy)
        if k == n - 1:
            break
        px, py = px + fx * dt, py + fy * dt
        x[k + 1] = (px, py)
        if not (abs(px) <= bound and abs(py) <= bound):
            break


def _euler_lorenz96(x, x_dot, draws, dt, bound):
    n = x.shape[0]
    for k in range(n):
        state = x[k]
        # (x[i+1] - x[i-2]) * x[i-1] - x[i] + F_i for every i, indices mod N.
        f = (np.roll(state, -1) - np.roll(state, 2)) * np.roll(state, 1) - state + draws[k]
        x_dot[k] = f
        if k == n - 1:
            break
        x[k + 1] = state + f * dt
        if not np.all(np.abs(x[k + 1]) <= bound):
            break


_EULER_STEPS = {
    "lorenz": _euler_lorenz,
    "rossler": _euler_rossler,
    "lotka_volterra": _euler_lotka_volterra,
    "lorenz96": _euler_lorenz96,
}


def mean_drift(system: str) -> Callable[[np.ndarray], np.ndarray]:
    """Return the vector field of `system` with every coefficient at its mean (Lotka-Volterra's at 1 + 0)."""
    check_system(system)
    mean_draws = _draw_coefficients(system, 0.0, np.random.RandomState(0), 1)
    euler = _EULER_STEPS[system]

    def drift(state: np.ndarray) -> np.ndarray:
        x = np.asarray(state, dtype=np.float64).reshape(1, -1).copy()
        out = np.zeros_like(x)
        euler(x, out, mean_draws, 1.0, np.inf)
        return out[0]

    return drift


def simulate_sde(
    drift: Callable[[np.ndarray], np.ndarray] | str,
    diffusion: float | np.ndarray | Callable[[np.ndarray], np.ndarray],
    x0: tuple[float, ...] | np.ndarray,
    dt: float,
    n_steps: int = 10_000,
    seed: int = 1000,
    *,
    divergence_bound: float = DEFAULT_DIVERGENCE_BOUND,
) -> Simulation:
    """Integrate dx = f(x) dt + g(x) dW with Euler-Maruyama: x_{k+1} = x_k + dt f(x_k) + sqrt(dt) g(x_k) xi_k.

    `drift` is a callable or a system name (its mean vector field). `diffusion` is a scalar or a
    (dim,) array for additive noise, or a callable of the state returning (dim,) (diagonal noise) or
    (dim, m) (m independent Wiener processes) for state-dependent noise. xi_k ~ N(0, I) comes from
    `np.random.RandomState(seed)`.
    """
    check_dt(dt)
    name = drift if isinstance(drift, str) else "custom"
    drift_fn = mean_drift(drift) if isinstance(drift, str) else drift
    state = np.asarray(x0, dtype=np.float64).copy()
    dim = state.shape[0]
    rng = np.random.RandomState(seed)
    x = np.zeros((n_steps, dim))
    x_dot = np.zeros((n_steps, dim))
    x[0] = state
    sqrt_dt = math.sqrt(dt)
    for k in range(n_steps):
        f = np.asarray(drift_fn(x[k]), dtype=np.float64)
        x_dot[k] = f
        if k == n_steps - 1:
            break
        g = np.asarray(diffusion(x[k]) if callable(diffusion) else diffusion, dtype=np.float64)
        if g.ndim == 2:
            noise = g @ rng.standard_normal(g.shape[1])
        else:
            noise = np.broadcast_to(g, (dim,)) * rng.standard_normal(dim)
        x[k + 1] = x[k] + dt * f + sqrt_dt * noise
        if _diverged(x[k + 1], divergence_bound):
            _raise_diverged(name, k + 1, x[k + 1], float(np.max(np.abs(g))), dt, "SDE")
    variable_names = SYSTEMS[name].variable_names if name in SYSTEMS else tuple(f"x{i}" for i in range(dim))
    return Simulation(
        system=name,
        noise_scale=float(np.max(np.abs(g))) if n_steps > 1 else 0.0,
        seed=seed,
        dt=dt,
        x=x,
        x_dot=x_dot,
        t=np.arange(n_steps) * dt,
        coefficients=np.zeros((n_steps, 0)),
        coefficient_names=(),
        variable_names=variable_names,
    )


def finite_difference(x: np.ndarray, dt: float) -> np.ndarray:
    """4th-order finite-difference derivative along axis 0.

    Interior rows use the central stencil (-x[k+2] + 8 x[k+1] - 8 x[k-1] + x[k-2]) / (12 dt); the first
    and last two rows use the one-sided stencil (-11/6 x[k] + 3 x[k+1] - 3/2 x[k+2] + 1/3 x[k+3]) / dt
    (mirrored at the end). This is the stencil of the HyperSINDy paper; pysindy's FiniteDifference(order=4)
    agrees on interior rows only.
    """
    check_dt(dt)
    if x.shape[0] < 5:
        raise ValueError(f"the 4th-order finite difference needs at least 5 states; got {x.shape[0]}.")
    out = np.empty_like(x, dtype=np.float64)
    out[2:-2] = (-x[4:] + 8 * x[3:-1] - 8 * x[1:-3] + x[:-4]) / (12 * dt)
    for k in (0, 1):
        out[k] = (-11 / 6 * x[k] + 3 * x[k + 1] - 3 / 2 * x[k + 2] + 1 / 3 * x[k + 3]) / dt
    n = x.shape[0]
    for k in (n - 2, n - 1):
        out[k] = (11 / 6 * x[k] - 3 * x[k - 1] + 3 / 2 * x[k - 2] - 1 / 3 * x[k - 3]) / dt
    return out


def load_or_simulate(
    system: str, noise_scale: float, n_steps: int, seed: int, dt: float | None, cache_dir: Path | None
) -> Simulation:
    """Return the random-ODE trajectory for these settings, from the .npz cache when present."""
    spec = check_system(system)
    dt_used = spec.dt if dt is None else float(dt)
    path = None
    if cache_dir is not None:
        key = f"{system}_s{noise_scale:g}_seed{seed}_n{n_steps}_dt{dt_used:g}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        path = cache_dir / "sde" / f"{key}_{digest}.npz"
        if path.is_file():
            stored = load_cached_arrays(path, ("x", "x_dot", "t", "coefficients"))
            return Simulation(
                system=system,
                noise_scale=float(noise_scale),
                seed=seed,
                dt=dt_used,
                x=stored["x"],
                x_dot=stored["x_dot"],
                t=stored["t"],
                coefficients=stored["coefficients"],
                coefficient_names=spec.coefficient_names,
                variable_names=spec.variable_names,
            )
    sim = simulate(system, noise_scale, n_steps, seed, dt=dt)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, x=sim.x, x_dot=sim.x_dot, t=sim.t, coefficients=sim.coefficients)
            tmp.replace(path)
        except OSError as error:
            log.warning("could not cache the simulation at %s (%s); it is regenerated next time", path, error)
    return sim


class TrajectoryTensors(Dataset):
    """A trajectory held as tensors; indexing with a LongTensor returns a whole batch at once.

    Items are (x, dx_standardised, dx) with x raw states, dx the finite-difference target and
    dx_standardised the target standardised per dimension (the encoder input).
    """

    def __init__(self, x: torch.Tensor, dx: torch.Tensor, dx_standardised: torch.Tensor):
        self.x = x
        self.dx = dx
        self.dx_standardised = dx_standardised

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        return self.x[index], self.dx_standardised[index], self.dx[index]


class IndexBatchSampler(EpochShuffleSampler):
    """Yield whole batches of indices; the order is a permutation drawn from (seed, epoch) alone.

    With shuffle off the batches follow the trajectory in order. Lightning calls `set_epoch`, so a
    resumed run replays the same order, and `resume_at` counts whole batches: a run resumed mid-epoch
    starts with the first batch it had not trained on.
    """

    def __init__(self, n_samples: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        super().__init__(n_samples, seed)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        batches_to_skip = 0
        if self._resume is not None:
            epoch, batches_consumed = self._resume
            self._resume = None
            if epoch == self.epoch:
                batches_to_skip = batches_consumed
        n_full = self.length // self.batch_size
        for i in range(batches_to_skip, n_full):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]
        if not self.drop_last and max(n_full, batches_to_skip) * self.batch_size < self.length:
            yield order[n_full * self.batch_size :]

    def __len__(self) -> int:
        if self.drop_last:
            return self.length // self.batch_size
        return math.ceil(self.length / self.batch_size)


def batch_loader(dataset: TrajectoryTensors, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
    """Build a DataLoader that slices whole batches out of in-memory tensors, with no workers.

    NOTE: only single-process training has run with this loader; under DDP Lightning wraps custom samplers,
    and whether that wrapper splits these index batches across ranks is untested.
    """
    sampler = IndexBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    # A private generator: each new DataLoader iterator draws a base seed, and drawing it from the global
    # torch RNG would shift the stream by one draw per epoch, differently in a resumed run, where Lightning
    # creates the first iterator before the RNG state is restored.
    # A shuffled loader records how many batches training consumed, so a run killed mid-epoch resumes there.
    loader_class = ResumableDataLoader if shuffle else DataLoader
    return loader_class(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=0,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(seed),
    )


def _identity(batch):
    return batch


class SDEDataModule(LightningDataModule):
    """Trajectories of a stochastic system with finite-difference derivative targets.

    `state_dim`, `variable_names` and `dt` are set at construction; the CLI links them to the model.
    After `setup`, `derivative_mean` and `derivative_std` hold the per-dimension statistics used to
    standardise the encoder input, and `true_coefficients()` gives the ground-truth mean and std.
    """

    def __init__(
        self,
        system: Literal["lorenz", "rossler", "lotka_volterra", "lorenz96"] = "lorenz",
        noise_scale: float = 10.0,
        n_steps: int = 10_000,
        seed: int = 1000,
        dt: float | None = None,
        mode: Literal["random_ode", "sde"] = "random_ode",
        sde_diffusion: float = 1.0,
        sde_noise: Literal["additive", "linear"] = "additive",
        derivative: Literal["fd4", "forward", "exact"] = "fd4",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        test_seed: int = 0,
        batch_size: int = 250,
        num_workers: int = 0,
        subset: int | None = None,
        data_dir: str | None = None,
        cache: bool = True,
    ):
        """
        Args:
            system: which benchmark system to simulate.
            noise_scale: std s of the per-step coefficient noise (random_ode mode).
            n_steps: states per trajectory, the initial state included.
            seed: seed of numpy's legacy RandomState for the training trajectory (1000 in the published data sets).
            dt: Euler time step; None uses the system's published value (0.01, or 0.005 for Lotka-Volterra).
            mode: "random_ode" redraws coefficients each step (the paper's data); "sde" integrates the mean
                vector field with Euler-Maruyama and the diffusion below.
            sde_diffusion: diffusion amplitude g in "sde" mode.
            sde_noise: "additive" uses g dW on every component, "linear" uses g * x_i dW_i (state-dependent).
            derivative: training target; "fd4" is the 4th-order finite difference of the paper, "forward"
                and "exact" (the stored per-step f_k) remove the FD attenuation of the noise (an ablation).
            val_fraction: share of the trajectory held out for validation by a random split; 0 keeps every
                sample for training (the paper setting) and validates on the training trajectory.
            split_seed: seed of the train/validation split and of the shuffling order.
            test_seed: seed of the test trajectory, started from the system's test initial state.
            batch_size: samples per batch (250 in the paper, so 40 steps per epoch on 10,000 samples).
            num_workers: accepted for interface parity; batches are sliced from memory in the main process.
            subset: keep at most this many samples per split (the first ones of the trajectory).
            data_dir: cache folder for generated trajectories (default $DYNLAB_DATA or ./data).
            cache: store generated trajectories under data_dir/sde/.
        """
        super().__init__()
        spec = check_system(system)
        check_noise_scale(noise_scale)
        if dt is not None:
            check_dt(dt)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} is invalid: use a value in [0, 1).")
        if not (math.isfinite(sde_diffusion) and sde_diffusion >= 0):
            raise ValueError(f"sde_diffusion={sde_diffusion} is invalid: use a finite value >= 0.")
        if subset is not None and subset < 5:
            raise ValueError(f"subset={subset} is invalid: the finite difference needs at least 5 samples.")
        # dt is left out: the model logs the resolved step it receives through the CLI link, and Lightning
        # rejects the same key with two values (None here when the system default applies).
        self.save_hyperparameters(ignore=["dt"])
        self.dt_override = dt
        self.system = system
        self.noise_scale = float(noise_scale)
        self.spec = spec
        self.state_dim = len(spec.variable_names)
        self.variable_names = list(spec.variable_names)
        self.dt = float(spec.dt if dt is None else dt)
        self.batch_size = batch_size
        self.subset = subset
        self.train_set: TrajectoryTensors | None = None
        self.val_set: TrajectoryTensors | None = None
        self.test_set: TrajectoryTensors | None = None
        self.simulation: Simulation | None = None
        self.derivative_mean: torch.Tensor | None = None
        self.derivative_std: torch.Tensor | None = None

    # ----------------------------------------------------------------- data
    def _simulate(self, seed: int, x0) -> Simulation:
        hp = self.hparams
        if hp.mode == "sde":
            amplitude = hp.sde_diffusion
            diffusion = (lambda state: amplitude * state) if hp.sde_noise == "linear" else amplitude
            return simulate_sde(
                self.system, diffusion, x0 if x0 is not None else self.spec.x0, self.dt, hp.n_steps, seed
            )
        cache_dir = resolve_data_dir(hp.data_dir) if hp.cache else None
        if x0 is None:
            return load_or_simulate(self.system, self.noise_scale, hp.n_steps, seed, self.dt, cache_dir)
        return simulate(self.system, self.noise_scale, hp.n_steps, seed, x0=x0, dt=self.dt)

    def _targets(self, sim: Simulation) -> np.ndarray:
        kind = self.hparams.derivative
        if kind == "exact":
            return sim.x_dot
        if kind == "forward":
            forward = np.empty_like(sim.x)
            forward[:-1] = (sim.x[1:] - sim.x[:-1]) / sim.dt
            forward[-1] = sim.x_dot[-1]
            return forward
        return finite_difference(sim.x, sim.dt)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        sim = self._simulate(hp.seed, None)
        self.simulation = sim
        dx = self._targets(sim)
        x = torch.from_numpy(sim.x).float()
        dx_t = torch.from_numpy(dx).float()
        # Whole-trajectory statistics (unbiased std), as the model stores them for the encoder input.
        mean = torch.from_numpy(dx.mean(axis=0)).float()
        std = torch.from_numpy(dx.std(axis=0, ddof=1)).float()
        self.derivative_mean, self.derivative_std = mean, std
        dx_standardised = (dx_t - mean) / std

        n = x.shape[0]
        n_val = int(round(hp.val_fraction * n))
        if n_val > 0:
            generator = torch.Generator().manual_seed(hp.split_seed)
            order = torch.randperm(n, generator=generator)
            val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        else:
            train_idx = val_idx = torch.arange(n)
        if self.subset is not None:
            train_idx, val_idx = train_idx[: self.subset], val_idx[: self.subset]
        self.train_set = TrajectoryTensors(x[train_idx], dx_t[train_idx], dx_standardised[train_idx])
        self.val_set = TrajectoryTensors(x[val_idx], dx_t[val_idx], dx_standardised[val_idx])

        # NOTE: Lotka-Volterra and Lorenz-96 have no published test initial state here, so their test
        # trajectory starts from the training x0 with test_seed.
        test_x0 = self.spec.test_x0 or self.spec.x0
        try:
            test_sim = self._simulate(hp.test_seed, test_x0)
        except SimulationDivergedError as error:
            log.warning("test trajectory diverged (%s); testing on the training trajectory instead", error)
            test_sim = sim
        test_dx = torch.from_numpy(self._targets(test_sim)).float()
        test_x = torch.from_numpy(test_sim.x).float()
        if self.subset is not None:
            test_x, test_dx = test_x[: self.subset], test_dx[: self.subset]
        self.test_set = TrajectoryTensors(test_x, test_dx, (test_dx - mean) / std)

    def _batch_size_for(self, dataset: TrajectoryTensors, split: str) -> int:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: use a positive integer.")
        if len(dataset) < self.batch_size:
            log.info(
                "%s split has %d samples, fewer than batch_size=%d: using one batch of %d",
                split,
                len(dataset),
                self.batch_size,
                len(dataset),
            )
            return len(dataset)
        return self.batch_size

    def train_dataloader(self) -> DataLoader:
        size = self._batch_size_for(self.train_set, "train")
        return batch_loader(self.train_set, size, shuffle=True, seed=self.hparams.split_seed, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        size = self._batch_size_for(self.val_set, "validation")
        return batch_loader(self.val_set, size, shuffle=False, seed=0, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        size = self._batch_size_for(self.test_set, "test")
        return batch_loader(self.test_set, size, shuffle=False, seed=0, drop_last=False)

    # ---------------------------------------------------------------- truth
    def true_coefficients(self, feature_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth coefficient mean and per-step std as (L, D) arrays in the order of `feature_names`."""
        return true_coefficients(self.system, self.noise_scale, feature_names, self.variable_names)


def true_coefficients(
    system: str, noise_scale: float, feature_names: list[str], variable_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-step std of the true coefficient matrix (library terms x state dimensions).

    Lotka-Volterra coefficients are 1 + s|N(0, 1)|, so their mean is 1 + s sqrt(2/pi) and their std
    s sqrt(1 - 2/pi). Terms the library lacks (the constant without a bias column) raise ValueError.
    """
    check_system(system)
    s = float(noise_scale)
    index = {name: i for i, name in enumerate(feature_names)}
    mean = np.zeros((len(feature_names), len(variable_names)))
    std = np.zeros_like(mean)

    def put(term: str, dim: int, value: float, spread: float = 0.0) -> None:
        if term not in index:
            raise ValueError(
                f"the {system} equations need the library term {term!r}; include it in the library."
            )
        mean[index[term], dim] = value
        std[index[term], dim] = spread

    if system == "lorenz":
        put("x", 0, -10.0, s)
        put("y", 0, 10.0, s)
        put("x", 1, 28.0, s)
        put("y", 1, -1.0)
        put("x z", 1, -1.0)
        put("z", 2, -8.0 / 3, s)
        put("x y", 2, 1.0)
    elif system == "rossler":
        small = min(1.0, s)
        put("y", 0, -1.0)
        put("z", 0, -1.0)
        put("x", 1, 1.0)
        put("y", 1, 0.2, small)
        put("1", 2, 0.2, small)
        put("z", 2, -5.7, s)
        put("x z", 2, 1.0)
    elif system == "lotka_volterra":
        m = 1 + s * math.sqrt(2 / math.pi)
        spread = s * math.sqrt(1 - 2 / math.pi)
        put("x", 0, m, spread)
        put("x y", 0, -m, spread)
        put("x y", 1, m, spread)
        put("y", 1, -m, spread)
    else:
        n = len(variable_names)
        names = variable_names

        def product(i: int, j: int) -> str:
            a, b = sorted((i % n, j % n))
            return f"{names[a]}^2" if a == b else f"{names[a]} {names[b]}"

        for i in range(n):
            put("1", i, 8.0, s)
            put(names[i], i, -1.0)
            put(product(i + 1, i - 1), i, 1.0)
            put(product(i - 2, i - 1), i, -1.0)
    return mean, std
