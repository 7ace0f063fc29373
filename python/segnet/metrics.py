"""Segmentation metrics from one confusion matrix: the paper's G, C and mIoU."""
from pathlib import Path
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


def scores(confusion: Tensor, class_names: Optional[Sequence[str]] = None, ignore_index: Optional[int] = None) -> Dict:
    """Global accuracy (G), class-average accuracy (C), per-class accuracy and IoU, mIoU,
    all in percent. Classes with no true pixels are left out of C; classes with neither
    true nor predicted pixels are left out of mIoU (their entries are None). A class whose
    id is ``ignore_index`` is left out of everything."""
    names = list(class_names) if class_names is not None else list(CLASSES) if len(confusion) == len(CLASSES) \
        else [f"class {i}" for i in range(len(confusion))]
    if len(names) != len(confusion):
        raise ValueError(f"{len(names)} class names for a {len(confusion)}x{len(confusion)} confusion matrix")
    keep = _kept(len(confusion), ignore_index)
    rows = confusion.double()[keep]          # a prediction of the ignored class stays an error
    names, cm = [names[i] for i in keep], rows[:, keep]
    true, predicted, hits = rows.sum(1), cm.sum(0), cm.diag()
    union = true + predicted - hits
    accuracy = torch.where(true > 0, hits / true.clamp(min=1), torch.nan)
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    total = true.sum()

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


def _kept(n: int, ignore_index: Optional[int]) -> list:
    """The class ids that are scored: all but an ignore index that is a class's id."""
    return [i for i in range(n) if i != ignore_index]


def format_scores(result: Dict) -> str:
    """A plain-text table of :func:`scores`."""

    def f(v):
        return "   -  " if v is None else f"{v:6.2f}"

    width = max([12, *map(len, result["per_class"])])
    lines = [f"{'class':<{width}} {'acc %':>6} {'IoU %':>6} {'pixels':>11}"]
    for name, row in result["per_class"].items():
        lines.append(f"{name:<{width}} {f(row['accuracy'])} {f(row['iou'])} {row['pixels']:>11,}")
    lines.append(
        f"global accuracy G {f(result['global_accuracy'])}   class average C {f(result['class_accuracy'])}"
        f"   mIoU {f(result['mean_iou'])}"
    )
    return "\n".join(lines)


def plot_confusion(confusion: Tensor, class_names: Sequence[str], path, title: str = "",
                   ignore_index: Optional[int] = None) -> Optional[Path]:
    """The confusion matrix as a PNG: each row (true class) normalised to 100%, class names
    on both axes, the percentages written in the cells (up to 30 classes). None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keep = _kept(len(confusion), ignore_index)
    names, cm = [class_names[i] for i in keep], confusion.double()[keep]
    rows = (100 * cm / cm.sum(1, keepdim=True).clamp(min=1))[:, keep]
    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's pixels")
    ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                value = float(rows[i, j])
                if value >= 0.5:
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 60 else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
