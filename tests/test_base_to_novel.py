"""The base-to-novel protocol: ``classes=all|base|novel`` on the class-folder
sources (one rule, :func:`clipft.data.base_novel_split`), ``clipft eval
--base-to-novel`` (base, novel, harmonic mean) and its refusal for a head that
cannot score unseen classes."""
import json

import pytest

from conftest import read_summary
from test_data import make_folder, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

#: shapes' class names are "{colour} {shape}"; 2 × 3 = 6 classes, sorted:
#: blue circle, blue square, blue triangle | red circle, red square, red triangle
SHAPES = "shapes:n=24,val_n=16,colours=red,blue,shapes=circle,square,triangle"
BASE_NAMES = ["blue circle", "blue square", "blue triangle"]
NOVEL_NAMES = ["red circle", "red square", "red triangle"]


def ctx():
    from clipft.data import DataContext
    return DataContext(transform_train=lambda x: x, transform_val=lambda x: x, seed=0)


# -- the rule --------------------------------------------------------------------------------
def test_split_rule_sorted_first_half_base_odd_extra_to_base():
    from clipft.data import base_novel_split, keep_classes
    assert base_novel_split(["d", "b", "a", "c"]) == (["a", "b"], ["c", "d"])
    assert base_novel_split(["e", "c", "a", "d", "b"]) == (["a", "b", "c"], ["d", "e"])
    assert base_novel_split(["x"]) == (["x"], [])
    # listing order changes nothing; indices keep the data's own order
    names = ["pear", "apple", "fig", "kiwi"]
    assert base_novel_split(names) == base_novel_split(list(reversed(names)))
    assert keep_classes(names, "base") == [1, 2]
    assert keep_classes(names, "novel") == [0, 3]
    assert keep_classes(names, "all") == [0, 1, 2, 3]


def test_shapes_halves():
    from clipft_data.shapes import ShapesOptions, build_shapes
    opts = dict(n=12, val_n=12, colours=("red", "blue"), shapes=("circle", "square", "triangle"))
    full = build_shapes(ShapesOptions(**opts), ctx())
    base = build_shapes(ShapesOptions(**opts, classes="base"), ctx())
    novel = build_shapes(ShapesOptions(**opts, classes="novel"), ctx())
    assert full.split is None and len(full.classnames) == 6
    assert base.classnames == BASE_NAMES and novel.classnames == NOVEL_NAMES
    assert base.split["classes"] == "base" and base.split["class_names"] == BASE_NAMES
    # every image is of a kept class and its caption names it
    for i in range(12):
        _, _, caption, label = novel.val[i]
        assert novel.classnames[label] in caption


def test_imagefolder_and_captions_halves(tmp_path):
    from clipft_data.captions import CaptionsOptions, build_captions
    from clipft_data.imagefolder import ImageFolderOptions, build_imagefolder
    root = make_folder(tmp_path / "data", per_class=4)   # red, blue, green -> base: blue, green
    whole = build_imagefolder(ImageFolderOptions(root=str(root)), ctx())
    base = build_imagefolder(ImageFolderOptions(root=str(root), classes="base", shots=2), ctx())
    novel = build_imagefolder(ImageFolderOptions(root=str(root), classes="novel"), ctx())
    assert whole.classnames == ["blue", "green", "red"]
    assert base.classnames == ["blue", "green"] and novel.classnames == ["red"]
    assert {y for _, _, y in base.train.items} == {0, 1} and len(base.train.items) == 4   # 2 shots × 2
    assert all("red" in p for p, _, _ in novel.val.items)
    # the val images of a class are the same in the half as in the whole
    assert sorted(p for p, _, y in whole.val.items if y == 2) == sorted(p for p, _, _ in novel.val.items)
    assert base.split["shots"] == 2 and base.split["classes"] == "base"
    f = write_pairs(tmp_path, "csv")
    caps = build_captions(CaptionsOptions(file=str(f), label_column="cls", classes="novel"), ctx())
    assert caps.classnames == ["red"] and all(y == 0 for _, _, y in caps.train.items + caps.val.items)
    with pytest.raises(ValueError, match="label_column"):
        CaptionsOptions(file=str(f), classes="base")


def test_bad_value_names_the_choices(invoke):
    r = invoke("plan", "--model", "tiny-vit", "--data", "shapes:n=8,val_n=8,classes=foo")
    assert r.exit_code == 2
    assert "classes must be one of all, base, novel" in r.stderr and "'foo'" in r.stderr


