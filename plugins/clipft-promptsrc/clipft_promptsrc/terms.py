"""PromptSRC's self-regularisers as functions of tensors (imports torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipft.errors import ClipftError


def l1_agreement(prompted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """``mean |prompted - frozen|`` over every element (``F.l1_loss``'s mean, as
    the released code): both normalised embeddings of the same rows."""
    return (prompted.float() - frozen.float()).abs().mean()


def logit_kl(logits: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """``sum KL(softmax(zero_shot) || softmax(logits)) / logits.numel()``: the
    KL of each row summed over the batch, divided by rows x classes (the
    released code's ``kl_div(..., reduction="sum") / numel``)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(zero_shot.float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum() / logits.numel()


def promptsrc_terms(record, w_frozen: torch.Tensor, opts) -> dict:
    """The weighted terms of one step; each is left out when its weight is 0."""
    w = record.class_text_features
    if w is None or w.shape != w_frozen.shape:
        raise ClipftError(f"promptsrc compares the step's class prompts with the frozen model's for the "
                          f"{w_frozen.shape[0]} classes of the run; the step encoded "
                          f"{'none' if w is None else w.shape[0]}")
    w_frozen = w_frozen.to(w.device)
    terms = {}
    if opts.text_weight > 0:
        terms["scl_text"] = opts.text_weight * l1_agreement(w, w_frozen)
    if opts.image_weight > 0 or opts.kl_weight > 0:
        f, f_frozen = record.image_features, record.frozen_image_features
        if f_frozen is None:
            raise ClipftError("promptsrc needs ForwardRecord.frozen_image_features, which this step lacks")
        if opts.image_weight > 0:
            terms["scl_image"] = opts.image_weight * l1_agreement(f, f_frozen)
        if opts.kl_weight > 0:
            scale = record.logit_scale.float() if record.logit_scale is not None else 1.0
            logits = scale * f.float() @ w.float().t()
            zero_shot = scale * f_frozen.float() @ w_frozen.t()
            terms["scl_kl"] = opts.kl_weight * logit_kl(logits, zero_shot)
    return terms
