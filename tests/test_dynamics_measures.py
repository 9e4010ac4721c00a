"""Dynamical measures on synthetic trajectories with results known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks.dynamics import measures
from callbacks.dynamics.callback import phase_slices, summarise
from lightning_modules.trajectory import Trajectory

GROUPS = {"cls": torch.tensor([0]), "patch": torch.arange(1, 5)}


def rotation(dim: int, theta: float) -> torch.Tensor:
    """Rotation by theta in the plane of the first two coordinates."""
    matrix = torch.eye(dim, dtype=torch.float64)
    matrix[0, 0] = matrix[1, 1] = math.cos(theta)
    matrix[0, 1], matrix[1, 0] = -math.sin(theta), math.sin(theta)
    return matrix


def linear_trajectory(matrix: torch.Tensor, start: torch.Tensor, steps: int) -> torch.Tensor:
    """States (B, steps + 1, N, D) of x_(l+1) = x_l A^T."""
    states = [start]
    for _ in range(steps):
        states.append(states[-1] @ matrix.T)
    return torch.stack(states, dim=1)


def test_angle_exact_near_parallel():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(1e-4), math.sin(1e-4), 0.0])
    assert measures.angle(a, b).item() == pytest.approx(1e-4, rel=1e-3)
    assert measures.angle(a, a).item() == 0.0
    assert measures.angle(a, -a).item() == pytest.approx(math.pi)


def test_speed_constant_rotation_equals_angle():
    theta = 0.3
    start = torch.randn(3, 5, 6, dtype=torch.float64)
    start[..., 2:] = 0.0  # keep every token in the rotation plane
    states = linear_trajectory(rotation(6, theta), start, steps=7)
    speed = measures.angular_speed(states, GROUPS)
    for group in GROUPS:
        assert speed[group].shape == (7,)
        torch.testing.assert_close(speed[group], torch.full((7,), theta, dtype=torch.float64))


def test_speed_zero_for_identical_states():
    states = torch.randn(2, 1, 5, 8).expand(2, 6, 5, 8)
    speed = measures.angular_speed(states, GROUPS)
    assert speed["cls"].abs().max().item() == 0.0
    assert speed["patch"].abs().max().item() == 0.0


def test_convergence_contracting_map_monotone_to_one():
    # A = diag(1, 0.5, ..., 0.5): every direction contracts towards the first axis.
    dim, steps = 6, 12
    matrix = torch.diag(torch.tensor([1.0] + [0.5] * (dim - 1), dtype=torch.float64))
    start = torch.randn(4, 5, dim, dtype=torch.float64)
    start[..., 0] = start[..., 0].abs() + 0.1
    states = linear_trajectory(matrix, start, steps)
    gamma = measures.directional_convergence(states, GROUPS)
    for group in GROUPS:
        curve = gamma[group]
        assert curve.shape == (steps + 1,)
        assert curve[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert torch.all(curve[1:] - curve[:-1] > 0), curve
        assert curve[0].item() < 0.99


def test_convergence_last_step_is_one():
    states = torch.randn(3, 9, 5, 7)
    gamma = measures.directional_convergence(states, GROUPS)
    assert gamma["cls"][-1].item() == pytest.approx(1.0, abs=1e-6)
    assert gamma["patch"][-1].item() == pytest.approx(1.0, abs=1e-6)


def test_coherence_identical_tokens_is_one():
    token = torch.randn(2, 4, 1, 8)
    growth = torch.linspace(1, 2, 4).view(1, 4, 1, 1)
    states = (token * growth).expand(2, 4, 6, 8)  # the updates are identical across tokens too
    result = measures.patch_coherence(states, torch.arange(6))
    for key in ("state", "state_pairwise", "update", "update_pairwise"):
        torch.testing.assert_close(result[key], torch.ones_like(result[key]), atol=1e-6, rtol=0)


def test_coherence_orthogonal_tokens_hand_computed():
    # N orthonormal tokens: the mean is (1/N) sum e_i, cos(e_i, mean) = 1/sqrt(N), pairwise cosine 0.
    n = 4
    states = torch.eye(n).view(1, 1, n, n).expand(1, 2, n, n)
    to_mean, pairwise = measures.coherence(states)
    torch.testing.assert_close(to_mean, torch.full((1, 2), 1 / math.sqrt(n)))
    torch.testing.assert_close(pairwise, torch.zeros(1, 2))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_update_rank_built_with_rank_r(rank):
    # Updates U = P diag(1) Q^T with orthonormal P (N x r), Q (D x r): all r singular values equal 1.
    generator = torch.Generator().manual_seed(rank)
    n_tokens, dim, steps = 12, 10, 3
    states = [torch.randn(2, n_tokens, dim, generator=generator, dtype=torch.float64)]
    for _ in range(steps):
        left = torch.linalg.qr(torch.randn(2, n_tokens, rank, generator=generator, dtype=torch.float64)).Q
        right = torch.linalg.qr(torch.randn(2, dim, rank, generator=generator, dtype=torch.float64)).Q
        states.append(states[-1] + left @ right.transpose(-1, -2))
    result = measures.update_ranks(torch.stack(states, dim=1))
    for key in ("stable_per_image", "effective_per_image"):
        torch.testing.assert_close(result[key], torch.full((steps,), float(rank), dtype=torch.float64))
    # Pooled over two images whose column spaces differ, the rank lies between r and 2r.
    assert torch.all(result["effective_pooled"] >= rank - 1e-9)
    assert torch.all(result["effective_pooled"] <= 2 * rank + 1e-9)


def test_update_rank_random_factors_bounded_by_r():
    generator = torch.Generator().manual_seed(0)
    rank = 4
    start = torch.randn(3, 20, 16, generator=generator)
    update = torch.randn(3, 20, rank, generator=generator) @ torch.randn(3, rank, 16, generator=generator)
    result = measures.update_ranks(torch.stack([start, start + update], dim=1))
    assert rank / 2 < result["effective_per_image"].item() <= rank + 1e-6
    assert 1.0 <= result["stable_per_image"].item() <= rank + 1e-6


def test_matrix_ranks_rank_one_and_identity():
    rank_one = torch.outer(torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    stable, effective = measures.matrix_ranks(rank_one)
    assert stable.item() == pytest.approx(1.0, abs=1e-9)
    assert effective.item() == pytest.approx(1.0, abs=1e-9)
    stable, effective = measures.matrix_ranks(torch.eye(6))
    assert stable.item() == pytest.approx(6.0)
    assert effective.item() == pytest.approx(6.0)
    stable, effective = measures.matrix_ranks(torch.zeros(4, 3))
    assert stable.item() == 0.0
    assert effective.item() == 0.0


def test_tangential_rank_drops_radial_growth():
    # Tokens c_i u grow radially and shift by a shared w orthogonal to u: the full update 0.5 c_i u + w has
    # rank 2 (unequal singular values), its tangential part is w for every token (rank 1).
    scales = torch.linspace(-1.5, 1.5, 6, dtype=torch.float64)  # sum 0: the two parts are orthogonal
    u = torch.zeros(8, dtype=torch.float64)
    u[0] = 1.0
    w = torch.zeros(8, dtype=torch.float64)
    w[3] = 0.3
    start = (scales[:, None] * u).unsqueeze(0)
    states = torch.stack([start, 1.5 * start + w], dim=1)
    assert measures.update_ranks(states)["stable_per_image"].item() > 1.2
    tangential = measures.update_ranks(states, tangential=True)
    assert tangential["stable_per_image"].item() == pytest.approx(1.0, abs=1e-9)
    assert tangential["effective_per_image"].item() == pytest.approx(1.0, abs=1e-9)


def basin_trajectory(n_per_class: int, steps: int, seed: int = 0):
    """Two classes whose cls token moves from a shared start to class directions e_0 and e_1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat(n_per_class)  # alternate, so both halves hold both classes
    targets = torch.eye(4)[labels]
    noise = 0.05 * torch.randn(labels.numel(), 4, generator=generator)
    start = torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(labels.numel(), 4)
    mix = torch.linspace(0, 1, steps + 1).view(1, -1, 1)
    cls = (1 - mix) * start[:, None] + mix * (targets[:, None] + noise[:, None])
    return cls, labels


