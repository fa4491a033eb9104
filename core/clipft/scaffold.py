"""``clipft new KIND NAME [--dir D]``: write a complete plugin distribution.

D (default ``./clipft-NAME``) gets:

- ``pyproject.toml``: distribution ``clipft-NAME``, ``dependencies = ["clipft"]``,
  the ``clipft`` entry point ``NAME = "clipft_NAME"``, pytest as the ``test`` extra;
- ``clipft_NAME/__init__.py``: the registration hook, the spec, an attrs options
  class and a small component of KIND that works as written (a strategy training
  LayerNorms, a multi-positive contrastive loss, a cosine-classifier head, a
  synthetic colour-swatch data source, a callback logging each optimizer step);
- ``README.md``: install, use, test;
- ``tests/test_NAME.py``: tests written against :mod:`clipft.testing`.

Right after scaffolding, ``pip install -e D && pytest D`` passes. The templates
are the string constants below (no package data): ``$name`` is the component
name, ``$pkg`` the import package, ``$dist`` the distribution, ``$cls`` a
CamelCase stem for class names.
"""
from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template
from typing import Optional

from clipft import kinds
from clipft.errors import ClipftUsageError

#: a component name: lower case letters and digits, words joined by single hyphens
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "clipft $kind plugin: $summary"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["clipft"]

[project.optional-dependencies]
test = ["pytest>=7"]

# The entry point is all clipft needs to discover the plugin.
[project.entry-points.clipft]
$name = "$pkg"

