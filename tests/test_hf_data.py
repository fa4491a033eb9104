"""The ``hf`` data source (plugins/clipft-hf): Hugging Face datasets written by
``datasets`` itself (save_to_disk, to_parquet), trained on end to end, streamed,
and refused clearly when the input is wrong."""
import io
import json
import subprocess
import sys

import pytest

D = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
RUN = ["run", "--model", "tiny-vit", "--pretrained", "none", "--strategy", "full", "--epochs", "1",
       "--batch-size", "8", "--callback", "none", "--json"]


def png(rgb, i: int) -> bytes:
    from PIL import Image
    im = Image.new("RGB", (24, 24), (240, 240, 240))
    im.paste(rgb, (2 + i % 6, 4, 14 + i % 6, 16))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def rows(n: int, start: int = 0, bad=()) -> dict:
    """``n`` rows cycling through the colours: a PNG, the ClassLabel index and
    a caption unique to the row; rows in ``bad`` hold bytes that are no image."""
    names = list(COLOURS)
    out = {"image": [], "label": [], "caption": []}
    for i in range(start, start + n):
        c = names[i % 3]
        out["image"].append({"bytes": b"not a png" if i in bad else png(COLOURS[c], i), "path": None})
        out["label"].append(i % 3)
        out["caption"].append(f"a {c} square number {i}")
    return out


def features():
    return D.Features({"image": D.Image(), "label": D.ClassLabel(names=list(COLOURS)),
                       "caption": D.Value("string")})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dd = D.DatasetDict(train=D.Dataset.from_dict(rows(24), features=features()),
                       validation=D.Dataset.from_dict(rows(12, 100), features=features()))
    dd.save_to_disk(str(root / "dict"))
    dd["train"].to_parquet(str(root / "pq" / "train.parquet"))
    dd["validation"].to_parquet(str(root / "pq" / "validation.parquet"))
    caps = D.Dataset.from_dict({k: v for k, v in rows(24).items() if k != "label"},
                               features=D.Features({"image": D.Image(), "caption": D.Value("string")}))
    caps.save_to_disk(str(root / "captions"))
    D.Dataset.from_dict(rows(24, bad={4}), features=features()).to_parquet(str(root / "bad.parquet"))
    ints = rows(12)
    D.Dataset.from_dict({"image": [r["bytes"] for r in ints["image"]], "label": ints["label"]}).to_parquet(
        str(root / "ints.parquet"))
    return root


def hf(data, rel, **opts) -> str:
    # datasets' Arrow copy of parquet data goes under the test's folder, not ~/.cache
    opts.setdefault("cache_dir", data / "hf-cache")
    return "hf:" + ",".join([f"path={data / rel}"] + [f"{k}={v}" for k, v in opts.items()])


def bundle(options: dict, seed: int = 0):
    """The source built as a run builds it, without a model (transforms give the image size)."""
    from clipft.data import DataContext
    from clipft.options import build_options
    from clipft.plugins import Registry
    spec = Registry().load().get("data", "hf")
    ctx = DataContext(transform_train=lambda im: im.size, transform_val=lambda im: im.size, seed=seed)
    return spec.build(build_options("data", spec, options), ctx)


