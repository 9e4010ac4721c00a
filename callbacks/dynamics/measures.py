"""Dynamical measures on a trajectory of token states, with depth (or recurrent time) as the time axis.

Every function is pure: it takes tensors (or a `Trajectory`) and returns tensors or plain Python values.
Notation: `states` is (B, S + 1, N, D); step l = 0..S is the state after l layers or time steps; token i of
image b at step l is x_(b,i,l). Only directions are compared, because state norms grow with depth. Angles
are in radians.

The measures read a ViT's depth as a dynamical system, as in the study of block-recurrent ViTs behind the
Raptor task. Where that study gives no exact formula, each docstring states the choice made here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lightning_modules.trajectory import Trajectory

REGISTER_GROUP_NAMES = ("reg", "register", "registers")
EPS = 1e-12


# ----------------------------------------------------------------------------- basic geometry
def unit(x: torch.Tensor) -> torch.Tensor:
    """Normalise the last dimension to unit length; zero vectors stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (0 where either vector is zero)."""
    return (unit(a) * unit(b)).sum(-1)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors along the last dimension, in radians.

    Computed as 2 atan2(|a^ - b^|, |a^ + b^|), which stays accurate for nearly parallel vectors where
    arccos(cos) loses half the digits (arccos(1 - 6e-8) is already 3e-4 rad in float32).
    """
    ua, ub = unit(a), unit(b)
    return 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


