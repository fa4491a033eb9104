"""Embedding clipft in your own code: train from a config object with a plugin
registered in-process (no entry point, no install), evaluate the run, then load
it and classify images, all from Python. Offline, a few seconds on a CPU:

    python examples/embed_clipft.py [RUN_DIR]
"""
import sys
import tempfile

import attrs
import numpy as np
import torch

import clipft
from clipft.api import RunConfig, evaluate, run
from clipft.specs import Selection, StrategySpec
from clipft_data.shapes import draw    # the generator behind --data shapes, to draw test images


@attrs.frozen
class NormsOptions:
    tower: str = attrs.field(default="vision", metadata={"help": "vision or text"})


class TrainNorms(clipft.Strategy):
    """Our team's in-house strategy: only LayerNorm affine parameters train."""

    def __init__(self, opts):
        self.prefix = "visual." if opts.tower == "vision" else ""
        self.vision = opts.tower == "vision"

    def apply(self, model, ctx):
        params = [(n, p) for m_name, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) and m_name.startswith("visual") == self.vision
                  for n, p in ((f"{m_name}.{k}", v) for k, v in m.named_parameters())]
        return [Selection("norms", params)]


class InHousePlugin:
    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(StrategySpec(name="norms", summary="LayerNorm parameters only",
                              options=NormsOptions, build=TrainNorms, default_lr=1e-3))


def train(out_dir: str) -> dict:
    """Train; returns summary.json's dict."""
    config = RunConfig(
        model="tiny-vit",
        data="shapes:n=128,val_n=64",
        strategies=["norms:tower=vision"],
        loss="contrastive",
        epochs=1,
        batch_size=32,
    )
    return run(config, plugins=[InHousePlugin()], out=out_dir)


def main(out_dir: str) -> dict:
    summary = train(out_dir)
    # what `clipft eval RUN --json` prints; a run is evaluated on its own val split.
    # The in-house strategy is needed again to rebuild the run's model
    report = evaluate(out_dir, plugins=[InHousePlugin()])
    model = clipft.load(out_dir, plugins=[InHousePlugin()], device="cpu")
    rng = np.random.default_rng(0)
    wanted = ["red circle", "blue square", "green triangle"]
    images = [draw(*name.split(), rng, 64) for name in wanted]    # PIL images (file paths work too)
    probs = model.classify(images)                                # [3, len(model.classes)], rows sum to 1
    return {"summary": summary, "report": report, "classes": model.classes,
            "wanted": wanted, "probs": probs, "image_features": model.encode_image(images)}


def show(result: dict, out_dir: str) -> None:
    summary, report = result["summary"], result["report"]
    print(f"trained {summary['params']['trainable']} of {summary['params']['total']} parameters;"
          f" top1 {summary['eval']['before'].get('top1'):.3f} -> {summary['eval']['after'].get('top1'):.3f}"
          f"; run dir {out_dir}")
    print(f"evaluated on {report['samples']} images of {report['data']}: top1 {report['metrics']['top1']:.3f}")
    for name, row in zip(result["wanted"], result["probs"]):
        best = int(row.argmax())
        print(f"a {name}: {result['classes'][best]} ({float(row[best]):.2f})")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="clipft-embed-")
    show(main(out), out)
