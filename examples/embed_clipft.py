"""Embedding clipft in your own code: build a run from a config object, register
a plugin in-process (no entry point, no install) and get the summary back.

    python examples/embed_clipft.py
"""
import sys
import tempfile

import attrs
import torch

import clipft
from clipft.api import RunConfig, run
from clipft.specs import Selection, StrategySpec


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


def main(out_dir: str) -> dict:
    config = RunConfig(
        model="tiny-vit",
        data="shapes:n=128,val_n=64",
        strategies=["norms:tower=vision"],
        loss="contrastive",
        epochs=1,
        batch_size=32,
    )
    return run(config, plugins=[InHousePlugin()], out=out_dir)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="clipft-embed-")
    summary = main(out)
    print(f"trained {summary['params']['trainable']} of {summary['params']['total']} parameters;"
          f" top1 {summary['eval']['before'].get('top1'):.3f} -> {summary['eval']['after'].get('top1'):.3f}"
          f"; run dir {out}")
