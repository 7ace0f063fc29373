"""The Lovász-softmax loss against Berman et al.'s per-class reference, against 1 - IoU on
hard predictions, and its gradient; OHEM's choice of pixels against a one-pixel-at-a-time
reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from segnet.losses import lovasz_softmax, ohem_labels

IGNORE = 255


def reference(logits, labels, ignore_index):
    """Berman et al.'s lovasz_softmax_flat (classes='present'), one class at a time, float64."""
    probs = logits.double().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = labels.reshape(-1)
    probs, labels = probs[labels != ignore_index], labels[labels != ignore_index]
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).double()
        if fg.sum() == 0:
            continue
        errors, perm = (fg - probs[:, c]).abs().sort(descending=True)
        fg_sorted = fg[perm]
        gts = fg_sorted.sum()
        jaccard = 1.0 - (gts - fg_sorted.cumsum(0)) / (gts + (1.0 - fg_sorted).cumsum(0))
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
        losses.append(torch.dot(errors, jaccard))
    return torch.stack(losses).mean()


def random_case(n, c, h, w, ignored=0.2):
    logits = torch.randn(n, c, h, w, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (n, h, w))
    labels[torch.rand(n, h, w) < ignored] = IGNORE
    return logits, labels


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 11, 7, 9), (3, 5, 1, 13), (1, 3, 16, 1)])
def test_matches_the_per_class_reference(shape):
    logits, labels = random_case(*shape)
    if (labels == IGNORE).all():
        labels[0, 0, 0] = 1
    torch.testing.assert_close(lovasz_softmax(logits, labels, IGNORE), reference(logits, labels, IGNORE))
    torch.testing.assert_close(lovasz_softmax(logits.float(), labels, IGNORE), reference(logits, labels, IGNORE).float())


def test_ties_and_saturated_probabilities():
    """Equal errors (the value does not depend on their order) and probabilities of exactly
    0 and 1 (logits of +-inf in effect)."""
    logits = torch.randint(-1, 2, (2, 4, 6, 6)).double() * 40
    labels = torch.randint(0, 4, (2, 6, 6))
    torch.testing.assert_close(lovasz_softmax(logits, labels, IGNORE), reference(logits, labels, IGNORE))


def test_on_hard_predictions_it_is_one_minus_the_iou_of_the_present_classes():
    labels = torch.randint(0, 6, (3, 10, 12))
    labels[:, :, 0] = IGNORE
    labels[labels == 4] = 5                                               # class 4 absent from the labels
    predicted = torch.randint(0, 6, (3, 10, 12))                          # ... but predicted
    logits = F.one_hot(predicted, 6).permute(0, 3, 1, 2).double() * 100.0
    valid = labels != IGNORE
    ious = []
    for c in labels[valid].unique().tolist():
        inter = ((predicted == c) & (labels == c) & valid).sum()
        union = (((predicted == c) | (labels == c)) & valid).sum()
        ious.append(inter / union)
    expected = 1.0 - torch.stack(ious).double().mean()
    torch.testing.assert_close(lovasz_softmax(logits, labels, IGNORE), expected)
    # a perfect prediction costs nothing
    perfect = F.one_hot(labels.clamp(max=5), 6).permute(0, 3, 1, 2).double() * 100.0
    assert lovasz_softmax(perfect, labels, IGNORE).item() == pytest.approx(0.0, abs=1e-12)


def test_ignored_pixels_do_not_count():
    logits, labels = random_case(2, 5, 8, 8, ignored=0.0)
    hidden = labels.clone()
    hidden[:, :, 4:] = IGNORE
    other = logits.clone()
    other[:, :, :, 4:] = torch.randn_like(other[:, :, :, 4:]) * 10       # anything behind the ignored pixels
    torch.testing.assert_close(lovasz_softmax(other, hidden, IGNORE), lovasz_softmax(logits[..., :4], labels[..., :4], IGNORE))
    everything = torch.full_like(labels, IGNORE)
    logits.requires_grad_(True)
    loss = lovasz_softmax(logits, everything, IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradcheck():
    logits, labels = random_case(2, 4, 3, 5)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lovasz_softmax(x, labels, IGNORE), (logits,), eps=1e-7, atol=1e-6)


def test_channels_last_and_nan():
    logits, labels = random_case(2, 5, 6, 7)
    expected = lovasz_softmax(logits, labels, IGNORE)
    torch.testing.assert_close(lovasz_softmax(logits.contiguous(memory_format=torch.channels_last), labels, IGNORE), expected)
    logits[0, 1, 2, 3], labels[0, 2, 3] = float("nan"), 1              # at a counted pixel
    assert lovasz_softmax(logits, labels, IGNORE).isnan()                # a diverged network shows, it is not hidden


def test_bad_input_names_what_is_wrong():
    logits, labels = random_case(2, 5, 6, 7, ignored=0.0)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 5\) or ignore_index 255; got values in \[0, 7\]"):
        lovasz_softmax(logits, labels.clamp(max=3).index_fill(1, torch.tensor([0]), 7), IGNORE)
    with pytest.raises(ValueError, match=r"got logits \(2, 5, 6, 7\) and labels \(2, 6, 6\)"):
        lovasz_softmax(logits, labels[:, :, :6], IGNORE)


