"""A "pretrained" tiny-vit for the prompt-tuning, LoRA and export tests.

Built once per test session by the recipe ``make base`` runs
(``examples/configs/base.toml``: a short contrastive run, ``full``, on the
``shapes`` data with four colours), then exported with ``clipft export``.
The tests tune it on *other* colours (purple, orange), a task it was not
trained for, and check that zero-shot top-1 improves.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the recipe (``make base`` runs the same file)
BASE_CONFIG = ROOT / "examples" / "configs" / "base.toml"
#: the base's own concepts (its val split is the control set for forgetting)
BASE_DATA = "shapes:n=1536,val_n=96,colours=red,green,blue,yellow,shapes=circle,square,triangle"
NOVEL_DATA = "shapes:n=512,val_n=96,seed=1,colours=purple,orange,shapes=circle,square,triangle"
SMALL_NOVEL = "shapes:n=64,val_n=32,seed=1,colours=purple,orange,shapes=circle,square,triangle"

_cache: dict = {}


def wanted(zero_shot: float, margin: float, level: float) -> float:
    """The top-1 a method tuned on the novel colours must reach: ``margin`` over
    zero-shot, or ``level`` on a base whose zero-shot already sits near it.

    The base is 4 chaotic epochs of training, so it differs from one CPU (and
    kernel path, and thread count) to the next, and its zero-shot top-1 on
    colours it never saw is luck. Over 12 bases (seeds 0-5, AVX-512 and AVX2
    ATen kernels, one thread as the tests run: ``tests/base_survey.py``) it
    was 0.00-0.35 on eleven and 0.65 on one (seed 0, AVX2). That
    one's image features barely tell purple from orange: every method ended at
    0.51-0.69 there, near zero-shot, while on the other eleven they gained
    0.08-0.73. A gain asked on that base is not there to take; a level a tuned
    model reaches on every base is.
    """
    return min(zero_shot + margin, level)


def base_checkpoint(tmp_path_factory) -> dict:
    """``{"run": run dir, "export": export dir, "weights": .safetensors, "top1": base top-1}``."""
    if "base" in _cache:
        return _cache["base"]
    from click.testing import CliRunner

    from clipft.cli import cli

    root = tmp_path_factory.mktemp("peft-base")
    run_dir, export_dir = root / "run", root / "export"
    runner = CliRunner()
    res = runner.invoke(cli, ["run", "--config", str(BASE_CONFIG), "--callback", "none",
                              "--out", str(run_dir), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    res = runner.invoke(cli, ["export", str(run_dir), str(export_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _cache["base"] = {"run": run_dir, "export": export_dir,
                      "weights": export_dir / "open_clip_model.safetensors",
                      "top1": summary["eval"]["after"]["top1"]}
    return _cache["base"]
