"""Strategy ``promptsrc``: PromptSRC, self-regulating prompts (Khattak et al.,
ICCV 2023), built on clipft's public API only (:mod:`clipft.prompt_kit`,
``Strategy.loss_terms``, ``ForwardRecord.frozen_image_features``,
``InsertedModule.after_epoch``).

The prompts are IVLP's: deep text context (``n_ctx`` vectors from ``init`` at
the input, fresh N(0, 0.02^2) context at text blocks 1..J-1) and deep vision
tokens (``n_vision`` tokens after the class token at vision blocks 0..J-1,
N(0, 0.02^2)), ``depth`` J in both towers; CLIP stays frozen. On top, three
self-regularisers tie them to the frozen model:

- ``scl_text``: ``text_weight * mean |w - w_frozen|`` over the classes' normalised
  prompted class embeddings ``w`` (``ForwardRecord.class_text_features``) and the
  frozen model's ``w_frozen``, the normalised ensemble of ``templates``
  (textual diversity), encoded once in ``apply`` by the still-frozen text tower;
- ``scl_image``: ``image_weight * mean |f - f_frozen|`` over the batch's
  normalised prompted image embeddings and the frozen model's
  (``ForwardRecord.frozen_image_features``: the same model with the prompts
  bypassed, served from the engine's per-sample cache; no second model);
- ``scl_kl``: ``kl_weight * sum KL(p_zs || p) / (B * C)`` between the softmax of
  the zero-shot logits ``s * f_frozen @ w_frozen^T`` and of the prompted
  logits ``s * f @ w^T`` (``s`` the model's exp(logit_scale)), as the released code
  computes it;
- GPA: a Gaussian-weighted average of the prompts over epochs,
  ``sum_e g(e) * prompts_e / sum_e g(e)`` with ``g`` the N(gpa_mean, gpa_std^2)
  density at the 1-based epoch, kept by an inserted module
  (:mod:`clipft_promptsrc.gpa`); evaluation, ``clipft eval``/``predict`` and
  ``clipft export`` use the aggregate.

The terms are logged as ``reg.scl_text``, ``reg.scl_image`` and ``reg.scl_kl``.
All weights 0 and ``gpa=false`` is IVLP (``prompt:depth=J`` + ``vision-prompt:depth=J``
with this init).
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import Strategy, StrategySpec, hookimpl
from clipft.options import at_least_one, init_text, non_negative

#: PromptSRC's defaults (the released base-to-novel config, ViT-B/16)
DEPTH, N_CTX, N_VISION, INIT = 9, 4, 4, "a photo of a"
IMAGE_WEIGHT, TEXT_WEIGHT, KL_WEIGHT = 10.0, 25.0, 1.0
#: GPA without gpa_mean / gpa_std: the paper's 15 and 1 of 20 epochs, scaled to the run's epochs
GPA_MEAN_FRACTION, GPA_STD_FRACTION = 0.75, 0.05
STD = 0.02
STRATEGY = "promptsrc"
VISION_FILE = "promptsrc_vision_prompts.safetensors"
#: where the Gaussian prompt aggregate lives on the model
GPA_ATTR = "clipft_promptsrc_gpa"


def _positive_or_none(inst, attribute, value):
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _templates(inst, attribute, value):
    from clipft.data import TEMPLATE_SETS
    value = str(value).strip()
    if value == "run" or value in TEMPLATE_SETS or value.startswith("@") or value.count("{}") == 1:
        return
    raise ValueError(f"templates must be 'run', a template set ({', '.join(TEMPLATE_SETS)}), @FILE or one "
                     f"template with one '{{}}', got {value!r}")


@attrs.frozen
class PromptSRCOptions:
    depth: int = attrs.field(default=DEPTH, validator=at_least_one, metadata={"help": (
        f"prompt depth J in both towers (PromptSRC: {DEPTH}); at most either tower's block count")})
    n_ctx: int = attrs.field(default=N_CTX, validator=at_least_one, metadata={"help": (
        f"text context vectors (PromptSRC: {N_CTX}); must be init's token count")})
    n_vision: int = attrs.field(default=N_VISION, validator=at_least_one, metadata={"help": (
        f"vision prompt tokens per block (PromptSRC: {N_VISION})")})
    init: Optional[str] = attrs.field(default=INIT, converter=init_text, metadata={"help": (
        f"text initialising the input context; 'none': N(0, {STD}^2)")})
    image_weight: float = attrs.field(default=IMAGE_WEIGHT, validator=non_negative, metadata={"help": (
        "weight of the L1 distance between prompted and frozen image features (reg.scl_image); 0: off")})
    text_weight: float = attrs.field(default=TEXT_WEIGHT, validator=non_negative, metadata={"help": (
        "weight of the L1 distance between prompted and frozen class text features (reg.scl_text); 0: off")})
    kl_weight: float = attrs.field(default=KL_WEIGHT, validator=non_negative, metadata={"help": (
        "weight of KL(zero-shot || prompted) over the class logits (reg.scl_kl); 0: off")})
    templates: str = attrs.field(default="openai-imagenet", validator=_templates, metadata={"help": (
        "templates whose ensemble is the frozen text side (textual diversity): a set name "
        "(openai-imagenet: CLIP's 80), @FILE, one template, or 'run' (the data's)")})
    gpa: bool = attrs.field(default=True, metadata={"help": (
        "Gaussian prompt aggregation: evaluate and export the Gaussian-weighted average of the "
        "prompts over epochs")})
    gpa_mean: Optional[float] = attrs.field(default=None, validator=_positive_or_none, metadata={"help": (
        f"GPA's mean epoch (1-based); default {GPA_MEAN_FRACTION} x --epochs (PromptSRC: 15 of 20)")})
    gpa_std: Optional[float] = attrs.field(default=None, validator=_positive_or_none, metadata={"help": (
        f"GPA's standard deviation in epochs; default {GPA_STD_FRACTION} x --epochs (PromptSRC: 1 of 20)")})


class PromptSRC(Strategy):
    def __init__(self, opts: PromptSRCOptions):
        self.opts = opts
        # the engine fills ForwardRecord.frozen_image_features only when a term reads them
        self.frozen_image_features = opts.image_weight > 0 or opts.kl_weight > 0
        self.w_frozen = None

    def apply(self, model, ctx):
        from clipft_promptsrc.build import install_promptsrc
        selections, self.w_frozen = install_promptsrc(model, ctx, self.opts)
        return selections

    def loss_terms(self, record):
        if self.w_frozen is None:
            return {}
        from clipft_promptsrc.terms import promptsrc_terms
        return promptsrc_terms(record, self.w_frozen, self.opts)


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name=STRATEGY,
        summary="PromptSRC: deep prompts in both towers, regularised towards the frozen model (L1 on "
                "features, KL on logits) and averaged over epochs (GPA); CLIP stays frozen. Use with --head text.",
        options=PromptSRCOptions,
        build=PromptSRC,
        # PromptSRC: SGD lr 0.0025, batch 4, 20 epochs, 16 shots; only the lr is a strategy default
        default_lr=2.5e-3,
    ))
