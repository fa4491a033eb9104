"""Row 6: step time of ``last-n`` (image tower) for n = 1, 2, 4, 8, 12 on
ViT-B-32, batch 16, cross-entropy with a linear head (the text tower is not
needed, so none runs).

``live`` (``--no-cache``) shows autograd stopping at the first trainable
block: every step runs all 12 blocks forward, but backward only through the
last n, so the step time grows with n from a forward-only floor (``n = 0``:
the head alone). ``cached`` is clipft's default: the frozen prefix (embeddings
and the first 12 - n blocks) is computed in the first epoch and replayed from
the second on (measured there), so a step costs only the n trainable blocks,
forward and backward. The ratio is
t(12) / t(1) of the live runs; a graph kept through the frozen prefix would
flatten it (backward through all 12 blocks at every n).
"""
from __future__ import annotations

from common import BENCH, ClipftEpochs, Row, median, now

MODEL, BATCH, STEPS = "ViT-B-32", 16, 2
NS = (1, 2, 4, 8, 12)


def step_time(reg, work, n: int, cache: bool) -> float:
    """Median step time; with the cache, of the second epoch (the first one
    fills the cache as it goes and costs what a live epoch costs)."""
    strategies = [f"last-n:n={n},tower=vision"] if n else []
    rounds = 2 if cache else 1
    ours = ClipftEpochs(reg, work / f"last-n-{n}-{cache}", rounds, STEPS, BATCH, model=MODEL,
                        strategies=strategies, loss="cross-entropy", head="linear", cache=cache)
    for _ in range(rounds - 1):
        ours.round()
    return median(ours.round().step_times())


def plot(live: dict, cached: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(live), list(live.values()), "o-", label="live (--no-cache): autograd from block 12-n")
    ax.plot(list(cached), list(cached.values()), "s-", label="cached frozen prefix (default)")
    ax.set_xlabel("n (trainable last blocks of the image tower)")
    ax.set_ylabel("seconds per step")
    ax.set_title(f"last-n step time, {MODEL}, batch {BATCH}, 2 CPU cores")
    ax.set_xticks([0, *NS])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(reg, work) -> list:
    t0 = now()
    live = {0: step_time(reg, work, 0, cache=False)}
    cached = {}
    for n in NS:
        live[n] = step_time(reg, work, n, cache=False)
        # n = 12: every block trains, nothing is left to cache (the run is live)
        cached[n] = step_time(reg, work, n, cache=True) if n < 12 else live[n]
    png = BENCH / "last_n.png"
    plot(live, cached, png)
    ordered = [live[n] for n in NS]
    monotonic = all(b >= a * 0.97 for a, b in zip(ordered, ordered[1:]))
    return [Row(
        id="6", name=f"last-n step time, {MODEL} bs{BATCH}: t(n=12) / t(n=1), live; grows with n",
        ratio=live[12] / live[1], target=">= 1.5",
        figures={"live_step_s": {str(k): v for k, v in live.items()},
                 "cached_step_s": {str(k): v for k, v in cached.items()},
                 "live_monotonic_in_n": monotonic, "plot": str(png.relative_to(BENCH.parent))},
        note="" if monotonic else "live step time not monotonic in n (noise?)",
        seconds=now() - t0)]
