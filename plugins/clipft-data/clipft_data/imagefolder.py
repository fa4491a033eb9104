"""``imagefolder``: ``root/class_name/*.jpg``, like torchvision's ImageFolder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from clipft.data import DataBundle, check_image, resolve_templates
from clipft.datafiles import VAL_FOLDERS, scan_class_folders, split_folders
from clipft.errors import ClipftUsageError

from clipft_data.common import (
    FileDataset,
    classes_field,
    merge_split_record,
    restrict_classes,
    fraction,
    relative_key,
    sample_shots,
    shots_field,
    shots_min_field,
    shots_seed_field,
    split_items,
    split_record,
    templates_field,
)


@attrs.frozen
class ImageFolderOptions:
    root: str = attrs.field(metadata={"help": "folder with one sub-folder per class (or train/ and val/)"})
    val_fraction: float = attrs.field(default=0.2, validator=fraction, metadata={
        "help": "share of each class held out for validation when there is no val/ folder"})
    templates: tuple = templates_field()
    underscores_to_spaces: bool = attrs.field(default=True, metadata={
        "help": "turn 'golden_retriever' into 'golden retriever' in prompts"})
    shots: Optional[int] = shots_field()
    shots_seed: int = shots_seed_field()
    shots_min: bool = shots_min_field()
    classes: str = classes_field()


def _scan(root: Path):
    """Class folders and their image files; errors name the offending folder."""
    return scan_class_folders(root, "imagefolder")


def _items(classes, files, skipped, label_of):
    items = []
    for c in classes:
        for p in files[c]:
            reason = check_image(p)
            if reason:
                skipped.append((str(p), reason))
            else:
                items.append((str(p), None, label_of[c]))
    return items


def build_imagefolder(opts: ImageFolderOptions, ctx) -> DataBundle:
    root = Path(opts.root).expanduser()
    skipped: list = []
    warnings: list = []
    train_dir, val_dir = split_folders(root) if root.is_dir() else (None, None)
    if val_dir is not None:
        classes, train_files = _scan(train_dir)
        val_classes, val_files = _scan(val_dir)
        if val_classes != classes:
            missing = sorted(set(classes) ^ set(val_classes))
            raise ClipftUsageError(
                f"imagefolder: train/ and {val_dir.name}/ have different classes: {missing}")
        label_of = {c: i for i, c in enumerate(classes)}
        train = _items(classes, train_files, skipped, label_of)
        val = _items(classes, val_files, skipped, label_of)
    else:
        if train_dir is not None:
            warnings.append(f"imagefolder: {root} has train/ but no {'/, '.join(VAL_FOLDERS)}/: the classes are "
                            f"the folders in train/, {opts.val_fraction:g} of each held out for validation")
            root = train_dir
        classes, files = _scan(root)
        label_of = {c: i for i, c in enumerate(classes)}
        train, val = split_items(_items(classes, files, skipped, label_of),
                                 opts.val_fraction, ctx.seed, by_label=True)
    all_classes = classes
    # after the val split, so a class's val images are the same whichever half it is in
    classes, (train, val) = restrict_classes(classes, opts.classes, train, val)
    if not train:
        raise ClipftUsageError(f"imagefolder: no readable images under {root} ({len(skipped)} unreadable)")
    if opts.shots is not None:   # after the val split, so val is the same with and without shots
        train, shot_warnings = sample_shots(train, classes, opts.shots, opts.shots_seed, opts.shots_min,
                                       relative_key(root), "imagefolder")
        warnings += shot_warnings
    names = [c.replace("_", " ") if opts.underscores_to_spaces else c for c in classes]
    templates = resolve_templates(opts.templates)
    # the training caption of an image is a class prompt; templates rotate by
    # sample so that every template is seen, deterministically
    def caption(i, label):
        return templates[i % len(templates)].format(names[label])
    train = [(p, caption(i, y), y) for i, (p, _, y) in enumerate(train)]
    val = [(p, caption(i, y), y) for i, (p, _, y) in enumerate(val)]
    return DataBundle(
        train=FileDataset(train, ctx.transform_train),
        val=FileDataset(val, ctx.transform_val),
        classnames=names, templates=templates, has_captions=False, skipped=skipped,
        description=f"imagefolder {root}" + (f" ({opts.shots}-shot)" if opts.shots else "")
        + (f" ({opts.classes} classes)" if opts.classes != "all" else ""),
        split=merge_split_record(split_record(opts, train) if opts.shots is not None else None,
                                 all_classes, opts.classes), warnings=warnings)
