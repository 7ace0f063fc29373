"""Evaluation: one confusion matrix over a split, the paper's G, C, per-class IoU, mIoU."""
import contextlib
import functools
import json
import math
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from . import distributed
from .checkpoint import load_model
from .data import SegmentationDataset, collate, rescale
from .description import DatasetDescription
from .metrics import confusion_matrix, format_scores, plot_confusion, scores


@functools.lru_cache(maxsize=None)  # autocast() asks on every batch; the CPU does not change
def cpu_runs_bf16_fast() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 and up). Elsewhere PyTorch's bf16
    convolutions fall back to reference code: a 64-channel 7x7 convolution on [4, 64, 96, 128]
    took 47 s in bf16 against 0.16 s in float32 on an AMD EPYC with AVX2 (torch 2.14)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, amp: str):
    """A context for ``amp`` in none | bf16 | fp16 (fp16 only on CUDA)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp 'fp16' needs a CUDA device (got {device.type}); use 'bf16' on CPU")
    if amp == "bf16" and device.type == "cpu" and not cpu_runs_bf16_fast():
        warnings.warn("amp 'bf16' on a CPU without AVX-512: PyTorch's bf16 convolutions run two orders of "
                      "magnitude slower than float32 here; use --amp none", stacklevel=2)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def tta_scales(scales: Sequence[float]) -> Tuple[float, ...]:
    """``scales`` checked: one or more finite factors > 0 (1.0: the image as it is)."""
    try:
        if isinstance(scales, (str, bytes)):
            raise TypeError
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scale_tta must be a sequence of numbers, got {scales!r}") from None
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"scale_tta must be one or more finite factors > 0 (e.g. 0.75, 1, 1.25), got {scales!r}")
    return values


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, amp: str = "none", channels_last: bool = False,
                   flip: bool = False, scales: Sequence[float] = (1.0,)) -> Tensor:
    """Class scores [N, classes, H, W] whose argmax is the prediction: the logits, or with
    test-time augmentation the mean of the softmax of every view, each resized back to H x W.
    The views: the image rescaled by each factor of ``scales`` (bilinear, antialiased when
    shrinking, as training's scale jitter), and with ``flip`` the mirror of each. Float32,
    or float64 for a float64 model."""
    scales = tta_scales(scales)
    if not flip and scales == (1.0,):
        return _forward(model, images, amp, channels_last)
    size = images.shape[-2:]
    views = [(s, mirror) for s in scales for mirror in ((False, True) if flip else (False,))]
    total = 0
    for s, mirror in views:
        x = images if s == 1 else rescale(images, s)
        scores = _forward(model, x.flip(-1) if mirror else x, amp, channels_last)
        scores = (scores.flip(-1) if mirror else scores).softmax(1)
        if s != 1:
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False, antialias=s > 1)
        total = total + scores
    return total / len(views)


def _forward(model: nn.Module, images: Tensor, amp: str, channels_last: bool) -> Tensor:
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, amp):
        scores = model(images)
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores  # keeps float64


@torch.no_grad()
def confusion_over(
    model: nn.Module,
    dataset: SegmentationDataset,
    device: torch.device,
    batch_size: int = 1,
    amp: str = "none",
    channels_last: bool = False,
    workers: int = 0,
    context: Optional[distributed.Context] = None,
    progress: bool = True,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Tensor:
    """The confusion matrix of ``model`` (in eval mode) over ``dataset``; under torchrun
    each process takes every world_size-th image and the matrices are summed. ``flip``,
    ``scales``: test-time augmentation (see :func:`predict_logits`)."""
    context = context or distributed.Context()
    scales = tta_scales(scales)
    was_training = model.training
    model.eval()
    indices = list(range(context.rank, len(dataset), context.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers, collate_fn=collate
    )
    num_classes = getattr(model, "num_classes", None) or getattr(getattr(model, "module", None), "num_classes")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, labels in tqdm(loader, desc=f"eval {dataset.split}", unit="batch", disable=not (progress and context.is_main), leave=False):
        logits = predict_logits(model, images.to(device), amp, channels_last, flip, scales)
        confusion += confusion_matrix(logits.argmax(1).cpu(), labels, num_classes, dataset.description.ignore_index)
    model.train(was_training)
    return distributed.all_reduce(confusion, context)


def evaluate_checkpoint(
    checkpoint: Union[str, Path],
    data: Union[str, Path],
    split: str = "val",
    output: Optional[Union[str, Path]] = None,
    device: str = "auto",
    batch_size: int = 1,
    amp: str = "none",
    backend: Optional[str] = None,
    workers: int = 0,
    trust: bool = False,
    dataset: Union[str, Path, DatasetDescription, None] = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Dict:
    """Evaluate a checkpoint on a split of the dataset it was trained on (or ``dataset``, a
    description with as many classes; ``split`` as :func:`data.list_pairs` takes it, e.g.
    ``train@0006R0``); prints the table, writes JSON to ``output`` and the row-normalised
    confusion matrix beside it (``NAME_confusion.png``). ``flip``, ``scales``: test-time
    augmentation (see :func:`predict_logits`)."""
    scales = tta_scales(scales)
    torch_device = resolve_device(device)
    model, config = load_model(checkpoint, torch_device, backend=backend, trust=trust, dataset=dataset)
    description = model.dataset
    data_split = SegmentationDataset(data, split, None, description)
    confusion = confusion_over(model, data_split, torch_device, batch_size, amp, config.get("channels_last", False), workers,
                               flip=flip, scales=scales)
    result = scores(confusion, description.classes, description.ignore_index)
    result.update(checkpoint=str(checkpoint), dataset=description.name, data=str(data_split.root), split=split,
                  images=len(data_split), flip_tta=flip, scale_tta=list(scales), confusion_matrix=confusion.tolist())
    print(format_scores(result))
    if output is not None:
        output = Path(output)
        if output.suffix != ".json":
            output = output / "metrics.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2))
        result["output"] = str(output)
        picture = plot_confusion(confusion, description.classes, output.with_name(f"{output.stem}_confusion.png"),
                                 f"{description.name} {split}: {len(data_split)} images, G {_pct(result['global_accuracy'])}, "
                                 f"mIoU {_pct(result['mean_iou'])}",
                                 description.ignore_index)
        print(f"metrics written to {output}" + (f", confusion matrix to {picture}" if picture else ""))
        if picture:
            result["confusion_png"] = str(picture)
    return result


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%"


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), or any torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return d
