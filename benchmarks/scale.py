"""Row 7: how the frozen-tower cache's cost grows with the data, kept in memory
and with ``--cache-dir`` (on disk, memory-mapped).

tiny-vit (the embedded config: 32 px input, 8 px patches, width 64) on the
synthetic ``shapes`` source drawn at 64 px (``shapes:n=N,val_n=16,size=64``;
the model's preprocess resizes to 32 px), a linear head with cross-entropy,
2 epochs at batch 64: the first epoch builds the cache, the second replays it.
Two cuts of the frozen image tower:

- ``tokens``: ``--strategy last-n:n=1``, the cache holds the token sequence
  entering the last ViT block, 17 tokens x 64 floats = 4352 bytes an image
  (70 MB at 16k images);
- ``embedding``: no strategy, the whole tower is frozen and the cache holds
  one 64-float embedding an image (256 bytes, 4 MB at 16k).

For 1k, 4k and 16k training images, each configuration runs once with the
cache in memory and once with a fresh ``--cache-dir``, each in a fresh child
process (this file run as a script), so that every peak RSS is that process's
own high-water mark (``train.peak_rss_mb`` of the run's summary: Linux's
VmHWM, read after training and evaluation). The child also reads
``/proc/self/status`` at the start of training and after every step, epoch and
evaluation, and reports the largest anonymous (RssAnon) and file-backed
(RssFile) resident memory it saw: in memory the cache is anonymous memory, on
disk the mapped file's pages count as RssFile once the process touches them.
For ``tokens`` the 1k and 16k disk runs are repeated on their now-complete
cache directories (``reused``): those runs only read the store (replay), they
do not build it.

The ratio (``tokens``) is the growth of the peak RSS from 1k to 16k images with
``--cache-dir`` over the same growth in memory: 1 when the disk cache costs as
much resident memory as the in-memory one, 0 when it keeps the process flat.
The target ``<= 0.25`` leaves room for what grows either way (captions, labels
and the per-sample status, ~1 MB at 16k) and for a few MB of noise between
processes. ``embedding``'s cache is too small for its growth to rise above that
noise; its figures (under ``embedding``) are for information.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Row, now, python_exe, run_child  # noqa: E402

MODEL, BATCH, EPOCHS, VAL, SIZE = "tiny-vit", 64, 2, 16, 64
SIZES = (1000, 4000, 16000)
CACHES = {
    # name: (strategies, what the cache holds)
    "tokens": (["last-n:n=1"], "the tokens entering the last ViT block"),
    "embedding": ([], "the image embedding (whole tower frozen)"),
}
REUSED = ("tokens", (SIZES[0], SIZES[-1]))


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# -- the child process ----------------------------------------------------------------
def _status_mb() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return out


def _trace_class():
    from clipft.progress import Silent

    class MemoryTrace(Silent):
        """A silent progress reporter that samples this process's resident
        memory at the start of training and after every step, evaluation and
        epoch."""

        def __init__(self):
            self.start: dict = {}
            self.max: dict = {}
            self.epoch_max: list = []

        def _sample(self):
            s = _status_mb()
            for k, v in s.items():
                self.max[k] = max(self.max.get(k, 0.0), v)
                if self.epoch_max:
                    self.epoch_max[-1][k] = max(self.epoch_max[-1].get(k, 0.0), v)

        def on_run_start(self, run):
            self.start = _status_mb()

        def on_epoch_start(self, epoch, epochs, n_batches):
            self.epoch_max.append({})
            self._sample()

        def on_step_end(self, step):
            self._sample()

        def on_eval(self, ev):
            self._sample()

        def on_epoch_end(self, epoch):
            self._sample()

    return MemoryTrace


def child(argv=None) -> None:
    ap = argparse.ArgumentParser(description="row 7's child: one run, one JSON line")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--strategy", action="append", default=[])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)

    from clipft.api import run
    from clipft.config import RunConfig

    t0 = now()
    trace = _trace_class()()
    cfg = RunConfig(model=MODEL, pretrained="none", device="cpu", data=f"shapes:n={a.n},val_n={VAL},size={SIZE}",
                    strategies=a.strategy, loss="cross-entropy", head="linear", epochs=EPOCHS,
                    batch_size=BATCH, cache_dir=a.cache_dir, callbacks=["none"])
    summary = run(cfg, out=Path(a.work) / "run", overwrite=True, progress=trace)
    cache, train = summary.get("cache") or {}, summary["train"]
    print(json.dumps({
        "n": a.n, "location": cache.get("location"), "image_cache": cache.get("image"),
        "peak_rss_mb": train["peak_rss_mb"], "train_seconds": train["seconds"],
        "build_seconds": cache.get("build_seconds"), "cache_bytes": cache.get("bytes"),
        "loaded_from_disk": cache.get("loaded_from_disk"), "image_hits": cache.get("image_hits"),
        "image_misses": cache.get("image_misses"), "at_start": trace.start, "max": trace.max,
        "epoch_max": trace.epoch_max, "child_seconds": now() - t0,
    }))


# -- the row -------------------------------------------------------------------------
def probe(work: Path, name: str, n: int, strategies: list, cache_dir=None) -> dict:
    args = [python_exe(), str(BENCH / "scale.py"), "--n", str(n), "--work", str(work / f"scale-{name}")]
    for s in strategies:
        args += ["--strategy", s]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    t0 = now()
    res = run_child(args, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"scale probe {name} failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = now() - t0
    return out


def _growth(r: dict, key: str) -> float:
    """How much ``key`` (RssAnon, RssFile) grew during training."""
    return r["max"].get(key, float("nan")) - r["at_start"].get(key, float("nan"))


def measure(work: Path, name: str) -> dict:
    """Every size in memory and on disk (and reused, for ``REUSED``): the children's reports."""
    strategies, _ = CACHES[name]
    res = {"memory": {}, "disk": {}, "reused": {}}
    for n in SIZES:
        res["memory"][n] = probe(work, f"{name}-{label(n)}-memory", n, strategies)
        cache_dir = work / f"scale-cache-{name}-{label(n)}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        res["disk"][n] = probe(work, f"{name}-{label(n)}-disk", n, strategies, cache_dir)
        if name == REUSED[0] and n in REUSED[1]:
            res["reused"][n] = probe(work, f"{name}-{label(n)}-reused", n, strategies, cache_dir)
    return res


