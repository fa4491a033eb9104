"""Row onnx: image encoding on CPU, onnxruntime / torch eager (images/s).

The image encoder of ``clipft export --format onnx`` (the same wrapper and the
same TorchScript exporter, :mod:`clipft.commands.onnx_export`) against the
torch model it was traced from, ViT-B-32 with random init (the weights do not
change the cost), batch 32, fp32, both on the threads torch uses. Batches
alternate between the two sides (one onnxruntime batch, then one torch batch),
so a busy machine slows both alike; one untimed batch each runs first. The
ratio is the median of the per-pair ratios.

    python benchmarks/onnx_cpu.py [--model tiny-vit --iters 2]   # a quick check that it runs
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL, BATCH, ITERS = "ViT-B-32", 32, 10


def measure(work: Path, model_name: str = MODEL, batch: int = BATCH, iters: int = ITERS) -> dict:
    import torch

    from clipft.commands.onnx_export import _Images, _session, _trace, require_onnx
    from clipft.models import load_model
    from common import median, now

    ort = require_onnx()
    loaded = load_model(model_name, "none", device="cpu")
    model = loaded.model.eval().requires_grad_(False)
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    wrapper = _Images(model).eval()
    path = Path(work) / "image_encoder.onnx"
    with torch.no_grad():
        _trace(wrapper, (images[:2],), path, ["pixel_values"], ["image_embeds"], "image encoder")
    sess = _session(ort, path)
    feed = {"pixel_values": images.numpy()}
    ours, theirs = [], []
    with torch.no_grad():
        sess.run(None, feed)
        wrapper(images)
        for _ in range(iters):
            t = now()
            sess.run(None, feed)
            ours.append(now() - t)
            t = now()
            wrapper(images)
            theirs.append(now() - t)
    return {"model": model_name, "batch": batch, "iters": iters, "threads": torch.get_num_threads(),
            "onnxruntime_images_per_s": batch / median(ours), "torch_images_per_s": batch / median(theirs),
            "ratio": median([b / a for a, b in zip(ours, theirs)]), "onnxruntime": ort.__version__,
            "torch": torch.__version__}


def run(reg, work) -> list:
    from common import Row, now
    t0 = now()
    f = measure(Path(work))
    return [Row(id="onnx", name=f"{MODEL} image encoding, batch {BATCH}, CPU: onnxruntime / torch eager "
                                f"(images/s)", ratio=f.pop("ratio"), target="info", figures=f,
                seconds=now() - t0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--iters", type=int, default=ITERS)
    a = ap.parse_args(argv)
    import json
    with tempfile.TemporaryDirectory(prefix="clipft-onnx-bench-") as tmp:
        print(json.dumps(measure(Path(tmp), a.model, a.batch, a.iters), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
