"""``captions``: the val split from a second file (``val_file``) or from a
column naming each pair's split (``split_column``), besides ``val_fraction``."""
from __future__ import annotations

import json

import pytest

from clipft.data import DataContext
from clipft_data.captions import CaptionsOptions, build_captions
from test_data import BASE, COLOURS, write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows, header=("image", "caption", "cls", "split")):
    """``rows`` of ``(colour, index, split)``: an image per row (beside the file), a caption naming both."""
    lines = [",".join(header)]
    for colour, i, split in rows:
        write_image(path.parent / "imgs" / f"{colour}{i}.png", COLOURS[colour], seed=i)
        lines.append(",".join([f"imgs/{colour}{i}.png", f"a {colour} square number {i}", colour, split][:len(header)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def build(**opts):
    return build_captions(CaptionsOptions(**opts), DataContext(transform_train=None, transform_val=None, seed=0))


def names(dataset) -> list:
    return sorted(p.rsplit("/", 1)[-1] for p, _, _ in dataset.items)


ROWS = [(c, i, "val" if i >= 3 else "train") for i in range(4) for c in ("red", "blue", "green")]


def test_split_column_puts_each_pair_where_it_says(tmp_path):
    f = write_csv(tmp_path / "pairs.csv", ROWS[:-1] + [("green", 3, " Val ")])   # case and spaces aside
    b = build(file=str(f), split_column="split", label_column="cls")
    assert names(b.val) == ["blue3.png", "green3.png", "red3.png"]
    assert len(b.train) == 9 and not set(names(b.train)) & set(names(b.val))
    assert b.split == {"val_split": {"by": "split_column", "split_column": "split"}}
    assert b.classnames == ["blue", "green", "red"]


def test_val_file_is_the_val_split_and_the_file_trains_whole(tmp_path):
    train = write_csv(tmp_path / "train.csv", [r for r in ROWS if r[2] == "train"], header=("image", "caption", "cls"))
    val = write_csv(tmp_path / "val.csv", [("red", 7, ""), ("blue", 8, "")], header=("image", "caption", "cls"))
    b = build(file=str(train), val_file=str(val), label_column="cls", shots=1)
    assert names(b.val) == ["blue8.png", "red7.png"]
    assert len(b.train) == 3                      # shots sample the train file; val is untouched
    assert b.split["val_split"] == {"by": "val_file", "val_file": str(val)} and b.split["shots"] == 1
    assert str(val) in b.description


@pytest.mark.parametrize("opts, needle", [
    ({"val_file": "v.csv", "val_fraction": 0.1}, "val_file=v.csv and val_fraction=0.1 each choose the val split"),
    ({"split_column": "split", "val_fraction": 0.0}, "split_column=split and val_fraction=0.0"),
    ({"split_column": "split", "val_file": "v.csv"}, "give one of them"),
])
def test_two_ways_to_choose_val_is_a_usage_error(invoke, tmp_path, opts, needle):
    f = write_csv(tmp_path / "pairs.csv", ROWS)
    ref = ",".join(f"{k}={v}" for k, v in opts.items())
    r = invoke(*BASE, "--data", f"captions:file={f},{ref}", "--out", tmp_path / "run")
    assert r.exit_code == 2 and needle in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_split_value_is_named_with_its_line(invoke, tmp_path):
    f = write_csv(tmp_path / "pairs.csv", ROWS[:4] + [("red", 9, "test")] + ROWS[4:])
    r = invoke(*BASE, "--data", f"captions:file={f},split_column=split", "--out", tmp_path / "run")
    assert r.exit_code == 2, r.stderr
    assert f"{f}:6: split_column 'split' is 'test'; each row's must be train or val" in " ".join(r.stderr.split())
    r = invoke(*BASE, "--data", f"captions:file={f},split_column=part", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "has no column 'part'" in r.stderr


def test_an_empty_val_split_is_a_usage_error(tmp_path):
    f = write_csv(tmp_path / "pairs.csv", [(c, i, "train") for c, i, _ in ROWS])
    with pytest.raises(Exception, match="the val split is empty: split_column 'split' puts no pair in val"):
        build(file=str(f), split_column="split")
    gone = write_csv(tmp_path / "gone.csv", [("red", 20, "")], header=("image", "caption", "cls"))
    (tmp_path / "imgs" / "red20.png").unlink()
    with pytest.raises(Exception, match=r"the val split is empty: none of the 1 images in val_file .*gone\.csv"):
        build(file=str(f), val_file=str(gone))
    vals = write_csv(tmp_path / "vals.csv", [(c, i, "val") for c, i, _ in ROWS])
    with pytest.raises(Exception, match="the train split is empty"):
        build(file=str(vals), split_column="split")


def test_a_run_records_the_split_and_eval_uses_it(invoke, tmp_path):
    f = write_csv(tmp_path / "pairs.csv", ROWS)
    out = tmp_path / "run"
    r = invoke(*BASE, "--data", f"captions:file={f},split_column=split", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["data"]["train_size"], s["data"]["val_size"]) == (9, 3)
    assert s["data"]["val_split"] == {"by": "split_column", "split_column": "split"}
    assert json.loads((out / "data_split.json").read_text())["val_split"]["by"] == "split_column"
    r = invoke("eval", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 3


def test_describe_lists_the_new_options(invoke):
    r = invoke("describe", "data", "captions")
    assert r.exit_code == 0
    for needle in ("val_file", "split_column", "train or val"):
        assert needle in r.stdout
