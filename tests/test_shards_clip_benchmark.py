"""`clipft shards --clip-benchmark`: clip_benchmark's `wds/` layout, read back
the way clip_benchmark reads it (clip_benchmark.datasets.builder.build_wds_dataset:
SPLIT/nshards.txt names SPLIT/{0..N-1}.tar, the image is the first of
webp/png/jpg/jpeg, the label `cls` an int, classnames.txt one a line, and each
line of zeroshot_classification_templates.txt formatted with c=CLASS), without
clip_benchmark installed; and by clipft's own webdataset source."""
import collections
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")   # clip_benchmark's order


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """train/ and val/ of 4 classes (png from the shapes generator), plus in val
    a jpg, a bmp (re-encoded as png) and an unreadable file."""
    from shapes_folder import write_folder
    root = tmp_path_factory.mktemp("cb") / "images"
    write_folder(root / "train", 3, ["red", "blue"], ["circle", "square"], seed=0, size=24)
    write_folder(root / "val", 2, ["red", "blue"], ["circle", "square"], seed=1, size=24)
    Image.new("RGB", (20, 20), (200, 20, 20)).save(root / "val" / "red_square" / "photo.jpg")
    Image.new("RGB", (20, 20), (20, 20, 200)).save(root / "val" / "blue_circle" / "scan.bmp")
    (root / "val" / "blue_square" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbpairs")
    rows = ["image,caption,kind"]
    for i in range(6):
        kind = ("cat", "dog")[i % 2]
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / f"{i}.jpg")
        rows.append(f"{i}.jpg,a {kind} number {i},{kind}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def cb(invoke, source, out, *args):
    r = invoke("shards", source, out, "--clip-benchmark", "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def read_split(root: Path, split: str) -> list:
    """``[(image bytes, PIL size, label)]`` of ``root/split``, as clip_benchmark
    finds them: the tar names from nshards.txt, samples grouped by the name
    before the first dot."""
    nshards = int((root / split / "nshards.txt").read_text())
    tars = [root / split / f"{i}.tar" for i in range(nshards)]
    assert sorted(p.name for p in (root / split).glob("*.tar")) == sorted(p.name for p in tars)
    out = []
    for tar_path in tars:
        samples = collections.OrderedDict()
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, s in samples.items():
            ext = next(e for e in IMAGE_KEYS if e in s)
            with Image.open(io.BytesIO(s[ext])) as im:
                im.load()
                size = im.size
            out.append((s[ext], size, int(s["cls"])))
    return out


def clip_benchmark_zero_shot(export: Path, root: Path) -> list:
    """``[(image bytes, predicted class, true class)]`` of the test split, by
    clip_benchmark's zero-shot classification (models/open_clip.py, metrics/
    zeroshot_classification.py) on the samples as read above: the model through
    open_clip's ``local-dir:`` (its --pretrained ignored), each class the mean of
    its normalized prompt embeddings. (That plain open_clip loads an export
    without clipft is test_export.py's.)"""
    import open_clip
    import torch
    import torch.nn.functional as F
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{export}", pretrained="laion400m_e32")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    classes = [line.strip() for line in (root / "classnames.txt").read_text().splitlines()]
    templates = [line.strip() for line in (root / "zeroshot_classification_templates.txt").read_text().splitlines()]
    samples = read_split(root, "test")
    images = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b, _, _ in samples])
    with torch.no_grad():
        weights = []
        for c in classes:
            e = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])), dim=-1).mean(0)
            weights.append(e / e.norm())
        pred = (100.0 * F.normalize(model.encode_image(images), dim=-1) @ torch.stack(weights, dim=1)).argmax(1)
    return [(b, classes[int(k)], classes[y]) for (b, _, y), k in zip(samples, pred)]


def source_pairs(folder: Path) -> collections.Counter:
    """(image bytes, class name) of every readable image of a class folder tree
    (a bmp is compared by its pixels, see below)."""
    got = collections.Counter()
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix in (".png", ".jpg") and p.name != "broken.png":
            got[(p.read_bytes(), p.parent.name.replace("_", " "))] += 1
    return got


