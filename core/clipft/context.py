"""``BuildContext``: what strategies and heads receive while a run is assembled;
``TrainFeatures``: what a component fitted to the training split receives.

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


class TrainFeatures:
    """The training split as embeddings, for
    :meth:`clipft.protocols.FitsTrainFeatures.fit_train_features`:

    - ``features``: ``[N, D]`` L2-normalised image embeddings of every decodable
      training image, in index order, as evaluation computes them (eval mode,
      the image-embedding adapter applied, float32, on the run's device);
    - ``labels``: ``[N]`` class indices (-1 for an image without a class);
    - ``classnames``: the data's class names in label order (None without classes);
    - ``val_features()``: ``(features, labels)`` of the val split, computed on
      first use through the same cache the evaluation uses. A hyperparameter
      chosen on it makes the run's own val metrics optimistic: say so in the
      record ``fit_train_features`` returns.
    """

    def __init__(self, features, labels, classnames=None, val=None):
        self.features, self.labels, self.classnames = features, labels, classnames
        self._val, self._val_value = val, None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def val_features(self):
        if self._val is None:
            raise ValueError("this TrainFeatures has no val split")
        if self._val_value is None:
            self._val_value = self._val()
        return self._val_value
