"""Component references (``name:k=v,...``) and option validation.

Options of every component are an attrs class. The same validation serves the
command line (strings to coerce) and TOML tables (already typed values).
"""
from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import attrs

from clipft.errors import ClipftUsageError


@attrs.frozen
class ComponentRef:
    """A component chosen by the user: its name and raw option values."""

    name: str
    options: dict = attrs.field(factory=dict, converter=dict)

    def to_table(self) -> dict:
        return {"name": self.name, **self.options}


def parse_ref(text: str) -> ComponentRef:
    """Parse ``name`` or ``name:k=v,k2=v2``.

    A comma-separated item with no ``=`` continues the previous value, so list
    options can be written inline: ``lora:targets=q,k,v,r=4``.
    """
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ClipftUsageError(f"empty component name in '{text}'")
    options: dict[str, str] = {}
    last = None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key:
                raise ClipftUsageError(f"empty option key in '{text}'")
            if key in options:   # which one was meant? refuse rather than keep the last
                raise ClipftUsageError(f"option '{key}' is given twice in '{text}'")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] += "," + item
        else:
            raise ClipftUsageError(
                f"option '{item}' in '{text}' has no value; write it as key=value")
    return ComponentRef(name, options)


#: table files the ``captions`` source reads (clipft.datafiles.TABLE_SUFFIXES)
CAPTION_TABLES = (".csv", ".tsv", ".jsonl")


def _looks_like_path(name: str) -> bool:
    """A data "name" that can only be a path: it has a separator, starts like
    one (``.``, ``~``) or ends in a file extension; registered names never do."""
    return ("/" in name or "\\" in name or name.startswith(("~", ".")) or
            Path(name).suffix.lower() in CAPTION_TABLES + (".parquet",))


def data_ref(ref: ComponentRef) -> ComponentRef:
    """``--data PATH``: a bare directory means ``imagefolder:root=PATH``, a
    CSV/TSV/JSONL file ``captions:file=PATH``. The one place where a data
    reference given as a path is resolved (run, plan, sweep and eval all pass
    here); any other path-looking name is an error giving the spelling to use."""
    name = ref.name
    if ref.options or not _looks_like_path(name):
        return ref
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        raise ClipftUsageError(
            f"--data {name}: a Parquet file is read by the hf source (Hugging Face datasets): --data "
            f"hf:path={name}; the captions source reads {', '.join(s[1:].upper() for s in CAPTION_TABLES)} "
            "files (--data captions:file=PATH.csv)")
    if path.is_dir():
        return ComponentRef("imagefolder", {"root": name})
    if suffix in CAPTION_TABLES:
        if not path.is_file():
            raise ClipftUsageError(f"--data {name}: no such file")
        return ComponentRef("captions", {"file": name})
    if path.exists():
        raise ClipftUsageError(
            f"--data {name}: a file, but not a {'/'.join(CAPTION_TABLES)} table; give a folder of class "
            "sub-folders (imagefolder:root=PATH) or an image-caption table (captions:file=PATH.csv)")
    raise ClipftUsageError(
        f"--data {name}: no such directory or file; for a folder of class sub-folders write "
        f"--data imagefolder:root={name}, for an image-caption table --data captions:file={name}")


def parse_data_ref(text: str) -> ComponentRef:
    """:func:`parse_ref` for ``--data``: a bare path resolves (:func:`data_ref`)."""
    return data_ref(parse_ref(text))


def ref_from_table(table: Any, where: str) -> ComponentRef:
    """A TOML table ``{name = "...", k = v}`` (or a bare string) to a ref."""
    if isinstance(table, str):
        return parse_ref(table)
    if not isinstance(table, dict) or "name" not in table:
        raise ClipftUsageError(f"{where} must be a string or a table with a 'name' key")
    opts = {k: v for k, v in table.items() if k != "name"}
    return ComponentRef(str(table["name"]), opts)


def _fields(options_cls: type):
    attrs.resolve_types(options_cls)
    return attrs.fields(options_cls)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(type_name(a) for a in args) + " | none"
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0]) if args else 'str'}]"
    return getattr(tp, "__name__", str(tp))


#: an int option is a 64-bit signed integer; an option with a sane maximum
#: (a data set size, an image side) says so in its own validator
INT_LIMIT = 2**63
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, tp: Any) -> Any:
    """Coerce a CLI string (or check a TOML value) against a field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ValueError(f"must be one of {', '.join(map(str, choices))}")
    if tp in (list, tuple):
        origin = tp
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (str,)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError("must be a list")
        out = [_coerce(v.strip() if isinstance(v, str) else v, item_tp) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be an integer")
        number = int(value)
        if not -INT_LIMIT <= number < INT_LIMIT:
            raise ValueError("out of range: an integer option must fit in 64 bits")
        return number
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except OverflowError:    # float(10**400)
            number = math.inf
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError("must be a string")
        return str(value)
    return value


def build_options(kind: str, spec, raw: dict) -> Any:
    """Validate raw option values against ``spec.options``; raise a usage error
    that names the key and lists the valid keys."""
    fields = {f.name: f for f in _fields(spec.options)}
    valid = ", ".join(fields) or "(none)"
    values = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise ClipftUsageError(
                f"{kind} '{spec.name}' has no option '{key}'. Valid options: {valid}")
        try:
            values[key] = _coerce(value, f.type)
        except (ValueError, TypeError) as exc:
            raise ClipftUsageError(
                f"bad value {value!r} for option '{key}' of {kind} '{spec.name}' "
                f"(expected {type_name(f.type)}): {exc}. Valid options: {valid}") from None
    missing = [f for name, f in fields.items() if f.default is attrs.NOTHING and name not in values]
    if missing:
        f = missing[0]
        what = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
        raise ClipftUsageError(
            f"{kind} '{spec.name}' needs option '{f.name}'{what}, e.g. "
            f"{spec.name}:{f.name}=VALUE. Valid options: {valid}")
    try:
        return spec.options(**values)
    except (ValueError, TypeError) as exc:
        raise ClipftUsageError(
            f"invalid options for {kind} '{spec.name}': {exc}. Valid options: {valid}") from None


def describe_options(spec) -> list[dict]:
    rows = []
    for f in _fields(spec.options):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        rows.append({
            "name": f.name,
            "type": type_name(f.type),
            "default": default if default is not attrs.NOTHING else None,
            "required": default is attrs.NOTHING,
            "help": f.metadata.get("help", ""),
        })
    return rows


# -- attrs validators the plugins' option classes share ---------------------------
def at_least_one(inst, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def positive(inst, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def non_negative(inst, attribute, value):
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def init_text(value):
    """Converter for a prompt's initial words: ``none``, ``random`` or empty mean
    random context vectors (``None``); anything else is the text, stripped."""
    if value is None:
        return None
    value = str(value).strip()
    return None if value.lower() in ("", "none", "random") else value


def unit_fraction(inst, attribute, value):
    """In [0, 1): a dropout probability, a decay."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value}")


def options_to_dict(opts: Any) -> dict:
    return attrs.asdict(opts, recurse=False) if attrs.has(type(opts)) else {}