def test_a_train_val_folder_becomes_train_and_test(invoke, split_folder, tmp_path):
    out = tmp_path / "wds"
    m = cb(invoke, split_folder, out, "--shard-size", "5", "--shuffle-seed", "0",
           "--templates", "a photo of a {}.,a {{curly}} {}")
    # the layout clip_benchmark reads, and each split a clipft set too
    assert sorted(p.name for p in out.iterdir()) == ["classnames.txt", "test", "train",
                                                    "zeroshot_classification_templates.txt"]
    for split in ("train", "test"):
        assert {"nshards.txt", "shards.json", "classnames.txt"} <= {p.name for p in (out / split).iterdir()}
    assert not [p for p in out.rglob(".*")]   # no temporary left
    classes = [line.strip() for line in (out / "classnames.txt").read_text().splitlines()]
    assert classes == ["blue circle", "blue square", "red circle", "red square"] == m["classnames"]
    templates = [line.strip() for line in (out / "zeroshot_classification_templates.txt").read_text().splitlines()]
    assert all("{c}" in t for t in templates)
    assert [t.format(c="red circle") for t in templates] == ["a photo of a red circle.", "a {curly} red circle"]

    # clipft's val is clip_benchmark's test; the labels name the folder each image came from
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) == 12 and len(test) == 4 * 2 + 2 and m["splits"]["test"]["samples"] == 10
    assert int((out / "train" / "nshards.txt").read_text()) == 3 == len(m["splits"]["train"]["shards"])
    assert collections.Counter((b, classes[y]) for b, _, y in train) == source_pairs(split_folder / "train")
    kept = collections.Counter((b, classes[y]) for b, size, y in test if size != (20, 20) or b[:4] != b"\x89PNG")
    assert kept == source_pairs(split_folder / "val")
    bmp = [(size, classes[y]) for b, size, y in test if size == (20, 20) and b[:4] == b"\x89PNG"]
    assert bmp == [((20, 20), "blue circle")]   # re-encoded as png, label kept
    assert [s["path"] for s in m["skipped"]] == [str(split_folder / "val" / "blue_square" / "broken.png")]
    assert "clip_benchmark eval --dataset wds/wds --dataset_root" in m["command"]
    assert "--model local-dir:EXPORT" in m["command"] and "--output" in m["command"]


def test_clipfts_webdataset_source_reads_the_splits(invoke, split_folder, tmp_path):
    from clipft.data import DataContext
    from clipft.options import build_options
    from clipft.plugins import Registry
    out = tmp_path / "wds"
    cb(invoke, split_folder, out, "--shard-size", "4")
    spec = Registry().load().get("data", "webdataset")
    ctx = DataContext(transform_train=lambda im: im.size, transform_val=lambda im: im.size, seed=0, num_workers=0)
    b = spec.build(build_options("data", spec, {"urls": str(out / "train"), "val_urls": str(out / "test")}), ctx)
    assert b.classnames == ["blue circle", "blue square", "red circle", "red square"]
    labels = collections.Counter(int(x[3]) for x in b.val)
    assert labels == collections.Counter(y for _, _, y in read_split(out, "test"))
    assert sum(1 for _ in b.train) == 12


