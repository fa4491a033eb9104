"""Write synthetic shapes as an image folder (one sub-folder per class), for
trying ``imagefolder`` data, few-shot splits and ``clipft predict`` offline.

    python examples/shapes_folder.py OUT [--per-class 16] [--colours purple,orange]
                                         [--shapes circle,square,triangle] [--seed 0] [--size 64]

Images are drawn by the ``shapes`` data source's own generator, so a folder
written here looks like ``--data shapes:...`` with the same colours.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def write_folder(out: Path, per_class: int, colours, shapes, seed: int = 0, size: int = 64) -> list[Path]:
    import numpy as np

    from clipft_data.shapes import COLOURS, SHAPES, draw
    written = []
    for colour in colours:
        if colour not in COLOURS:
            raise SystemExit(f"unknown colour {colour}; choose from {', '.join(COLOURS)}")
        for shape in shapes:
            if shape not in SHAPES:
                raise SystemExit(f"unknown shape {shape}; choose from {', '.join(SHAPES)}")
            folder = out / f"{colour}_{shape}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, _colour_index(colour), SHAPES.index(shape), i])
                path = folder / f"{i:04d}.png"
                draw(colour, shape, rng, size).save(path)
                written.append(path)
    return written


def _colour_index(colour: str) -> int:
    from clipft_data.shapes import COLOURS
    return list(COLOURS).index(colour)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--colours", default="purple,orange")
    ap.add_argument("--shapes", default="circle,square,triangle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args(argv)
    files = write_folder(a.out, a.per_class, a.colours.split(","), a.shapes.split(","), a.seed, a.size)
    print(f"wrote {len(files)} images to {a.out}")


if __name__ == "__main__":
    main()
