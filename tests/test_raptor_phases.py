"""Layer similarity, contiguous DP phases, recursive max-cut, automatic k and routing."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_modules.raptor.phases import (
    choose_k,
    contiguous_phases,
    max_cut_phases,
    phase_contrast,
    route_layers,
    similarity_matrix,
    within_phase_distance,
)


def random_similarity(n_layers: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    summaries = torch.randn(6, n_layers, 2, 5, generator=generator)
    summaries = summaries.cumsum(1)  # neighbouring layers correlate, as in a residual stream
    return similarity_matrix(summaries)


def brute_force_contiguous(similarity: torch.Tensor, k: int) -> tuple[float, list[int]]:
    n_layers = similarity.shape[0]
    best = (float("inf"), [])
    for cuts in itertools.combinations(range(1, n_layers), k - 1):
        boundaries = [*cuts, n_layers]
        cost = within_phase_distance(similarity, boundaries)
        if cost < best[0] - 1e-12:
            best = (cost, boundaries)
    return best


def test_similarity_symmetric_unit_diagonal():
    sim = random_similarity(9, seed=0)
    assert torch.allclose(sim, sim.T)
    assert torch.allclose(torch.diagonal(sim), torch.ones(9))
    assert sim.min() >= -1 - 1e-6
    assert sim.max() <= 1 + 1e-6


def test_similarity_hand_computed():
    # Two layers, one image, one summary: cos([1,0],[1,1]) = 1/sqrt(2).
    summaries = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    sim = similarity_matrix(summaries)
    assert sim[0, 1].item() == pytest.approx(2**-0.5, abs=1e-6)


def test_similarity_duplicate_layer_rows():
    summaries = torch.randn(4, 5, 2, 8)
    summaries[:, 3] = summaries[:, 1]
    sim = similarity_matrix(summaries)
    assert torch.allclose(sim[1], sim[3], atol=1e-6)


@pytest.mark.parametrize("n_layers,k", [(6, 2), (8, 3), (10, 4), (12, 3)])
def test_dp_matches_brute_force(n_layers, k):
    for seed in range(3):
        sim = random_similarity(n_layers, seed)
        boundaries = contiguous_phases(sim, k)
        cost = within_phase_distance(sim, boundaries)
        brute_cost, _ = brute_force_contiguous(sim, k)
        assert boundaries[-1] == n_layers
        assert len(boundaries) == k
        assert cost == pytest.approx(brute_cost, abs=1e-9)


def test_dp_recovers_planted_blocks():
    sim = torch.full((12, 12), 0.1)
    sim[:7, :7] = 0.9
    sim[7:, 7:] = 0.85
    sim.fill_diagonal_(1.0)
    assert contiguous_phases(sim, 2) == [7, 12]


def test_dp_within_plus_cut_is_total():
    sim = random_similarity(10, seed=5)
    distance = 1 - sim.double()
    boundaries = contiguous_phases(sim, 3)
    phase_of = torch.tensor(route_layers(boundaries))
    cross = phase_of[:, None] != phase_of[None, :]
    cut = float(distance[cross].sum()) / 2
    total = float(distance.sum() - torch.diagonal(distance).sum()) / 2
    assert within_phase_distance(sim, boundaries) + cut == pytest.approx(total, abs=1e-9)


def test_dp_min_length():
    sim = random_similarity(8, seed=2)
    boundaries = contiguous_phases(sim, 3, min_length=2)
    lengths = [b - a for a, b in zip([0, *boundaries[:-1]], boundaries, strict=False)]
    assert min(lengths) >= 2


@pytest.mark.parametrize("k", [0, 13])
def test_dp_rejects_bad_k(k):
    with pytest.raises(ValueError, match=f"k={k} is invalid"):
        contiguous_phases(torch.eye(12), k)


def brute_force_max_cut(distance: torch.Tensor, members: list[int]) -> float:
    best = 0.0
    for r in range(1, len(members)):
        for side in itertools.combinations(members, r):
            other = [m for m in members if m not in side]
            best = max(best, float(distance[list(side)][:, other].sum()))
    return best


def test_max_cut_two_clusters():
    sim = torch.full((8, 8), 0.0)
    sim[:5, :5] = 1.0
    sim[5:, 5:] = 1.0
    assert max_cut_phases(sim, f=0.2) == [[1, 2, 3, 4, 5], [6, 7, 8]]


def test_max_cut_first_split_is_exact():
    from lightning_modules.raptor.phases import _max_cut

    sim = random_similarity(7, seed=3).double()
    distance = 1 - sim
    distance.fill_diagonal_(0)
    weight, side_a, side_b = _max_cut(distance, list(range(7)))
    assert weight == pytest.approx(brute_force_max_cut(distance, list(range(7))), abs=1e-9)
    assert sorted(side_a + side_b) == list(range(7))


def test_max_cut_high_threshold_keeps_one_cluster():
    sim = random_similarity(6, seed=1)
    assert max_cut_phases(sim, f=10.0) == [[1, 2, 3, 4, 5, 6]]


def test_choose_k_planted():
    sim = torch.full((12, 12), 0.0)
    for start, end in [(0, 4), (4, 8), (8, 12)]:
        sim[start:end, start:end] = 1.0
    assert choose_k(sim, gain_threshold=0.05) == 3


def test_routing_published_table():
    assert route_layers([7, 12]) == [0] * 7 + [1] * 5
    assert route_layers([7, 10, 12]) == [0] * 7 + [1] * 3 + [2] * 2
    routed = route_layers([4, 7, 10, 12])
    counts = [routed.count(j) for j in range(4)]
    assert counts == [4, 3, 3, 2]
    assert sum(counts) == 12


def test_phase_contrast_hand_computed():
    sim = torch.full((4, 4), 0.2)
    sim[:2, :2] = 0.8
    sim[2:, 2:] = 0.6
    sim.fill_diagonal_(1.0)
    # within off-diagonal: 0.8, 0.8, 0.6, 0.6 -> 0.7; cross: 0.2
    assert phase_contrast(sim, [2, 4]) == pytest.approx(0.5, abs=1e-6)
