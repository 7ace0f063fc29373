"""Segmentation metrics from one confusion matrix: the paper's G, C and mIoU."""
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .data import CLASSES, NUM_CLASSES, VOID


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int = NUM_CLASSES, ignore_index: int = VOID) -> Tensor:
    """int64 [num_classes, num_classes]: rows are true classes, columns predicted ones.
    Pixels whose target is ``ignore_index`` (or outside 0..num_classes-1) are not counted."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target shape {tuple(target.shape)}")
    target, prediction = target.reshape(-1).long(), prediction.reshape(-1).long()
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)
    flat = target[valid] * num_classes + prediction[valid].clamp(0, num_classes - 1)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def scores(confusion: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict:
    """Global accuracy (G), class-average accuracy (C), per-class accuracy and IoU, mIoU,
    all in percent. Classes with no true pixels are left out of C; classes with neither
    true nor predicted pixels are left out of mIoU (their entries are None)."""
    cm = confusion.double()
    true, predicted, hits = cm.sum(1), cm.sum(0), cm.diag()
    union = true + predicted - hits
    accuracy = torch.where(true > 0, hits / true.clamp(min=1), torch.nan)
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    total = cm.sum()
    names = list(class_names or CLASSES[: len(cm)])

    def percent(t: Tensor):
        return None if torch.isnan(t) else round(100 * float(t), 4)

    return {
        "global_accuracy": percent(hits.sum() / total) if total > 0 else None,
        "class_accuracy": percent(accuracy.nanmean()),
        "mean_iou": percent(iou.nanmean()),
        "per_class": {
            name: {"accuracy": percent(accuracy[i]), "iou": percent(iou[i]), "pixels": int(true[i])}
            for i, name in enumerate(names)
        },
        "pixels": int(total),
    }


def format_scores(result: Dict) -> str:
    """A plain-text table of :func:`scores`."""

    def f(v):
        return "   -  " if v is None else f"{v:6.2f}"

    lines = [f"{'class':<12} {'acc %':>6} {'IoU %':>6} {'pixels':>11}"]
    for name, row in result["per_class"].items():
        lines.append(f"{name:<12} {f(row['accuracy'])} {f(row['iou'])} {row['pixels']:>11,}")
    lines.append(
        f"global accuracy G {f(result['global_accuracy'])}   class average C {f(result['class_accuracy'])}"
        f"   mIoU {f(result['mean_iou'])}"
    )
    return "\n".join(lines)
