"""Data sources end to end, and every bad-input case from the core issue."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import read_summary

BASE = ["run", "--model", "tiny-vit", "--batch-size", "8", "--epochs", "1", "--strategy", "full"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_image(path, rgb, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root, per_class=5, classes=("red", "blue", "green"), ext=".png"):
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{i}{ext}", COLOURS[c], seed=i)
    return root


def test_imagefolder_with_seeded_val_split(invoke, tmp_path):
    root = make_folder(tmp_path / "data", per_class=5)
    out = tmp_path / "run"
    r = invoke(*BASE, "--data", f"imagefolder:root={root},val_fraction=0.4", "--head", "zero-shot",
               "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["data"]["classes"] == 3 and s["data"]["val_size"] == 6 and s["data"]["train_size"] == 9
    assert {"top1", "head_top1"} <= set(s["eval"]["after"])
    assert "recall@1" not in s["eval"]["after"]  # class folders are not caption data
    # the zero-shot head starts exactly at zero-shot accuracy
    assert s["eval"]["before"]["head_top1"] == s["eval"]["before"]["top1"]


def test_imagefolder_train_val_subfolders_and_templates(invoke, tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=2)
    r = invoke(*BASE, "--data", f"imagefolder:root={root},templates=a {{}} thing,a picture of {{}}",
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["data"]["train_size"], s["data"]["val_size"]) == (9, 6)
    cfg = (tmp_path / "run" / "config.toml").read_text()
    assert 'templates = ["a {} thing", "a picture of {}"]' in cfg


def test_undecodable_image_is_skipped_counted_and_reported(invoke, tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    out = tmp_path / "run"
    r = invoke(*BASE, "--data", f"imagefolder:root={root}", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable image" in r.stderr
    s = read_summary(out)
    assert s["data"]["skipped_images"] == 1 and s["data"]["skipped"][0].endswith("broken.jpg")
    assert s["data"]["train_size"] + s["data"]["val_size"] == 12


@pytest.mark.parametrize("setup,needle", [
    (lambda root: None, "data folder not found"),
    (lambda root: root.mkdir(), "has no class folders"),
    (lambda root: (make_folder(root, 2), (root / "empty_class").mkdir()), "empty_class has no images"),
])
def test_bad_image_folders(invoke, tmp_path, setup, needle):
    root = tmp_path / "data"
    setup(root)
    out = tmp_path / "run"
    r = invoke(*BASE, "--data", f"imagefolder:root={root}", "--out", out)
    assert r.exit_code == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def write_pairs(tmp_path, fmt, image_col="image", caption_col="caption"):
    imgs = tmp_path / "imgs"
    rows = []
    for i, c in enumerate(["red", "blue", "green"] * 4):
        write_image(imgs / f"{c}{i}.png", COLOURS[c], seed=i)
        rows.append({image_col: f"imgs/{c}{i}.png", caption_col: f"a {c} square number {i}", "cls": c})
    if fmt == "jsonl":
        f = tmp_path / "pairs.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        sep = "," if fmt == "csv" else "\t"
        f = tmp_path / f"pairs.{fmt}"
        keys = list(rows[0])
        f.write_text("\n".join([sep.join(keys)] + [sep.join(r[k] for k in keys) for r in rows]) + "\n")
    return f


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_captions_formats_with_relative_paths(invoke, tmp_path, fmt, monkeypatch):
    f = write_pairs(tmp_path, fmt)
    monkeypatch.chdir(tmp_path.parent)  # relative paths resolve against the file, not the cwd
    r = invoke(*BASE, "--data", f"captions:file={f},val_fraction=0.25", "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["data"]["train_size"], s["data"]["val_size"]) == (9, 3)
    assert {"recall@1", "recall@5"} <= set(s["eval"]["after"])
    assert "top1" not in s["eval"]["after"]  # no classes without a label column


def test_captions_custom_columns_and_labels(invoke, tmp_path):
    f = write_pairs(tmp_path, "csv", image_col="path", caption_col="text")
    r = invoke(*BASE, "--data", f"captions:file={f},image_column=path,caption_column=text,label_column=cls",
               "--head", "linear", "--loss", "cross-entropy", "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["data"]["classes"] == 3
    assert {"top1", "head_top1", "recall@1"} <= set(s["eval"]["after"])


def test_captions_missing_column(invoke, tmp_path):
    f = write_pairs(tmp_path, "csv")
    r = invoke(*BASE, "--data", f"captions:file={f},caption_column=text", "--out", tmp_path / "run")
    assert r.exit_code == 2
    assert "has no column 'text'" in r.stderr and "Columns: image, caption, cls" in r.stderr
    assert not (tmp_path / "run").exists()


def test_captions_without_labels_cannot_feed_a_head(invoke, tmp_path):
    f = write_pairs(tmp_path, "csv")
    r = invoke(*BASE, "--data", f"captions:file={f}", "--head", "linear", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "needs class labels" in r.stderr


def test_captions_missing_file_and_missing_images(invoke, tmp_path):
    r = invoke(*BASE, "--data", f"captions:file={tmp_path}/nope.csv", "--out", tmp_path / "r1")
    assert r.exit_code == 2 and "file not found" in r.stderr
    f = write_pairs(tmp_path, "csv")
    f.write_text(f.read_text() + "imgs/gone.png,a lost caption,red\n")
    r = invoke(*BASE, "--data", f"captions:file={f}", "--out", tmp_path / "r2", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["data"]["skipped_images"] == 1


def test_shapes_is_deterministic_and_matches_captions():
    from clipft.data import DataContext
    from clipft_data.shapes import ShapesOptions, build_shapes
    import torchvision.transforms as T

    ctx = DataContext(transform_train=T.ToTensor(), transform_val=T.ToTensor(), seed=0)
    a = build_shapes(ShapesOptions(n=10, seed=3), ctx)
    b = build_shapes(ShapesOptions(n=10, seed=3), ctx)
    c = build_shapes(ShapesOptions(n=10, seed=4), ctx)
    for i in range(10):
        ia, ib = a.train[i], b.train[i]
        assert (ia[1] == ib[1]).all() and ia[2:] == ib[2:]
        assert ia[2] == f"a photo of a {a.classnames[ia[3]]}."
    assert any(not (a.train[i][1] == c.train[i][1]).all() for i in range(10))
    # the dominant non-background colour matches the caption
    red = [x for x in (a.train[i] for i in range(10)) if "red" in x[2]]
    for _, img, _, _ in red:
        px = img.reshape(3, -1)
        fg = px[:, px.min(0).values < 0.7]
        assert fg[0].mean() > fg[1].mean() and fg[0].mean() > fg[2].mean()


def test_tiny_rn_end_to_end_on_shapes(invoke, tmp_path):
    r = invoke("run", "--model", "tiny-rn", "--data", "shapes:n=32,val_n=16", "--strategy", "full",
               "--batch-size", "16", "--out", tmp_path / "rn", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["params"]["trainable"] > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_samples_failing_at_load_time_are_dropped_and_counted_once(workers):
    """Failures found only when decoding (or raising in a transform) are dropped
    from the batch and counted in the main process, also with DataLoader workers."""
    import torch
    from clipft.data import Batches, DecodeFailures, GuardedDataset, collate

    class Flaky:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 3:
                return None            # undecodable
            if i == 7:
                raise OSError("truncated")  # transform blew up
            return i, torch.zeros(3, 4, 4), f"c{i}", 0

    failures = DecodeFailures()
    for _ in range(2):  # two epochs: still counted once
        loader = torch.utils.data.DataLoader(GuardedDataset(Flaky()), batch_size=4,
                                             num_workers=workers, collate_fn=collate)
        seen = [int(i) for b in Batches(loader, failures, "train") for i in b["index"]]
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert failures.count == 2


def test_main_process_decoding_runs_on_one_thread_and_gives_the_threads_back():
    """Without workers, each batch is decoded and collated with one intra-op
    thread, as a worker decodes; the code between batches (the forward) keeps
    the caller's threads, and so does the caller after a pass, whole or cut short."""
    import torch
    from clipft.data import Batches, DecodeFailures, collate, guard

    class Recording:
        def __init__(self):
            self.threads = []

        def __len__(self):
            return 6

        def __getitem__(self, i):
            self.threads.append(torch.get_num_threads())
            return i, torch.full((3, 2, 2), float(i)), f"c{i}", 0

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = Recording()
        loader = torch.utils.data.DataLoader(guard(data), batch_size=2, collate_fn=collate)
        between = []
        for b in Batches(loader, DecodeFailures(), "train"):
            between.append(torch.get_num_threads())
        assert data.threads == [1] * 6 and between == [2] * 3
        for _ in Batches(loader, DecodeFailures(), "train"):
            break
        assert torch.get_num_threads() == 2
        assert [int(i) for b in Batches(loader, DecodeFailures(), "train") for i in b["index"]] == list(range(6))
    finally:
        torch.set_num_threads(before)


