"""Data source ``hf``: Hugging Face ``datasets``.

The options live here; :mod:`clipft_hf.source` (map-style) and
:mod:`clipft_hf.stream` (``streaming=true``) import ``datasets`` and torch only
when a run builds the data, so listing plugins stays fast.
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import DataSourceSpec, hookimpl
from clipft_data.common import (
    classes_field,
    fraction,
    shots_field,
    shots_min_field,
    shots_seed_field,
    templates_field,
)


def _classes(value):
    # imported when the option is read, not when the plugin loads: a plugin
    # listing never depends on this helper of clipft-data
    from clipft_data.common import classnames_option
    return classnames_option(value)


def _positive(inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class HfOptions:
    path: str = attrs.field(metadata={
        "help": "a save_to_disk folder, a .parquet/.arrow file, a glob or folder of them, an image folder "
                "(train/, validation/ of class folders), or a Hub name (online only)"})
    split: str = attrs.field(default="train", metadata={"help": "the split to train on"})
    val_split: Optional[str] = attrs.field(default=None, metadata={
        "help": "the split to evaluate on; none: val_fraction of the train split, seeded"})
    val_fraction: float = attrs.field(default=0.2, validator=fraction, metadata={
        "help": "without val_split: share of the train split held out for validation"})
    image: str = attrs.field(default="image", metadata={
        "help": "image column: an Image feature, bytes, or file paths (relative to the data)"})
    label: Optional[str] = attrs.field(default="auto", metadata={
        "help": "class column (ClassLabel, int or str); auto: 'label' when present; none: no classes"})
    caption: Optional[str] = attrs.field(default="auto", metadata={
        "help": "caption column; auto: 'caption' or 'text' when present; none: class prompts"})
    classes: Optional[tuple] = attrs.field(default=None, converter=_classes, metadata={
        "help": "class names in label order, or @FILE; default: the ClassLabel's names "
                "(a str label column: its sorted values)"})
    underscores_to_spaces: bool = attrs.field(default=True, metadata={
        "help": "turn 'golden_retriever' into 'golden retriever' in prompts"})
    templates: tuple = templates_field()
    shots: Optional[int] = shots_field("rows")
    shots_seed: int = shots_seed_field()
    shots_min: bool = shots_min_field("rows")
    # `classes` already names the classes here, so the base-to-novel half has its own key
    class_half: str = classes_field()
    config: Optional[str] = attrs.field(default=None, metadata={
        "help": "a Hub dataset's configuration name"})
    cache_dir: Optional[str] = attrs.field(default=None, metadata={
        "help": "where datasets keeps its Arrow copy of parquet and image-folder data "
                "(default: its own cache, HF_DATASETS_CACHE)"})
    streaming: bool = attrs.field(default=False, metadata={
        "help": "stream the splits (data larger than memory), split by rank and worker; needs val_split"})
    samples_per_epoch: Optional[int] = attrs.field(default=None, validator=_positive, metadata={
        "help": "streaming: train rows per epoch, when the data cannot say"})
    shuffle_buffer: int = attrs.field(default=1000, metadata={
        "help": "streaming: train rows held for shuffling in each reader (0 or 1: shard order only)"})

    def __attrs_post_init__(self):
        if self.shots is not None and self.label is None:
            raise ValueError(f"shots={self.shots} samples K rows per class, so it needs a label column")
        if self.streaming and self.shots is not None:
            raise ValueError("shots samples the train split, which a stream cannot; drop streaming=true")
        if self.streaming and not self.val_split:
            raise ValueError("streaming=true needs val_split: a stream cannot hold a seeded share out")
        if self.class_half != "all" and (self.label is None or self.streaming):
            raise ValueError(f"class_half={self.class_half} keeps half of the classes, so it needs a label "
                             "column and a non-streaming source")


@hookimpl
def clipft_register_data_sources(register):
    def build(opts, ctx):
        from clipft_hf.source import build_hf
        return build_hf(opts, ctx)

    register(DataSourceSpec(
        name="hf",
        summary="Hugging Face datasets: save_to_disk folders, parquet/arrow files, image folders, the Hub.",
        options=HfOptions, build=build))
