"""clipft loss `example-name`: symmetric contrastive loss (InfoNCE) in which every pair
with an identical caption is a positive (class prompts of one class, say), so
duplicates are not pushed apart. Returns its named terms and their total.

A loss gets a clipft.ForwardRecord: L2-normalised ``image_features`` and
``text_features``, the exponentiated ``logit_scale``, ``caption_ids`` (equal ids:
identical captions), ``labels`` and the head's ``logits``. ``LossSpec.needs``
says which the engine must provide.
"""
from typing import Optional

import attrs

from clipft import LossSpec, hookimpl
from clipft.specs import NEED_TEXT

NAME = "example-name"


@attrs.frozen
class ExampleNameOptions:
    scale: Optional[float] = attrs.field(default=None, metadata={
        "help": "fixed logit scale; default: the model's learned one"})


def multi_positive_nce(image_features, text_features, scale, caption_ids=None):
    """``(image->text, text->image)`` cross-entropies against a target spread
    evenly over every caption equal to the image's own."""
    import torch
    import torch.nn.functional as F

    logits = scale * image_features @ text_features.t()
    n = logits.shape[0]
    if caption_ids is None:
        same = torch.eye(n, device=logits.device)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return i2t, t2i


class ExampleName:
    def __init__(self, opts: ExampleNameOptions):
        self.opts = opts

    def __call__(self, rec):
        scale = rec.logit_scale if self.opts.scale is None else self.opts.scale
        i2t, t2i = multi_positive_nce(rec.image_features, rec.text_features, scale, rec.caption_ids)
        # the named terms are logged, only the total is differentiated
        return {"total": (i2t + t2i) / 2, "image_to_text": i2t.detach(), "text_to_image": t2i.detach()}


@hookimpl
def clipft_register_losses(register):
    register(LossSpec(
        name=NAME,
        summary="Contrastive loss in which identical captions are positives.",
        options=ExampleNameOptions,
        build=ExampleName,
        needs={NEED_TEXT},
        # each pair's loss depends on the batch's other pairs: runs drop a short last batch
        batch_coupled=True,
    ))
