"""Losses and heads: values against references, and the duplicate-caption rule."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipft_losses import ContrastiveOptions, Contrastive, contrastive_loss
from clipft.record import ForwardRecord, caption_ids
from numerics import assert_close_rel


def feats(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.numerics
def test_contrastive_equals_open_clip_cliploss_without_duplicates():
    from open_clip.loss import ClipLoss
    img, txt = feats(6, seed=1), feats(6, seed=2)
    scale = torch.tensor(14.3)
    ids = caption_ids([f"caption {i}" for i in range(6)])  # all distinct
    ours = contrastive_loss(img, txt, scale, ids, "mask")
    ref = ClipLoss()(img, txt, scale)
    # open_clip computes logits_per_text as its own product (8-term dot products,
    # other operand order) instead of the transpose; cross-entropy passes a logit
    # error on at most twice (its gradient has 1-norm <= 2), and the logits are at
    # most the scale in size (unit features)
    assert_close_rel(ours, ref, reduction=8, depth=2, scale=float(scale), what="contrastive vs ClipLoss")


def test_same_class_pairs_are_not_negatives_under_mask():
    """Class-prompt captions: items 0 and 1 share a caption. With perfectly aligned
    features plain InfoNCE ('ignore') cannot go below log 2 on those rows, because
    the duplicate caption is counted as a negative; 'mask' drops it."""
    captions = ["a photo of a red circle.", "a photo of a red circle.", "a photo of a blue square."]
    t = feats(2, seed=3)
    txt = torch.stack([t[0], t[0], t[1]])
    img = txt.clone()
    ids = caption_ids(captions)
    scale = torch.tensor(100.0)
    plain = contrastive_loss(img, txt, scale, ids, "ignore")
    masked = contrastive_loss(img, txt, scale, ids, "mask")
    # 2 of 3 rows stuck at log 2 in exact arithmetic; 1e-3 is far above rounding
    # (~1e-7) and far below the gap it guards (log 2 against ~0)
    assert plain.item() > (2 / 3) * math.log(2) - 1e-3
    # exactly aligned features at scale 100: what remains is exp(-100 (1 - cos)) of
    # the other caption (cos 0.16: e^-84, 0 in float32), so 1e-3 only has to be above rounding
    assert masked.item() < 1e-3


def test_contrastive_plugin_uses_record_and_fixed_scale():
    img, txt = feats(4, seed=5), feats(4, seed=6)
    rec = ForwardRecord(image_features=img, text_features=txt, logit_scale=torch.tensor(10.0),
                        caption_ids=caption_ids(list("abcd")))
    a = Contrastive(ContrastiveOptions())(rec)
    b = Contrastive(ContrastiveOptions(fixed_scale=100.0))(rec)
    # exact: the plugin calls contrastive_loss on the same tensors (a 0-d tensor or
    # a float scale is the same correctly rounded multiply; no caption repeats, so
    # the mask removes nothing)
    assert torch.equal(a, contrastive_loss(img, txt, 10.0))
    assert torch.equal(b, contrastive_loss(img, txt, 100.0))


def test_cross_entropy_plugin():
    from clipft_losses import CrossEntropy, CrossEntropyOptions
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    rec = ForwardRecord(image_features=feats(5), logits=logits, labels=labels)
    # exact: the plugin is F.cross_entropy on the same (already float32) logits
    assert torch.equal(CrossEntropy(CrossEntropyOptions())(rec), F.cross_entropy(logits, labels))


def test_bad_loss_option_value():
    with pytest.raises(ValueError):
        ContrastiveOptions(label_smoothing=1.5)