[tool.setuptools]
packages = ["$pkg"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

README = """\
# $dist

A clipft plugin: $kind `$name`, $summary

Written by `clipft new $kind $name`; the component in `$pkg/__init__.py` is a
working starting point to replace with your own.

## Install and use

```bash
pip install -e .
clipft plugins                  # lists $dist and what it provides
clipft describe $kind $name     # its options
clipft run --model tiny-vit $usage
```

## Test

```bash
pip install -e '.[test]'
pytest
```

The tests in `tests/` use `clipft.testing`: short in-process runs on the embedded
`tiny-vit` and the synthetic `shapes` data, offline, a few seconds on a CPU. They
use clipft's built-in plugins too (`clipft-data`, `clipft-losses`,
`clipft-logit-scale`, `clipft-heads`), so have those installed next to clipft.

## Layout

```
pyproject.toml        the distribution; entry point group "clipft": $name = "$pkg"
$pkg/__init__.py      the hook, the spec, the options and the component
tests/                pytest, with clipft.testing
```

Keep torch imports inside the component's code (not at module level) so that
`clipft plugins` stays fast. Raise `clipft.ClipftUsageError` for what a user can
fix (exit 2); anything else is a runtime failure (exit 1).
"""

STRATEGY = '''\
"""clipft strategy `$name`: train only LayerNorm parameters (the affine weight and
bias of every LayerNorm) in one tower or both; everything else stays frozen.

The engine hands ``apply`` a fully frozen model and trains exactly the union of
the returned selections (see clipft.protocols.Strategy).
"""
from typing import Literal

import attrs

from clipft import ClipftUsageError, Selection, Strategy, StrategySpec, hookimpl

NAME = "$name"


@attrs.frozen
class ${cls}Options:
    tower: Literal["vision", "text", "both"] = attrs.field(
        default="both", metadata={"help": "whose LayerNorms train: vision, text or both"})


def in_tower(module_name: str, tower: str) -> bool:
    """open_clip keeps the image tower under ``visual``; the rest is text."""
    is_vision = module_name == "visual" or module_name.startswith("visual.")
    return tower == "both" or (tower == "vision") == is_vision


class ${cls}(Strategy):
    def __init__(self, opts: ${cls}Options):
        self.opts = opts

    def apply(self, model, ctx):
        import torch

        params = [(f"{m_name}.{p_name}", p)
                  for m_name, module in model.named_modules()
                  if isinstance(module, torch.nn.LayerNorm) and in_tower(m_name, self.opts.tower)
                  for p_name, p in module.named_parameters(recurse=False)]
        if not params:
            raise ClipftUsageError(f"{ctx.model_name} has no LayerNorm in tower '{self.opts.tower}'")
        return [Selection("norms", params, weight_decay=False)]


@hookimpl
def clipft_register_strategies(register):
    register(StrategySpec(
        name=NAME,
        summary="Train only the LayerNorm parameters of one tower or both.",
        options=${cls}Options,
        build=${cls},
        default_lr=1e-3,
    ))
'''

STRATEGY_TEST = '''\
"""Tests for strategy `$name`, written with clipft.testing."""
import pytest

import $pkg
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry($pkg)


def is_norm(name):
    """``...ln_1.weight``, ``visual.ln_post.bias``, ``ln_final.weight``: open_clip's LayerNorms."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].startswith("ln_")


def is_vision_norm(name):
    return name.startswith("visual.") and is_norm(name)


def test_hook_registers_the_strategy(registry):
    spec = registry.get("strategy", "$name")
    assert spec.options().tower == "both" and spec.default_lr == 1e-3


@pytest.mark.parametrize("tower,selected", [("vision", is_vision_norm), ("both", is_norm)])
def test_trains_only_the_selected_layernorms(registry, tmp_path, tower, selected):
    summary = testing.run_plugin($pkg, strategy=f"$name:tower={tower}", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    model, _, _ = testing.tiny_model()
    expected = {n: p.numel() for n, p in model.named_parameters() if selected(n)}
    assert summary["params"]["trainable"] == sum(expected.values()) > 0
    assert [(g["name"], g["tensors"]) for g in summary["params"]["groups"]] == [
        ("norms/no_decay", len(expected))]
    trained = testing.load_trained(summary["run_dir"], registry).model
    testing.assert_only_selected_changed(testing.initial_state(summary["run_dir"]), trained, selected)


def test_checkpoint_and_export_round_trip(registry, tmp_path):
    summary = testing.run_plugin($pkg, strategy="$name", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", registry)
'''

LOSS = '''\
"""clipft loss `$name`: symmetric contrastive loss (InfoNCE) in which every pair
with an identical caption is a positive (class prompts of one class, say), so
duplicates are not pushed apart. Returns its named terms and their total.

A loss gets a clipft.ForwardRecord: L2-normalised ``image_features`` and
``text_features``, the exponentiated ``logit_scale``, ``caption_ids`` (equal ids:
identical captions), ``labels`` and the head's ``logits``. ``LossSpec.needs``
says which the engine must provide.
"""
from typing import Optional

import attrs

from clipft import LossSpec, hookimpl
from clipft.specs import NEED_TEXT

NAME = "$name"


@attrs.frozen
class ${cls}Options:
    scale: Optional[float] = attrs.field(default=None, metadata={
        "help": "fixed logit scale; default: the model's learned one"})


def multi_positive_nce(image_features, text_features, scale, caption_ids=None):
    """``(image->text, text->image)`` cross-entropies against a target spread
    evenly over every caption equal to the image's own."""
    import torch
    import torch.nn.functional as F

    logits = scale * image_features @ text_features.t()
    n = logits.shape[0]
    if caption_ids is None:
        same = torch.eye(n, device=logits.device)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return i2t, t2i


class ${cls}:
    def __init__(self, opts: ${cls}Options):
        self.opts = opts

    def __call__(self, rec):
        scale = rec.logit_scale if self.opts.scale is None else self.opts.scale
        i2t, t2i = multi_positive_nce(rec.image_features, rec.text_features, scale, rec.caption_ids)
        # the named terms are logged, only the total is differentiated
        return {"total": (i2t + t2i) / 2, "image_to_text": i2t.detach(), "text_to_image": t2i.detach()}


@hookimpl
def clipft_register_losses(register):
    register(LossSpec(
        name=NAME,
        summary="Contrastive loss in which identical captions are positives.",
        options=${cls}Options,
        build=${cls},
        needs={NEED_TEXT},
    ))
'''

LOSS_TEST = '''\
"""Tests for loss `$name`, written with clipft.testing."""
import math

import pytest
import torch
import torch.nn.functional as F

import $pkg
from clipft import ForwardRecord, testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry($pkg)


def features(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_hook_registers_the_loss(registry):
    spec = registry.get("loss", "$name")
    assert spec.needs == {"text"}


def test_aligned_pairs_cost_less_than_shuffled_ones(registry):
    loss = registry.get("loss", "$name").build($pkg.${cls}Options(scale=10.0))
    img = features()
    aligned = loss(ForwardRecord(image_features=img, text_features=img))
    shuffled = loss(ForwardRecord(image_features=img, text_features=img.roll(1, dims=0)))
    assert set(aligned) == {"total", "image_to_text", "text_to_image"}
    assert aligned["total"] < shuffled["total"]
    assert torch.isclose(aligned["total"], (aligned["image_to_text"] + aligned["text_to_image"]) / 2)


def test_identical_captions_are_positives(registry):
    loss = registry.get("loss", "$name").build($pkg.${cls}Options(scale=10.0))
    img = features(n=2)
    txt = torch.stack([img[0], img[0]])  # both images carry the same caption
    ids = torch.tensor([0, 0])
    out = loss(ForwardRecord(image_features=img, text_features=txt, caption_ids=ids))
    # the target is uniform over the two equal captions: image->text costs exactly log 2
    assert math.isclose(float(out["image_to_text"]), math.log(2), rel_tol=1e-5)


def test_trains_in_a_run(registry, tmp_path):
    summary = testing.run_plugin($pkg, loss="$name", strategy="logit-scale", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    assert summary["loss"]["name"] == "$name"
    assert summary["train"]["steps"] == 2 and math.isfinite(summary["train"]["final_loss"])
'''

HEAD = '''\
"""clipft head `$name`: a cosine classifier, ``scale * cos(x, w_c)`` against one
learned prototype per class, on the (normalised) image embeddings.

``build(options, ctx)`` gets a clipft.context.BuildContext: ``ctx.embed_dim``,
``ctx.classnames`` (``needs_classes=True`` makes the engine require them),
``ctx.device`` and the model itself.
"""
import attrs

from clipft import HeadSpec, hookimpl

NAME = "$name"


@attrs.frozen
class ${cls}Options:
    scale: float = attrs.field(default=10.0, validator=attrs.validators.gt(0), metadata={
        "help": "the logits' scale (inverse temperature)"})


def build(opts: ${cls}Options, ctx):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CosineClassifier(nn.Module):
        def __init__(self, dim: int, classes: int, scale: float):
            super().__init__()
            self.prototypes = nn.Parameter(torch.randn(classes, dim) * dim ** -0.5)
            self.scale = scale

        def forward(self, image_features):
            w = F.normalize(self.prototypes, dim=-1).to(image_features.dtype)
            return self.scale * F.normalize(image_features, dim=-1) @ w.t()

    return CosineClassifier(ctx.embed_dim, len(ctx.classnames), opts.scale).to(ctx.device)


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name=NAME,
        summary="Cosine classifier against learned class prototypes.",
        options=${cls}Options,
        build=build,
        needs_classes=True,
    ))
'''

HEAD_TEST = '''\
"""Tests for head `$name`, written with clipft.testing."""
import pytest

import $pkg
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry($pkg)


def test_hook_registers_the_head(registry):
    spec = registry.get("head", "$name")
    assert spec.needs_classes and spec.options().scale == 10.0


def test_the_head_alone_trains_and_round_trips(registry, tmp_path):
    summary = testing.run_plugin($pkg, head="$name", loss="cross-entropy", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    model, _, _ = testing.tiny_model()
    classes = summary["data"]["classes"]
    # nothing of the model trains: the head's prototypes are all there is
    assert summary["params"]["trainable"] == classes * model.text_projection.shape[1]
    assert "head_top1" in summary["eval"]["after"]
    model_t, head_t = testing.checkpoint_tensors(summary["run_dir"])
    assert model_t == {} and set(head_t) == {"prototypes"}
    loaded = testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    assert loaded.head is not None
    testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", registry)
'''

DATA = '''\
"""clipft data source `$name`: synthetic colour swatches, one class per colour
(a noisy square of that colour), captioned "a swatch of COLOUR.", made from a seed.

``build(options, ctx)`` gets a clipft.data.DataContext (the model's transforms and
the run's seed) and returns a clipft.data.DataBundle whose datasets yield
``(index, image_tensor, caption, label)``.
"""
import attrs

from clipft import hookimpl, DataSourceSpec

NAME = "$name"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220),
           "yellow": (235, 215, 40), "purple": (140, 50, 170), "orange": (245, 140, 20)}
TEMPLATE = "a swatch of {}."


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class ${cls}Options:
    n: int = attrs.field(default=256, validator=_positive, metadata={"help": "training images"})
    val_n: int = attrs.field(default=64, validator=_positive, metadata={"help": "validation images"})
    size: int = attrs.field(default=32, validator=_positive, metadata={"help": "image side in pixels"})
    seed: int = attrs.field(default=0, metadata={"help": "generator seed"})


class Swatches:
    def __init__(self, n, seed, split, size, transform):
        self.n, self.seed, self.split, self.size, self.transform = n, seed, split, size, transform
        self.names = list(COLOURS)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng([self.seed, self.split, i])
        label = int(rng.integers(len(self.names)))
        colour = np.array(COLOURS[self.names[label]])
        pixels = colour + rng.integers(-25, 26, size=(self.size, self.size, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype("uint8"), "RGB")
        return i, self.transform(image), TEMPLATE.format(self.names[label]), label


def build(opts: ${cls}Options, ctx):
    from clipft.data import DataBundle

    return DataBundle(
        train=Swatches(opts.n, opts.seed, 0, opts.size, ctx.transform_train),
        val=Swatches(opts.val_n, opts.seed, 1, opts.size, ctx.transform_val),
        classnames=list(COLOURS), templates=(TEMPLATE,), has_captions=True,
        description=f"{NAME} n={opts.n} seed={opts.seed}")


@hookimpl
def clipft_register_data_sources(register):
    register(DataSourceSpec(
        name=NAME,
        summary="Synthetic colour swatches, one class per colour.",
        options=${cls}Options,
        build=build,
    ))
'''

DATA_TEST = '''\
"""Tests for data source `$name`, written with clipft.testing."""
import pytest

import $pkg
from clipft import testing
from clipft.data import DataContext


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry($pkg)


def test_builds_a_labelled_captioned_bundle(registry):
    spec = registry.get("data", "$name")
    _, _, preprocess = testing.tiny_model()
    bundle = spec.build(spec.options(n=12, val_n=5),
                        DataContext(transform_train=preprocess, transform_val=preprocess, seed=0))
    assert (len(bundle.train), len(bundle.val)) == (12, 5)
    index, image, caption, label = bundle.train[3]
    assert index == 3 and image.shape[0] == 3
    assert caption == bundle.templates[0].format(bundle.classnames[label])
    again = bundle.train[3]
    assert again[2] == caption and bool((again[1] == image).all())  # the seed decides everything


def test_a_run_trains_on_it(registry, tmp_path):
    summary = testing.run_plugin($pkg, data="$name:n=16,val_n=8", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    assert summary["data"]["name"] == "$name"
    assert (summary["data"]["train_size"], summary["data"]["val_size"]) == (16, 8)
    assert summary["data"]["classes"] == len($pkg.COLOURS)
    assert "top1" in summary["eval"]["after"] and "recall@1" in summary["eval"]["after"]
'''

CALLBACK = '''\
"""clipft callback `$name`: logs every optimizer step (step, loss, learning rate)
and writes them, with the final evaluation, to ``RUN_DIR/$name.json`` at the end.

A callback observes the run through read-only views (clipft.callbacks): it
cannot change training. Select it with ``--callback $name`` (or
``[[callback]]`` in TOML); ``CallbackSpec(default=True)`` would turn it on in
every run instead.
"""
import json

import attrs

from clipft import Callback, CallbackSpec, hookimpl

NAME = "$name"


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class ${cls}Options:
    every: int = attrs.field(default=1, validator=_positive, metadata={
        "help": "log every N-th optimizer step"})


class ${cls}(Callback):
    def __init__(self, opts: ${cls}Options):
        self.every = opts.every
        self.out_dir = None
        self.rows = []

    def on_run_start(self, run):
        self.out_dir = run.out_dir

    def on_step_end(self, step):
        if step.stepped and step.step % self.every == 0:
            self.rows.append({"step": step.step, "epoch": step.epoch, "loss": step.loss, "lr": step.lr})

    def on_run_end(self, summary):
        doc = {"steps": self.rows, "eval_after": dict(summary["eval"]["after"])}
        (self.out_dir / f"{NAME}.json").write_text(json.dumps(doc, indent=2))


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(
        name=NAME,
        summary="Log every optimizer step's loss and lr to RUN_DIR/$name.json.",
        options=${cls}Options,
        build=${cls},
    ))
'''

CALLBACK_TEST = '''\
"""Tests for callback `$name`, written with clipft.testing."""
import json
from pathlib import Path

import pytest

import $pkg
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry($pkg)


def test_hook_registers_the_callback(registry):
    spec = registry.get("callback", "$name")
    assert spec.default is False and spec.options().every == 1


@pytest.mark.parametrize("every,logged", [(1, [1, 2, 3]), (2, [2])])
def test_logs_the_optimizer_steps(registry, tmp_path, every, logged):
    summary = testing.run_plugin($pkg, callbacks=[f"$name:every={every}"], steps=3,
                                 tmp_path=tmp_path, registry=registry)
    doc = json.loads((Path(summary["run_dir"]) / "$name.json").read_text())
    assert [row["step"] for row in doc["steps"]] == logged
    assert all(row["loss"] > 0 for row in doc["steps"])
    assert doc["eval_after"] == summary["eval"]["after"]
'''

#: kind -> (component source, test source, summary, example usage on the command line)
TEMPLATES = {
    "strategy": (STRATEGY, STRATEGY_TEST, "trains only LayerNorm parameters.",
                 "--data shapes:n=64,val_n=32 --strategy $name:tower=vision"),
    "loss": (LOSS, LOSS_TEST, "contrastive loss in which identical captions are positives.",
             "--data shapes:n=64,val_n=32 --strategy logit-scale --loss $name"),
    "head": (HEAD, HEAD_TEST, "a cosine classifier against learned class prototypes.",
             "--data shapes:n=64,val_n=32 --head $name --loss cross-entropy"),
    "data": (DATA, DATA_TEST, "synthetic colour swatches, one class per colour.",
             "--data $name:n=256,val_n=64 --strategy logit-scale"),
    "callback": (CALLBACK, CALLBACK_TEST, "logs each optimizer step to RUN_DIR/$name.json.",
                 "--data shapes:n=64,val_n=32 --strategy logit-scale --callback $name"),
}


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


def names_for(name: str) -> dict:
    """The template variables for component ``name``."""
    snake = name.replace("-", "_")
    return {"name": name, "pkg": f"clipft_{snake}", "dist": f"clipft-{name}",
            "cls": "".join(part.capitalize() for part in name.split("-"))}


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


def files_for(kind: str, name: str) -> dict:
    """``{relative path: text}`` of the distribution ``clipft new KIND NAME`` writes."""
    k = kinds.lookup(kind).name
    check_name(name)
    v = names_for(name)
    code, test, summary, usage = TEMPLATES[k]
    v.update(kind=k, summary=summary, usage=Template(usage).substitute(v))
    return {
        "pyproject.toml": Template(PYPROJECT).substitute(v),
        "README.md": Template(README).substitute(v),
        f"{v['pkg']}/__init__.py": Template(code).substitute(v),
        f"tests/test_{v['pkg'][len('clipft_'):]}.py": Template(test).substitute(v),
    }


def scaffold(kind: str, name: str, directory: Optional[Path] = None, registry=None) -> tuple[Path, list]:
    """Write the distribution into ``directory`` (default ``./clipft-NAME``);
    returns ``(directory, [written paths])``. Refuses (usage errors) an unknown
    kind, an invalid name, a non-empty directory, and a name that an installed
    plugin in ``registry`` already provides for the kind."""
    files = files_for(kind, name)
    k = kinds.lookup(kind).name
    target = Path(directory) if directory is not None else Path.cwd() / f"clipft-{name}"
    _check_target(target)
    _check_unused(k, name, registry)
    written = []
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return target, written
