"""Data sources: ``imagefolder``, ``captions`` and the synthetic ``shapes``."""
from clipft import DataSourceSpec, hookimpl

from clipft_data.captions import CaptionsOptions, build_captions
from clipft_data.imagefolder import ImageFolderOptions, build_imagefolder
from clipft_data.shapes import ShapesOptions, build_shapes


@hookimpl
def clipft_register_data_sources(register):
    register(DataSourceSpec(
        name="imagefolder",
        summary="PATH/class_name/*.jpg; train/ and val/ subfolders or a seeded val split.",
        options=ImageFolderOptions, build=build_imagefolder))
    register(DataSourceSpec(
        name="captions",
        summary="Image-caption pairs from a CSV, TSV or JSONL file.",
        options=CaptionsOptions, build=build_captions))
    register(DataSourceSpec(
        name="shapes",
        summary="Synthetic coloured shapes with captions, generated offline from a seed.",
        options=ShapesOptions, build=build_shapes))
