"""``clipft eval`` and ``clipft predict`` on runs, exports and plain models,
checked against computations that do not go through clipft's eval code."""
from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from peft_base import SMALL_NOVEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shapes_folder import write_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONTROL = "shapes:n=16,val_n=48,seed=2,colours=red,green,blue,yellow,shapes=circle,square,triangle"


def _eval(invoke, *args):
    res = invoke("eval", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_eval_of_a_run_on_its_own_data_matches_the_runs_evaluation(invoke, runs):
    doc = _eval(invoke, runs["full"], "--data", SMALL_NOVEL)
    after = runs["full_summary"]["eval"]["after"]
    n = doc["samples"]
    assert n == runs["full_summary"]["data"]["val_size"] == 32
    # same model, same split: at most one image may flip on a near tie between batchings
    assert abs(doc["metrics"]["top1"] - after["top1"]) <= 1 / n + 1e-9
    assert abs(doc["metrics"]["i2t_recall@1"] - after["i2t_recall@1"]) <= 1 / n + 1e-9
    assert {"top5", "balanced_accuracy", "ece", "recall@10"} <= set(doc["metrics"])
    assert len(doc["per_class"]) == 6 and sum(r["samples"] for r in doc["per_class"]) == n
    assert len(doc["reliability"]["zero-shot"]) == 15


@pytest.mark.parametrize("name", ["full", "head"])
def test_eval_batched_as_the_run_reports_the_runs_evaluation_exactly(invoke, runs, name):
    """One evaluation path: on the run's val split, batched as the run batched
    it (--batch-size 16), ``clipft eval`` reports every number of the run's
    own evaluation (zero-shot and head top-1, caption recall), bit for bit."""
    doc = _eval(invoke, runs[name], "--data", SMALL_NOVEL, "--batch-size", "16")
    after = runs[f"{name}_summary"]["eval"]["after"]
    assert {"top1", "recall@1", "recall@5"} <= set(after)
    assert ("head_top1" in after) == (name == "head")
    assert {k: doc["metrics"][k] for k in after} == after


def test_eval_of_a_run_without_data_uses_the_runs_own_data_and_says_so(invoke, runs, tmp_path):
    res = invoke("eval", runs["head"], "--batch-size", "16", "--json")
    assert res.exit_code == 0, res.output
    assert "no --data: evaluating on the run's own data" in res.stderr
    doc = json.loads(res.stdout)
    after = runs["head_summary"]["eval"]["after"]
    assert {k: doc["metrics"][k] for k in after} == after        # the same split, the same numbers
    # an export or a plain model has no data of its own
    r = invoke("eval", "--model", "tiny-vit")
    assert r.exit_code == 2 and "--data is required" in r.stderr


def test_eval_metrics_equal_an_independent_computation(invoke, runs):
    """Features through open_clip's own encode_image/encode_text on the same
    images, metrics by plain loops."""
    from clipft.engine.loadrun import load_run
    from clipft.commands.inference import build_data
    from clipft.commands.source import load_source
    from clipft.options import parse_ref
    from clipft.plugins import Registry
    doc = _eval(invoke, runs["full"], "--data", SMALL_NOVEL)
    run = load_run(runs["full"])
    src = load_source(str(runs["full"]))
    bundle = build_data(parse_ref(SMALL_NOVEL), Registry().load(), src)
    model = run.model
    with torch.no_grad():
        items = [bundle.val[i] for i in range(len(bundle.val))]
        images = torch.stack([it[1] for it in items])
        labels = [it[3] for it in items]
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        prompts = [t.format(c) for c in bundle.classnames for t in doc["templates"]]
        txt = torch.nn.functional.normalize(model.encode_text(run.tokenizer(prompts)), dim=-1)
        txt = torch.nn.functional.normalize(txt.view(len(bundle.classnames), len(doc["templates"]), -1)
                                            .mean(1), dim=-1)
        logits = (model.logit_scale.exp().clamp(max=100) * img @ txt.t())
    probs = logits.softmax(1).tolist()
    pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    top1 = sum(p == y for p, y in zip(pred, labels)) / len(labels)
    per = {c: [p == y for p, y in zip(pred, labels) if y == c] for c in set(labels)}
    balanced = sum(sum(v) / len(v) for v in per.values()) / len(per)
    bins = [[] for _ in range(15)]
    for p, y in zip(probs, labels):
        conf = max(p)
        bins[min(14, max(0, int(-(-conf * 15 // 1)) - 1))].append((conf, p.index(conf) == y))
    ece = sum(len(b) / len(labels) * abs(sum(o for _, o in b) / len(b) - sum(c for c, _ in b) / len(b))
              for b in bins if b)
    m = doc["metrics"]
    n = len(labels)
    # the two computations batch differently, so a near tie may round either way:
    # one flipped image moves top-1 by 1/n, balanced accuracy by 1/(C * n_c) and
    # ECE by at most 2/n (its bin's accuracy and the overall weighting); none
    # moves them by float rounding alone (confidences agree to ~1e-6)
    smallest = min(len(v) for v in per.values())
    assert abs(m["top1"] - top1) <= 1 / n + 1e-9
    assert abs(m["balanced_accuracy"] - balanced) <= 1 / (len(per) * smallest) + 1e-6
    assert abs(m["ece"] - ece) <= 2 / n + 1e-5
    if m["top1"] == pytest.approx(top1, abs=1e-9):   # the usual case: no flip, so equal
        assert m["balanced_accuracy"] == pytest.approx(balanced, abs=1e-6)
        assert m["ece"] == pytest.approx(ece, abs=1e-5)
    for row in doc["per_class"]:
        c = bundle.classnames.index(row["class"])
        assert row["samples"] == labels.count(c)


def test_eval_reports_head_metrics_and_writes_csv_and_confusion(invoke, runs, tmp_path):
    csv_path, png = tmp_path / "per_class.csv", tmp_path / "confusion.png"
    doc = _eval(invoke, runs["head"], "--data", SMALL_NOVEL, "--per-class", csv_path, "--confusion", png)
    after = runs["head_summary"]["eval"]["after"]
    assert abs(doc["metrics"]["head_top1"] - after["head_top1"]) <= 1 / doc["samples"] + 1e-9
    assert {"head_balanced_accuracy", "head_ece"} <= set(doc["metrics"])
    assert "head" in doc["reliability"]
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["class"] for r in rows] == doc["classes"]
    assert {float(r["head_top1"]) for r in rows} == {r["head_top1"] for r in doc["per_class"]}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 300 and h > 300


def test_did_it_forget_eval_on_a_control_set(invoke, runs):
    """The base's own colours as a control: eval on a run and on the base."""
    base = runs["base"]
    doc = _eval(invoke, runs["full"], "--data", SMALL_NOVEL, "--control-data", CONTROL)
    before = _eval(invoke, "--model", "tiny-vit", "--pretrained", base["weights"], "--data", CONTROL)
    assert doc["control"]["samples"] == before["samples"] == 48
    assert 0 <= doc["control"]["metrics"]["top1"] <= 1
    # the base knows its own colours (chance is 1/12)
    assert before["metrics"]["top1"] > 0.3
    # an export evaluates like the model it came from
    exported = _eval(invoke, base["export"], "--data", CONTROL)
    assert exported["metrics"]["top1"] == pytest.approx(before["metrics"]["top1"], abs=1 / 48 + 1e-9)


def test_eval_errors(invoke, runs, tmp_path, monkeypatch):
    res = invoke("eval", runs["base"]["export"])             # an export has no data of its own
    assert res.exit_code == 2 and "--data is required" in res.stderr
    res = invoke("eval", tmp_path / "nope", "--data", SMALL_NOVEL)
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = invoke("eval", runs["full"], "--model", "tiny-vit", "--data", SMALL_NOVEL)
    assert res.exit_code == 2 and "not both" in res.stderr
    (tmp_path / "plain").mkdir()
    res = invoke("eval", tmp_path / "plain", "--data", SMALL_NOVEL)
    assert res.exit_code == 2 and "neither a clipft run directory" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # the plots extra is not installed
    res = invoke("eval", runs["full"], "--data", SMALL_NOVEL, "--confusion", tmp_path / "c.png")
    assert res.exit_code == 2 and "pip install 'clipft[plots]'" in res.stderr
    assert not (tmp_path / "c.png").exists()


# -- predict ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    files = write_folder(root, 2, ["purple", "orange"], ["circle", "square", "triangle"])
    bad = root / "purple_circle" / "broken.png"
    bad.write_bytes(b"not a png")
    return root, files, bad


def test_predict_json_lines_for_a_folder_with_a_bad_image(invoke, runs, images):
    root, files, bad = images
    res = invoke("predict", runs["full"], root, "--top-k", "3", "--json")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(recs) == len(files) + 1
    by_path = {r["image"]: r for r in recs}
    assert "error" in by_path[str(bad)] and "1 of 13 images could not be read" in res.stderr
    good = [r for r in recs if "error" not in r]
    assert all(len(r["top"]) == 3 and r["used"] == "zero-shot" for r in good)
    for r in good:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    # the run learned these colours: most files get their own class first
    right = sum(r["top"][0]["label"] == Path(r["image"]).parent.name.replace("_", " ") for r in good)
    assert right >= len(good) // 2


def test_predict_probabilities_equal_softmax_of_the_eval_logits(invoke, runs, images):
    """One image through predict and through open_clip by hand."""
    from PIL import Image

    from clipft.engine.loadrun import load_run
    _, files, _ = images
    res = invoke("predict", runs["full"], files[0], "--top-k", "6", "--json")
    rec = json.loads(res.stdout)
    run = load_run(runs["full"])
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            run.model.encode_image(run.preprocess(Image.open(files[0]).convert("RGB"))[None]), dim=-1)
        txt = torch.nn.functional.normalize(
            run.model.encode_text(run.tokenizer([run.templates[0].format(c) for c in run.classnames])), dim=-1)
        probs = (run.model.logit_scale.exp().clamp(max=100) * img @ txt.t()).softmax(1)[0]
    got = {t["label"]: t["prob"] for t in rec["top"]}
    for i, c in enumerate(run.classnames):
        assert got[c] == pytest.approx(float(probs[i]), abs=1e-4)


def test_predict_text_output_uses_the_head_and_ad_hoc_labels(invoke, runs, images, tmp_path):
    _, files, _ = images
    res = invoke("predict", runs["head"], files[0], files[1], "--top-k", "2", "--json")
    assert res.exit_code == 0, res.output
    assert all(json.loads(x)["used"] == "head" for x in res.stdout.splitlines())
    res = invoke("predict", runs["head"], files[0], "--top-k", "2")
    assert res.exit_code == 0 and res.stderr == ""
    line = res.stdout.splitlines()[0]
    assert line.startswith(str(files[0]) + "\t") and len(line.split("\t")[1].split("  ")) == 2
    labels = tmp_path / "labels.txt"
    labels.write_text("purple circle\norange circle\nsomething else\n")
    for opt in (["--labels", "purple circle,orange circle,something else"], ["--labels-file", labels]):
        res = invoke("predict", "--model", "tiny-vit", "--pretrained", runs["base"]["weights"], files[0],
                     *opt, "--json")
        assert res.exit_code == 0, res.output
        rec = json.loads(res.stdout)
        assert rec["used"] == "zero-shot"
        assert {t["label"] for t in rec["top"]} == {"purple circle", "orange circle", "something else"}


def test_predict_errors(invoke, runs, images, tmp_path):
    _, files, _ = images
    res = invoke("predict", "--model", "tiny-vit", "--pretrained", "none", files[0])
    assert res.exit_code == 2 and "--labels" in res.stderr
    res = invoke("predict", runs["full"])
    assert res.exit_code == 2 and "no images" in res.stderr
    res = invoke("predict", runs["full"], files[0], "--labels", "a,a")
    assert res.exit_code == 2 and "repeat" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("predict", runs["full"], empty)
    assert res.exit_code == 2 and "holds no images" in res.stderr
    res = invoke("predict", runs["full"], tmp_path / "missing.png", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"] == "no such file"


def test_eval_on_captions_without_labels_reports_recall_only(invoke, runs, images, tmp_path):
    _, files, _ = images
    table = tmp_path / "pairs.csv"
    lines = ["image,caption"] + [f"{p},a photo of a {p.parent.name.replace('_', ' ')}." for p in files]
    table.write_text("\n".join(lines) + "\n")
    doc = _eval(invoke, runs["full"], "--data", f"captions:file={table}", "--split", "all")
    assert doc["samples"] == len(files)
    assert {"recall@1", "recall@5", "recall@10", "i2t_recall@10", "t2i_recall@1"} <= set(doc["metrics"])
    assert "top1" not in doc["metrics"] and "per_class" not in doc


def test_a_head_for_other_classes_is_skipped_with_a_note(invoke, runs):
    doc = _eval(invoke, runs["head"], "--data", CONTROL)
    assert "top1" in doc["metrics"] and "head_top1" not in doc["metrics"]
    assert any("head skipped" in n for n in doc["notes"])