def run(reg, work) -> list:
    t0 = now()
    work = Path(work)
    results = {name: measure(work, name) for name in CACHES}
    lo, hi = SIZES[0], SIZES[-1]
    L, H = label(lo), label(hi)

    def peaks(runs):
        return {label(n): r["peak_rss_mb"] for n, r in runs.items()}

    def growth(runs):
        return runs[hi]["peak_rss_mb"] - runs[lo]["peak_rss_mb"]

    tok, emb = results["tokens"], results["embedding"]
    mem, disk, reused = tok["memory"], tok["disk"], tok["reused"]
    mem_growth, disk_growth = growth(mem), growth(disk)
    figures = {
        f"growth_{L}_to_{H}_mb": {"memory": mem_growth, "disk": disk_growth,
                                  "cache": (mem[hi]["cache_bytes"] - mem[lo]["cache_bytes"]) / 2**20},
        "peak_rss_mb_memory": peaks(mem),
        "peak_rss_mb_disk": peaks(disk),
        "cache_mb": {label(n): r["cache_bytes"] / 2**20 for n, r in mem.items()},
        "build_s_memory": {label(n): r["build_seconds"] for n, r in mem.items()},
        "build_s_disk": {label(n): r["build_seconds"] for n, r in disk.items()},
        # where the growth sits: anonymous memory or the mapped file's pages
        f"train_growth_{H}_mb": {"memory_anon": _growth(mem[hi], "RssAnon"),
                                 "memory_file": _growth(mem[hi], "RssFile"),
                                 "disk_anon": _growth(disk[hi], "RssAnon"),
                                 "disk_file": _growth(disk[hi], "RssFile")},
        "reused_disk": {**{f"peak_{label(n)}_mb": r["peak_rss_mb"] for n, r in reused.items()},
                        "growth_mb": growth(reused), f"file_growth_{H}_mb": _growth(reused[hi], "RssFile"),
                        f"loaded_from_disk_{H}": reused[hi]["loaded_from_disk"],
                        f"build_s_{H}": reused[hi]["build_seconds"]},
        "embedding": {"cache_mb_" + H: emb["memory"][hi]["cache_bytes"] / 2**20,
                      "growth_memory_mb": growth(emb["memory"]), "growth_disk_mb": growth(emb["disk"]),
                      **{f"peak_memory_{label(n)}_mb": r["peak_rss_mb"] for n, r in emb["memory"].items()},
                      **{f"peak_disk_{label(n)}_mb": r["peak_rss_mb"] for n, r in emb["disk"].items()},
                      f"build_s_memory_{H}": emb["memory"][hi]["build_seconds"],
                      f"build_s_disk_{H}": emb["disk"][hi]["build_seconds"]},
        "child_wall_s_max": max(r["wall_s"] for c in results.values() for k in c.values() for r in k.values()),
        # every child's own report (JSON only)
        "runs": {name: {kind: {label(n): r for n, r in runs.items()} for kind, runs in res.items()}
                 for name, res in results.items()},
    }
    return [Row(
        id="7", name=f"cache cost vs data, {MODEL} {SIZE} px, last-n:n=1 token cache: peak RSS growth "
                     f"{L}->{H} images, --cache-dir / in memory",
        ratio=disk_growth / mem_growth if mem_growth > 0 else float("nan"), target="<= 0.25",
        figures=figures, seconds=now() - t0)]


if __name__ == "__main__":
    child()
