"""The run directory contract: config.toml, metrics.jsonl, summary.json, checkpoint/."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from clipft.errors import ClipftUsageError

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoint")


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_out_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ClipftUsageError(f"--out {path} exists and is not a directory")
    if holds_run(path) and not overwrite:
        raise ClipftUsageError(
            f"--out {path} already holds a run; choose another directory, "
            "pass --overwrite to replace it, or --resume it")


def start_run_dir(path: Path, overwrite: bool) -> None:
    check_out_dir(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for f in RUN_FILES + ("checkpoint.tmp", "checkpoint.old"):
            p = path / f
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def default_run_dir(model: str, strategies) -> Path:
    tag = "+".join(s.name for s in strategies) or "probe"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model.replace('/', '_')}-{tag}"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
