"""The README's "From fine-tune to production" walkthrough runs as written.

``make base`` is replaced by the session's base (tests/peft_base.py builds it
from the same examples/configs/base.toml that the Makefile's ``base`` target
runs); every other line runs unchanged in bash, in a scratch folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peft_base import BASE_CONFIG, base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- walkthrough -->"


def walkthrough_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    return [ln.split("  #")[0].rstrip() for ln in block.splitlines() if ln.strip()]


def test_make_base_runs_the_recipe_the_tests_use():
    lines = walkthrough_lines()
    assert lines[0] == "make base"
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\nbase:"):].split("\n\n")[0]
    assert str(BASE_CONFIG.relative_to(ROOT)) in target
    assert "runs/base-export" in target and "runs/base-export/open_clip_model.safetensors" in lines[1]


def test_the_walkthrough_runs(tmp_path_factory, tmp_path):
    base = base_checkpoint(tmp_path_factory)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "base-export").symlink_to(base["export"])
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = "set -euo pipefail\n" + "\n".join(walkthrough_lines()[1:]) + "\n"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               COLUMNS="160")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "WiSE-FT" in out and "balanced_accuracy" in out
    assert (tmp_path / "runs" / "task" / "summary.json").is_file()
    assert (tmp_path / "runs" / "task-wise" / "open_clip_model.safetensors").is_file()
    predictions = [ln for ln in out.splitlines() if ln.startswith("runs/images/")]
    assert len(predictions) == 12 and all(len(ln.split("\t")[1].split("  ")) == 3 for ln in predictions)
