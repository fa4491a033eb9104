"""`clipft new`'s templates are real files: each kind's folder is a plugin named
``example-name`` that compiles and imports as it is, the wheel's package data
carries every one of them, and a scaffolded plugin keeps no placeholder text."""
from __future__ import annotations

import importlib
import importlib.util
import json
import py_compile
import re
import sys
import tomllib
from pathlib import Path

import pytest

from clipft import kinds, testing
from clipft.commands.scaffold import PLACEHOLDER, files_for, renamer, template_files, templates

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(str(templates()))
PKG = "clipft_example_name"
# a spelling of the placeholder, a field left unfilled, or the old `$name` syntax
LEFTOVER = re.compile(r"example.?name|@\w+@|\$\{?(name|pkg|dist|cls|kind|summary|usage)\b", re.I)


def template_paths():
    return sorted(TEMPLATES / rel for top in ("common", *kinds.kind_names())
                  for rel, _ in template_files(TEMPLATES / top, f"{top}/"))


def test_every_kind_has_a_template_and_its_readme_fields():
    assert sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted(["common", *kinds.kind_names()])
    fields = json.loads((TEMPLATES / "kinds.json").read_text())
    assert set(fields) == set(kinds.kind_names())
    assert all(set(f) == {"summary", "usage"} for f in fields.values())
    for kind in kinds.kind_names():
        assert sorted(rel for rel, _ in template_files(TEMPLATES / kind)) == [
            f"{PKG}/__init__.py", "tests/test_example_name.py"]


def test_every_template_module_compiles(tmp_path):
    py = [p for p in template_paths() if p.suffix == ".py"]
    assert len(py) == 2 * len(kinds.kind_names())
    for i, path in enumerate(py):
        py_compile.compile(str(path), cfile=str(tmp_path / f"{i}.pyc"), doraise=True)


@pytest.mark.parametrize("kind", kinds.kind_names())
def test_each_template_imports_as_is_and_registers_the_placeholder(kind, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no caches in the source tree
    monkeypatch.syspath_prepend(str(TEMPLATES / kind))
    try:
        module = importlib.import_module(PKG)
        assert Path(module.__file__).parent == TEMPLATES / kind / PKG
        reg = testing.plugin_registry(module, entry_points=False)
        (rec,) = reg.records
        assert rec.status == "active", rec.error
        assert {k: v for k, v in rec.provides.items() if v} == {kind: [PLACEHOLDER]}
        reg.get(kind, PLACEHOLDER).options()
        test_file = TEMPLATES / kind / "tests" / "test_example_name.py"
        spec = importlib.util.spec_from_file_location(f"template_test_{kind}", test_file)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        assert getattr(tests, PKG) is module and callable(tests.registry)
    finally:
        sys.modules.pop(PKG, None)


@pytest.mark.parametrize("kind", kinds.kind_names())
def test_a_scaffolded_plugin_keeps_no_placeholder_text(kind):
    files = files_for(kind, "my-thing")
    assert list(files) == ["pyproject.toml", "README.md", "clipft_my_thing/__init__.py",
                           "tests/test_my_thing.py"]
    for rel, text in files.items():
        leftover = LEFTOVER.search(text)
        assert leftover is None, (rel, text[max(0, leftover.start() - 60):leftover.end() + 20])
    readme = files["README.md"]
    assert readme.startswith(f"# clipft-my-thing\n\nA clipft plugin: {kind} `my-thing`, ")
    assert f"clipft describe {kind} my-thing" in readme
    assert 'NAME = "my-thing"' in files["clipft_my_thing/__init__.py"]
    assert "MyThingOptions" in files["clipft_my_thing/__init__.py"]


def test_the_callback_readme_names_its_output_file():
    readme = files_for("callback", "step-log")["README.md"]
    assert "logs each optimizer step to RUN_DIR/step-log.json." in readme


def test_renaming_is_one_pass_over_every_spelling():
    rename = renamer("a-b2")
    assert rename("clipft-example-name clipft_example_name ExampleNameOptions example-name") == \
        "clipft-a-b2 clipft_a_b2 AB2Options a-b2"
    # a name that spells the placeholder itself is not renamed twice
    assert renamer("example-name")("example_name ExampleName") == "example_name ExampleName"


def test_caches_next_to_the_templates_are_not_copied(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / ".pytest_cache").mkdir()
    (tmp_path / ".pytest_cache" / "README.md").write_text("cache")
    (tmp_path / "notes.txt").write_text("not a template type")
    (tmp_path / "README.md").write_text("kept")
    assert [rel for rel, _ in template_files(tmp_path)] == ["README.md", "pkg/__init__.py"]


def test_the_package_data_globs_ship_every_template():
    """setuptools expands package-data globs recursively (``**``), relative to the package."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    base = ROOT / "core" / "clipft"
    shipped = {p for g in globs["clipft"] for p in base.glob(g)}
    assert TEMPLATES / "kinds.json" in shipped
    missing = [str(p.relative_to(base)) for p in template_paths() if p not in shipped]
    assert not missing
