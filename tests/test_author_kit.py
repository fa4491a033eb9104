"""The plugin author's kit: clipft.testing (runs, assertions that pass on good
plugins and fail on bad ones) and `clipft new` (a distribution that installs and
passes its own tests right away)."""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
import torch

import clipft
from clipft import kinds, testing
from clipft.commands.scaffold import files_for, scaffold

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# -- a plugin under test: trains biases, and optionally (a bug) the logit scale too ----
@attrs.frozen
class BiasOptions:
    leak: bool = attrs.field(default=False, metadata={"help": "also train logit_scale (a bug)"})


class Biases(clipft.Strategy):
    def __init__(self, opts):
        self.opts = opts

    def apply(self, model, ctx):
        params = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
        if self.opts.leak:
            params.append(("logit_scale", model.logit_scale))
        return [clipft.Selection("bias", params, weight_decay=False)]


class ImageAdapter(clipft.InsertedModule, torch.nn.Module):
    """A residual MLP on the image embedding: exported to its own file."""

    enters = "image-embedding"

    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        torch.nn.init.normal_(self.fc.weight, std=0.2)

    def forward(self, x):
        return x + self.fc(x)

    def export_info(self):
        return {"file": "kit_adapter.safetensors", "strategy": "kit-adapter", "options": {}}


class AddAdapter(clipft.Strategy):
    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        slot = clipft.install(model, ImageAdapter(ctx.embed_dim).to(ctx.device))
        return [clipft.Selection("adapter", [(f"{slot}.{n}", p)
                                             for n, p in getattr(model, slot).named_parameters()])]


class KitPlugin:
    __name__ = "kit_plugin"

    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(clipft.StrategySpec(name="kit-biases", summary="test", options=BiasOptions,
                                     build=Biases, default_lr=1e-2))
        register(clipft.StrategySpec(name="kit-adapter", summary="test", build=AddAdapter,
                                     default_lr=1e-3))


PLUGIN = KitPlugin()


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(PLUGIN)


def is_bias(name):
    return name.endswith("bias")


# -- clipft.testing -------------------------------------------------------------------
def test_run_plugin_runs_the_plugin_for_the_given_steps(registry, tmp_path):
    summary = testing.run_plugin(PLUGIN, strategy="kit-biases", steps=3, tmp_path=tmp_path,
                                 registry=registry)
    assert summary["strategies"] == [{"name": "kit-biases", "leak": False}]
    assert summary["train"]["steps"] == 3
    assert summary["data"]["train_size"] == 3 * testing.DEFAULT_BATCH_SIZE
    assert Path(summary["run_dir"]).parent == tmp_path
    # the starting weights are tiny_model()'s, so only the biases moved
    before = testing.initial_state(summary)
    fresh, _, _ = testing.tiny_model()
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    trained = testing.load_trained(summary["run_dir"], registry).model
    changed = testing.assert_only_selected_changed(before, trained, is_bias)
    assert changed and all(is_bias(n) for n in changed)
    # a second run in the same tmp_path gets its own directory; no strategy means logit-scale
    again = testing.run_plugin(None, steps=2, tmp_path=tmp_path)
    assert again["run_dir"] != summary["run_dir"]
    assert [s["name"] for s in again["strategies"]] == ["logit-scale"]
    assert again["params"]["trainable"] == 1


def test_run_plugin_checks_steps_against_your_own_data(registry, tmp_path):
    with pytest.raises(AssertionError, match="took 2 optimizer steps, not 3"):
        testing.run_plugin(PLUGIN, strategy="kit-biases", data="shapes:n=16,val_n=8", steps=3,
                           tmp_path=tmp_path, registry=registry)


