"""Segmentation metrics computed per image and averaged over a split.

With p the argmax prediction, g the label map and F the pixels with g != 0:
- acc: fraction of pixels with p == g.
- fg_acc: fraction of F with p == g (false positives on background are ignored); NaN for an image
  without foreground, and the split average skips NaN.
- iou: pooled ("micro") IoU over one-hot classes, background included. A correct pixel adds 1 to the
  intersection and the union, a wrong one adds 0 and 2, so iou = acc / (2 - acc) per image.
- fg_iou: the same sums over F alone, fg_acc / (2 - fg_acc).
These are the numbers the published wave-segmentation results report; `miou` (macro over classes,
accumulated over the split, from torchmetrics) is an extra, not comparable to them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassJaccardIndex


def per_image_scores(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Acc, FG-Acc, IoU and FG-IoU per image, each (B,) float; FG values are NaN without foreground."""
    prediction = logits.argmax(1)
    correct = (prediction == target).flatten(1).float()
    foreground = (target != 0).flatten(1).float()
    acc = correct.mean(1)
    fg_count = foreground.sum(1)
    fg_acc = (correct * foreground).sum(1) / fg_count  # 0 / 0 gives NaN for empty images
    return {"acc": acc, "fg_acc": fg_acc, "iou": acc / (2 - acc), "fg_iou": fg_acc / (2 - fg_acc)}


def pooled_iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pooled IoU of one image from the one-hot sums (the definition, for checking the closed form)."""
    p = nn.functional.one_hot(prediction.flatten(), num_classes).bool()
    g = nn.functional.one_hot(target.flatten(), num_classes).bool()
    return (p & g).sum() / (p | g).sum()


class SegmentationMetrics(nn.Module):
    """Per-image means of acc, fg_acc, iou and fg_iou, plus macro mIoU with and without background."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.means = nn.ModuleDict(
            {name: MeanMetric(nan_strategy="ignore") for name in ("acc", "fg_acc", "iou", "fg_iou")}
        )
        self.jaccard = MulticlassJaccardIndex(num_classes=num_classes, average="none")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        for name, values in per_image_scores(logits.detach(), target).items():
            self.means[name].update(values)
        self.jaccard.update(logits.detach().argmax(1), target)

    def compute(self) -> dict[str, torch.Tensor]:
        values = {name: metric.compute() for name, metric in self.means.items()}
        per_class = self.jaccard.compute()
        values["miou"] = per_class.mean()  # macro over all classes, background included
        values["miou_fg"] = per_class[1:].mean()  # macro over the object classes only
        return values

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()
        self.jaccard.reset()
