"""Phase discovery: layer-by-layer similarity of a ViT and its segmentation into k phases.

Layer l is summarised per image by a few vectors (the cls token and the mean patch token); the
similarity S_ij is the cosine between the summaries of layers i and j, averaged over images and
summaries. Phases are groups of layers that W = 1 - S keeps close together. Layers are 1-based in
every returned value: a phase list such as [7, 12] means layers 1-7 and 8-12.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def similarity_matrix(summaries: Tensor) -> Tensor:
    """Return the (L, L) mean cosine between layers from summaries of shape (n_images, L, n_summaries, D)."""
    if summaries.dim() != 4:
        raise ValueError(
            "summaries must have shape (n_images, layers, n_summaries, features); got "
            f"{tuple(summaries.shape)}."
        )
    unit = torch.nn.functional.normalize(summaries.double(), dim=-1)
    cosines = torch.einsum("nisd,njsd->ij", unit, unit)
    similarity = cosines / (unit.shape[0] * unit.shape[2])
    similarity = 0.5 * (similarity + similarity.T)
    similarity.fill_diagonal_(1.0)
    return similarity.to(summaries.dtype if summaries.is_floating_point() else torch.float32)


def _check_square(similarity: Tensor) -> Tensor:
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (L, L) matrix; got shape {tuple(similarity.shape)}.")
    return similarity.double()


def _segment_costs(distance: Tensor) -> Tensor:
    """Return cost[a, b] = sum of distance over pairs p < q inside layers a..b (0-based, inclusive).

    The costs come from a 2-D prefix sum, so each segment costs O(1) after O(L^2) set-up.
    """
    n = distance.shape[0]
    off_diagonal = distance - torch.diag(torch.diagonal(distance))
    prefix = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    prefix[1:, 1:] = off_diagonal.cumsum(0).cumsum(1)
    cost = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a, n):
            block = prefix[b + 1, b + 1] - prefix[a, b + 1] - prefix[b + 1, a] + prefix[a, a]
            cost[a, b] = block / 2
    return cost


def within_phase_distance(similarity: Tensor, boundaries: list[int]) -> float:
    """Return the sum of W = 1 - S over layer pairs that share a phase."""
    distance = 1.0 - _check_square(similarity)
    cost = _segment_costs(distance)
    total, start = 0.0, 0
    for end in boundaries:
        total += float(cost[start, end - 1])
        start = end
    return total


def contiguous_phases(similarity: Tensor, k: int, min_length: int = 1) -> list[int]:
    """Split layers 1..L into k contiguous phases with the least within-phase distance, by exact DP.

    Minimises sum over phases of sum over pairs inside the phase of W = 1 - S, which is the same as
    maximising the k-way cut over contiguous partitions because the total of W is fixed. Returns the
    phase end boundaries as 1-based layer indices, the last one equal to L. Runs in O(k L^2).
    """
    distance = 1.0 - _check_square(similarity)
    n_layers = distance.shape[0]
    if not isinstance(k, int) or k < 1 or k > n_layers:
        raise ValueError(f"k={k} is invalid for a teacher of depth {n_layers}: use 1 <= k <= {n_layers}.")
    if min_length < 1 or k * min_length > n_layers:
        raise ValueError(
            f"min_length={min_length} is invalid: {k} phases of at least {min_length} layers do not fit in "
            f"{n_layers} layers; lower min_length to at most {n_layers // k}."
        )
    cost = _segment_costs(distance)
    inf = float("inf")
    # best[j][e] is the least cost of covering the first e layers with j phases.
    # parent[j][e] is the start of the last of those phases.
    best = [[inf] * (n_layers + 1) for _ in range(k + 1)]
    parent = [[-1] * (n_layers + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for end in range(j * min_length, n_layers + 1):
            for start in range((j - 1) * min_length, end - min_length + 1):
                if best[j - 1][start] == inf:
                    continue
                candidate = best[j - 1][start] + float(cost[start, end - 1])
                if candidate < best[j][end] - 1e-12:
                    best[j][end] = candidate
                    parent[j][end] = start
    boundaries, end = [], n_layers
    for j in range(k, 0, -1):
        boundaries.append(end)
        end = parent[j][end]
    return sorted(boundaries)


def _max_cut(distance: Tensor, members: list[int]) -> tuple[float, list[int], list[int]]:
    """Return the exact max-cut of a cluster by exhaustive search, with the first member pinned to side A."""
    best_weight, best_split = -1.0, (members, [])
    rest = members[1:]
    for mask in range(1 << len(rest)):
        side_a = [members[0]] + [m for i, m in enumerate(rest) if not mask >> i & 1]
        side_b = [m for i, m in enumerate(rest) if mask >> i & 1]
        if not side_b:
            continue
        weight = float(distance[side_a][:, side_b].sum())
        if weight > best_weight:
            best_weight, best_split = weight, (side_a, side_b)
    return best_weight, best_split[0], best_split[1]


def max_cut_phases(similarity: Tensor, f: float) -> list[list[int]]:
    """Split layers by recursive exact max-cut on W = 1 - S; returns clusters of 1-based layers, sorted.

    A cluster is split when its max-cut weight exceeds f times half the sum of W over the whole matrix;
    clusters of fewer than 4 layers are never split. Clusters need not be contiguous. With DINOv2
    ViT-B/14-reg features, f = 0.20, 0.10 and 0.09 were the published choices for k = 2, 3 and 4.
    """
    distance = 1.0 - _check_square(similarity)
    distance = distance - torch.diag(torch.diagonal(distance))
    if not f > 0:
        raise ValueError(f"f={f} is invalid: use a positive fraction of the total distance, such as 0.2.")
    threshold = f * float(distance.sum()) / 2
    pending, done = [list(range(distance.shape[0]))], []
    while pending:
        cluster = pending.pop()
        if len(cluster) < 4:
            done.append(cluster)
            continue
        weight, side_a, side_b = _max_cut(distance, cluster)
        if weight > threshold:
            pending.extend([side_a, side_b])
        else:
            done.append(cluster)
    return sorted([[layer + 1 for layer in sorted(c)] for c in done], key=lambda c: c[0])


def choose_k(similarity: Tensor, gain_threshold: float = 0.05, max_k: int | None = None) -> int:
    """Pick the number of phases: the largest k whose extra phase still cuts enough within-phase distance.

    Going from k - 1 to k phases is worth it when the drop of the optimal within-phase distance, as a
    fraction of the total pairwise distance, is at least `gain_threshold`. Returns at least 1.
    """
    sim = _check_square(similarity)
    n_layers = sim.shape[0]
    total = within_phase_distance(sim, [n_layers])
    if total <= 0:
        return 1
    max_k = n_layers if max_k is None else min(max_k, n_layers)
    previous, chosen = total, 1
    for k in range(2, max_k + 1):
        cost = within_phase_distance(sim, contiguous_phases(sim, k))
        if (previous - cost) / total < gain_threshold:
            break
        previous, chosen = cost, k
    return chosen


def phases_to_boundaries(phases: list[list[int]]) -> list[int]:
    """Turn sorted contiguous clusters of 1-based layers into end boundaries; raise when not contiguous."""
    boundaries, expected = [], 1
    for cluster in phases:
        if cluster != list(range(expected, expected + len(cluster))):
            raise ValueError(
                f"phases {phases} are not contiguous, so they cannot be routed to blocks: use the contiguous "
                "DP segmentation (phase_method: dp) or pass the boundaries by hand."
            )
        expected += len(cluster)
        boundaries.append(cluster[-1])
    return boundaries


def route_layers(boundaries: list[int]) -> list[int]:
    """Return the 0-based block index that produces each layer 1..L.

    Layer l is produced by the first block whose boundary is >= l, else by the last block.
    """
    n_layers = boundaries[-1]
    blocks = []
    for layer in range(1, n_layers + 1):
        index = next((j for j, bound in enumerate(boundaries) if bound >= layer), len(boundaries) - 1)
        blocks.append(index)
    return blocks


def check_boundaries(boundaries: list[int], n_layers: int) -> list[int]:
    """Validate end boundaries: strictly increasing, inside 1..L, last one equal to L."""
    values = [int(b) for b in boundaries]
    if (
        not values
        or values[-1] != n_layers
        or values[0] < 1
        or any(b <= a for a, b in itertools.pairwise(values))
    ):
        raise ValueError(
            f"phase boundaries {list(boundaries)} are invalid for depth {n_layers}: give strictly increasing "
            f"1-based layer indices ending at {n_layers}, e.g. [{max(1, n_layers // 2)}, {n_layers}]."
        )
    return values


def phase_contrast(similarity: Tensor, boundaries: list[int]) -> float:
    """Return mean within-phase S minus mean cross-phase S (off-diagonal pairs); 0 for a single phase."""
    sim = _check_square(similarity)
    n_layers = sim.shape[0]
    phase_of = torch.tensor(route_layers(check_boundaries(boundaries, n_layers)))
    same = phase_of[:, None] == phase_of[None, :]
    off_diagonal = ~torch.eye(n_layers, dtype=torch.bool)
    within, cross = sim[same & off_diagonal], sim[~same]
    if within.numel() == 0 or cross.numel() == 0:
        return 0.0
    return float(within.mean() - cross.mean())
