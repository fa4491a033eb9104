"""Losses and heads: values against references, and the duplicate-caption rule."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipft_losses import ContrastiveOptions, Contrastive, contrastive_loss
from clipft.record import ForwardRecord, caption_ids


def feats(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_contrastive_equals_open_clip_cliploss_without_duplicates():
    from open_clip.loss import ClipLoss
    img, txt = feats(6, seed=1), feats(6, seed=2)
    scale = torch.tensor(14.3)
    ids = caption_ids([f"caption {i}" for i in range(6)])  # all distinct
    ours = contrastive_loss(img, txt, scale, ids, "mask")
    ref = ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, ref, atol=1e-6)


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
    assert plain.item() > (2 / 3) * math.log(2) - 1e-3  # 2 of 3 rows stuck at log 2
    assert masked.item() < 1e-3


def test_contrastive_plugin_uses_record_and_fixed_scale():
    img, txt = feats(4, seed=5), feats(4, seed=6)
    rec = ForwardRecord(image_features=img, text_features=txt, logit_scale=torch.tensor(10.0),
                        caption_ids=caption_ids(list("abcd")))
    a = Contrastive(ContrastiveOptions())(rec)
    b = Contrastive(ContrastiveOptions(fixed_scale=100.0))(rec)
    assert torch.allclose(a, contrastive_loss(img, txt, 10.0))
    assert torch.allclose(b, contrastive_loss(img, txt, 100.0))


def test_cross_entropy_plugin():
    from clipft_losses import CrossEntropy, CrossEntropyOptions
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    rec = ForwardRecord(image_features=feats(5), logits=logits, labels=labels)
    assert torch.allclose(CrossEntropy(CrossEntropyOptions())(rec), F.cross_entropy(logits, labels))


def test_bad_loss_option_value():
    with pytest.raises(ValueError):
        ContrastiveOptions(label_smoothing=1.5)
