"""CLIP-Adapter's modules; imported by :meth:`clipft_clip_adapter.ClipAdapter.apply`,
so that importing the plugin does not import torch."""
from __future__ import annotations

import math

import torch
from torch import nn

import clipft

from clipft_clip_adapter import IMAGE_FILE, TEXT_FILE


class ResidualAdapter(clipft.InsertedModule, nn.Module):
    """``x -> ratio * relu(relu(x @ down) @ up) + (1 - ratio) * x``."""

    file = ""

    def __init__(self, dim: int, hidden: int, ratio: float, seed: int, options: dict):
        super().__init__()
        self.ratio = float(ratio)
        self.options = dict(options)
        # nn.Linear's own initialisation (Kaiming-uniform, a=sqrt(5)), as the
        # paper's adapter has, but from a generator of its own so that the
        # run's global random stream is left alone
        with torch.random.fork_rng(devices=[]):
            self.down = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(hidden, dim, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.down, self.up):
                w = torch.empty(layer.weight.shape)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
                layer.weight.copy_(w)

    def forward(self, x):
        adapted = torch.relu(self.up(torch.relu(self.down(x))))
        return self.ratio * adapted + (1.0 - self.ratio) * x

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"

    def export_info(self) -> dict:
        # load_export rebuilds strategy "clip-adapter" with these options (once,
        # for both files when both embeddings are adapted) and loads the tensors
        return {"file": self.file, "strategy": "clip-adapter", "options": self.options}


class ImageAdapter(ResidualAdapter):
    enters = "image-embedding"
    file = IMAGE_FILE


class TextAdapter(ResidualAdapter):
    enters = "text-embedding"
    file = TEXT_FILE
