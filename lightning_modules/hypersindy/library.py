"""Polynomial feature library in torch, with the term order and names of pysindy's PolynomialLibrary."""

from __future__ import annotations

from itertools import combinations_with_replacement

import torch
from torch import nn


def monomial_name(indices: tuple[int, ...], variable_names: list[str]) -> str:
    """Name a monomial the way pysindy does: 'x^2 y' for indices (0, 0, 1)."""
    if not indices:
        return "1"
    parts = []
    for var in sorted(set(indices)):
        power = indices.count(var)
        parts.append(variable_names[var] if power == 1 else f"{variable_names[var]}^{power}")
    return " ".join(parts)


class PolynomialLibrary(nn.Module):
    """All monomials of the state up to `degree`: the constant (optional), degree 1, then each higher degree
    as combinations with replacement in lexicographic order, which is pysindy's PolynomialLibrary order.

    forward: (..., D) -> (..., L). Each degree is the previous degree's features times one variable, so a
    batch costs one gather and one product per degree.
    """

    def __init__(
        self,
        state_dim: int,
        degree: int = 3,
        include_constant: bool = True,
        variable_names: list[str] | None = None,
    ):
        super().__init__()
        if degree < 1:
            raise ValueError(
                f"library degree={degree} is invalid: use a polynomial degree >= 1 (3 in the paper)."
            )
        if state_dim < 1:
            raise ValueError(f"state_dim={state_dim} is invalid: use a positive state dimension.")
        names = list(variable_names) if variable_names else [f"x{i}" for i in range(state_dim)]
        if len(names) != state_dim:
            raise ValueError(f"variable_names has {len(names)} entries but state_dim={state_dim}.")
        self.state_dim = state_dim
        self.degree = degree
        self.include_constant = include_constant
        self.variable_names = names

        combos_by_degree = [
            list(combinations_with_replacement(range(state_dim), k)) for k in range(degree + 1)
        ]
        terms = [()] if include_constant else []
        for k in range(1, degree + 1):
            terms.extend(combos_by_degree[k])
        self.terms = terms
        self.feature_names = [monomial_name(t, names) for t in terms]

        # For degree k >= 2, each combination (i1 <= ... <= ik) is the degree-(k-1) combination
        # (i1, ..., i(k-1)) times variable ik; store the parent index and the extra variable.
        for k in range(2, degree + 1):
            parent_of = {c: i for i, c in enumerate(combos_by_degree[k - 1])}
            parents = torch.tensor([parent_of[c[:-1]] for c in combos_by_degree[k]], dtype=torch.long)
            extra = torch.tensor([c[-1] for c in combos_by_degree[k]], dtype=torch.long)
            self.register_buffer(f"parent_{k}", parents, persistent=False)
            self.register_buffer(f"extra_{k}", extra, persistent=False)

    @property
    def num_features(self) -> int:
        return len(self.terms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        if self.include_constant:
            features.append(torch.ones_like(x[..., :1]))
        current = x
        features.append(current)
        for k in range(2, self.degree + 1):
            parents = getattr(self, f"parent_{k}")
            extra = getattr(self, f"extra_{k}")
            current = current.index_select(-1, parents) * x.index_select(-1, extra)
            features.append(current)
        return torch.cat(features, dim=-1)