def test_a_train_folder_without_val_is_read_as_a_split_not_as_a_class(tmp_path):
    """root/train/<class>/ alone: the classes are train/'s, part held out for
    validation and a note says so; never one class named "train"."""
    import numpy as np
    from PIL import Image

    from clipft.data import DataContext
    from clipft_data.imagefolder import ImageFolderOptions, build_imagefolder
    for c, v in (("red", 200), ("blue", 10)):
        for i in range(5):
            d = tmp_path / "train" / c
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), v + i, np.uint8)).save(d / f"{i}.png")
    ctx = DataContext(transform_train=None, transform_val=None, seed=0)
    bundle = build_imagefolder(ImageFolderOptions(root=str(tmp_path)), ctx)
    assert bundle.classnames == ["blue", "red"]
    assert len(bundle.train) + len(bundle.val) == 10 and len(bundle.val) > 0
    assert any("has train/ but no val" in w for w in bundle.warnings)


def test_guarded_stream_pickles_by_name_for_spawned_workers():
    """A spawned DataLoader worker unpickles the guarded stream, so its class
    must be importable by name; the markers it yields say which sample failed."""
    import pickle

    import torch
    from clipft.data import _Failed, guard
    from clipft.guarded_stream import GuardedStream

    back = pickle.loads(pickle.dumps(GuardedStream([(0, None, "", 0), None, (2, "img", "c", 1)], _Failed)))
    assert type(back) is GuardedStream and isinstance(back, torch.utils.data.IterableDataset)
    assert type(guard(back)) is GuardedStream
    items = list(back)
    assert [type(x) for x in items[:2]] == [_Failed, _Failed]
    assert [x.index for x in items[:2]] == [0, None]
    assert items[2] == (2, "img", "c", 1)


