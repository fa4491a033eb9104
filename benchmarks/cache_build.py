"""Row 8b: row 8's cache build against a plain ``encode_image`` loop over the
same images, in one process, so that a loaded machine slows both alike.

    python benchmarks/cache_build.py [--rounds N] [--work DIR]
    python benchmarks/run.py --rows 8b

One clipft run of row 8's configuration (frozen ViT-B-32 from a local
checkpoint, linear head, 128 train / 64 val images, batch 32) is prepared
once; then, ``ROUNDS`` times, in the order clipft, plain, plain, clipft (each
half of a round pairs one of each, so drift cancels):

- **clipft**: its image stores emptied, the val store filled as evaluation
  fills it (eval mode) and the train store by epoch 0's batches in train mode
  (the head's steps left out): the decode, the frozen forward and the store
  writes, through the provider's own code;
- **plain**: ``torchvision.datasets.ImageFolder`` with the same preprocessing,
  a default ``DataLoader`` at the same batch size, ``model.eval()``,
  ``torch.no_grad()``, ``model.encode_image(images)``: val then train.

The ratio is clipft / plain wall time (median of the pairs; 1.0 is "as fast as
a plain loop"). Next to it, on the same warm process, each side's decode alone
(the loaders iterated without the forward) and the forward alone on one
decoded batch in train mode against eval mode (what filling the train store
in training's mode costs over an eval-mode fill).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Row, now, prepared_run, registry  # noqa: E402

MODEL, BATCH = "ViT-B-32", 32
ROUNDS = int(os.environ.get("CLIPFT_BENCH_ROUNDS", "3"))


def _inputs(work: Path, model: str):
    import open_clip
    import small_data
    from safetensors.torch import save_file

    from clipft.models import register_tiny_configs
    register_tiny_configs()
    data, ckpt = work / "data", work / f"{model}.safetensors"
    if not (data / "val").is_dir():
        small_data.write_data(data)
    if not ckpt.is_file():
        built = open_clip.create_model(model)
        save_file({k: v.contiguous() for k, v in built.state_dict().items()}, str(ckpt))
    return data, ckpt


def measure(reg, work: Path, rounds: int = ROUNDS, model_name: str = MODEL) -> dict:
    import torch
    from torchvision.datasets import ImageFolder

    from clipft.engine.compose import freeze_frozen_norm_stats

    data, ckpt = _inputs(work, model_name)
    run = prepared_run(reg, model=model_name, pretrained=str(ckpt), data=f"imagefolder:root={data}",
                       loss="cross-entropy", head="linear", epochs=1, batch_size=BATCH)
    features, model, loaders = run.features, run.model, run.loaders
    if not hasattr(features, "splits") or set(features.splits) != {"train", "val"}:
        raise RuntimeError(f"row 8's run caches no image stores here: {features.stats}")
    transform = run.bundle.val.transform
    plain_sets = [ImageFolder(str(data / split), transform=transform) for split in ("val", "train")]

    def clipft():
        for split in features.splits.values():
            split.store = None
        model.eval()
        features.val_image_features()
        model.train()
        freeze_frozen_norm_stats(model)
        for _ in features.train_epoch(0):
            pass

    def plain():
        model.eval()
        with torch.no_grad():
            for ds in plain_sets:
                for images, _ in torch.utils.data.DataLoader(ds, batch_size=BATCH):
                    model.encode_image(images)

    def clipft_decode():
        for _ in loaders.val(reuse=False):
            pass
        for _ in loaders.train(0, whole=True):
            pass

    def plain_decode():
        for ds in plain_sets:
            for _ in torch.utils.data.DataLoader(ds, batch_size=BATCH):
                pass

    def timed(fn) -> float:
        t = now()
        fn()
        return now() - t

    def pairs(a, b, n):
        out = []
        for _ in range(n):
            x1, y1 = timed(a), timed(b)
            y2, x2 = timed(b), timed(a)
            out += [(x1, y1), (x2, y2)]
        return out

    plain()      # the process's one-time costs (first-touch memory, kernel set-up) fall on neither side
    build = pairs(clipft, plain, rounds)
    decode = pairs(clipft_decode, plain_decode, rounds)
    batch = next(iter(loaders.val(reuse=False)))["images"]

    def forward(train: bool):
        def go():
            model.train(train)
            with torch.no_grad():
                model.encode_image(batch)
        return go
    modes = pairs(forward(True), forward(False), rounds)
    model.eval()

    def ratio(ps):
        return statistics.median(a / b for a, b in ps)

    return {
        "ratio": ratio(build),
        "clipft_build_s": [a for a, _ in build], "plain_loop_s": [b for _, b in build],
        "decode_ratio": ratio(decode),
        "clipft_decode_s": [a for a, _ in decode], "plain_decode_s": [b for _, b in decode],
        "train_mode_over_eval_mode_forward": ratio(modes),
        "images": len(run.bundle.train) + len(run.bundle.val),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
    }


def run(reg, work) -> list:
    t0 = now()
    work = Path(work) / "cache-build"
    work.mkdir(parents=True, exist_ok=True)
    m = measure(reg, work)
    figures = {k: v for k, v in m.items() if k != "ratio"}
    figures["clipft_build_median_s"] = statistics.median(m["clipft_build_s"])
    figures["plain_loop_median_s"] = statistics.median(m["plain_loop_s"])
    return [Row(id="8b", name=f"row 8's cache build ({m['images']} images, frozen {MODEL}, batch {BATCH}): "
                              "clipft / plain encode_image loop, one process (wall)",
                ratio=m["ratio"], target="<= 1.05", figures=figures, seconds=now() - t0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--model", default=MODEL, help="another open_clip model (e.g. tiny-vit, for a quick check)")
    ap.add_argument("--work", default=None, help="folder for the images and checkpoint (default: a temporary one)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="clipft-cache-build-") as tmp:
        m = measure(registry(), Path(a.work or tmp), a.rounds, a.model)
    print(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
