"""The ``siglip`` loss module; imported by its ``build``, so that importing the
plugin does not import torch."""
from __future__ import annotations

import torch
from torch import nn

from clipft import Loss

from clipft_losses import SigLipOptions, siglip_loss


class SigLip(Loss, nn.Module):
    """The sigmoid loss with the model's ``logit_scale`` and ``logit_bias``;
    where the model lacks one, a trainable parameter of the loss stands in
    (``logit_bias`` at ``bias_init``, ``logit_scale`` at ``scale_init``), which
    the engine trains (group ``loss``) and checkpoints."""

    def __init__(self, opts: SigLipOptions):
        super().__init__()
        self.opts = opts

    def setup(self, ctx):
        model = ctx.model
        if not isinstance(getattr(model, "logit_bias", None), torch.Tensor):
            self.logit_bias = nn.Parameter(torch.tensor(float(self.opts.bias_init)))
        if not isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            self.logit_scale = nn.Parameter(torch.tensor(float(self.opts.scale_init)))

    def forward(self, rec):
        own = self._parameters
        scale = own["logit_scale"].exp() if "logit_scale" in own else rec.logit_scale
        bias = own["logit_bias"] if "logit_bias" in own else rec.logit_bias
        ids = rec.caption_ids if self.opts.duplicates == "positive" else None
        return siglip_loss(rec.image_features, rec.text_features, scale, bias, ids)