def test_only_selected_changed_fails_on_a_leaky_strategy(registry, tmp_path):
    summary = testing.run_plugin(PLUGIN, strategy="kit-biases:leak=true", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    before = testing.initial_state(summary)
    trained = testing.load_trained(summary["run_dir"], registry).model
    with pytest.raises(AssertionError, match="1 tensors outside the selection changed: logit_scale"):
        testing.assert_only_selected_changed(before, trained, is_bias)
    # names work as well as a predicate, and a name that is not there is reported
    names = [n for n in before if is_bias(n)] + ["logit_scale"]
    assert "logit_scale" in testing.assert_only_selected_changed(before, trained, names)
    with pytest.raises(AssertionError, match="not in the model: visual.nope"):
        testing.assert_only_selected_changed(before, trained, ["visual.nope"])
    with pytest.raises(AssertionError, match="did anything train"):
        testing.assert_only_selected_changed(before, before, is_bias)


def test_checkpoint_roundtrip_passes_and_can_fail(registry, tmp_path):
    summary = testing.run_plugin(PLUGIN, strategy="kit-biases", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    loaded = testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    model_t, head_t = testing.checkpoint_tensors(summary["run_dir"])
    assert set(model_t) == {n for n, _ in loaded.model.named_parameters() if is_bias(n)}
    assert head_t == {}
    # the rebuilt model must score what the run's final evaluation said
    path = Path(summary["run_dir"]) / "summary.json"
    doc = json.loads(path.read_text())
    doc["eval"]["after"]["top1"] = 1.0 - doc["eval"]["after"]["top1"] / 2
    path.write_text(json.dumps(doc))
    with pytest.raises(AssertionError, match="rebuilt model's top1"):
        testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    assert testing.assert_checkpoint_roundtrip(summary["run_dir"], registry, metrics=False)
    # lr 0: the checkpoint holds the starting weights, so nothing trained
    still = testing.run_plugin(PLUGIN, strategy="kit-biases", steps=1, lr=0.0, tmp_path=tmp_path,
                               registry=registry)
    with pytest.raises(AssertionError, match="nothing trained"):
        testing.assert_checkpoint_roundtrip(still["run_dir"], registry)


def test_export_roundtrip_keeps_an_inserted_module_and_can_fail(registry, tmp_path, monkeypatch):
    summary = testing.run_plugin(PLUGIN, strategy="kit-adapter", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    manifest = testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "x", registry)
    assert [d["module"] for d in manifest["plain_open_clip_drops"]] == ["clipft_image_adapter"]
    # a run whose rebuilt model differs from what the export loads back is caught
    real = testing.load_trained

    def tampered(run, registry=None, device="cpu"):
        got = real(run, registry, device)
        with torch.no_grad():
            got.model.clipft_image_adapter.fc.bias.add_(0.1)
        return got

    monkeypatch.setattr(testing, "load_trained", tampered)
    with pytest.raises(AssertionError, match="image features differ after export"):
        testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "y", registry)


def test_tiny_base_checkpoint_is_better_than_chance_and_loads_as_pretrained(tmp_path):
    base = testing.tiny_base_checkpoint(tmp_path / "base")
    assert base["top1"] > 2 / 12  # 12 classes
    assert testing.tiny_base_checkpoint(tmp_path / "base") is base  # built once
    from safetensors.torch import load_file
    weights = load_file(str(base["weights"]))
    model, _, _ = testing.tiny_model(pretrained=str(base["weights"]))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k in weights)


def test_resume_run_changes_what_the_command_line_may_and_refuses_the_rest(tmp_path, invoke):
    summary = testing.run_plugin(None, steps=2, tmp_path=tmp_path)     # logit-scale: installed plugins
    with pytest.raises(clipft.ClipftUsageError, match=r"can change when resuming .*; got --lr$") as refused:
        testing.resume_run(summary, lr=0.5)
    r = invoke("run", "--resume", summary["run_dir"], "--lr", "0.5")
    assert r.exit_code == 2 and str(refused.value) in r.stderr          # the command line's words
    with pytest.raises(TypeError, match="'lrr'"):
        testing.resume_run(summary, lrr=0.5)
    # epochs may change: the run goes on in its own directory, from its checkpoint
    more = testing.resume_run(summary["run_dir"], epochs=2)
    assert more["run_dir"] == summary["run_dir"] and more["train"]["epochs"] == 2
    assert more["train"]["steps"] == 4 and [h["epoch"] for h in more["eval"]["history"]] == [0, 1, 2]
    trained = testing.load_trained(summary["run_dir"]).model
    assert testing.assert_only_selected_changed(testing.initial_state(summary), trained, ["logit_scale"])


# -- clipft new -------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["bogus", "x"], "unknown kind 'bogus'; use one of strategy, loss, head, data, callback"),
    (["strategy", "My_Thing"], "invalid NAME 'My_Thing'"),
    (["strategy", "2fast"], "invalid NAME '2fast'"),
    (["strategy", "a--b"], "invalid NAME 'a--b'"),
    (["strategy", "trailing-"], "invalid NAME 'trailing-'"),
    (["loss", "clipft-foo"], "without the clipft- prefix"),
    (["strategy", "full"], "strategy 'full' is already provided by clipft-full"),
])
def test_new_refuses_bad_arguments(invoke, tmp_path, args, needle):
    r = invoke("new", *args, "--dir", tmp_path / "d")
    assert r.exit_code == 2 and needle in r.stderr
    assert not (tmp_path / "d").exists()


