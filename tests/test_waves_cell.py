"""Wave cell: update order, circular padding, initialisation, energy, equivariance, fast == reference."""

from __future__ import annotations

import shutil

import pytest
import torch

from lightning_modules.waves.cell import WaveCell, WaveRollout, circular_conv3x3, laplacian_kernel
from lightning_modules.waves.layers import READOUTS
from lightning_modules.waves.native import fused_kernels
from lightning_modules.waves.networks import WaveNetwork


def reference_rollout(y0, omega, alpha, weight, steps: int, dt: float) -> torch.Tensor:
    """Plain step-by-step rollout through autograd, time-major (T, B, C, H, W)."""
    y, z = y0, torch.zeros_like(y0)
    history = []
    for _ in range(steps):
        z = z + dt * (torch.tanh(circular_conv3x3(y, weight)) - omega * y - alpha * z)
        y = y + dt * z
        history.append(y)
    return torch.stack(history)


def random_fields(batch=3, channels=2, size=9, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    y0 = torch.rand(batch, channels, size, size, generator=generator, dtype=dtype) * 2 - 1
    omega = torch.rand(batch, channels, size, size, generator=generator, dtype=dtype) * 2
    alpha = torch.rand(batch, channels, size, size, generator=generator, dtype=dtype) * 0.5
    return y0, omega, alpha


def test_coupling_initialised_to_laplacian():
    cell = WaveCell(channels=3, steps=5)
    stencil = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    for i in range(3):
        for j in range(3):
            expected = stencil if i == j else torch.zeros(3, 3)
            assert torch.equal(cell.coupling[i, j].detach(), expected)
    assert [name for name, _ in cell.named_parameters()] == ["coupling"]  # no bias


def test_coupling_padding_is_circular():
    field = torch.zeros(1, 1, 5, 5)
    field[0, 0, 0, 0] = 1.0
    out = circular_conv3x3(field, laplacian_kernel(1))
    # The impulse at the corner reaches the opposite edges through the wrap-around.
    assert out[0, 0, 0, 0] == -4.0
    assert out[0, 0, 4, 0] == 1.0
    assert out[0, 0, 0, 4] == 1.0
    assert out[0, 0, 1, 0] == 1.0
    assert out[0, 0, 0, 1] == 1.0
    assert out.sum() == 0.0


def test_update_order_velocity_first():
    y0, omega, alpha = random_fields()
    weight = laplacian_kernel(2) + 0.1
    dt = 0.3
    positions = WaveRollout.apply(y0, omega, alpha, weight, 2, dt, 1)
    # Step 1 by hand: z1 from z0 = 0 and y0, then y1 with the new z1.
    z1 = dt * (torch.tanh(circular_conv3x3(y0, weight)) - omega * y0)
    y1 = y0 + dt * z1
    z2 = z1 + dt * (torch.tanh(circular_conv3x3(y1, weight)) - omega * y1 - alpha * z1)
    y2 = y1 + dt * z2
    torch.testing.assert_close(positions[0], y1, rtol=0, atol=1e-6)
    torch.testing.assert_close(positions[1], y2, rtol=0, atol=1e-6)
    # y_0 is not recorded and the explicit order (y first) would differ.
    assert not torch.allclose(positions[0], y0 + dt * torch.zeros_like(y0))


def test_fused_kernels_build_with_a_compiler():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on this machine: the torch-op cell is used")
    assert fused_kernels() is not None


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [3, 30])
def test_rollout_matches_reference_with_gradients(chunk, fused):
    y0, omega, alpha = (t.requires_grad_() for t in random_fields(seed=1))
    weight = laplacian_kernel(2) + 0.2 * torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    weight.requires_grad_()
    steps, dt = 23, 0.1
    upstream = torch.randn(steps, 3, 2, 9, 9, generator=torch.Generator().manual_seed(3))
    fast = WaveRollout.apply(y0, omega, alpha, weight, steps, dt, chunk, fused)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), (y0, omega, alpha, weight))
    ref = reference_rollout(y0, omega, alpha, weight, steps, dt)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (y0, omega, alpha, weight))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for fast_grad, ref_grad in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_fused_equals_torch_ops_on_odd_shapes():
    """Three channels, a non-square grid and a last chunk shorter than the others."""
    y0, omega, alpha = (t.requires_grad_() for t in random_fields(batch=2, channels=3, size=7, seed=7))
    weight = laplacian_kernel(3) + 0.1 * torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(8))
    weight.requires_grad_()
    y0_wide, omega_wide, alpha_wide = (torch.cat([t, t.flip(-1)], -1) for t in (y0, omega, alpha))
    steps, dt, chunk = 17, 0.1, 5
    upstream = torch.randn(steps, 2, 3, 7, 14, generator=torch.Generator().manual_seed(9))
    results = []
    for fused in (True, False):
        out = WaveRollout.apply(y0_wide, omega_wide, alpha_wide, weight, steps, dt, chunk, fused)
        results.append((out, torch.autograd.grad((out * upstream).sum(), (y0, omega, alpha, weight))))
    (fused_out, fused_grads), (torch_out, torch_grads) = results
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-5, atol=1e-5)
    for fused_grad, torch_grad in zip(fused_grads, torch_grads, strict=True):
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("readout", READOUTS)
def test_network_matches_reference_cell(readout, monkeypatch):
    torch.manual_seed(0)
    net = WaveNetwork(
        in_channels=3,
        num_classes=6,
        channels=2,
        steps=12,
        dt=0.1,
        readout=readout,
        head_widths=[16, 16],
        rollout_chunk=5,
    )
    images = torch.rand(2, 3, 10, 10)
    target = torch.randint(0, 6, (2, 10, 10))

    def loss_and_grads():
        net.zero_grad()
        logits = net(images)
        torch.nn.functional.cross_entropy(logits, target).backward()
        return logits.detach(), [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()
        ]

    fast_logits, fast_grads = loss_and_grads()
    monkeypatch.setattr(
        net.cell,
        "forward",
        lambda y0, omega, alpha: reference_rollout(
            y0, omega, alpha, net.cell.coupling, net.cell.steps, net.cell.dt
        ),
    )
    ref_logits, ref_grads = loss_and_grads()
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-6)
    for (name, _), fast_grad, ref_grad in zip(net.named_parameters(), fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)