def test_failed_samples_are_named_once_and_unreadable_parts_take_no_slot():
    """The names of failed samples and unreadable shards reach DecodeFailures
    through the re-cut batches of a stream; a shard marker is no sample."""
    import torch
    from clipft.data import (
        Batches,
        DecodeFailures,
        collate,
        failed_sample,
        guard,
        unreadable_part,
    )

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 0, torch.zeros(3, 2, 2), "a", 0
            yield failed_sample(77, "s0.tar sample k1", "UnidentifiedImageError: nope")
            yield unreadable_part("s1.tar", "ReadError: invalid header", 5)
            yield 1, torch.zeros(3, 2, 2), "b", 0

    failures = DecodeFailures()
    for _ in range(2):
        loader = torch.utils.data.DataLoader(guard(Stream()), batch_size=2, collate_fn=collate)
        batches = list(Batches(loader, failures, "train"))
    assert [b["index"].tolist() for b in batches] == [[0], [1]]   # the shard took no sample's place
    assert failures.count == 1 and failures.examples() == [("s0.tar sample k1", "UnidentifiedImageError: nope")]
    assert failures.parts == {("train", "s1.tar"): ("ReadError: invalid header", 5)}
    assert failures.describe() == ("1 shard(s) could not be read (5 samples) and 1 sample(s) could not be "
                                   "decoded, e.g. s1.tar (ReadError: invalid header)")
