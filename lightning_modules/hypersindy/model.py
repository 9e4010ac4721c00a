"""HyperSINDy's networks: encoder q(z | x, dx/dt), hypernetwork z -> coefficients, and the hard-concrete gate.

Sizes follow Jacobs et al., "HyperSINDy: Deep Generative Modeling of Nonlinear Stochastic Governing
Equations" (arXiv:2310.04832) and its public package: ELU MLPs, Xavier-uniform weights, default biases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Hard-concrete constants of Louizos et al. (arXiv:1712.01312): temperature, stretch interval (gamma, zeta).
GATE_TEMPERATURE = 2.0 / 3.0
GATE_GAMMA = -0.1
GATE_ZETA = 1.1
# log(-gamma / zeta) times the temperature; sigmoid(log_alpha - L0_SHIFT) is P(gate != 0).
L0_SHIFT = GATE_TEMPERATURE * math.log(-GATE_GAMMA / GATE_ZETA)


def xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)


class Encoder(nn.Module):
    """[x, standardised dx/dt] (2D) -> (mu, log variance) of z, each (B, z_dim)."""

    def __init__(self, state_dim: int, z_dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2 * state_dim, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, z_dim),
        )
        self.mu = nn.Linear(z_dim, z_dim)
        self.log_var = nn.Linear(z_dim, z_dim)

    def forward(self, x: torch.Tensor, dx_standardised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x, dx_standardised], dim=-1))
        return self.mu(h), self.log_var(h)


class HyperNetwork(nn.Module):
    """z (B, z_dim) -> full coefficient matrix (B, L, D): Linear, ELU, then `num_hidden - 1` hidden layers."""

    def __init__(self, z_dim: int, num_features: int, state_dim: int, hidden: int, num_hidden: int = 5):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(z_dim, hidden), nn.ELU()]
        for _ in range(num_hidden - 1):
            layers += [nn.Linear(hidden, hidden), nn.ELU()]
        layers.append(nn.Linear(hidden, num_features * state_dim))
        self.layers = nn.Sequential(*layers)
        self.num_features = num_features
        self.state_dim = state_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).view(-1, self.num_features, self.state_dim)


class HardConcreteGate(nn.Module):
    """Hard-concrete L0 gate over the (L, D) coefficient entries.

    Train mode draws an independent stretched, clamped concrete sample per batch element; eval mode returns
    the deterministic gate clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1), which may be fractional.
    """

    def __init__(self, num_features: int, state_dim: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.randn(num_features, state_dim) * 0.01)

    def sample(self, batch: int) -> torch.Tensor:
        u = torch.rand(batch, *self.log_alpha.shape, dtype=self.log_alpha.dtype, device=self.log_alpha.device)
        # logit(u) = log(u) - log(1 - u), with u clamped to [1e-6, 1 - 1e-6], in one operation.
        s = torch.sigmoid((torch.logit(u, eps=1e-6) + self.log_alpha) * (1.0 / GATE_TEMPERATURE))
        return (s * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA).clamp(0.0, 1.0)

    def forward(self, batch: int) -> torch.Tensor:
        """Gate of shape (batch, L, D) in train mode, (1, L, D) in eval mode."""
        if self.training:
            return self.sample(batch)
        return self.deterministic().unsqueeze(0)

    def expected_l0(self, mask: torch.Tensor) -> torch.Tensor:
        """Return the expected number of open gates among kept entries, sum M * sigmoid(log_alpha - shift)."""
        return (mask * torch.sigmoid(self.log_alpha - L0_SHIFT)).sum()


def kl_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) summed over latent dimensions and averaged over the batch."""
    return (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(-1)).mean()