def modified_energy(y, z, omega, dt):
    """1/2 |z|^2 - 1/2 <y, A y> + dt/2 <z, A y> with A = Laplacian - diag(omega), in float64."""
    a_y = circular_conv3x3(y, laplacian_kernel(y.shape[1]).double()) - omega * y
    return 0.5 * (z * z).sum() - 0.5 * (y * a_y).sum() + 0.5 * dt * (z * a_y).sum()


def energy_series(alpha_scale: float):
    y0, omega, _ = random_fields(batch=1, size=12, seed=4)
    y0 = 1e-3 * y0
    alpha = torch.full_like(y0, alpha_scale)
    dt, steps = 0.1, 100
    positions = WaveRollout.apply(y0, omega, alpha, laplacian_kernel(2), steps, dt, 10).double()
    ys = torch.cat([y0.double()[None], positions])
    zs = (ys[1:] - ys[:-1]) / dt  # y_{t+1} = y_t + dt z_{t+1}
    return torch.stack([modified_energy(ys[t + 1], zs[t], omega.double(), dt) for t in range(steps)])


def test_energy_conserved_without_damping():
    energy = energy_series(0.0)
    drift = (energy - energy[0]).abs().max() / energy[0].abs()
    assert drift < 1e-5


def test_energy_decreases_with_damping():
    energy = energy_series(0.5)
    assert energy[-1] < 0.5 * energy[0]
    assert torch.all(energy[1:] <= energy[:-1] * (1 + 1e-4))


def test_rollout_bounded_without_restoring_forces():
    y0, _, _ = random_fields(seed=5)
    zero = torch.zeros_like(y0)
    steps, dt = 100, 0.1
    positions = WaveRollout.apply(y0, zero, zero, laplacian_kernel(2) * 5, steps, dt, 10)
    t = torch.arange(1, steps + 1, dtype=torch.float32)
    bound = 1 + dt**2 * t * (t + 1) / 2
    assert torch.isfinite(positions).all()
    assert torch.all(positions.abs().amax(dim=(1, 2, 3, 4)) <= bound + 1e-5)


@pytest.mark.parametrize("readout", READOUTS)
def test_cell_readout_head_commute_with_circular_shift(readout):
    torch.manual_seed(0)
    net = WaveNetwork(
        in_channels=3, num_classes=6, channels=2, steps=15, dt=0.1, readout=readout, head_widths=[8]
    )
    y0, omega, alpha = random_fields(batch=2, size=11, seed=6)

    def logits(fields):
        states = net.cell(*fields)
        return net.head(net.readout(states), 2, 11, 11)

    shift = (3, -4)
    shifted = [torch.roll(f, shift, dims=(2, 3)) for f in (y0, omega, alpha)]
    with torch.no_grad():
        torch.testing.assert_close(
            logits(shifted), torch.roll(logits((y0, omega, alpha)), shift, dims=(2, 3)), rtol=1e-5, atol=1e-5
        )


def test_full_model_shift_equivariant_with_circular_encoders():
    torch.manual_seed(0)
    net = WaveNetwork(
        in_channels=3, num_classes=6, channels=2, steps=10, dt=0.1, readout="linear", head_widths=[8]
    )
    for module in net.modules():  # test-only switch: circular padding in the encoders
        if isinstance(module, torch.nn.Conv2d):
            module.padding_mode = "circular"
    images = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            net(torch.roll(images, (2, 5), (2, 3))),
            torch.roll(net(images), (2, 5), (2, 3)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_cell_runs_in_float32_under_bf16_autocast():
    cell = WaveCell(channels=2, steps=5)
    y0, omega, alpha = (t.bfloat16() for t in random_fields())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cell(y0, omega, alpha)
    assert out.dtype == torch.float32
