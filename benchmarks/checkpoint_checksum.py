"""What the checkpoint checksums cost on ViT-B-32, measured side by side in one
process: a full fine-tune checkpoint (every weight plus AdamW's two moments,
as the checkpointer writes them) is written, then hashed (SHA-256, as
clipft.engine.checkpoint.file_digest does after each write), and compared with
one full fine-tune training step at batch 32 on the same machine.

    python benchmarks/checkpoint_checksum.py [--steps 3]

Prints one JSON document: bytes written, seconds to write, to hash, the median
step, and the ratios hash/write and hash/step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    args = ap.parse_args(argv)

    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipft.engine.checkpoint import file_digest

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(32, 3, size, size)
    text = torch.randint(0, 49408, (32, 77))
    step_times = []
    for _ in range(args.steps + 1):        # the first step warms up (and creates AdamW's moments)
        t = time.perf_counter()
        img, txt, scale = model(images, text)
        logits = scale * img @ txt.T
        labels = torch.arange(32)
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - t)
    step = statistics.median(step_times[1:])

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        t = time.perf_counter()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        moments = {}
        for i, p in enumerate(model.parameters()):
            st = opt.state[p]
            moments[f"optim.{i}.exp_avg"] = st["exp_avg"]
            moments[f"optim.{i}.exp_avg_sq"] = st["exp_avg_sq"]
        save_file(moments, str(folder / "optimizer.safetensors"))
        write = time.perf_counter() - t
        files = sorted(folder.iterdir())
        total = sum(f.stat().st_size for f in files)
        t = time.perf_counter()
        for f in files:
            file_digest(f)
        digest = time.perf_counter() - t
    out = {"model": args.model, "bytes": total, "write_s": round(write, 3), "sha256_s": round(digest, 3),
           "sha256_GB_per_s": round(total / digest / 1e9, 2), "step_s": round(step, 3),
           "sha256_over_write": round(digest / write, 3), "sha256_over_step": round(digest / step, 3),
           "torch_threads": torch.get_num_threads()}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