# -- eval ------------------------------------------------------------------------------------
def _run(invoke, out, *args):
    r = invoke("run", "--model", "tiny-vit", "--pretrained", "none", "--data", f"{SHAPES},classes=base",
               "--epochs", "1", "--batch-size", "8", "--callback", "none", "--out", out, *args)
    assert r.exit_code == 0, r.stderr
    return out


def test_run_on_base_then_eval_base_to_novel(invoke, tmp_path):
    out = _run(invoke, tmp_path / "prompt", "--strategy", "prompt", "--head", "text")
    s = read_summary(out)
    assert s["data"]["classes"] == "base"
    assert json.loads((out / "data_split.json").read_text())["class_names"] == BASE_NAMES
    r = invoke("eval", out, "--base-to-novel", "--json")   # the run's own data, both halves
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["protocol"] == "base-to-novel" and doc["novel_by"] == "class text"
    assert doc["base"]["classes"] == BASE_NAMES and doc["novel"]["classes"] == NOVEL_NAMES
    m = doc["metrics"]
    a, b = m["base_top1"], m["novel_top1"]
    assert a == doc["base"]["metrics"]["head_top1"] and b == doc["novel"]["metrics"]["top1"]
    assert m["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
    assert min(a, b) - 1e-9 <= m["hm"] <= max(a, b) + 1e-9
    # the same numbers from api.evaluate, and the table on stdout
    from clipft import api
    assert api.evaluate(out, base_to_novel=True)["metrics"] == m
    r = invoke("eval", out, "--data", SHAPES, "--base-to-novel")
    assert r.exit_code == 0, r.stderr
    assert "HM" in r.stdout and f"{m['hm']:.4f}" in r.stdout and "novel" in r.stdout


def test_heads_that_cannot_score_novel_classes(invoke, tmp_path):
    linear = _run(invoke, tmp_path / "linear", "--head", "linear")
    r = invoke("eval", linear, "--base-to-novel")
    assert r.exit_code == 2 and "'linear'" in r.stderr and "novel" in r.stderr and not r.stdout
    zs = _run(invoke, tmp_path / "zs", "--head", "zero-shot")
    r = invoke("eval", zs, "--base-to-novel", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["novel_by"] == "zero-shot fallback"
    assert any(n.startswith("novel: zero-shot fallback") for n in doc["notes"])


def test_base_to_novel_usage_errors(invoke):
    model = ("--model", "tiny-vit", "--pretrained", "none")
    r = invoke("eval", *model, "--data", f"{SHAPES},classes=base", "--base-to-novel")
    assert r.exit_code == 2 and "drop classes=base" in r.stderr
    r = invoke("eval", *model, "--data", SHAPES, "--base-to-novel", "--wise-ft-sweep", "0,1")
    assert r.exit_code == 2 and "--wise-ft-sweep" in r.stderr


# -- sweep -----------------------------------------------------------------------------------
def test_sweep_base_to_novel_two_members_one_seed(invoke, tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "--model", "tiny-vit", "--pretrained", "none", "--data", "shapes:n=16,val_n=8",
               "--strategies", "prompt,logit-scale", "--head", "text", "--epochs", "1", "--batch-size", "8",
               "--callback", "none", "--base-to-novel", "--out", out)
    assert r.exit_code == 0, r.stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["base_to_novel"] and doc["data"]["classes"] == "base"
    assert set(doc["zero_shot"]) >= {"base_top1", "novel_top1", "hm"}
    for m in doc["members"]:
        assert m["ok"] == 1, m
        run = m["runs"][0]
        a, b = run["base_top1"], run["novel_top1"]
        assert run["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
        assert m["mean"]["hm"] == run["hm"] and m["std"]["hm"] == 0.0
        assert read_summary(run["run_dir"])["data"]["classes"] == "base"   # trained on base only
    assert "HM" in r.stdout and "zero-shot (before)" in r.stdout
    assert (out / "sweep.png").stat().st_size > 0


def test_sweep_base_to_novel_refuses_a_linear_head_before_training(invoke, tmp_path):
    r = invoke("sweep", "--model", "tiny-vit", "--pretrained", "none", "--data", "shapes:n=8,val_n=8",
               "--strategies", "last-n:n=1", "--head", "linear", "--base-to-novel", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "'linear'" in r.stderr
    assert not (tmp_path / "s").exists()
