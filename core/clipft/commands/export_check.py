"""Reading an export that may be damaged or foreign: the manifest checked field
by field, and every file read under :func:`blame`, so that ``clipft eval``,
``clipft predict`` and ``clipft.load`` name the file and what is wrong (a usage
error) instead of failing somewhere inside open_clip or safetensors."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from clipft.errors import ClipftError, ClipftUsageError


def _bad(path: Path, what: str) -> ClipftUsageError:
    return ClipftUsageError(f"{path}: {what}; export the run again (clipft export RUN OUT)")


def _strings(path: Path, key: str, value, allow_empty: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, f"'{key}' must be a list of strings, got {json.dumps(value)[:60]}")
    if not allow_empty and (not value or any(not v.strip() for v in value)):
        raise _bad(path, f"'{key}' must hold non-empty names (one is empty)" if value
                   else f"'{key}' is an empty list")


def _outside(name: str) -> bool:
    return Path(name).is_absolute() or ".." in Path(name).parts


def read_manifest(path: Path) -> dict:
    """The manifest at ``path`` (clipft_export.json), or a usage error saying
    which field is malformed."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClipftUsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _bad(path, f"expected a JSON object, got {type(doc).__name__}")
    extras = doc.get("extras", [])
    if not isinstance(extras, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] for e in extras):
        raise _bad(path, "'extras' must be a list of objects, each with a 'file'")
    for e in extras:
        if _outside(e["file"]):
            raise _bad(path, f"extras file {e['file']!r} is not a file name inside the export")
    head = doc.get("head")
    if head is not None and not (isinstance(head, dict) and isinstance(head.get("name"), str)
                                 and isinstance(head.get("options", {}), dict)
                                 and isinstance(head.get("file", ""), (str, type(None)))):
        raise _bad(path, "'head' must be an object with a 'name' (and 'options', 'file')")
    if head is not None and head.get("file") and _outside(head["file"]):
        raise _bad(path, f"head file {head['file']!r} is not a file name inside the export")
    _strings(path, "classnames", doc.get("classnames"))
    _strings(path, "templates", doc.get("templates"), allow_empty=True)
    if doc.get("templates"):
        from clipft.data import check_templates
        try:
            check_templates(doc["templates"])
        except ValueError as exc:
            raise _bad(path, f"'templates': {exc}") from None
    if not isinstance(doc.get("seed", 0), int):
        raise _bad(path, f"'seed' must be an integer, got {json.dumps(doc['seed'])[:40]}")
    return {**doc, "extras": extras}


def check_config(path: Path) -> None:
    """open_clip_config.json: a JSON object with a ``model_cfg`` object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(path, "missing (an export holds open_clip_config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"not valid JSON ({_reason(exc)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg"), dict):
        raise _bad(path, "expected a JSON object with a 'model_cfg' object")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def blame(path: Path, what: str = "is damaged or not what this export needs"):
    """Reading ``path``: a failure other than clipft's own becomes a usage
    error naming the file (a truncated or foreign .safetensors, tensors of
    another shape, a config open_clip cannot build)."""
    try:
        yield
    except (ClipftError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:   # safetensors, open_clip and torch raise many types here
        raise _bad(path, f"{what} ({_reason(exc)})") from None
