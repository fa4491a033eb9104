"""The declared contract between engine and plugins (clipft.protocols): plugins
stay on the public API, a module that runs on top of cached frozen features is
cached and exported as declared, and the engine refuses what does not meet the
contract."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import attrs
import pytest
import torch

import clipft
from clipft.api import RunConfig, run
from clipft.errors import ClipftError

ROOT = Path(__file__).resolve().parents[1]
DATA = "shapes:n=64,val_n=32"

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine_imports(path: Path) -> list[str]:
    """``file:line module`` of every import of clipft.engine (any spelling)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from clipft import engine` names the engine through the package
            names = [f"clipft.{a.name}" for a in node.names] if node.module == "clipft" else [node.module]
        bad += [f"{path.name}:{node.lineno} {n}" for n in names
                if n == "clipft.engine" or n.startswith("clipft.engine.")]
    return bad


def test_plugins_and_examples_use_only_the_public_api():
    files = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 15
    offenders = [b for f in files for b in _engine_imports(f)]
    assert offenders == []


def test_the_engine_import_scan_can_fail(tmp_path):
    (tmp_path / "p.py").write_text("from clipft.engine.features import LiveFeatures\nimport clipft.engine\n"
                                   "def f():\n    from clipft import engine, Strategy\n")
    assert _engine_imports(tmp_path / "p.py") == [
        "p.py:1 clipft.engine.features", "p.py:2 clipft.engine", "p.py:4 clipft.engine"]


# -- an adapter on the image embedding (CLIP-Adapter style) ---------------------------
class ImageAdapter(clipft.InsertedModule, torch.nn.Module):
    """x' = a * MLP(x) + (1 - a) * x on encode_image's output."""

    enters = "image-embedding"

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim // 4), torch.nn.ReLU(),
                                       torch.nn.Linear(dim // 4, dim))
        torch.nn.init.normal_(self.mlp[2].weight, std=0.5)  # visibly non-identity at step 0

    def forward(self, x):
        return self.ratio * self.mlp(x) + (1 - self.ratio) * x

    def export_info(self):
        return {"file": "image_adapter.safetensors", "strategy": "image-adapter",
                "options": {"ratio": self.ratio}}


@attrs.frozen
class AdapterOptions:
    ratio: float = attrs.field(default=0.2, metadata={"help": "residual ratio"})


class AddImageAdapter(clipft.Strategy):
    def __init__(self, opts):
        self.opts = opts

    def apply(self, model, ctx):
        adapter = ImageAdapter(ctx.embed_dim, self.opts.ratio).to(ctx.device)
        slot = clipft.install(model, adapter)
        return [clipft.Selection("adapter", [(f"{slot}.{n}", p) for n, p in adapter.named_parameters()])]


class NotAStrategy:
    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        return []


class BadSelection(clipft.Strategy):
    def __init__(self, opts):
        self.kind = opts.kind

    def apply(self, model, ctx):
        import torch
        if self.kind == "stray":
            return [clipft.Selection("x", [("logit_scale", torch.nn.Parameter(torch.zeros(1)))])]
        return [clipft.Selection("x", [("visual.not_there", model.logit_scale)])]


@attrs.frozen
class BadOptions:
    kind: str = attrs.field(default="stray", metadata={"help": "stray or misnamed"})


class AdapterPlugin:
    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        register(clipft.StrategySpec(name="image-adapter", summary="test: image-embedding adapter",
                                     options=AdapterOptions, build=AddImageAdapter, default_lr=1e-3))
        register(clipft.StrategySpec(name="duck", summary="test: no Strategy base", build=NotAStrategy))
        register(clipft.StrategySpec(name="bad-selection", summary="test", options=BadOptions,
                                     build=BadSelection))


#: in-process plugins the conftest ``registry`` fixture adds to the installed ones
PLUGINS = [AdapterPlugin()]


def _trained(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.numerics
def test_image_adapter_runs_on_the_cached_image_embedding(registry, tmp_path):
    conf = dict(model="tiny-vit", data=DATA, strategies=["image-adapter"], epochs=2, batch_size=16,
                loss="contrastive")
    cached = run(RunConfig(**conf), registry=registry, out=tmp_path / "cached")
    live = run(RunConfig(**conf, cache=False), registry=registry, out=tmp_path / "live")
    # the whole tower is frozen: its output is cached, the adapter runs on it
    assert cached["cache"]["image"].startswith("output ") and "adapter runs live" in cached["cache"]["image"]
    assert cached["cache"]["image_hits"] > 0 and "cache" not in live
    a, b = _trained(tmp_path / "cached"), _trained(tmp_path / "live")
    assert sorted(a) == sorted(b) and all(k.startswith("clipft_image_adapter.") for k in a)
    # the cached replay computes the same values as the live tower: same kernels
    # on the same inputs, so the trained adapters agree exactly
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = json.loads((tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["type"] == "eval"
    assert cached["eval"]["after"] == live["eval"]["after"]


def test_export_says_plain_open_clip_drops_the_adapter_and_load_export_keeps_it(registry, tmp_path, invoke):
    from clipft.commands.export import export_run, load_export
    from clipft.engine.loadrun import load_run

    run(RunConfig(model="tiny-vit", data=DATA, strategies=["image-adapter"], epochs=1, batch_size=32),
        registry=registry, out=tmp_path / "r")
    manifest = export_run(tmp_path / "r", tmp_path / "x", registry)
    assert [d["module"] for d in manifest["plain_open_clip_drops"]] == ["clipft_image_adapter"]
    assert manifest["plain_open_clip_drops"][0]["kind"] == "image-embedding"
    # the "verified" figure compares plain open_clip with the run's model: the
    # adapter is missing from plain open_clip, so it is far from zero ...
    assert manifest["verified_max_abs_diff"] > 1e-2
    # ... while load_export puts the adapter back and reproduces the run's model
    assert manifest["load_export_max_abs_diff"] <= 1e-6

    from clipft.encode import encode_images
    trained = load_run(tmp_path / "r", registry)
    back = load_export(tmp_path / "x", registry)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = encode_images(trained.model, images)
        got = encode_images(back["model"], images)
    # same weights, same kernels: exact
    assert torch.equal(got, want)


def test_a_strategy_must_subclass_the_protocol(registry, tmp_path):
    with pytest.raises(ClipftError, match="not a clipft.Strategy"):
        run(RunConfig(model="tiny-vit", data=DATA, strategies=["duck"]), registry=registry,
            out=tmp_path / "duck")
    assert not (tmp_path / "duck").exists()


def test_one_module_per_slot(registry, tmp_path):
    from clipft.errors import ClipftUsageError

    class Second(AddImageAdapter):
        pass

    model = torch.nn.Module()
    clipft.install(model, ImageAdapter(16, 0.2))
    with pytest.raises(ClipftUsageError, match="already installed"):
        clipft.install(model, ImageAdapter(16, 0.2))
    with pytest.raises(ValueError, match="no slot"):
        clipft.install(model, type("Hooked", (clipft.InsertedModule, torch.nn.Module), {})())


@pytest.mark.parametrize("kind,message", [("stray", "not part of the model"),
                                          ("misnamed", "wrong name .'visual.not_there'; the model calls it 'logit_scale'")])
def test_selections_are_checked(registry, tmp_path, kind, message):
    with pytest.raises(ClipftError, match=message):
        run(RunConfig(model="tiny-vit", data=DATA, strategies=[f"bad-selection:kind={kind}"]),
            registry=registry, out=tmp_path / kind)
