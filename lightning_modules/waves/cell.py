"""The wave cell: a 2-D grid of damped nonlinear oscillators coupled by one circular 3x3 convolution.

For t = 0 .. T-1 the state advances by semi-implicit (symplectic) Euler, velocity first:

    z_{t+1} = z_t + dt * (tanh(W * y_t) - omega * y_t - alpha * z_t)
    y_{t+1} = y_t + dt * z_{t+1}

with W a C -> C 3x3 convolution with circular padding and no bias, initialised to the discrete Laplacian on
each diagonal kernel, and z_0 = 0. The rollout records y_1 .. y_T.

`WaveRollout` is an `autograd.Function` with a hand-written backward pass. The forward writes each new y
straight into one preallocated time-major buffer (T, B, C, H, W) and keeps only every `chunk`-th velocity
z. The backward runs the adjoint recurrence in reverse and recomputes the velocities of one chunk at a
time from the stored positions. The memory kept for the backward is therefore the position history, which
the readout needs anyway, plus T / chunk velocity snapshots, instead of the five or six state-sized
tensors per step that autograd would keep.

On a CPU both passes run in the fused C++ kernels of `wave_kernels.cpp` (see `native.py`), one thread per
image with its state in cache. Elsewhere, or where the kernels cannot be built, the same algorithm runs
as torch ops, with the coupling's weight gradient computed once per chunk by a single batched product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.waves.native import fused_kernels


def circular_conv3x3(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 convolution with circular padding and no bias to (N, C, H, W)."""
    return F.conv2d(F.pad(state, (1, 1, 1, 1), mode="circular"), weight)


