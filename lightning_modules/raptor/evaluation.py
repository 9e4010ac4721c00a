"""Raptor evaluation: linear probes, per-layer fidelity R^2 and compute cost (parameters, FLOPs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class FidelityR2:
    """Accumulate per-layer, per-token-group R^2 of predicted states against teacher states.

    Standard R^2 per layer: 1 - sum (p - y)^2 / sum (y - ybar)^2, with ybar the per-feature mean over
    images and tokens of that layer and group. The pooled variant (the public Raptor code's) uses one
    global scalar mean of the prediction as the reference: 1 - mean (p - y)^2 / mean (p - mean p)^2,
    pooled over every token and layer 1..L.
    """

    def __init__(self, n_layers: int, groups: dict[str, Tensor]):
        self.n_layers = n_layers
        self.groups = {name: index for name, index in groups.items() if index.numel() > 0}
        self.groups["all"] = None
        self.sse = {g: torch.zeros(n_layers, dtype=torch.float64) for g in self.groups}
        self.sum_y = {g: None for g in self.groups}
        self.sum_y2 = {g: torch.zeros(n_layers, dtype=torch.float64) for g in self.groups}
        self.count = {g: torch.zeros(n_layers, dtype=torch.float64) for g in self.groups}
        self.pooled = torch.zeros(4, dtype=torch.float64)  # sse, sum p, sum p^2, count

    def update(self, predictions: list[Tensor], targets: list[Tensor]) -> None:
        """Add a batch: lists of L states (B, N, D) for layers 1..L."""
        for layer, (pred, target) in enumerate(zip(predictions, targets, strict=False)):
            pred, target = pred.detach().double().cpu(), target.detach().double().cpu()
            for name, index in self.groups.items():
                p = pred if index is None else pred[:, index]
                y = target if index is None else target[:, index]
                y_flat = y.reshape(-1, y.shape[-1])
                if self.sum_y[name] is None:
                    self.sum_y[name] = torch.zeros(self.n_layers, y.shape[-1], dtype=torch.float64)
                self.sse[name][layer] += ((p - y) ** 2).sum()
                self.sum_y[name][layer] += y_flat.sum(0)
                self.sum_y2[name][layer] += (y_flat**2).sum()
                self.count[name][layer] += y_flat.shape[0]
            self.pooled += torch.stack(
                [((pred - target) ** 2).sum(), pred.sum(), (pred**2).sum(), torch.tensor(float(pred.numel()))]
            )

    def per_layer(self, group: str = "all") -> Tensor:
        """Return R^2 for layers 1..L of one token group."""
        sum_y = self.sum_y[group]
        total = self.sum_y2[group] - (sum_y**2).sum(-1) / self.count[group].clamp(min=1)
        return 1.0 - self.sse[group] / total.clamp(min=1e-30)

    def pooled_r2(self) -> float:
        sse, sum_p, sum_p2, count = self.pooled.tolist()
        variance = sum_p2 / count - (sum_p / count) ** 2
        return 1.0 - (sse / count) / max(variance, 1e-30)


def r2_score(prediction: Tensor, target: Tensor) -> float:
    """Return the standard R^2 of (…, D) predictions with per-feature means over all leading dims."""
    y = target.double().reshape(-1, target.shape[-1])
    p = prediction.double().reshape(-1, target.shape[-1])
    total = ((y - y.mean(0)) ** 2).sum()
    return float(1.0 - ((p - y) ** 2).sum() / total)


@dataclass
class LinearProbe:
    """Softmax regression on standardised features."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    l2: float

    def logits(self, features: Tensor) -> Tensor:
        x = (features.float().to(self.weight.device) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return float((self.logits(features).argmax(-1).cpu() == labels.cpu()).float().mean())


def _fit_softmax(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    n_classes: int,
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
    max_iter: int = 300,
) -> LinearProbe:
    """Fit softmax regression for every L2 strength in the grid and keep the best on the validation split.

    Deterministic (zero init, full-batch L-BFGS), so teacher and Raptor features get the same protocol.
    """
    best: LinearProbe | None = None
    best_acc = -1.0
    # Lightning tests under inference mode; the probe needs autograd, and clones of inference tensors.
    with torch.inference_mode(False), torch.enable_grad():
        train_x, val_x = train_x.float().cpu().clone(), val_x.float().cpu().clone()
        train_y, val_y = train_y.long().cpu().clone(), val_y.long().cpu().clone()
        mean = train_x.mean(0)
        std = train_x.std(0).clamp(min=1e-6)
        x = (train_x - mean) / std
        for l2 in l2_grid:
            weight, bias = _fit_softmax(x, train_y, n_classes, l2, max_iter)
            probe = LinearProbe(mean, std, weight, bias, l2)
            acc = probe.accuracy(val_x, val_y)
            if acc > best_acc:
                best, best_acc = probe, acc
    return best


def count_flops(fn: Callable[[], object]) -> int:
    """Return the FLOPs torch's FlopCounterMode records for one call of `fn` (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())