def ohem_reference(logits, labels, ignore_index, threshold, min_kept):
    """The definition, pixel by pixel in float64: keep a valid pixel below the threshold, then
    the least confident until the share is reached, with every pixel tied at that cut."""
    probs = logits.double().softmax(1)
    flat_labels = labels.reshape(-1).tolist()
    confidence = [probs[n, c, h, w].item() if c != ignore_index else None
                  for (n, h, w), c in zip(torch.cartesian_prod(*(torch.arange(s) for s in labels.shape)).tolist(), flat_labels)]
    valid = [i for i, c in enumerate(confidence) if c is not None]
    keep = {i for i in valid if math.isnan(confidence[i]) or confidence[i] < threshold}
    least = math.ceil(min_kept * len(valid))
    if len(keep) < least:
        order = sorted(valid, key=lambda i: -1.0 if math.isnan(confidence[i]) else confidence[i])
        cut = -1.0 if math.isnan(confidence[order[least - 1]]) else confidence[order[least - 1]]
        keep |= {i for i in valid if math.isnan(confidence[i]) or confidence[i] <= cut}
    return torch.tensor([c if i in keep else ignore_index for i, c in enumerate(flat_labels)]).reshape(labels.shape)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 11, 7, 9), (3, 5, 1, 13), (1, 3, 16, 1)])
@pytest.mark.parametrize("threshold, min_kept", [(0.7, 0.2), (0.3, 0.5), (0.02, 0.6), (1.0, 0.0), (0.05, 1.0), (0.9, 0.0)])
def test_ohem_keeps_the_pixels_its_definition_keeps(shape, threshold, min_kept):
    logits, labels = random_case(*shape)
    expected = ohem_reference(logits, labels, IGNORE, threshold, min_kept)
    assert torch.equal(ohem_labels(logits, labels, IGNORE, threshold, min_kept), expected)
    kept, valid = (expected != IGNORE).sum().item(), (labels != IGNORE).sum().item()
    assert kept >= math.ceil(min_kept * valid)
    # float32 logits with the channels_last layout choose the same pixels
    # (random logits * 3 sit far from the cut compared with float32's rounding)
    channels_last = logits.float().contiguous(memory_format=torch.channels_last)
    assert torch.equal(ohem_labels(channels_last, labels, IGNORE, threshold, min_kept), expected)


def test_ohem_ties_at_the_cut_all_stay_and_nan_stays():
    logits = torch.zeros(1, 3, 4, 5, dtype=torch.float64)               # every pixel at probability 1/3: all tied
    logits[0, 0, 0, :2] = 4.0                                            # two pixels sure of class 0
    labels = torch.zeros(1, 4, 5, dtype=torch.long)
    labels[0, 3, 4] = IGNORE
    chosen = ohem_labels(logits, labels, IGNORE, 0.2, 0.1)               # the 2 least confident: 17 tied at 1/3
    assert (chosen == 0).sum() == 17 and (chosen[0, 0, :2] == IGNORE).all() and chosen[0, 3, 4] == IGNORE
    assert torch.equal(chosen, ohem_reference(logits, labels, IGNORE, 0.2, 0.1))
    logits[0, :, 0, 0] = float("nan")                                    # a diverged pixel is not dropped as easy
    chosen = ohem_labels(logits, labels, IGNORE, 0.2, 0.0)
    assert chosen[0, 0, 0] == 0 and (chosen == 0).sum() == 1
    assert F.cross_entropy(logits, chosen, ignore_index=IGNORE, reduction="sum").isnan()


def test_ohem_with_every_pixel_ignored_and_without_gradient():
    logits, labels = random_case(2, 4, 3, 5)
    everything = torch.full_like(labels, IGNORE)
    assert torch.equal(ohem_labels(logits, everything, IGNORE, 0.7, 1.0), everything)
    logits.requires_grad_(True)
    chosen = ohem_labels(logits, labels, IGNORE, 0.7, 0.2)
    assert not chosen.requires_grad and chosen.dtype == torch.long
    assert torch.equal(chosen == IGNORE, (chosen == IGNORE) | (labels == IGNORE))   # never un-ignores a pixel


def test_ohem_bad_input_names_what_is_wrong():
    logits, labels = random_case(2, 5, 6, 7, ignored=0.0)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 5\) or ignore_index 255; got values in \[-1, 4\]"):
        ohem_labels(logits, labels.index_fill(1, torch.tensor([0]), -1), IGNORE, 0.7, 0.2)
    with pytest.raises(ValueError, match=r"got logits \(2, 5, 6, 7\) and labels \(2, 6, 6\)"):
        ohem_labels(logits, labels[:, :, :6], IGNORE, 0.7, 0.2)
    for threshold in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"threshold must be a probability in \(0, 1\] \(0.7 typical\), got {threshold}"):
            ohem_labels(logits, labels, IGNORE, threshold, 0.2)
    for share in (-0.1, 2.0):
        with pytest.raises(ValueError, match=rf"min_kept must be a share of the pixels in \[0, 1\] \(0.2 typical\), got {share}"):
            ohem_labels(logits, labels, IGNORE, 0.7, share)
