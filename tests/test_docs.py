"""The documentation covers the plugin API and the command line.

Every registration hook (``clipft.hookspecs``), every field of each kind's spec
class (``clipft.kinds.KINDS``), every public member of the protocols
(``Strategy``, ``StrategyModifier``, ``InsertedModule``, ``ClassTextEncoder``,
``Callback``), every field of the callback views, ``BuildContext``,
``DataContext``, ``DataBundle`` and ``ForwardRecord``, every CLI command and
every name in ``clipft.testing.__all__`` and ``clipft.api.__all__``, and every
member of what ``clipft.load`` returns (``LoadedModel``), must appear in code (backticks or a
fenced block) in ``README.md`` or ``docs/*.md``. A class member counts as
documented where a section (the text under one heading) names both the class
and the member, or where ``Class.member`` is written out.

Run ``python tests/test_docs.py`` to print the number of items checked.
Also here: relative links resolve, and the worked example in docs/plugins.md runs.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_MARKER = re.compile(r"^<!-- worked-example: (\S+) -->\n", re.M)


# -- reading the docs -----------------------------------------------------------------
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # may wrap, not across paragraphs
_HEADING = re.compile(r"^#{1,6} .*$", re.M)


def code_text(markdown: str) -> str:
    """The code in a piece of markdown: inline spans, and fenced blocks that name
    a language (an untagged block, such as the README's layout, is prose)."""
    parts = [body for lang, body in _FENCE.findall(markdown) if lang]
    parts += _INLINE.findall(_FENCE.sub("", markdown))
    return "\n".join(parts)


class Docs:
    """The code of each section of each page (split at every heading)."""

    def __init__(self, files=DOC_FILES):
        self.sections: list[str] = []
        for path in files:
            text = path.read_text(encoding="utf-8")
            # a heading in a fenced block (a comment in a bash example) is no heading
            cuts, pos = [0], 0
            fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
            for m in _HEADING.finditer(text):
                if not any(a <= m.start() < b for a, b in fenced):
                    cuts.append(m.start())
            cuts.append(len(text))
            self.sections += [code_text(text[a:b]) for a, b in zip(cuts, cuts[1:])]
        self.code = "\n".join(self.sections)

    @staticmethod
    def _has(code: str, name: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", code) is not None

    def mentions(self, name: str) -> bool:
        return self._has(self.code, name)

    def mentions_member(self, owner: str, name: str) -> bool:
        if self._has(self.code, f"{owner}.{name}"):
            return True
        return any(self._has(s, owner) and self._has(s, name) for s in self.sections)

    def mentions_command(self, name: str) -> bool:
        return re.search(rf"clipft\s+{re.escape(name)}(?![\w-])", self.code) is not None


# -- what must be documented ----------------------------------------------------------
class Item(NamedTuple):
    category: str
    owner: Optional[str]   # the class a member belongs to
    name: str

    def __str__(self):
        return f"{self.category}: {self.owner + '.' if self.owner else ''}{self.name}"


def hook_items(module) -> list[Item]:
    marker = f"{module.PROJECT}_spec"  # what pluggy's HookspecMarker sets
    return [Item("hook", None, n) for n, f in inspect.getmembers(module, inspect.isfunction)
            if hasattr(f, marker)]


def spec_items(kinds) -> list[Item]:
    return [Item("spec field", k.spec.__name__, f.name) for k in kinds for f in attrs.fields(k.spec)]


def _defined_by(cls, name: str) -> str:
    return next(c.__name__ for c in cls.__mro__ if name in vars(c))


def member_items(classes) -> list[Item]:
    """Public members defined by each class (or the protocol base it extends),
    each under the class that defines it."""
    out = []
    for cls in classes:
        for name in sorted(n for n in dir(cls) if not n.startswith("_") and n not in dir(object)):
            owner = _defined_by(cls, name)
            if owner in {c.__name__ for c in classes}:
                out.append(Item("protocol member", owner, name))
    return sorted(set(out))


def field_items(classes) -> list[Item]:
    """attrs fields, plus public properties and methods, of data classes."""
    out = []
    for cls in classes:
        names = [f.name for f in attrs.fields(cls) if not f.name.startswith("_")]
        names += [n for n, v in vars(cls).items()
                  if not n.startswith("_") and (isinstance(v, property) or inspect.isfunction(v))]
        out += [Item("field", cls.__name__, n) for n in names]
    return out


def loaded_model_items(cls) -> list[Item]:
    """What ``clipft.load`` returns: its annotated attributes and public methods."""
    names = set(cls.__annotations__) | {n for n, v in vars(cls).items()
                                       if not n.startswith("_") and inspect.isfunction(v)}
    return [Item("loaded model member", cls.__name__, n) for n in sorted(names)]


def command_items(group) -> list[Item]:
    return [Item("command", None, name) for name in sorted(group.commands)]


def all_items() -> list[Item]:
    import clipft
    from clipft import (api, callbacks, cli, context, data, hookspecs, kinds, prompt_kit, protocols,
                        record, specs, testing)
    from clipft.commands.loaded import LoadedModel

    items = hook_items(hookspecs)
    items += spec_items(kinds.KINDS)
    items += member_items([protocols.Strategy, protocols.StrategyModifier, protocols.InsertedModule,
                           protocols.ClassTextEncoder, protocols.FitsTrainFeatures, protocols.AddsLossTerms,
                           protocols.UpdatesPerEpoch,
                           protocols.Loss, callbacks.Callback])
    items += field_items([callbacks.RunView, callbacks.StepView, callbacks.EvalView,
                          callbacks.EpochView, callbacks.CheckpointView, context.BuildContext,
                          data.DataContext, data.DataBundle, record.ForwardRecord])
    items += command_items(cli.cli)
    items += [Item("flag", None, k.flag) for k in kinds.KINDS]
    items += [Item("enters value", None, v) for v in protocols.ENTERS]
    items += [Item("slot", None, v) for v in protocols.SLOTS.values()]
    items += [Item("public name", None, n) for n in clipft.__all__]
    items += [Item("testing helper", None, n) for n in testing.__all__]
    items += [Item("loss need", None, getattr(specs, n)) for n in dir(specs) if n.startswith("NEED_")]
    items += [Item("loss need", None, n) for n in dir(specs) if n.startswith("NEED_")]
    items += [Item("prompt kit", None, n) for n in prompt_kit.__all__]
    items += [Item("api function", None, n) for n in api.__all__]
    items += loaded_model_items(LoadedModel)
    return items


def undocumented(items, docs: Docs) -> list[Item]:
    def ok(item: Item) -> bool:
        if item.category == "command":
            return docs.mentions_command(item.name)
        if item.owner is not None:
            return docs.mentions_member(item.owner, item.name)
        return docs.mentions(item.name)
    return [i for i in items if not ok(i)]


def check_docs() -> int:
    """The number of documented items checked; raises if one is missing."""
    items = all_items()
    missing = undocumented(items, Docs())
    assert not missing, "undocumented in README.md / docs/*.md:\n  " + "\n  ".join(map(str, missing))
    return len(items)


# -- the tests ------------------------------------------------------------------------------
def test_every_hook_spec_field_protocol_member_and_command_is_documented(capsys):
    n = check_docs()
    assert n > 150
    with capsys.disabled():
        print(f"\n{n} documented items checked")


def test_each_category_is_collected():
    counts: dict = {}
    for item in all_items():
        counts[item.category] = counts.get(item.category, 0) + 1
    assert counts["hook"] == 5
    assert counts["command"] >= 5
    assert counts["spec field"] >= 4 * 5 + 4
    assert {("Strategy", "apply"), ("InsertedModule", "export_info"), ("Callback", "on_run_end"),
            ("StrategyModifier", "role"), ("ClassTextEncoder", "enters")} <= {
        (i.owner, i.name) for i in all_items() if i.category == "protocol member"}
    assert ("StepView", "samples_per_s") in {(i.owner, i.name) for i in all_items()}
    assert {"checkpoint_tensors", "resume_run"} <= {i.name for i in all_items() if i.category == "testing helper"}
    assert {("Strategy", "loss_terms"), ("InsertedModule", "loss_terms"), ("AddsLossTerms", "loss_terms"),
            ("UpdatesPerEpoch", "end_epoch")} <= {
        (i.owner, i.name) for i in all_items() if i.category == "protocol member"}
    assert ("ForwardRecord", "class_text_features") in {(i.owner, i.name) for i in all_items()}
    assert {"class-text", "NEED_CLASS_TEXT", "install_prompt_learner", "ContextLearner"} <= {
        i.name for i in all_items()}
    assert {"run", "evaluate", "predict", "export", "sweep", "load"} <= {
        i.name for i in all_items() if i.category == "api function"}
    assert {"encode_image", "encode_text", "classify", "classes", "preprocess", "tokenizer", "model"} <= {
        i.name for i in all_items() if i.category == "loaded model member"}


def test_made_up_names_are_reported_missing():
    """The same collectors and checks, pointed at made-up API, report every name."""
    import types

    import click
    import pluggy

    fake_hooks = types.ModuleType("fake_hookspecs")
    fake_hooks.PROJECT = "clipft"
    spec = pluggy.HookspecMarker("clipft")

    @spec
    def clipft_register_widgets(register):
        """not a real hook"""
    fake_hooks.clipft_register_widgets = clipft_register_widgets

    @attrs.frozen
    class WidgetSpec:
        sprocket_count: int = 0

    class FakeKind:
        spec = WidgetSpec

    class Gadget:
        def frobnicate_all(self): ...
        def on_gizmo_exploded(self): ...

    @attrs.define
    class GizmoView:
        flux_capacity: int = 0

    @click.group()
    def group():
        pass

    @group.command("frobnicate")
    def _frobnicate():
        pass

    fake = (hook_items(fake_hooks) + spec_items([FakeKind]) + member_items([Gadget])
            + field_items([GizmoView]) + command_items(group))
    assert [str(i) for i in undocumented(fake, Docs())] == [
        "hook: clipft_register_widgets",
        "spec field: WidgetSpec.sprocket_count",
        "protocol member: Gadget.frobnicate_all",
        "protocol member: Gadget.on_gizmo_exploded",
        "field: GizmoView.flux_capacity",
        "command: frobnicate",
    ]
    # a real member counts only next to its own class, a command only after `clipft`
    assert undocumented([Item("field", "CheckpointView", "tokenize")], Docs()) != []
    assert not Docs().mentions_command("plugin")


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def test_relative_links_resolve():
    bad = []
    for page in DOC_FILES:
        text = _FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                body = _FENCE.sub("", dest.read_text(encoding="utf-8"))
                if anchor not in {_slug(h) for h in _HEADING.findall(body)}:
                    bad.append(f"{page.name}: {target} (no such heading)")
    assert bad == []


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.index("make demo") < text.index("make test") < text.index("## Plugins")
    assert "## Layout" in text
    for dist in sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file()):
        assert f"| `{dist}` |" in text, f"{dist} is missing from the README's plugin table"
    # a landing page: the commands, a tour, the plugins and the layout (one line a module)
    assert len(text.splitlines()) < 250


def test_the_readme_layout_names_every_module():
    """Each module of core/clipft has its line in the README's Layout (so it stays true)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    core = ROOT / "core" / "clipft"
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core)
        if rel.parts[0] in ("templates", "model_configs") or rel.name == "__main__.py":
            continue
        if rel.parts[0] == "engine" and len(rel.parts) > 2:   # engine/cache/*: one line for the package
            continue
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            continue
        assert f" {rel.name} " in layout, f"{rel} has no line in the README's Layout"


# -- the worked example runs ------------------------------------------------------------
def _example_files() -> dict:
    """``{path: source}`` of each file of the worked example."""
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    files = {}
    for marker in EXAMPLE_MARKER.finditer(text):
        m = _FENCE.match(text, marker.end())
        assert m and m.group(1) == "python", f"no python block right after {marker.group(0)!r}"
        files[marker.group(1)] = m.group(2)
    return files


@pytest.fixture(scope="module")
def adapter_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    files = _example_files()
    assert sorted(files) == ["clipft_clip_adapter/__init__.py", "clipft_clip_adapter/adapter.py"]
    for rel, source in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    # the repository's own clipft-clip-adapter has the same package name: set it
    # aside while the example stands in for it
    names = ("clipft_clip_adapter", "clipft_clip_adapter.adapter")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    package = root / "clipft_clip_adapter"
    spec = importlib.util.spec_from_file_location("clipft_clip_adapter", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["clipft_clip_adapter"] = module
    spec.loader.exec_module(module)
    yield module
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)


@pytest.mark.usefixtures("one_thread")
def test_the_worked_example_trains_on_cached_embeddings_and_round_trips(adapter_plugin, tmp_path):
    import torch

    import clipft
    from clipft.api import RunConfig, export, make_registry, run
    from clipft.encode import encode_images
    from clipft.errors import ClipftUsageError
    from clipft.options import build_options

    registry = make_registry(plugins=[adapter_plugin])
    spec = registry.get("strategy", "clip-adapter")
    with pytest.raises(ClipftUsageError, match="ratio must be in"):
        build_options("strategy", spec, {"ratio": "0"})

    summary = run(RunConfig(model="tiny-vit", data="shapes:n=32,val_n=16", strategies=["clip-adapter"],
                            epochs=1, batch_size=16), registry=registry, out=tmp_path / "run")
    assert "adapter runs live on the cached value" in summary["cache"]["image"]
    assert [g["name"] for g in summary["params"]["groups"]] == ["clip-adapter"]

    manifest = export(tmp_path / "run", tmp_path / "export", registry=registry)
    assert [d["module"] for d in manifest["plain_open_clip_drops"]] == ["clipft_image_adapter"]
    assert manifest["load_export_max_abs_diff"] <= 1e-6
    back = clipft.load(tmp_path / "export", registry=registry, device="cpu").model
    adapter = back.clipft_image_adapter
    assert isinstance(adapter, adapter_plugin.clipft.InsertedModule)
    assert adapter.up.weight.abs().sum() > 0  # trained, and loaded back from its own file

    # at step 0 (up-projection zero) the normalised embedding is the base model's
    model = back
    del model.clipft_image_adapter
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = encode_images(model, images)
        fresh = adapter_plugin.adapter.ClipAdapter(plain.shape[1], adapter.opts, seed=0)
        adapter_plugin.clipft.install(model, fresh)
        assert torch.allclose(encode_images(model, images), plain, atol=1e-6)


if __name__ == "__main__":
    print(f"{check_docs()} documented items checked")