def test_webdataset_reads_it_as_clip_benchmark_does(invoke, split_folder, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "wds"
    cb(invoke, split_folder, out, "--shard-size", "3")
    nshards = int((out / "test" / "nshards.txt").read_text())
    ds = (wds.WebDataset(os.path.join(out, "test", "{0..%d}.tar" % (nshards - 1)),
                         nodesplitter=lambda src: src, shardshuffle=False)
          .decode(wds.autodecode.ImageHandler("pil", extensions=list(IMAGE_KEYS)))
          .to_tuple(";".join(IMAGE_KEYS), "cls"))
    got = [(im.mode, y) for im, y in ds]
    assert len(got) == 10 and all(isinstance(y, int) for _, y in got)
    assert collections.Counter(y for _, y in got) == collections.Counter(y for *_, y in read_split(out, "test"))


def test_a_plain_folder_or_table_is_the_test_split(invoke, split_folder, pairs, tmp_path):
    m = cb(invoke, split_folder / "val", tmp_path / "a")
    assert list(m["splits"]) == ["test"] and not (tmp_path / "a" / "train").exists()
    m = cb(invoke, pairs, tmp_path / "b", "--label-column", "kind", "--shard-size", "4")
    assert m["classnames"] == ["cat", "dog"] and m["dataset_type"] == "classification"
    rows = [line.split(",") for line in pairs.read_text().splitlines()[1:]]
    got = collections.Counter((b, m["classnames"][y]) for b, _, y in read_split(tmp_path / "b", "test"))
    assert got == collections.Counter(((pairs.parent / img).read_bytes(), kind) for img, _, kind in rows)
    # captions without labels: clip_benchmark's zero-shot retrieval
    m = cb(invoke, pairs, tmp_path / "c")
    assert (tmp_path / "c" / "dataset_type.txt").read_text().strip() == "retrieval"
    assert not (tmp_path / "c" / "classnames.txt").exists() and "--task zeroshot_retrieval" in m["command"]


def test_bad_input_is_a_usage_error_and_writes_nothing(invoke, split_folder, tmp_path):
    from clipft.commands.shards import write_shards
    from clipft.errors import ClipftUsageError
    lone = tmp_path / "lone"
    (lone / "train" / "a").mkdir(parents=True)
    (lone / "train" / "b").mkdir(parents=True)
    r = invoke("shards", lone, tmp_path / "o1", "--clip-benchmark")
    assert r.exit_code == 2 and "train/ but no val/" in r.stderr and not (tmp_path / "o1").exists()
    odd = tmp_path / "odd"
    for split, classes in (("train", "ab"), ("val", "ac")):
        for c in classes:
            (odd / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(odd / split / c / "0.png")
    r = invoke("shards", odd, tmp_path / "o2", "--clip-benchmark")
    assert r.exit_code == 2 and "different classes" in r.stderr and not (tmp_path / "o2").exists()
    with pytest.raises(ClipftUsageError, match="spans lines"):
        write_shards(split_folder, tmp_path / "o3", templates=["a photo\nof a {}."], clip_benchmark=True)
    assert not (tmp_path / "o3").exists()
    # without the flag a split folder is still refused, now naming the flag
    r = invoke("shards", split_folder, tmp_path / "o4")
    assert r.exit_code == 2 and "--clip-benchmark" in r.stderr and "val_urls" in r.stderr


def test_overwrite_replaces_only_its_files_and_a_crash_keeps_the_old_set(invoke, split_folder, tmp_path,
                                                                          monkeypatch):
    import clipft.commands.shards as mod
    out = tmp_path / "wds"
    cb(invoke, split_folder, out, "--shard-size", "5")
    r = invoke("shards", split_folder, out, "--clip-benchmark")
    assert r.exit_code == 2 and "not empty" in r.stderr and "--overwrite" in r.stderr
    (out / "notes.md").write_text("mine")
    (out / "train" / "notes.md").write_text("mine too")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = mod._write_shard

    def failing(path, samples, first):
        if path.parent.name == "test":
            raise OSError(28, "No space left on device", str(path))
        return real(path, samples, first)
    monkeypatch.setattr(mod, "_write_shard", failing)
    r = invoke("shards", split_folder, out, "--clip-benchmark", "--overwrite", "--shard-size", "2")
    assert r.exit_code == 1 and "No space left" in r.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(mod, "_write_shard", real)
    # a plain folder over a train/val set: train/ loses clipft's files, keeps the user's
    cb(invoke, split_folder / "val", out, "--overwrite", "--shard-size", "4")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["notes.md"]
    assert sorted(p.name for p in (out / "test").iterdir()) == [
        "0.tar", "1.tar", "2.tar", "classnames.txt", "nshards.txt", "shards.json"]
    assert (out / "notes.md").read_text() == "mine" and len(read_split(out, "test")) == 10


def test_an_export_predicts_in_clip_benchmarks_way_as_clipft_predict_does(invoke, split_folder, tmp_path):
    run, export, out = tmp_path / "run", tmp_path / "export", tmp_path / "wds"
    templates = "a photo of a {}.,a {} shape"
    r = invoke("run", "--model", "tiny-vit", "--pretrained", "none", "--strategy", "full", "--epochs", "1",
               "--data", f"imagefolder:root={split_folder},templates={templates}",
               "--batch-size", "8", "--callback", "none", "--out", run)
    assert r.exit_code == 0, r.stderr
    assert invoke("export", run, export).exit_code == 0
    cb(invoke, split_folder, out, "--templates", templates)
    r = invoke("predict", export, split_folder / "val", "--json", "--top-k", "1")
    assert r.exit_code == 0, r.stderr
    ours = {Path(d["image"]).read_bytes(): d["top"][0]["label"]
            for d in map(json.loads, r.stdout.splitlines()) if "top" in d}   # not broken.png
    theirs = clip_benchmark_zero_shot(export, out)
    # the same images (the bmp, re-encoded, has other bytes), labels, class names and prompts
    folder_of = {b: name for b, name in source_pairs(split_folder / "val")}
    rows = [(ours[b], pred, true, folder_of[b]) for b, pred, true in theirs if b in ours]
    assert len(rows) == 9 and all(true == folder for _, _, true, folder in rows)
    assert sum(mine != pred for mine, pred, _, _ in rows) <= 1   # one near-tie may fall either way
