"""The whole tool from Python: ``clipft.api.evaluate / predict / export /
sweep`` return what the commands' ``--json`` prints, and ``clipft.load`` gives
a run's or an export's model that classifies as ``clipft predict`` does.

The runs are the session's shared ones (``runs`` in conftest.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipft
from clipft import api
from clipft.errors import ClipftUsageError
from peft_base import SMALL_NOVEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shapes_folder import write_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    files = write_folder(root, 2, ["purple", "orange"], ["circle", "square", "triangle"])
    return root, files


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """The head run (last-n:n=1 with a zero-shot head), exported by the API."""
    out = tmp_path_factory.mktemp("exp") / "head"
    return out, api.export(runs["head"], out)


def _json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines()]


# -- the functions are the commands -----------------------------------------------------
def test_evaluate_returns_what_eval_json_prints(invoke, runs, tmp_path):
    res = invoke("eval", runs["head"], "--data", SMALL_NOVEL, "--per-class", tmp_path / "cli.csv", "--json")
    assert res.exit_code == 0, res.output
    doc = api.evaluate(runs["head"], data=SMALL_NOVEL, per_class=tmp_path / "api.csv")
    assert doc == json.loads(res.stdout)
    assert {"top1", "head_top1"} <= set(doc["metrics"]) and doc["samples"] == 32
    assert (tmp_path / "api.csv").read_text() == (tmp_path / "cli.csv").read_text()
    # without data, a run is evaluated on its own data, as the command does (it says so on stderr)
    own = api.evaluate(runs["head"])
    assert own["data"] == doc["data"] and own["metrics"] == doc["metrics"]


def test_predict_returns_what_predict_json_prints(invoke, runs, images):
    root, files = images
    res = invoke("predict", runs["head"], root, "--top-k", "3", "--json")
    assert res.exit_code == 0, res.output
    records = api.predict(runs["head"], [root], top_k=3)
    assert records == _json_lines(res.stdout)
    assert [r["image"] for r in records] == [str(f) for f in sorted(files)]
    assert all(r["used"] == "head" and len(r["top"]) == 3 for r in records)
    # ad-hoc labels: zero-shot, as --labels; a list or the flag's comma-separated string
    res = invoke("predict", runs["head"], files[0], "--labels", "purple circle,orange square", "--json")
    assert api.predict(runs["head"], files[0], labels=["purple circle", "orange square"]) \
        == api.predict(runs["head"], [files[0]], labels="purple circle,orange square") == _json_lines(res.stdout)


def test_export_writes_what_the_command_writes(invoke, runs, exported, tmp_path):
    out, manifest = exported
    res = invoke("export", runs["head"], tmp_path / "cli", "--json")
    assert res.exit_code == 0, res.output
    cli_manifest = json.loads(res.stdout)
    assert json.loads((out / "clipft_export.json").read_text()) == manifest
    def without_folder(m):     # what names the folder, and the sizes of the files that name it
        return {**{k: v for k, v in m.items() if k not in ("load_with", "load_all_with")},
                "bytes": {k: v for k, v in m["bytes"].items() if k not in ("clipft_export.json", "README.md")}}
    assert without_folder(manifest) == without_folder(cli_manifest)
    assert manifest["head"]["file"] == "head.safetensors"
    for name in manifest["bytes"]:
        if name == "README.md":     # the model card names the folder, as load_with does
            card = (tmp_path / "cli" / name).read_text(encoding="utf-8").replace(str(tmp_path / "cli"), str(out))
            assert (out / name).read_text(encoding="utf-8") == card
        elif name != "clipft_export.json":
            assert (out / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    # plain open_clip reads it, with the run's weights
    import open_clip
    plain = open_clip.create_model(f"local-dir:{out}")
    run = clipft.load(runs["head"], device="cpu")
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in plain.state_dict().items())
    with pytest.raises(ClipftUsageError, match="already exists and is not empty; pass --overwrite"):
        api.export(runs["head"], out)


# -- clipft.load ------------------------------------------------------------------------
def test_load_of_a_run_classifies_as_predict(runs, images):
    """Same images, same batches, same classifier (the head): the very floats
    ``predict`` reports, from file paths, PIL images or a preprocessed batch."""
    from PIL import Image
    _, files = images
    model = clipft.load(runs["head"])
    assert model.kind == "run" and model.classes == [f"{c} {s}" for c in ("purple", "orange")
                                                    for s in ("circle", "square", "triangle")]
    assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())
    assert next(model.model.parameters()).device == model.device
    probs = model.classify(files)
    assert probs.shape == (len(files), len(model.classes)) and probs.device == model.device
    records = api.predict(runs["head"], files, top_k=len(model.classes))
    for row, rec in zip(probs.tolist(), records):
        assert {t["label"]: t["prob"] for t in rec["top"]} == dict(zip(model.classes, row))
    pil = [Image.open(f) for f in files]
    assert torch.equal(model.classify(pil), probs)
    assert torch.equal(model.classify(torch.stack([model.preprocess(im.convert("RGB")) for im in pil])), probs)
    # one image alone is a batch of one (another batch shape: float32 rounding apart)
    assert torch.allclose(model.classify(files[3]), probs[3:4], atol=1e-5)


def test_load_of_an_export_classifies_as_predict_and_as_the_run(runs, exported, images):
    out, manifest = exported
    _, files = images
    model = clipft.load(out)
    assert model.kind == "export" and model.classes == manifest["classnames"] and model.head is not None
    probs = model.classify(files)
    records = api.predict(out, files, top_k=len(model.classes))
    for row, rec in zip(probs.tolist(), records):
        assert {t["label"]: t["prob"] for t in rec["top"]} == dict(zip(model.classes, row))
    # against the run's model: the export's own check bounds the features' difference
    # (load_export_max_abs_diff on a probe); a head's softmax moves by at most its
    # logits' change, |W|_1 times the features' (a generous multiple of it here)
    run = clipft.load(runs["head"])
    w = run.head.state_dict()
    row_l1 = max(float(t.abs().sum(dim=-1).max()) for t in w.values() if t.dim() == 2)
    tol = 1e-6 + 4 * row_l1 * manifest["load_export_max_abs_diff"]
    assert float((run.classify(files) - probs).abs().max()) <= tol


def test_encode_image_and_text_are_the_zero_shot_classifier(runs, images):
    """``classify(labels=...)`` is softmax(logit scale · image · text) of the
    two encoders' outputs, with one template."""
    _, files = images
    model = clipft.load(runs["full"])
    labels, template = ["purple circle", "orange square", "a dog"], "a photo of a {}."
    img = model.encode_image(files)
    txt = model.encode_text([template.format(c) for c in labels])
    assert img.shape == (len(files), txt.shape[1]) and txt.shape[0] == 3
    ones = torch.ones(len(files), device=model.device)
    assert torch.allclose(img.norm(dim=1), ones, atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), ones[:3], atol=1e-5)
    scale = model.model.logit_scale.exp().clamp(max=100)
    probs = model.classify(files, labels=labels, templates=[template])
    assert probs.shape == (len(files), 3)
    assert torch.allclose(probs, (scale * img @ txt.t()).softmax(dim=1), atol=1e-5)