def test_new_refuses_a_non_empty_dir_and_accepts_an_empty_one(invoke, tmp_path, monkeypatch):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = invoke("new", "strategy", "mine", "--dir", tmp_path / "busy")
    assert r.exit_code == 2 and "already exists and is not empty" in r.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert invoke("new", "strategy", "mine", "--dir", tmp_path / "empty").exit_code == 0
    assert (tmp_path / "empty" / "clipft_mine" / "__init__.py").is_file()
    monkeypatch.chdir(tmp_path)  # the default: ./clipft-NAME
    r = invoke("new", "callback", "step-log")
    assert r.exit_code == 0 and "pip install -e" in r.stderr
    assert sorted(str(p.relative_to(tmp_path / "clipft-step-log"))
                  for p in (tmp_path / "clipft-step-log").rglob("*") if p.is_file()) == [
        "README.md", "clipft_step_log/__init__.py", "pyproject.toml", "tests/test_step_log.py"]


def _top_level_imports(source: str) -> set:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


@pytest.mark.parametrize("kind", kinds.kind_names())
def test_new_writes_a_distribution_whose_hook_registers_the_spec(kind, tmp_path, monkeypatch):
    name = f"kit-{kind}"
    target, written = scaffold(kind, name, tmp_path / "d")
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    pkg = f"clipft_kit_{kind}"
    assert project["name"] == f"clipft-{name}" and project["dependencies"] == ["clipft"]
    assert project["entry-points"]["clipft"] == {name: pkg}
    source = (target / pkg / "__init__.py").read_text()
    assert "torch" not in _top_level_imports(source)  # listing plugins stays cheap
    for path in written:
        if path.suffix == ".py":
            assert not any(m and m.startswith("clipft.engine") for m in _top_level_imports(path.read_text()))
    test_source = (target / "tests" / f"test_kit_{kind}.py").read_text()
    assert re.search(r"^from clipft import .*\btesting\b", test_source, re.M)
    monkeypatch.syspath_prepend(str(target))
    module = importlib.import_module(pkg)
    try:
        reg = testing.plugin_registry(module, entry_points=False)
        (rec,) = reg.records
        assert rec.status == "active", rec.error
        assert {k: v for k, v in rec.provides.items() if v} == {kind: [name]}
        spec = reg.get(kind, name)
        assert isinstance(spec, kinds.by_name()[kind].spec)
        spec.options()  # every option has a default
    finally:
        sys.modules.pop(pkg, None)


#: what a template may hold that writing it must replace: the placeholder's
#: spellings, the common files' @field@s and string.Template/format-style names
LEFTOVER = re.compile(r"example[-_]name|ExampleName|@\w+@|\$\{?\w+|\{\{|\{(name|kind|summary|usage)\}")


@pytest.mark.parametrize("kind", kinds.kind_names())
def test_new_leaves_no_placeholder_in_any_file(kind):
    files = files_for(kind, "zz-top")
    assert files
    for path, text in files.items():
        assert not LEFTOVER.search(path), path
        hit = LEFTOVER.search(text)
        assert hit is None, f"{kind} {path}: {text[max(0, hit.start() - 40):hit.end() + 20]!r}"
        assert "zz-top" in text or "zz_top" in text or "ZzTop" in text, path


def test_files_for_every_kind_differ_only_where_the_kind_does():
    a, b = files_for("strategy", "one"), files_for("loss", "one")
    assert set(a) == set(b) == {"pyproject.toml", "README.md", "clipft_one/__init__.py",
                                "tests/test_one.py"}
    assert a["clipft_one/__init__.py"] != b["clipft_one/__init__.py"]
    assert "clipft_register_strategies" in a["clipft_one/__init__.py"]
    assert "clipft_register_losses" in b["clipft_one/__init__.py"]


def test_scaffolded_distributions_install_and_pass_their_own_tests(tmp_path):
    """`clipft new` for every kind, pip-install each (a real install, entry points
    and all), then run each distribution's generated tests in a fresh interpreter."""
    targets = []
    for kind in kinds.kind_names():
        target, _ = scaffold(kind, f"gen-{kind}", tmp_path / f"clipft-gen-{kind}")
        targets.append(target)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *map(str, targets)], check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    plugins = subprocess.run([sys.executable, "-m", "clipft.cli", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    rows = {p["distribution"]: p for p in json.loads(plugins.stdout)["plugins"]}
    for kind in kinds.kind_names():
        row = rows[f"clipft-gen-{kind}"]
        assert row["status"] == "active", row
        assert row["provides"][kind] == [f"gen-{kind}"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *(str(t / "tests") for t in targets)],
                       env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "15 passed" in r.stdout  # 4 strategy, 4 loss, 2 head, 2 data, 3 callback tests
