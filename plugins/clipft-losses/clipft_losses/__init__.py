"""Losses: ``contrastive`` (CLIP's symmetric InfoNCE), ``siglip`` (the pairwise
sigmoid loss of SigLIP) and ``cross-entropy``."""
import math
from typing import Literal, Optional

import attrs

from clipft import LossSpec, hookimpl
from clipft.specs import NEED_HEAD, NEED_LABELS, NEED_TEXT


def _positive_scale(inst, attribute, value):
    # 0 leaves every logit equal (no signal); a negative scale trains the opposite objective
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"fixed_scale must be a finite number > 0 (CLIP-LoRA uses 100), got {value}")


@attrs.frozen
class ContrastiveOptions:
    duplicates: Literal["mask", "ignore"] = attrs.field(default="mask", metadata={"help": (
        "pairs in a batch whose captions are identical (class prompts of one class): "
        "'mask' removes them from each other's negatives; 'ignore' is plain CLIP, "
        "which pushes an image away from its own caption's duplicate")})
    fixed_scale: Optional[float] = attrs.field(default=None, validator=_positive_scale, metadata={"help": (
        "use this logit scale instead of the model's learned one (CLIP-LoRA uses 100)")})
    label_smoothing: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.lt(1.0)), metadata={"help": "label smoothing"})
    local_loss: bool = attrs.field(default=True, metadata={"help": (
        "with several processes: each computes its own rows against the columns of every "
        "rank (labels offset by its first row), open_clip's --local-loss; false computes "
        "the whole global-batch loss on every rank")})
    gather_with_grad: bool = attrs.field(default=True, metadata={"help": (
        "with several processes: gather the other ranks' features with their gradient "
        "(open_clip's --gather-with-grad); false gathers them as constants, so only local "
        "rows carry gradient")})


def contrastive_loss(image_features, text_features, logit_scale, caption_ids=None,
                     duplicates="mask", label_smoothing=0.0):
    """Symmetric InfoNCE over a batch of L2-normalised features.

    With ``duplicates='mask'`` and ``caption_ids``, entry (i, j) for i != j whose
    captions are identical is removed from the softmax: those are not negatives
    (they are the same text), and keeping them would give contradictory gradients
    and a loss floor of log(k) for k duplicates.
    """
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.t()
    n = logits.shape[0]
    target = torch.arange(n, device=logits.device)
    if duplicates == "mask" and caption_ids is not None:
        same = caption_ids[:, None] == caption_ids[None, :]
        off_diag = same & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off_diag, float("-inf"))
    loss_i = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    loss_t = F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)
    return (loss_i + loss_t) / 2


def local_contrastive_loss(image_features, text_features, all_image, all_text, start, logit_scale,
                           caption_ids=None, all_ids=None, duplicates="mask", label_smoothing=0.0):
    """This rank's rows against every rank's columns: image i's positive is
    global column ``start + i`` (open_clip's ``local_loss``). The mean over
    ranks equals :func:`contrastive_loss` over the global batch."""
    import torch
    import torch.nn.functional as F

    n = image_features.shape[0]
    target = torch.arange(n, device=image_features.device) + start
    logits_i = logit_scale * image_features @ all_text.t()        # [local, global]
    logits_t = logit_scale * text_features @ all_image.t()
    if duplicates == "mask" and caption_ids is not None:
        same = caption_ids[:, None] == all_ids[None, :]
        same[torch.arange(n, device=same.device), target] = False
        logits_i = logits_i.masked_fill(same, float("-inf"))
        logits_t = logits_t.masked_fill(same, float("-inf"))
    loss_i = F.cross_entropy(logits_i, target, label_smoothing=label_smoothing)
    loss_t = F.cross_entropy(logits_t, target, label_smoothing=label_smoothing)
    return (loss_i + loss_t) / 2


