"""``shapes``: synthetic coloured shapes with captions, fully offline.

Each image shows one shape in one colour at a random position and size on a
noisy background; its caption is "a photo of a {colour} {shape}." and its class
is "{colour} {shape}". Images are generated on access from (seed, split, index),
so the data set is deterministic and costs no memory.
"""
from __future__ import annotations

import attrs

from clipft.data import DataBundle, keep_classes
from clipft.options import non_negative

from clipft_data.common import classes_field, merge_split_record


COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 50, 170), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEMPLATE = "a photo of a {}."


def _names(value, known, what):
    items = tuple(v.strip() for v in (value.split(",") if isinstance(value, str) else value))
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return items


#: documented maxima: images are drawn on access, so a large n costs no memory,
#: but the sampler's permutation does (8 bytes a sample); past these it is a typo
MAX_IMAGES = 10_000_000
MAX_SIZE = 1024


def _between(low, high):
    def check(inst, attribute, value):
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be from {low} to {high:_}, got {value}")
    return check


@attrs.frozen
class ShapesOptions:
    n: int = attrs.field(default=512, validator=_between(1, MAX_IMAGES), metadata={
        "help": f"training images (at most {MAX_IMAGES:_})"})
    # numpy's SeedSequence takes any non-negative int (options are 64-bit already)
    seed: int = attrs.field(default=0, validator=non_negative, metadata={
        "help": "generator seed (>= 0)"})
    val_n: int = attrs.field(default=128, validator=_between(1, MAX_IMAGES), metadata={
        "help": f"validation images (at most {MAX_IMAGES:_})"})
    size: int = attrs.field(default=64, validator=_between(1, MAX_SIZE), metadata={
        "help": f"image side in pixels (at most {MAX_SIZE})"})
    colours: tuple = attrs.field(default=("red", "green", "blue"),
                                 converter=lambda v: _names(v, COLOURS, "colours"),
                                 metadata={"help": f"colours to use ({', '.join(COLOURS)})"})
    shapes: tuple = attrs.field(default=("circle", "square", "triangle"),
                                converter=lambda v: _names(v, SHAPES, "shapes"),
                                metadata={"help": f"shapes to use ({', '.join(SHAPES)})"})
    classes: str = classes_field()


def draw(colour, shape, rng, size):
    import numpy as np
    from PIL import Image, ImageDraw

    bg = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    r = int(rng.uniform(0.18, 0.32) * size)
    cx, cy = (int(rng.uniform(r, size - r)) for _ in range(2))
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLOURS[colour], jitter))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


class ShapesDataset:
    def __init__(self, classes, n, seed, split, size, transform):
        self.classes, self.n, self.seed, self.split = classes, n, seed, split
        self.size, self.transform = size, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np
        rng = np.random.default_rng([self.seed, self.split, i])
        label = int(rng.integers(len(self.classes)))
        colour, shape = self.classes[label]
        img = draw(colour, shape, rng, self.size)
        return i, self.transform(img), TEMPLATE.format(f"{colour} {shape}"), label


def build_shapes(opts: ShapesOptions, ctx) -> DataBundle:
    pairs = [(c, s) for c in opts.colours for s in opts.shapes]
    all_names = [f"{c} {s}" for c, s in pairs]
    # the halves split the "{colour} {shape}" names; images are drawn from the kept classes only
    kept = keep_classes(all_names, opts.classes)
    classes, names = [pairs[i] for i in kept], [all_names[i] for i in kept]
    return DataBundle(
        train=ShapesDataset(classes, opts.n, opts.seed, 0, opts.size, ctx.transform_train),
        val=ShapesDataset(classes, opts.val_n, opts.seed, 1, opts.size, ctx.transform_val),
        classnames=names, templates=(TEMPLATE,), has_captions=True,
        description=f"shapes n={opts.n} seed={opts.seed}"
        + (f" ({opts.classes} classes)" if opts.classes != "all" else ""),
        split=merge_split_record(None, all_names, opts.classes))
