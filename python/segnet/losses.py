"""What training adds to the class-weighted cross-entropy.

The Lovász-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018): a convex surrogate of
1 - IoU, the Lovász extension of each class's Jaccard loss evaluated at the per-pixel errors
|[label == c] - p_c|, averaged over the classes present. On one-hot probabilities it *is*
1 - the mean IoU, over the batch's pixels, of the classes present in the labels
(``metrics.scores``' mIoU also counts a class that is only predicted, at IoU 0); training adds
it to the cross-entropy with ``--lovasz WEIGHT``.
Sorting is the cost: one sort of the batch's pixels per class (of the 0.5 s that forward and
backward take for four 360x480 images on two Xeon cores, 0.3 s).

Online hard example mining (``--ohem THRESHOLD``; Wu, Shen, van den Hengel 2016's online
bootstrapping, as PSPNet and mmsegmentation's ``OHEMPixelSampler`` use it): the cross-entropy
counts only the pixels whose predicted probability of their label is below THRESHOLD (0.7
typical), and always at least a share of each batch's pixels, the least confident ones.
``ohem_labels`` does the choosing, by turning the easy pixels' labels into the ignore index.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def lovasz_softmax(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Mean over the classes present in ``labels`` of the Lovász-softmax loss of float
    ``logits`` [N, C, H, W] against int64 ``labels`` [N, H, W]; pixels labelled
    ``ignore_index`` do not count. A scalar in [0, 1], computed in float32 (or float64 for
    float64 logits); zero, with a gradient, when every pixel is ignored."""
    valid = _valid_pixels(logits, labels, ignore_index).reshape(-1)
    classes = logits.shape[1]
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(1)
    probs = probs.movedim(1, 0).reshape(classes, -1)                      # [C, P]
    labels = labels.reshape(-1)
    if not bool(valid.all()):
        probs, labels = probs[:, valid], labels[valid]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    foreground = F.one_hot(labels, classes).T.to(probs.dtype)            # [C, P]
    errors, order = (foreground - probs).abs().sort(1, descending=True)
    foreground = foreground.gather(1, order)
    pixels = foreground.sum(1, keepdim=True)
    # The Jaccard loss of the k largest errors, k = 1..P; its increments weight the sorted errors.
    jaccard = 1.0 - (pixels - foreground.cumsum(1)) / (pixels + (1.0 - foreground).cumsum(1))
    increments = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    per_class = (errors * increments).sum(1)
    return per_class[pixels[:, 0] > 0].mean()


def ohem_labels(logits: Tensor, labels: Tensor, ignore_index: int, threshold: float, min_kept: float) -> Tensor:
    """``labels`` [N, H, W] with the easy pixels set to ``ignore_index``: a valid pixel stays
    when the softmax of ``logits`` [N, C, H, W] gives its label a probability below
    ``threshold`` (in (0, 1]), or when it is among the ``ceil(min_kept * valid pixels)`` least
    confident (``min_kept`` in [0, 1]; ties at that cut all stay). A pixel whose probability
    is NaN stays, so that a diverging loss shows. No gradient flows through the choice."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1] (0.7 typical), got {threshold}")
    if not 0.0 <= min_kept <= 1.0:
        raise ValueError(f"min_kept must be a share of the pixels in [0, 1] (0.2 typical), got {min_kept}")
    valid = _valid_pixels(logits, labels, ignore_index)
    with torch.no_grad():
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(1)
        confidence = probs.gather(1, labels.where(valid, 0).unsqueeze(1)).squeeze(1)
        keep = valid & ~(confidence >= threshold)                       # NaN stays
        least = math.ceil(min_kept * int(valid.sum()))
        if least > 0 and int(keep.sum()) < least:
            cut = confidence[valid].nan_to_num(nan=-1.0).kthvalue(least).values
            keep |= valid & ~(confidence > cut)
    return labels.where(keep, ignore_index)


def _valid_pixels(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The mask of the pixels not labelled ``ignore_index``, once ``logits`` [N, C, H, W] and
    ``labels`` [N, H, W] are checked to fit and the labels to be class ids."""
    if logits.dim() != 4 or labels.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"logits must be [N, C, H, W] and labels [N, H, W] of the same N, H, W; got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    classes = logits.shape[1]
    valid = labels != ignore_index
    present = labels[valid]
    if present.numel() and (int(present.min()) < 0 or int(present.max()) >= classes):
        raise ValueError(f"labels must be class ids in [0, {classes}) or ignore_index {ignore_index}; "
                         f"got values in [{int(present.min())}, {int(present.max())}]")
    return valid