class Contrastive:
    def __init__(self, opts: ContrastiveOptions):
        self.opts = opts

    def __call__(self, rec):
        scale = rec.logit_scale if self.opts.fixed_scale is None else self.opts.fixed_scale
        ids = rec.caption_ids if self.opts.duplicates == "mask" else None
        if self.opts.label_smoothing and ids is not None:
            # smoothing spreads mass over masked (-inf) entries; keep it well-defined
            ids = None
        if rec.world_size == 1:
            return contrastive_loss(rec.image_features, rec.text_features, scale, ids,
                                    self.opts.duplicates, self.opts.label_smoothing)
        # several processes: every rank's features are negatives too
        grad = self.opts.gather_with_grad
        all_img, start = rec.gathered(rec.image_features, grad)
        all_txt, _ = rec.gathered(rec.text_features, grad)
        all_ids = rec.gathered(ids, False)[0] if ids is not None else None
        if self.opts.local_loss:
            return local_contrastive_loss(rec.image_features, rec.text_features, all_img, all_txt, start,
                                          scale, ids, all_ids, self.opts.duplicates, self.opts.label_smoothing)
        return contrastive_loss(all_img, all_txt, scale, all_ids, self.opts.duplicates,
                                self.opts.label_smoothing)


@attrs.frozen
class CrossEntropyOptions:
    label_smoothing: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.lt(1.0)), metadata={"help": "label smoothing"})


class CrossEntropy:
    def __init__(self, opts: CrossEntropyOptions):
        self.opts = opts

    def __call__(self, rec):
        import torch.nn.functional as F
        return F.cross_entropy(rec.logits.float(), rec.labels, label_smoothing=self.opts.label_smoothing)


# -- siglip ------------------------------------------------------------------------
@attrs.frozen
class SigLipOptions:
    duplicates: Literal["positive", "ignore"] = attrs.field(default="positive", metadata={"help": (
        "pairs in a batch whose captions are identical (class prompts of one class): 'positive' "
        "counts them as matching pairs (label +1); 'ignore' is the paper's loss, where only "
        "the diagonal is positive")})
    bias_init: float = attrs.field(default=-10.0, metadata={"help": (
        "initial value of the trainable logit bias the loss adds when the model has no "
        "logit_bias (the paper: -10)")})
    scale_init: float = attrs.field(default=math.log(10.0), metadata={"help": (
        "initial log logit scale of the trainable one the loss adds when the model has no "
        "logit_scale (the paper: log 10)")})


def siglip_loss(image_features, text_features, logit_scale, logit_bias, caption_ids=None):
    """SigLIP's sigmoid loss over a batch of L2-normalised features (Zhai et al. 2023):

        -1/B * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b))

    with ``z_ij = +1`` for matching pairs and -1 otherwise, summed over all B^2
    pairs and divided by the batch size, as open_clip's ``SigLipLoss`` does. The
    matching pairs are the diagonal; with ``caption_ids``, also the pairs whose
    captions are identical. ``logit_scale`` is ``t`` (already exponentiated).
    The operations are open_clip's, in its order, so the two agree bit for bit
    on the same inputs (``tests/test_siglip.py``)."""
    import torch
    import torch.nn.functional as F

    n = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits += logit_bias
    if caption_ids is None:
        positive = torch.eye(n, device=logits.device, dtype=logits.dtype)
    else:
        positive = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)   # diagonal included
    labels = 2 * positive + -torch.ones((n, n), device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def _build_siglip(opts: SigLipOptions):
    from clipft_losses.siglip import SigLip
    return SigLip(opts)


@hookimpl
def clipft_register_losses(register):
    register(LossSpec(
        name="contrastive",
        summary="CLIP's symmetric image-text InfoNCE with the model's logit scale.",
        options=ContrastiveOptions, build=Contrastive, needs={NEED_TEXT}, batch_coupled=True))
    register(LossSpec(
        name="siglip",
        summary="SigLIP's pairwise sigmoid loss with the model's logit scale and bias "
                "(a trainable bias at -10 where the model has none).",
        options=SigLipOptions, build=_build_siglip, needs={NEED_TEXT}, batch_coupled=True))
    register(LossSpec(
        name="cross-entropy",
        summary="Cross-entropy of a classification head's logits against class labels.",
        options=CrossEntropyOptions, build=CrossEntropy, needs={NEED_HEAD, NEED_LABELS}))
