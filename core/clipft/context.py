"""``BuildContext``: what strategies and heads receive while a run is assembled.

``StrategySpec.build(options)`` returns a :class:`clipft.Strategy` whose
``apply(model, ctx)`` gets one of these; ``HeadSpec.build(options, ctx)`` gets
the same object. (Data sources get a :class:`clipft.data.DataContext`.)
"""
from __future__ import annotations

from typing import Optional

import attrs


@attrs.define
class BuildContext:
    """Fields:

    - ``model``: the open_clip model being assembled (strategies may change it);
    - ``model_name``: its open_clip name (``tiny-vit``, ``ViT-B-32``, ``local-dir:...``);
    - ``tokenizer``: open_clip's tokenizer for the model;
    - ``device``: the torch device the run trains on;
    - ``classnames`` / ``templates``: the data's class names (None for caption
      data) and its prompt templates, each with one ``{}``;
    - ``seed``: the run's seed;
    - ``loss``: the name of the loss the run trains with (after defaults are
      applied; None when the model is rebuilt for inference) and ``loss_needs``,
      what that loss declared (``text``, ``labels``, ``head``);
    - ``head``: the name of the run's head, or None.
    """

    model: object
    model_name: str
    tokenizer: object
    device: object
    classnames: Optional[list] = None
    templates: tuple = ("a photo of a {}.",)
    seed: int = 0
    loss: Optional[str] = None
    loss_needs: frozenset = frozenset()
    head: Optional[str] = None

    @property
    def embed_dim(self) -> int:
        """Width of the shared embedding space, read off the live model."""
        from clipft.encode import infer_embed_dim
        return infer_embed_dim(self.model)

    def tokenize(self, texts):
        return self.tokenizer(list(texts)).to(self.device)

    def class_text_features(self, model=None):
        """Normalised class embeddings ``[C, D]`` (see :func:`clipft.encode.class_text_features`)."""
        from clipft.encode import class_text_features
        return class_text_features(model or self.model, self.tokenizer, self.classnames,
                                   self.templates, self.device)