def train(invoke, out, data_ref, *args) -> dict:
    r = invoke(*RUN, "--data", data_ref, "--out", out, *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


# -- map-style -----------------------------------------------------------------------------------
def test_a_save_to_disk_dict_trains_on_train_and_evaluates_on_validation(invoke, data, tmp_path):
    s = train(invoke, tmp_path / "run", hf(data, "dict", val_split="validation"))
    assert s["data"]["train_size"] == 24 and s["data"]["val_size"] == 12 and s["data"]["classes"] == 3
    assert s["train"]["steps"] == 3
    # labelled and captioned: zero-shot top-1 over the ClassLabel names, and recall on the captions
    assert {"top1", "recall@1", "recall@5"} <= set(s["eval"]["after"])
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'name = "hf"' in config and 'val_split = "validation"' in config


def test_parquet_files_take_their_splits_from_the_file_names(invoke, data, tmp_path):
    # caption=none: the rows are captioned with class prompts, so no recall
    s = train(invoke, tmp_path / "run", hf(data, "pq", val_split="validation", caption="none"))
    assert s["data"]["train_size"] == 24 and s["data"]["val_size"] == 12
    assert "top1" in s["eval"]["after"] and "recall@1" not in s["eval"]["after"]


def test_a_captions_dataset_trains_contrastively_without_classes(invoke, data, tmp_path):
    s = train(invoke, tmp_path / "run", hf(data, "captions", val_fraction=0.25))
    assert s["data"]["train_size"] == 18 and s["data"]["val_size"] == 6
    assert not s["data"].get("classes")
    assert "recall@1" in s["eval"]["after"] and "top1" not in s["eval"]["after"]


def test_shots_sample_k_rows_per_class_from_the_options_alone(invoke, data, tmp_path):
    s = train(invoke, tmp_path / "a", hf(data, "pq", val_split="validation", shots=2))
    assert s["data"]["shots"] == 2 and s["data"]["train_size"] == 6 and s["data"]["val_size"] == 12
    split = json.loads((tmp_path / "a" / "data_split.json").read_text())
    assert split["shots"] == 2 and split["shots_seed"] == 0 and len(split["train"]) == 6
    # rows are named "train[R]", and row R is of class R % 3: two of each
    assert sorted(int(n[6:-1]) % 3 for n in split["train"]) == [0, 0, 1, 1, 2, 2]
    # the sample follows shots_seed, not the run's seed
    opts = {"path": str(data / "pq"), "val_split": "validation", "shots": 2, "cache_dir": str(data / "hf-cache")}
    assert bundle(opts, seed=1).split["train"] == split["train"]
    assert bundle({**opts, "shots_seed": 1}).split["train"] != split["train"]
    r = invoke(*RUN, "--data", hf(data, "pq/train.parquet", shots=50), "--out", tmp_path / "c")
    assert r.exit_code == 2 and "shots=50" in r.stderr and "shots_min=false" in r.stderr
    assert not (tmp_path / "c").exists()


def test_a_corrupt_image_row_is_skipped_named_with_its_reason(invoke, data, tmp_path):
    s = train(invoke, tmp_path / "run", hf(data, "bad.parquet", val_fraction=0.25))
    assert s["data"]["skipped_images"] == 1
    failed = s["data"]["failed_at_load"]
    assert failed["count"] == 1
    assert failed["examples"][0]["name"] == "train[4]"
    assert "UnidentifiedImageError" in failed["examples"][0]["reason"]


def test_int_labels_take_their_names_from_classes(invoke, data, tmp_path):
    ref = hf(data, "ints.parquet", val_fraction=0.25)
    r = invoke(*RUN, "--data", ref, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "not a ClassLabel" in r.stderr and "classes=a,b,c" in r.stderr
    assert not (tmp_path / "a").exists()
    s = train(invoke, tmp_path / "b", ref + ",classes=red,green,blue")
    assert s["data"]["classes"] == 3 and s["data"]["train_size"] == 9


def test_image_folders_and_path_columns_read_as_the_builders_do(data, tmp_path):
    from PIL import Image
    root = tmp_path / "folder"
    for split, n in (("train", 4), ("validation", 2)):
        for name, rgb in COLOURS.items():
            (root / split / f"{name}_sq").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 16), rgb).save(root / split / f"{name}_sq" / f"{i}.png")
    built = bundle({"path": str(root), "val_split": "validation", "cache_dir": str(tmp_path / "cache")})
    # datasets' imagefolder builder: a ClassLabel of the sorted folder names; class prompts as captions
    assert built.classnames == ["blue sq", "green sq", "red sq"] and not built.has_captions
    assert len(built.train) == 12 and len(built.val) == 6
    i, size, caption, label = built.train[0]
    assert size == (20, 16) and caption == f"a photo of a {built.classnames[label]}."
    # a column of file paths, relative to the parquet file's folder, and string labels
    table = tmp_path / "paths"
    table.mkdir()
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    D.Dataset.from_dict({"file": [str(root / p) if k % 2 else f"../folder/{p}" for k, p in enumerate(files)],
                         "kind": [p.parent.name for p in files]}).to_parquet(str(table / "rows.parquet"))
    built = bundle({"path": str(table / "rows.parquet"), "image": "file", "label": "kind",
                    "underscores_to_spaces": False, "cache_dir": str(tmp_path / "cache")})
    assert built.classnames == ["blue_sq", "green_sq", "red_sq"]
    assert {built.train[k][1] for k in range(len(built.train))} == {(20, 16)}