def group_mean(values: torch.Tensor, token_groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average (B, T, N) per-token values over images and over each group's tokens: group -> (T,)."""
    result = {}
    for name, index in token_groups.items():
        index = index.to(values.device)
        if index.numel() == 0:
            continue
        result[name] = values.index_select(-1, index).mean(dim=(0, -1))
    return result


# ----------------------------------------------------------------------------- per-token measures
def directional_convergence(
    states: torch.Tensor, token_groups: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Average gamma_(i,l) = cos(x_(i,l), x_(i,S)) per token group: group -> (S + 1,), last entry 1."""
    final = states[:, -1:]
    return group_mean(cosine(states, final), token_groups)


def angular_speed(states: torch.Tensor, token_groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """omega_(i,l) = angle(x_(i,l+1), x_(i,l)) for l = 0..S-1, averaged per token group: group -> (S,)."""
    return group_mean(angle(states[:, 1:], states[:, :-1]), token_groups)


def coherence(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment of a set of vectors (..., N, D) with their mean direction and with each other.

    Returns (to_mean, pairwise), each of shape (...): to_mean = (1/N) sum_i cos(v_i, m) with m the mean
    vector; pairwise = mean of cos(v_i, v_j) over i != j, computed from |sum_i v^_i|^2 - N without the
    N x N matrix (zero vectors count as zero cosines, N >= 2 needed for pairwise).
    """
    mean = vectors.mean(dim=-2, keepdim=True)
    to_mean = cosine(vectors, mean).mean(-1)
    n = vectors.shape[-2]
    directions = unit(vectors)
    norms_sq = (directions * directions).sum(-1).sum(-1)  # N, minus the zero vectors
    summed = directions.sum(-2)
    if n < 2:
        pairwise = torch.ones_like(to_mean)
    else:
        pairwise = ((summed * summed).sum(-1) - norms_sq) / (n * (n - 1))
    return to_mean, pairwise


def patch_coherence(states: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coherence of the chosen tokens (usually the patches) per step, on states and on their updates.

    kappa_l = (1/N) sum_i cos(x_(i,l), m_l), m_l the mean of the N tokens; the same on the updates
    Delta_(i,l) = x_(i,l+1) - x_(i,l) with their own mean; plus the mean pairwise cosine over i != j.
    Each value is averaged over images. Keys: state, state_pairwise (S + 1,), update, update_pairwise (S,).
    """
    selected = states.index_select(2, tokens.to(states.device))
    state_mean, state_pair = coherence(selected)
    update_mean, update_pair = coherence(selected[:, 1:] - selected[:, :-1])
    return {
        "state": state_mean.mean(0),
        "state_pairwise": state_pair.mean(0),
        "update": update_mean.mean(0),
        "update_pairwise": update_pair.mean(0),
    }


# ----------------------------------------------------------------------------- rank of updates
def stable_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """|U|_F^2 / sigma_max^2 from singular values (..., K); 0 for the zero matrix."""
    squared = singular_values.square()
    return squared.sum(-1) / squared.amax(-1).clamp_min(torch.finfo(squared.dtype).tiny)


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp(-sum_k p_k log p_k) with p_k = sigma_k / sum sigma, from singular values; 0 for the zero matrix."""
    total = singular_values.sum(-1, keepdim=True)
    p = singular_values / total.clamp_min(torch.finfo(singular_values.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p)).sum(
        -1
    )
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def matrix_ranks(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable and effective rank of each matrix in (..., M, D), from a float64 SVD."""
    sigma = torch.linalg.svdvals(matrices.to(torch.float64))
    return stable_rank(sigma), effective_rank(sigma)


def update_ranks(
    states: torch.Tensor, tokens: torch.Tensor | None = None, pool_size: int = 64, tangential: bool = False
) -> dict[str, torch.Tensor]:
    """Stable and effective rank of the update matrix U_l = [Delta_(i,l)]_i (tokens x features) per step.

    U_l is uncentred. Per-image values are averaged over images; the pooled value stacks the updates of
    the first `pool_size` images into one (pool_size * N) x D matrix. With `tangential`, each update keeps
    only its part orthogonal to the current state direction, Delta - <Delta, x^> x^. Keys:
    stable_per_image, effective_per_image, stable_pooled, effective_pooled, each (S,). SVDs run in float64.
    """
    if tokens is not None:
        states = states.index_select(2, tokens.to(states.device))
    per_image_stable, per_image_effective, pooled_stable, pooled_effective = [], [], [], []
    for step in range(states.shape[1] - 1):
        current = states[:, step].to(torch.float64)
        update = states[:, step + 1].to(torch.float64) - current
        if tangential:
            direction = unit(current)
            update = update - (update * direction).sum(-1, keepdim=True) * direction
        s_rank, e_rank = matrix_ranks(update)
        per_image_stable.append(s_rank.mean())
        per_image_effective.append(e_rank.mean())
        pooled = update[:pool_size].reshape(-1, update.shape[-1])
        p_stable, p_effective = matrix_ranks(pooled)
        pooled_stable.append(p_stable)
        pooled_effective.append(p_effective)
    return {
        "stable_per_image": torch.stack(per_image_stable),
        "effective_per_image": torch.stack(per_image_effective),
        "stable_pooled": torch.stack(pooled_stable),
        "effective_pooled": torch.stack(pooled_effective),
    }


# ----------------------------------------------------------------------------- class basins
def summary_token_states(states: torch.Tensor, token_groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """Select one vector per image and step (B, S + 1, D): the cls token, else the mean of all tokens."""
    if "cls" in token_groups and token_groups["cls"].numel() > 0:
        return states[:, :, int(token_groups["cls"].reshape(-1)[0])]
    return states.mean(dim=2)


def fit_test_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split probe positions into a fit and a test half, stratified: within each class, alternate members.

    Alternating within a class (rather than over all positions) keeps both halves balanced even when the
    probe set cycles through the classes in a fixed order.
    """
    fit, test = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().reshape(-1)
        fit.append(members[0::2])
        test.append(members[1::2])
    return torch.cat(fit).sort().values, torch.cat(test).sort().values


def angular_silhouette(directions: torch.Tensor, labels: torch.Tensor) -> float:
    """Silhouette score with angular distance arccos(cos) between unit vectors (N, D); nan when undefined."""
    from sklearn.metrics import silhouette_score

    n_classes = int(labels.unique().numel())
    if n_classes < 2 or n_classes >= labels.numel():
        return float("nan")
    cos = (directions @ directions.T).clamp(-1.0, 1.0)
    distance = torch.arccos(cos)
    distance.fill_diagonal_(0.0)
    return float(silhouette_score(distance.cpu().numpy(), labels.cpu().numpy(), metric="precomputed"))


def class_basins(summary: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Nearest-class-mean accuracy, cosine to the true class's final mean direction, and silhouette per step.

    summary: (B, S + 1, D) one vector per image (the cls token); labels: (B,). The probe splits into a fit
    half and a test half by alternating the members of each class.
    mu_(c,l) = normalise(mean over fit images of class c of x^_l). The accuracy at step l is the fraction
    of test images whose argmax_c cos(x_l, mu_(c,l)) is their label, over the classes present in the fit
    half. cos_true_final = cos(x_l, mu_(label,S)) on test images whose class is in the fit half. The
    silhouette uses all probe images and angular distance.
    Keys: ncm_accuracy, cos_true_final, silhouette, each (S + 1,).
    """
    labels = labels.to(summary.device).long()
    fit, test = fit_test_split(labels)
    directions = unit(summary.to(torch.float64))
    classes = labels[fit].unique()
    class_means = torch.stack(
        [unit(directions[fit][labels[fit] == c].mean(0)) for c in classes], dim=1
    )  # (S + 1, C, D)
    test_dirs = directions[test]  # (T, S + 1, D)
    test_labels = labels[test]
    scores = torch.einsum("tsd,scd->tsc", test_dirs, class_means)
    predicted = classes[scores.argmax(-1)]
    accuracy = (predicted == test_labels[:, None]).to(torch.float64).mean(0)

    known = (test_labels[:, None] == classes[None, :]).any(-1)
    class_position = (test_labels[known][:, None] == classes[None, :]).to(torch.int64).argmax(-1)
    final_means = class_means[-1][class_position]  # (T_known, D)
    cos_true_final = (test_dirs[known] * final_means[:, None, :]).sum(-1).mean(0)

    silhouette = torch.tensor(
        [angular_silhouette(directions[:, step], labels) for step in range(summary.shape[1])],
        dtype=torch.float64,
    )
    return {"ncm_accuracy": accuracy, "cos_true_final": cos_true_final, "silhouette": silhouette}


# ----------------------------------------------------------------------------- perturbation test
def default_perturbation_depths(num_steps: int) -> list[int]:
    """Depths l0 at 1/6, 2/6, 3/6 and 4/6 of the trajectory (2, 4, 6, 8 for 12 layers), without repeats."""
    depths = sorted({min(num_steps - 1, max(0, round(num_steps * k / 6))) for k in (1, 2, 3, 4)})
    return depths


def noise_seed(seed: int, depth: int, alpha: float, sample_id: int) -> int:
    """Seed of the noise drawn for one sample, so the draw does not depend on how the probe is batched."""
    return ((int(seed) * 1_000_003 + int(depth)) * 1_000_033 + int(round(alpha * 1e6))) * 1_000_037 + int(
        sample_id
    )


def perturbation_distances(
    states: torch.Tensor,
    rollout: Callable[[torch.Tensor, int], torch.Tensor],
    token_groups: dict[str, torch.Tensor],
    depths: Sequence[int],
    alphas: Sequence[float] = (0.01, 0.05, 0.1),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sample_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample angles to the clean path after injecting noise at depth l0 and continuing the rollout.

    Each token's state at l0 becomes x + alpha |x| g / |g| with g ~ N(0, I_D), drawn from a generator
    seeded by (seed, l0, alpha, sample id). `rollout` continues exactly the samples of `states`, in
    order, because some models (the wave network) keep per-sample inputs in the rollout.
    Returns distance (B, depths, alphas, seeds, groups, S + 1), the group-mean angle D_m at steps
    m >= l0 and nan before l0, and agreement (B, depths, alphas, seeds): 1 where the class predicted by
    `classify` after the perturbed run equals the clean run's, nan without `classify`.
    """
    n_samples, num_steps = states.shape[0], states.shape[1] - 1
    for depth in depths:
        if not 0 <= depth < num_steps:
            raise ValueError(f"perturbation depth {depth} is invalid: use steps in 0..{num_steps - 1}.")
    ids = list(sample_ids) if sample_ids is not None else list(range(n_samples))
    groups = [index.to(states.device) for index in token_groups.values()]
    shape = (n_samples, len(depths), len(alphas), len(seeds))
    distance = torch.full((*shape, len(groups), num_steps + 1), math.nan, dtype=torch.float64)
    agreement = torch.full(shape, math.nan, dtype=torch.float64)
    clean_labels = classify(states[:, -1]).argmax(-1) if classify is not None else None

    for d, depth in enumerate(depths):
        clean = states[:, depth:]
        for a, alpha in enumerate(alphas):
            for s, seed in enumerate(seeds):
                noise = torch.stack(
                    [
                        torch.randn(
                            states.shape[2:],
                            generator=torch.Generator().manual_seed(noise_seed(seed, depth, alpha, i)),
                        )
                        for i in ids
                    ]
                ).to(states.device, states.dtype)
                start = states[:, depth] + alpha * states[:, depth].norm(dim=-1, keepdim=True) * unit(noise)
                perturbed = rollout(start, depth)
                angles = angle(perturbed, clean)  # (B, S - depth + 1, N)
                for g, index in enumerate(groups):
                    distance[:, d, a, s, g, depth:] = angles.index_select(-1, index).mean(-1).double().cpu()
                if classify is not None:
                    same = classify(perturbed[:, -1]).argmax(-1) == clean_labels
                    agreement[:, d, a, s] = same.double().cpu()
    return distance, agreement


def perturbation_records(
    distance: torch.Tensor,
    agreement: torch.Tensor,
    depths: Sequence[int],
    alphas: Sequence[float],
    group_names: Sequence[str],
) -> list[dict]:
    """Summarise per-sample perturbation distances into one record per (l0, alpha).

    Per token group: `curve` = D_m for m = l0..S averaged over samples and seeds, `curve_std` its
    seed-to-seed std, `contraction` = D_S / D_l0 averaged over seeds (nan when D_l0 = 0); `agreement`
    = fraction of samples and seeds whose predicted class matches the clean run, when there is a classifier.
    """
    per_seed = distance.mean(0)  # (depths, alphas, seeds, groups, S + 1)
    records = []
    for d, depth in enumerate(depths):
        for a, alpha in enumerate(alphas):
            record: dict = {"depth": int(depth), "alpha": float(alpha), "groups": {}}
            for g, name in enumerate(group_names):
                curves = per_seed[d, a, :, g, depth:]  # (seeds, S - depth + 1)
                start = curves[:, 0]
                ratio = torch.where(
                    start > 0, curves[:, -1] / start.clamp_min(EPS), torch.full_like(start, math.nan)
                )
                record["groups"][name] = {
                    "curve": curves.mean(0).tolist(),
                    "curve_std": curves.std(0, unbiased=False).tolist(),
                    "contraction": float(ratio.mean()),
                }
            agreed = agreement[:, d, a]
            if not torch.isnan(agreed).all():
                record["agreement"] = float(agreed.mean())
            records.append(record)
    return records


def perturbation_test(
    states: torch.Tensor,
    rollout: Callable[[torch.Tensor, int], torch.Tensor],
    token_groups: dict[str, torch.Tensor],
    depths: Sequence[int],
    alphas: Sequence[float] = (0.01, 0.05, 0.1),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Run the perturbation test on one batch: `perturbation_distances` followed by `perturbation_records`."""
    groups = {name: index for name, index in token_groups.items() if index.numel() > 0}
    distance, agreement = perturbation_distances(states, rollout, groups, depths, alphas, seeds, classify)
    return perturbation_records(distance, agreement, depths, alphas, list(groups))


# ----------------------------------------------------------------------------- layer similarity and phases
def layer_summaries(states: torch.Tensor, token_groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summarise steps 1..S for the phase code as (B, S, n_summaries, D): token mean per group, no registers.

    For a ViT this gives the cls token and the mean patch token. For a network with one token group, such as
    the wave segmenter's pixels, it gives the mean over all tokens.
    """
    summaries = []
    for name, index in token_groups.items():
        if name in REGISTER_GROUP_NAMES or index.numel() == 0:
            continue
        summaries.append(states[:, 1:].index_select(2, index.to(states.device)).mean(2))
    if not summaries:
        summaries.append(states[:, 1:].mean(2))
    return torch.stack(summaries, dim=2)


def layer_similarity(states: torch.Tensor, token_groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step-by-step cosine similarity matrix (S, S) of steps 1..S, from the Raptor phase code."""
    from lightning_modules.raptor.phases import similarity_matrix

    return similarity_matrix(layer_summaries(states, token_groups))


def phase_boundaries(similarity: torch.Tensor, num_phases: int, min_length: int = 1) -> list[int]:
    """Boundaries b (0 < b < S) between contiguous phases of the similarity matrix, by the Raptor phase code.

    The phase code returns 1-based end layers with the last = S; a boundary b here means that steps
    1..b and b+1..S fall in different phases.
    """
    from lightning_modules.raptor.phases import contiguous_phases

    num_steps = similarity.shape[0]
    k = max(1, min(num_phases, num_steps // max(1, min_length)))
    ends = contiguous_phases(similarity, k, min_length=min_length)
    return [int(end) for end in ends[:-1]]


# ----------------------------------------------------------------------------- everything at once
def analyse(
    trajectory: Trajectory,
    measures: Sequence[str],
    *,
    perturb_depths: Sequence[int] | None = None,
    perturb_alphas: Sequence[float] = (0.01, 0.05, 0.1),
    perturb_seeds: int = 5,
    rank_pool_size: int = 64,
    tangential_rank: bool = False,
    coherence_group: str = "patch",
) -> dict[str, dict]:
    """Run the requested measures on one trajectory; a measure whose inputs are missing is left out.

    Returns measure name -> its numbers (tensors converted to lists). Basins need labels; the
    perturbation test needs `trajectory.rollout` and runs on the whole trajectory as one batch.
    """
    states = trajectory.states
    groups = {name: index.reshape(-1).long() for name, index in trajectory.token_groups.items()}
    results: dict[str, dict] = {}

    if "convergence" in measures:
        results["convergence"] = to_lists(directional_convergence(states, groups))
    if "speed" in measures:
        results["speed"] = to_lists(angular_speed(states, groups))
    if "coherence" in measures:
        tokens = groups.get(coherence_group, torch.arange(states.shape[2]))
        results["coherence"] = to_lists(patch_coherence(states, tokens))
    if "rank" in measures:
        results["rank"] = to_lists(update_ranks(states, pool_size=rank_pool_size, tangential=tangential_rank))
    if "basins" in measures and trajectory.labels is not None:
        results["basins"] = to_lists(class_basins(summary_token_states(states, groups), trajectory.labels))
    if "perturbation" in measures and trajectory.rollout is not None and states.shape[1] > 2:
        depths = (
            list(perturb_depths)
            if perturb_depths is not None
            else default_perturbation_depths(states.shape[1] - 1)
        )
        records = perturbation_test(
            states,
            trajectory.rollout,
            groups,
            depths,
            perturb_alphas,
            list(range(perturb_seeds)),
            classify=trajectory.classify,
        )
        results["perturbation"] = {"records": records, "num_steps": states.shape[1] - 1}
    return results


def to_lists(values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Convert a dict of 1-D tensors to plain float lists for JSON."""
    return {key: [float(v) for v in value.detach().cpu().reshape(-1)] for key, value in values.items()}