def test_fit_test_split_stratified_for_cycling_labels():
    labels = torch.arange(4).repeat(3)  # 0 1 2 3 0 1 2 3 ...: a plain even/odd split would separate classes
    fit, test = measures.fit_test_split(labels)
    assert sorted(labels[fit].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(labels[test].tolist()) == [0, 1, 2, 3]
    assert set(fit.tolist()).isdisjoint(test.tolist())


def test_class_basins_separate_late():
    summary, labels = basin_trajectory(n_per_class=10, steps=6)
    summary[:, 0] += 1e-3 * torch.randn(summary[:, 0].shape, generator=torch.Generator().manual_seed(1))
    result = measures.class_basins(summary, labels)
    assert result["ncm_accuracy"][-1].item() == 1.0
    assert result["ncm_accuracy"][0].item() < 0.9  # the start is shared, classes are barely apart
    assert result["cos_true_final"][-1].item() > 0.99
    assert result["cos_true_final"][0].item() < 0.1  # the start is orthogonal to both class directions
    assert result["silhouette"][-1].item() > 0.9
    assert result["silhouette"][-1].item() > result["silhouette"][0].item()


def test_angular_silhouette_matches_hand_computed():
    # Four unit vectors: class 0 at angles 0 and 0.2, class 1 at 1.5 and 1.7 (radians, in a plane).
    angles = torch.tensor([0.0, 0.2, 1.5, 1.7], dtype=torch.float64)
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    # Point 0: a = 0.2, b = (1.5 + 1.7) / 2 = 1.6 -> s = 1 - 0.2/1.6; the layout is symmetric.
    expected = [1 - 0.2 / 1.6, 1 - 0.2 / 1.4, 1 - 0.2 / 1.4, 1 - 0.2 / 1.6]
    assert measures.angular_silhouette(directions, labels) == pytest.approx(sum(expected) / 4, rel=1e-6)


def rotating_trajectory(theta: float = 0.2, steps: int = 6):
    matrix = rotation(6, theta).float()

    def rollout(state: torch.Tensor, step: int) -> torch.Tensor:
        return linear_trajectory(matrix, state, steps - step)

    start = torch.randn(3, 5, 6)
    return linear_trajectory(matrix, start, steps), rollout


def test_perturbation_zero_alpha_gives_zero_curve():
    states, rollout = rotating_trajectory()
    records = measures.perturbation_test(states, rollout, GROUPS, depths=[1, 3], alphas=[0.0], seeds=[0, 1])
    assert [r["depth"] for r in records] == [1, 3]
    for record in records:
        for group in GROUPS:
            curve = record["groups"][group]["curve"]
            assert len(curve) == 6 - record["depth"] + 1
            assert max(curve) == pytest.approx(0.0, abs=1e-6)


def test_perturbation_rotation_keeps_distance():
    # A rotation is an isometry: the angle to the clean path stays at its initial value (ratio 1).
    states, rollout = rotating_trajectory()
    records = measures.perturbation_test(states, rollout, GROUPS, depths=[2], alphas=[0.05], seeds=[0, 1, 2])
    numbers = records[0]["groups"]["patch"]
    # |delta| = 0.05 |x| in a random direction, so the initial angle is at most atan(0.05).
    assert 0.02 < numbers["curve"][0] <= math.atan(0.05) + 1e-6
    assert numbers["contraction"] == pytest.approx(1.0, abs=1e-4)


def test_perturbation_contracting_map_self_corrects():
    matrix = torch.diag(torch.tensor([1.0, 0.3, 0.3, 0.3]))
    start = torch.randn(4, 5, 4)
    start[..., 0] = start[..., 0].abs() + 1.0
    states = linear_trajectory(matrix, start, steps=8)

    def rollout(state, step):
        return linear_trajectory(matrix, state, 8 - step)

    def classify(final):
        return final[:, 0, :2]

    records = measures.perturbation_test(
        states, rollout, GROUPS, depths=[2], alphas=[0.1], seeds=[0], classify=classify
    )
    assert records[0]["groups"]["cls"]["contraction"] < 0.2
    assert records[0]["agreement"] == 1.0


def test_perturbation_rejects_depth_out_of_range():
    states, rollout = rotating_trajectory(steps=4)
    with pytest.raises(ValueError, match="depth 4 is invalid"):
        measures.perturbation_test(states, rollout, GROUPS, depths=[4])


def test_default_depths_for_twelve_layers():
    assert measures.default_perturbation_depths(12) == [2, 4, 6, 8]
    assert measures.default_perturbation_depths(3) == [0, 1, 2]


def test_layer_summaries_leave_out_registers():
    states = torch.randn(2, 4, 7, 3)
    groups = {"cls": torch.tensor([0]), "reg": torch.tensor([1, 2]), "patch": torch.arange(3, 7)}
    summaries = measures.layer_summaries(states, groups)
    assert summaries.shape == (2, 3, 2, 3)
    torch.testing.assert_close(summaries[:, :, 0], states[:, 1:, 0])
    torch.testing.assert_close(summaries[:, :, 1], states[:, 1:, 3:].mean(2))


def test_similarity_finds_planted_phases():
    # Steps 1..3 point along e_0, steps 4..6 along e_1: two phases with the boundary after step 3.
    states = torch.zeros(2, 7, 3, 4)
    states[:, 1:4, :, 0] = 1.0
    states[:, 4:, :, 1] = 1.0
    states += 0.01 * torch.randn(states.shape, generator=torch.Generator().manual_seed(0))
    similarity = measures.layer_similarity(states, {"all": torch.arange(3)})
    assert similarity.shape == (6, 6)
    assert measures.phase_boundaries(similarity, num_phases=2) == [3]


def test_analyse_skips_measures_without_inputs():
    trajectory = Trajectory(states=torch.randn(4, 5, 5, 6), token_groups=GROUPS)
    results = measures.analyse(trajectory, ["convergence", "basins", "perturbation", "rank"])
    assert set(results) == {"convergence", "rank"}


def test_summary_flags_s_shape_and_phases():
    steps = 8
    curve = [1 / (1 + math.exp(-(step - 4.0) * 1.5)) for step in range(steps + 1)]
    curve = [c / curve[-1] for c in curve]
    results = {"convergence": {"cls": curve}, "speed": {"cls": [0.1] * 5 + [0.4] * 3}}
    summary = summarise(results, boundaries=[5], num_steps=steps)
    assert summary["convergence/cls"]["s_shaped"] is True
    assert summary["convergence/cls"]["steepest_rise_step"] in (4, 5)
    assert summary["speed/cls"]["last_phase_over_earlier"] == pytest.approx(4.0)
    linear = {"convergence": {"cls": [step / steps for step in range(steps + 1)][::-1]}}
    assert summarise(linear, [], steps)["convergence/cls"]["s_shaped"] is False
    concave = {"convergence": {"cls": [1 - 0.7**step for step in range(steps)] + [1.0]}}
    assert summarise(concave, [], steps)["convergence/cls"]["s_shaped"] is False  # fastest at the start
    assert phase_slices([5], steps) == [(1, 5), (6, 8)]
