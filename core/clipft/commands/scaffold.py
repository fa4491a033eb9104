"""``clipft new KIND NAME [--dir D]``: write a complete plugin distribution
(pyproject, package, README, tests) into D, default ``./clipft-NAME``; right
after scaffolding, ``pip install -e D && pytest D`` passes.

The files come from package data, ``clipft/templates``: ``common/`` (pyproject,
README) and ``KIND/`` (the package and its tests). They are a real plugin named
:data:`PLACEHOLDER`, so linters, formatters and tests read them as they are.
Writing one for NAME renames each spelling of the placeholder (see
:func:`spellings`) in paths and text: ``example-name`` (the component, also in
``clipft-example-name``), ``example_name`` (``clipft_example_name``,
``tests/test_example_name.py``) and ``ExampleName`` (class names). Before that,
the common files' ``@kind@``, ``@summary@`` and ``@usage@`` are filled from
``templates/kinds.json``; the renaming comes second because a summary or a usage
line may name the component.
"""
from __future__ import annotations

import json
import keyword
import re
from importlib import resources
from pathlib import Path
from typing import Optional

from clipft import kinds
from clipft.errors import ClipftUsageError

#: a component name: lower case letters and digits, words joined by single hyphens
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
#: the component name the templates are written for
PLACEHOLDER = "example-name"
#: the templates' file types; pyproject.toml's package-data globs must match them
SUFFIXES = (".py", ".toml", ".md")
#: the common files' per-kind fields, from templates/kinds.json
FIELD_RE = re.compile(r"@(kind|summary|usage)@")


def templates():
    """The template folder (a Traversable: it may live inside a zip)."""
    return resources.files("clipft") / "templates"


def check_name(name: str) -> None:
    """A usage error unless ``name`` can name a component, an entry point and
    (with underscores) a Python package."""
    if name.startswith("clipft-") or name.startswith("clipft_"):
        raise ClipftUsageError(f"invalid NAME '{name}': give the component's name without the "
                               f"clipft- prefix (the distribution becomes clipft-{name[7:] or 'NAME'})")
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise ClipftUsageError(
            f"invalid NAME '{name}': use lower-case letters and digits, starting with a letter, "
            "words joined by single hyphens (e.g. my-adapter)")


def spellings(name: str) -> tuple:
    """``(component name, Python spelling, CamelCase stem)`` of ``name``."""
    return name, name.replace("-", "_"), "".join(part.capitalize() for part in name.split("-"))


def renamer(name: str):
    """A function renaming the placeholder to ``name`` in a string, every
    spelling in one pass, so a replacement is never renamed again."""
    table = dict(zip(spellings(PLACEHOLDER), spellings(name)))
    pattern = re.compile("|".join(map(re.escape, table)))
    return lambda text: pattern.sub(lambda m: table[m.group()], text)


def template_files(folder, prefix: str = ""):
    """``(relative path, text)`` of every template under ``folder``; caches
    (``__pycache__``, dot folders) that using the templates in place leaves are
    not templates."""
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            if entry.name != "__pycache__" and not entry.name.startswith("."):
                yield from template_files(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(SUFFIXES):
            yield f"{prefix}{entry.name}", entry.read_text(encoding="utf-8")


def files_for(kind: str, name: str) -> dict:
    """``{relative path: text}`` of the distribution ``clipft new KIND NAME``
    writes: top-level files first, then by path."""
    k = kinds.lookup(kind).name
    check_name(name)
    root = templates()
    fields = {"kind": k, **json.loads((root / "kinds.json").read_text(encoding="utf-8"))[k]}
    rename = renamer(name)
    files = {}
    for top in ("common", k):
        for rel, text in template_files(root / top):
            files[rename(rel)] = rename(FIELD_RE.sub(lambda m: fields[m[1]], text))
    return dict(sorted(files.items(), key=lambda item: (item[0].count("/"), item[0].lower())))


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ClipftUsageError(f"{target} already exists and is not empty; choose another --dir")


def _check_unused(kind: str, name: str, registry) -> None:
    if registry is None or name not in registry.names(kind):
        return
    try:
        owner = registry.distribution_of(kind, name)
    except ClipftUsageError:  # registered twice already: still taken
        owner = "two installed distributions"
    raise ClipftUsageError(f"{kind} '{name}' is already provided by {owner}; a second one would "
                           "conflict with it, so pick another NAME")


def scaffold(kind: str, name: str, directory: Optional[Path] = None, registry=None) -> tuple[Path, list]:
    """Write the distribution into ``directory`` (default ``./clipft-NAME``);
    returns ``(directory, [written paths])``. Refuses (usage errors) an unknown
    kind, an invalid name, a non-empty directory, and a name that an installed
    plugin in ``registry`` already provides for the kind."""
    files = files_for(kind, name)
    target = Path(directory) if directory is not None else Path.cwd() / f"clipft-{name}"
    _check_target(target)
    _check_unused(kinds.lookup(kind).name, name, registry)
    written = []
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return target, written