def circular_conv3x3_transpose(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Adjoint of `circular_conv3x3` with respect to its input."""
    return circular_conv3x3(grad, weight.transpose(0, 1).flip(2, 3))


def circular_conv3x3_weight_grad(state: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Gradient of `circular_conv3x3(state, W)` with respect to W, as (C_out, C_in, 3, 3).

    Each of the nine taps is one (C_out x N*H*W) @ (N*H*W x C_in) product with a shifted window of the
    padded state. With few channels this is far cheaper than the generic convolution weight gradient.
    """
    height, width = grad_output.shape[-2:]
    padded = F.pad(state, (1, 1, 1, 1), mode="circular")
    grad_rows = grad_output.transpose(0, 1).reshape(grad_output.shape[1], -1)
    grad_weight = grad_output.new_empty(grad_output.shape[1], state.shape[1], 3, 3)
    for dy in range(3):
        for dx in range(3):
            window = (
                padded[:, :, dy : dy + height, dx : dx + width].transpose(0, 1).reshape(state.shape[1], -1)
            )
            grad_weight[:, :, dy, dx] = grad_rows @ window.T
    return grad_weight


def laplacian_kernel(channels: int) -> torch.Tensor:
    """Coupling weights (C, C, 3, 3): the 5-point Laplacian on each diagonal kernel, zeros elsewhere."""
    weight = torch.zeros(channels, channels, 3, 3)
    stencil = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    for channel in range(channels):
        weight[channel, channel] = stencil
    return weight


class WaveRollout(torch.autograd.Function):
    """T symplectic Euler steps of the wave cell; returns the positions y_1..y_T as (T, B, C, H, W)."""

    @staticmethod
    def forward(ctx, y0, omega, alpha, weight, steps: int, dt: float, chunk: int, fused: bool = True):
        y0, omega, alpha, weight = (t.float().contiguous() for t in (y0, omega, alpha, weight))
        kernels = fused_kernels() if fused and y0.device.type == "cpu" else None
        ctx.kernels, ctx.steps, ctx.dt, ctx.chunk = kernels, steps, dt, chunk
        if kernels is not None:
            positions, snapshots = kernels.rollout_forward(y0, omega, alpha, weight, steps, dt, chunk)
            ctx.save_for_backward(y0, omega, alpha, weight, positions, snapshots)
            return positions

        positions = y0.new_empty((steps, *y0.shape))
        damping = 1.0 - dt * alpha  # z is scaled by (1 - dt * alpha) every step
        stiffness = dt * omega
        velocity = torch.zeros_like(y0)
        snapshots = []
        position = y0
        for step in range(steps):
            if step % chunk == 0:
                snapshots.append(velocity.clone())
            force = circular_conv3x3(position, weight).tanh_()
            velocity.mul_(damping).add_(force, alpha=dt).addcmul_(stiffness, position, value=-1.0)
            torch.add(position, velocity, alpha=dt, out=positions[step])
            position = positions[step]
        ctx.save_for_backward(y0, omega, alpha, weight, positions, torch.stack(snapshots))
        return positions

    @staticmethod
    def backward(ctx, grad_positions):
        y0, omega, alpha, weight, positions, snapshots = ctx.saved_tensors
        steps, dt, chunk = ctx.steps, ctx.dt, ctx.chunk
        grad_positions = grad_positions.float().contiguous()
        if ctx.kernels is not None:
            grads = ctx.kernels.rollout_backward(
                grad_positions, y0, omega, alpha, weight, positions, snapshots, dt, chunk
            )
            return (*grads, None, None, None, None)

        damping = 1.0 - dt * alpha
        stiffness = dt * omega
        transposed = weight.transpose(0, 1).flip(2, 3).contiguous()

        grad_y = torch.zeros_like(y0)  # dL/dy_{t+1}, everything that flows back from later steps
        grad_z = torch.zeros_like(y0)  # dL/dz_{t+1} from later steps
        grad_omega = torch.zeros_like(omega)
        grad_alpha = torch.zeros_like(alpha)
        grad_weight = torch.zeros_like(weight)

        n_chunks = math.ceil(steps / chunk)
        for index in reversed(range(n_chunks)):
            start, stop = index * chunk, min((index + 1) * chunk, steps)
            length = stop - start
            # Recompute z_start .. z_{stop-1} and the coupling forces of this chunk from the stored positions.
            if start > 0:
                chunk_positions = positions[start - 1 : stop - 1]  # a view: y_start .. y_{stop-1}
            else:
                chunk_positions = torch.cat([y0[None], positions[: stop - 1]])
            flat = chunk_positions.flatten(0, 1)
            forces = circular_conv3x3(flat, weight).tanh_().view_as(chunk_positions)
            velocities = torch.empty_like(chunk_positions)
            velocities[0] = snapshots[index]
            for offset in range(length - 1):
                torch.mul(velocities[offset], damping, out=velocities[offset + 1])
                velocities[offset + 1].add_(forces[offset], alpha=dt).addcmul_(
                    stiffness, chunk_positions[offset], value=-1.0
                )
            # dt * tanh'(W * y_t) for the whole chunk at once, reused in place for the pre-activation grads.
            slopes = forces.square_().sub_(1.0).mul_(-dt)
            velocity_grads = torch.empty_like(chunk_positions)  # dL/dz_{t+1} of each step in the chunk

            for offset in reversed(range(length)):
                grad_y.add_(grad_positions[start + offset])
                grad_z.add_(grad_y, alpha=dt)  # y_{t+1} = y_t + dt z_{t+1}
                velocity_grads[offset].copy_(grad_z)
                grad_pre = slopes[offset].mul_(grad_z)
                grad_y.addcmul_(stiffness, grad_z, value=-1.0)
                grad_y.add_(circular_conv3x3(grad_pre, transposed))
                grad_z.mul_(damping)

            # The omega and alpha terms of z_{t+1} give their gradients summed over the chunk's steps.
            grad_omega.sub_((chunk_positions * velocity_grads).sum(0), alpha=dt)
            grad_alpha.sub_((velocities * velocity_grads).sum(0), alpha=dt)
            grad_weight += circular_conv3x3_weight_grad(flat, slopes.flatten(0, 1))
        return grad_y, grad_omega, grad_alpha, grad_weight, None, None, None, None


class WaveCell(nn.Module):
    """The learnable coupling W and the rollout; `forward` returns time-major positions (T, B, C, H, W).

    Args:
        channels: hidden channels C of the oscillator grid.
        steps: number of Euler steps T.
        dt: time step.
        chunk: steps per recomputation chunk in the backward pass (memory vs. recomputation).
        fused: use the fused C++ kernels on a CPU where they can be built (set False to compare).
    """

    def __init__(self, channels: int, steps: int, dt: float = 0.1, chunk: int = 10, fused: bool = True):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps={steps} is invalid: the rollout needs at least one step.")
        self.channels, self.steps, self.dt, self.chunk = channels, steps, float(dt), max(1, int(chunk))
        self.fused = fused
        self.coupling = nn.Parameter(laplacian_kernel(channels))

    # torch.compile runs the rollout as it is: its fused kernels are opaque to the compiler.
    @torch.compiler.disable
    def forward(self, y0: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        device_type = y0.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return WaveRollout.apply(
                y0.float(),
                omega.float(),
                alpha.float(),
                self.coupling.float(),
                self.steps,
                self.dt,
                self.chunk,
                self.fused,
            )

    def step(self, y: torch.Tensor, z: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor):
        """Advance (y, z) by one Euler step through autograd, for rollouts from an arbitrary state."""
        z = z + self.dt * (torch.tanh(circular_conv3x3(y, self.coupling)) - omega * y - alpha * z)
        return y + self.dt * z, z
