"""Data source ``webdataset``: WebDataset tar shards, streamed.

The options live here and the stream in :mod:`clipft_webdataset.stream`, which
imports torch and webdataset only when a run builds the data (listing plugins
stays fast).
"""
from __future__ import annotations

from typing import Optional

import attrs

from clipft import DataSourceSpec, hookimpl
from clipft_data.common import classnames_option, templates_field

IMAGE_KEYS = "jpg;png;jpeg;webp"   # open_clip's keys


def _at_least(low: int):
    def check(inst, attribute, value):
        if value is not None and value < low:
            raise ValueError(f"{attribute.name} must be >= {low}, got {value}")
    return check


@attrs.frozen
class WebDatasetOptions:
    urls: str = attrs.field(metadata={
        "help": "train shards: a brace pattern (PATH/shard-{000000..000009}.tar), one .tar, "
                "or a folder written by `clipft shards` (its shards.json)"})
    val_urls: Optional[str] = attrs.field(default=None, metadata={
        "help": "val shards (same forms); without it the last val_shards train shards are the val split"})
    val_shards: int = attrs.field(default=1, validator=_at_least(1), metadata={
        "help": "without val_urls: how many of the last shards (in url order) are held out for val"})
    image_key: str = attrs.field(default=IMAGE_KEYS, metadata={
        "help": "sample key(s) of the image, ';'-separated, the first present is used"})
    caption_key: Optional[str] = attrs.field(default="txt", metadata={
        "help": "sample key of the caption (none: captions are class prompts)"})
    label_key: str = attrs.field(default="auto", metadata={
        "help": "sample key of the class index (cls); auto: the one shards.json names, else none"})
    classnames: Optional[tuple] = attrs.field(default=None, converter=classnames_option, metadata={
        "help": "class names in label order, or @FILE; default: classnames.txt beside the shards"})
    resampled: bool = attrs.field(default=False, metadata={
        "help": "draw train shards with replacement (endless; an epoch is samples_per_epoch)"})
    samples_per_epoch: Optional[int] = attrs.field(default=None, validator=_at_least(1), metadata={
        "help": "train samples per epoch: required with resampled; else shards.json's count or a scan"})
    shuffle_buffer: int = attrs.field(default=1000, validator=_at_least(0), metadata={
        "help": "train samples held for shuffling in each worker (0 or 1: shard order only)"})
    templates: tuple = templates_field()

    def __attrs_post_init__(self):
        if self.resampled and self.samples_per_epoch is None:
            raise ValueError("resampled=true draws shards without end, so it needs samples_per_epoch "
                             "(the samples one epoch takes)")


@hookimpl
def clipft_register_data_sources(register):
    def build(opts, ctx):
        from clipft_webdataset.stream import build_webdataset
        return build_webdataset(opts, ctx)

    register(DataSourceSpec(
        name="webdataset",
        summary="WebDataset tar shards (`clipft shards` writes them), streamed and split by rank and worker.",
        options=WebDatasetOptions, build=build))