@pytest.mark.parametrize("opts, said", [
    ({"image": "picture"}, "no column 'picture'. Columns: image, label, caption"),
    ({"val_split": "test"}, "no split 'test'. Splits: train, validation"),
    ({"label": "caption", "classes": "a"}, "is not one of the classes"),
])
def test_bad_inputs_are_usage_errors_naming_what_exists(invoke, data, tmp_path, opts, said):
    r = invoke(*RUN, "--data", hf(data, "dict", **opts), "--out", tmp_path / "run")
    assert r.exit_code == 2, r.stderr
    assert said in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_hub_name_offline_says_how_to_use_local_files(invoke, tmp_path):
    r = invoke(*RUN, "--data", "hf:path=someone/pets", "--out", tmp_path / "run",
               env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 2 and "HF_HUB_OFFLINE" in r.stderr and "save_to_disk" in r.stderr
    assert not (tmp_path / "run").exists()
    # online settings but no Hub to reach (a closed local port): refused at once, not after retries
    r = invoke(*RUN, "--data", "hf:path=someone/pets", "--out", tmp_path / "run",
               env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                    **dict.fromkeys(("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))})
    assert r.exit_code == 2 and "cannot be reached" in r.stderr and "save_to_disk" in r.stderr
    # a path that is clearly local is never sent to the Hub
    r = invoke(*RUN, "--data", "hf:path=./no/such/data", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "no such file or folder" in r.stderr


def test_listing_plugins_imports_no_datasets():
    code = "import sys, clipft_hf; print('datasets' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_without_datasets_the_error_names_the_install(monkeypatch):
    from clipft.errors import ClipftUsageError
    from clipft_hf.source import datasets_module
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ClipftUsageError, match="pip install clipft-hf"):
        datasets_module()


# -- streaming -----------------------------------------------------------------------------------
def test_streaming_parquet_trains_a_whole_epoch(invoke, data, tmp_path):
    s = train(invoke, tmp_path / "run", hf(data, "pq", val_split="validation", streaming="true"))
    assert s["data"]["train_size"] == 24 and s["data"]["val_size"] == 12
    assert s["train"]["steps"] == 3 and "top1" in s["eval"]["after"]


def test_stream_readers_read_every_row_once_and_ranks_equally(data, tmp_path, monkeypatch):
    import clipft_hf.stream as stream
    folder = tmp_path / "shards"
    sizes = (5, 7, 4, 8)   # four files of unequal size: four shards, 24 rows; row 2 of shard 1 is no image
    for k, n in enumerate(sizes):
        part = D.Dataset.from_dict(rows(n, start=100 * k, bad={102}), features=features())
        part.to_parquet(str(folder / f"train-{k:05d}.parquet"))
    D.Dataset.from_dict(rows(3), features=features()).to_parquet(str(folder / "validation.parquet"))
    built = bundle({"path": str(folder), "val_split": "validation", "streaming": True, "shuffle_buffer": 4,
                    "cache_dir": str(tmp_path / "cache")})
    assert built.train_length == 24 and built.val_length == 3
    failed = []

    def read(rank, world, worker, workers):
        monkeypatch.setattr(stream, "reader_info", lambda: (rank, world, worker, workers))
        out = []
        for item in built.train:
            if isinstance(item, tuple):
                out.append(item[2])
            else:   # a failed_sample marker, named by shard and row, the same every epoch
                failed.append((item.index, item.name, item.reason))
                out.append(None)
        return out

    # one process, two workers: the shards split between them, every row once
    one = read(0, 1, 0, 2) + read(0, 1, 1, 2)
    good = [c for k, n in enumerate(sizes) for c in rows(n, 100 * k)["caption"] if not c.endswith(" 102")]
    assert sorted(c for c in one if c) == sorted(good) and one.count(None) == 1
    built.train.set_epoch(1)
    again = read(0, 1, 0, 1)
    assert again != one and sorted(c for c in again if c) == sorted(good)   # a new order each epoch
    assert len({f[0] for f in failed}) == 1 and failed[0][1] == "train shard 1 row 2"
    assert "UnidentifiedImageError" in failed[0][2]
    # two ranks: exactly 24 // 2 rows each, whatever their shards hold
    assert len(read(0, 2, 0, 1)) == 12 and len(read(1, 2, 0, 1)) == 12
    # val: every rank reads all of it
    monkeypatch.setattr(stream, "reader_info", lambda: (1, 2, 0, 1))
    assert len(list(built.val)) == 3


def test_class_half_keeps_the_base_or_novel_classes(data):
    """``class_half`` (``hf``'s ``classes`` names the classes): the ClassLabel's
    names sorted, the first half base; rows relabelled within the half."""
    opts = {"path": str(data / "pq"), "val_split": "validation", "cache_dir": str(data / "hf-cache")}
    names = sorted(COLOURS)
    base, novel = bundle({**opts, "class_half": "base"}), bundle({**opts, "class_half": "novel", "shots": 2})
    assert base.classnames == [n for n in COLOURS if n in names[:2]]
    assert novel.classnames == [names[2]] and novel.split["classes"] == "novel"
    assert len(base.train) == 16 and len(base.val) == 8 and len(novel.train) == 2
    assert {it[2] for it in base.train.items} == {0, 1}