# -- errors -------------------------------------------------------------------------------
def test_bad_paths_and_inputs_are_usage_errors(runs, exported, tmp_path, images):
    with pytest.raises(ClipftUsageError, match=r"clipft.load: .*nothing does not exist; give a run directory"):
        clipft.load(tmp_path / "nothing")
    with pytest.raises(ClipftUsageError, match="neither a clipft run directory .* nor an export directory"):
        clipft.load(tmp_path)
    with pytest.raises(ClipftUsageError, match="is an export, not a run directory"):
        clipft.load(exported[0], best=True)
    with pytest.raises(ClipftUsageError, match="kept no best checkpoint"):
        clipft.load(runs["full"], best=True)
    model = clipft.load(runs["full"])
    with pytest.raises(ClipftUsageError, match="missing.png: no such file"):
        model.classify([tmp_path / "missing.png"])
    with pytest.raises(ClipftUsageError, match="no images given"):
        model.classify([])
    with pytest.raises(ClipftUsageError, match=r"a batch \[N, 3, H, W\]"):
        model.encode_image(torch.zeros(3, 4))
    with pytest.raises(ClipftUsageError, match="distinct, non-empty class names"):
        model.classify(images[1][:1], labels=["a", "a"])
    with pytest.raises(ClipftUsageError, match="--top-k 0: must be >= 1"):
        api.predict(runs["full"], images[1][:1], top_k=0)
    with pytest.raises(ClipftUsageError, match="--data is required"):
        api.evaluate(model="tiny-vit")


class Nothing(clipft.Strategy):
    def __init__(self, opts):
        pass

    def apply(self, model, ctx):
        return []


class InHouse:
    """A strategy registered in-process only."""

    @clipft.hookimpl
    def clipft_register_strategies(self, register):
        import attrs

        register(clipft.StrategySpec(name="in-house", summary="in-process only",
                                     options=attrs.make_class("NoOptions", []), build=Nothing))


def test_sweep_refuses_what_its_member_processes_could_not_run(tmp_path):
    reg = api.make_registry(plugins=[InHouse()])
    with pytest.raises(ClipftUsageError, match="'in-house' is registered in-process; sweep members run as"):
        api.sweep({"model": "tiny-vit"}, ["full", "in-house"], registry=reg, out=tmp_path / "s")
    with pytest.raises(ClipftUsageError, match="--seeds 0: must be >= 1"):
        api.sweep({"model": "tiny-vit"}, "full", seeds=0, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_import_clipft_stays_cheap_and_load_is_there():
    code = "import sys, clipft; print(callable(clipft.load), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
