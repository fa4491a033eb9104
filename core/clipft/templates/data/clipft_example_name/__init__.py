"""clipft data source `example-name`: synthetic colour swatches, one class per colour
(a noisy square of that colour), captioned "a swatch of COLOUR.", made from a seed.

``build(options, ctx)`` gets a clipft.data.DataContext (the model's transforms and
the run's seed) and returns a clipft.data.DataBundle whose datasets yield
``(index, image_tensor, caption, label)``.
"""
import attrs

from clipft import hookimpl, DataSourceSpec

NAME = "example-name"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220),
           "yellow": (235, 215, 40), "purple": (140, 50, 170), "orange": (245, 140, 20)}
TEMPLATE = "a swatch of {}."


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class ExampleNameOptions:
    n: int = attrs.field(default=256, validator=_positive, metadata={"help": "training images"})
    val_n: int = attrs.field(default=64, validator=_positive, metadata={"help": "validation images"})
    size: int = attrs.field(default=32, validator=_positive, metadata={"help": "image side in pixels"})
    seed: int = attrs.field(default=0, metadata={"help": "generator seed"})


class Swatches:
    def __init__(self, n, seed, split, size, transform):
        self.n, self.seed, self.split, self.size, self.transform = n, seed, split, size, transform
        self.names = list(COLOURS)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng([self.seed, self.split, i])
        label = int(rng.integers(len(self.names)))
        colour = np.array(COLOURS[self.names[label]])
        pixels = colour + rng.integers(-25, 26, size=(self.size, self.size, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype("uint8"), "RGB")
        return i, self.transform(image), TEMPLATE.format(self.names[label]), label


def build(opts: ExampleNameOptions, ctx):
    from clipft.data import DataBundle

    return DataBundle(
        train=Swatches(opts.n, opts.seed, 0, opts.size, ctx.transform_train),
        val=Swatches(opts.val_n, opts.seed, 1, opts.size, ctx.transform_val),
        classnames=list(COLOURS), templates=(TEMPLATE,), has_captions=True,
        description=f"{NAME} n={opts.n} seed={opts.seed}")


@hookimpl
def clipft_register_data_sources(register):
    register(DataSourceSpec(
        name=NAME,
        summary="Synthetic colour swatches, one class per colour.",
        options=ExampleNameOptions,
        build=build,
    ))
