"""``clipft export --format onnx``: encoders and a classifier that onnxruntime
runs with the torch model's results (LoRA merged), any batch size, a card, and
clear refusals."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from numerics import TINY_DEPTH, TINY_REDUCTION, assert_close_rel

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"


def _run(tmp_path_factory, name, *args):
    from click.testing import CliRunner

    from clipft.cli import cli
    out = tmp_path_factory.mktemp("onnx") / name
    r = CliRunner().invoke(cli, ["run", "--model", "tiny-vit", "--data", DATA, "--epochs", "1", "--batch-size", "16",
                                 "--callback", "none", "--out", str(out), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _run(tmp_path_factory, "full", "--strategy", "full", "--lr", "1e-3")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    # a large lr so that the merged adapters change the model visibly
    return _run(tmp_path_factory, "lora", "--strategy", "lora:targets=q,k,v,out,mlp,r=4", "--head", "linear",
                "--loss", "cross-entropy", "--lr", "1e-2")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export(invoke, run, out):
    res = invoke("export", run, out, "--format", "onnx", "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


@pytest.mark.numerics
@pytest.mark.parametrize("which", ["full_run", "lora_run"])
def test_onnx_encoders_match_the_run_at_any_batch_size(which, request, tmp_path, invoke):
    from clipft.encode import encode_images, encode_texts
    from clipft.engine.loadrun import load_run
    run_dir = request.getfixturevalue(which)
    manifest, err = _export(invoke, run_dir, tmp_path / "x")
    out = tmp_path / "x"
    assert {"image_encoder.onnx", "text_encoder.onnx", "classifier.onnx", "preprocess.json", "README.md",
            "clipft_export.json"} <= set(manifest["bytes"])
    assert manifest["format_name"] == "onnx"
    checks = manifest["onnx"]["verification"]
    assert all(c["max_abs_diff"] <= c["allowed"] for c in checks.values())
    assert "onnx: image_encoder: onnxruntime vs torch, max |diff|" in err    # the figures on stderr
    if which == "lora_run":
        assert manifest["merged_adapter_layers"] > 0
        graph = __import__("onnx").load(str(out / "image_encoder.onnx"))
        assert not [i.name for i in graph.graph.initializer if "lora" in i.name.lower()]   # merged, not beside

    run = load_run(run_dir)        # the run's own model, adapters unmerged
    image, text = _session(out / "image_encoder.onnx"), _session(out / "text_encoder.onnx")
    g = torch.Generator().manual_seed(7)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32, generator=g)
        tokens = run.tokenizer(["a red circle", "a photo of a blue square.", "x"][:batch])
        with torch.no_grad():
            want_img, want_txt = encode_images(run.model, images), encode_texts(run.model, tokens)
        got_img = image.run(None, {"pixel_values": images.numpy()})[0]
        got_txt = text.run(None, {"input_ids": tokens.numpy().astype(np.int64)})[0]
        assert got_img.shape == (batch, want_img.shape[1])
        assert_close_rel(got_img, want_img, reduction=TINY_REDUCTION, depth=TINY_DEPTH + 1, what="onnx image")
        assert_close_rel(got_txt, want_txt, reduction=TINY_REDUCTION, depth=TINY_DEPTH, what="onnx text")

    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["image"]["size"] == [32, 32] and len(pre["image"]["mean"]) == 3
    assert pre["text"]["context_length"] == tokens.shape[1] and pre["classnames"] == run.classnames
    text = (out / "README.md").read_text()
    assert "onnxruntime" in text and "classifier.onnx" in text and f"clipft predict {out} image.jpg" in text
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "open_clip" and "clipft" in meta["tags"] and "model-index" in meta


@pytest.mark.numerics
def test_classifier_probabilities_match_clipft_predict(lora_run, tmp_path, invoke):
    from PIL import Image

    from clipft.engine.loadrun import load_run
    out = tmp_path / "x"
    manifest, _ = _export(invoke, lora_run, out)
    assert manifest["onnx"]["classifier_uses"] == "head"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    res = invoke("predict", lora_run, *paths, "--json", "--top-k", "100")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.splitlines()]
    run = load_run(lora_run)
    pixels = torch.stack([run.preprocess(Image.open(p).convert("RGB")) for p in paths]).numpy()
    _, probs = _session(out / "classifier.onnx").run(None, {"pixel_values": pixels})
    names = manifest["classnames"]
    for rec, row in zip(records, probs):
        want = {t["label"]: t["prob"] for t in rec["top"]}
        assert len(want) == len(names)
        # probabilities: half the logits' bound, logits below ~10 on a tiny model
        assert max(abs(want[n] - float(row[j])) for j, n in enumerate(names)) < 1e-4

    # clipft predict runs the ONNX export itself: the classifier graph, or the
    # encoders for ad-hoc labels
    for extra in ([], ["--labels", "red circle,blue square,a dog"]):
        ours = invoke("predict", lora_run, *paths, "--json", "--top-k", "100", *extra)
        theirs = invoke("predict", out, *paths, "--json", "--top-k", "100", *extra)
        assert ours.exit_code == 0 and theirs.exit_code == 0, theirs.output
        for a, b in zip(ours.stdout.splitlines(), theirs.stdout.splitlines()):
            a, b = json.loads(a), json.loads(b)
            assert a["image"] == b["image"] and a["used"] == b["used"]
            pa, pb = ({t["label"]: t["prob"] for t in r["top"]} for r in (a, b))
            assert pa.keys() == pb.keys() and max(abs(pa[k] - pb[k]) for k in pa) < 1e-4


def test_zero_shot_classifier_of_a_run_without_head(full_run, tmp_path, invoke):
    manifest, _ = _export(invoke, full_run, tmp_path / "x")
    assert manifest["onnx"]["classifier_uses"] == "zero-shot"
    _, probs = _session(tmp_path / "x" / "classifier.onnx").run(
        None, {"pixel_values": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)})
    assert probs.shape == (2, len(manifest["classnames"])) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # clipft eval takes runs and open_clip exports only, and says so
    res = invoke("eval", tmp_path / "x", "--data", DATA)
    assert res.exit_code == 2 and "ONNX export" in res.stderr


def test_conditional_prompts_are_refused(tmp_path_factory, tmp_path, invoke):
    run = _run(tmp_path_factory, "cocoop", "--strategy", "cocoop")
    res = invoke("export", run, tmp_path / "x", "--format", "onnx")
    assert res.exit_code == 2 and "conditional" in res.stderr and "CoCoOp" in res.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_a_module_that_neither_folds_nor_exports_is_refused():
    from torch import nn

    import clipft
    from clipft.commands.onnx_export import refusal

    class Opaque(clipft.InsertedModule, nn.Module):
        enters = "hook"

    model = nn.Module()
    model.visual = nn.Linear(2, 2)
    model.visual.opaque = Opaque()
    reason = refusal(model)
    assert "visual.opaque" in reason and "neither folds" in reason


def test_without_onnxruntime_it_is_a_usage_error(full_run, tmp_path, invoke, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime raises ImportError
    res = invoke("export", full_run, tmp_path / "x", "--format", "onnx")
    assert res.exit_code == 2
    assert "pip install 'clipft[onnx]'" in res.stderr and "onnxruntime" in res.stderr
    assert not (tmp_path / "x").exists()
