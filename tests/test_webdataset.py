"""WebDataset: `clipft shards` writes shards, the `webdataset` source streams
them (split by rank and worker), and the engine trains and evaluates on them."""
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import read_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["run", "--model", "tiny-vit", "--pretrained", "none", "--batch-size", "8", "--callback", "none"]


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 6 classes × 6 shapes images (36 png files)."""
    from shapes_folder import write_folder
    root = tmp_path_factory.mktemp("wds") / "images"
    write_folder(root, 6, ["red", "blue"], ["circle", "square", "triangle"], seed=0, size=32)
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A captions CSV of 12 pairs in 3 classes, each caption unique."""
    root = tmp_path_factory.mktemp("pairs")
    rows = ["image,caption,kind"]
    for i in range(12):
        kind = ("red", "green", "blue")[i % 3]
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[kind]
        Image.new("RGB", (24, 24), rgb).save(root / f"{i}.jpg")
        rows.append(f"{i}.jpg,a {kind} square number {i},{kind}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def shards(invoke, source, out, *args):
    r = invoke("shards", source, out, "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def bundle_of(options: dict, num_workers=0, seed=0):
    from clipft.data import DataContext
    from clipft.options import build_options
    from clipft.plugins import Registry
    spec = Registry().load().get("data", "webdataset")
    ctx = DataContext(transform_train=_tensor, transform_val=_tensor, seed=seed, num_workers=num_workers)
    return spec.build(build_options("data", spec, options), ctx)


def _tensor(image):
    import torch
    return torch.zeros(3, 4, 4)


# -- clipft shards ---------------------------------------------------------------------------
def test_shards_from_an_image_folder_keep_the_bytes_and_write_the_manifest(invoke, folder, tmp_path):
    out = tmp_path / "shards"
    m = shards(invoke, folder, out, "--shard-size", "10")
    assert [s["samples"] for s in m["shards"]] == [10, 10, 10, 6] and m["samples"] == 36
    assert m["classes"] == 6 and m["classnames"][0] == "blue circle"
    assert m["urls"] == str(out / "shard-{000000..000003}.tar")
    doc = json.loads((out / "shards.json").read_text())
    assert [s["name"] for s in doc["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    assert doc["keys"] == {"image": ["png"], "caption": "txt", "label": "cls"}
    assert (out / "classnames.txt").read_text().splitlines() == m["classnames"]
    first = members(out / "shard-000000.tar")
    # sorted order: the first class folder's first file is sample 000000, bytes as they were
    assert first["000000.png"] == (folder / "blue_circle" / "0000.png").read_bytes()
    assert first["000000.txt"] == b"a photo of a blue circle." and first["000000.cls"] == b"0"
    assert sorted(first)[:3] == ["000000.cls", "000000.png", "000000.txt"]
    last = members(out / "shard-000003.tar")
    assert last["000035.cls"] == b"5"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary left


def test_shards_refuse_a_non_empty_out_and_overwrite_only_their_own_files(invoke, folder, tmp_path):
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "10")
    r = invoke("shards", folder, out)
    assert r.exit_code == 2 and "not empty" in r.stderr and "--overwrite" in r.stderr
    (out / "notes.md").write_text("mine")
    m = shards(invoke, folder, out, "--shard-size", "20", "--shuffle-seed", "3", "--overwrite")
    assert [s["samples"] for s in m["shards"]] == [20, 16] and m["shuffle_seed"] == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "classnames.txt", "notes.md", "shard-000000.tar", "shard-000001.tar", "shards.json"]
    # shuffled: the same 36 images, in another order
    got = [v for name, v in sorted({**members(out / "shard-000000.tar"),
                                    **members(out / "shard-000001.tar")}.items()) if name.endswith(".png")]
    files = sorted(folder.rglob("*.png"))
    assert sorted(got) == sorted(p.read_bytes() for p in files) and got != [p.read_bytes() for p in files]


def test_shards_write_crash_safely(invoke, folder, tmp_path, monkeypatch):
    import clipft.commands.shards as mod
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "10")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = mod._write_shard, []

    def failing(path, samples, first):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, samples, first)
    monkeypatch.setattr(mod, "_write_shard", failing)
    r = invoke("shards", folder, out, "--shard-size", "5", "--overwrite")
    assert r.exit_code == 1 and "No space left" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # the old set is intact


@pytest.mark.parametrize("args, needle", [
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--label-column", "kind"], "are for a table of pairs"),
])
def test_shards_usage_errors(invoke, folder, tmp_path, args, needle):
    r = invoke("shards", folder, tmp_path / "out", *args)
    assert r.exit_code == 2 and needle in r.stderr


def test_shards_usage_errors_for_the_source(invoke, folder, tmp_path):
    r = invoke("shards", tmp_path / "nothing", tmp_path / "out")
    assert r.exit_code == 2 and "not found" in r.stderr
    split = tmp_path / "split"
    for part in ("train", "val"):
        (split / part / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(split / part / "a" / "0.png")
    r = invoke("shards", split, tmp_path / "out")
    assert r.exit_code == 2 and "train/ and val/" in r.stderr and "val_urls" in r.stderr
    r = invoke("shards", folder, folder / "inside")
    assert r.exit_code == 2 and "inside the image folder" in r.stderr


def test_shards_from_a_captions_file(invoke, pairs, tmp_path):
    out = tmp_path / "shards"
    m = shards(invoke, pairs, out, "--shard-size", "4", "--label-column", "kind")
    assert m["captions"] == "captions" and m["classnames"] == ["blue", "green", "red"]
    s0 = members(out / "shard-000000.tar")
    assert s0["000001.jpg"] == (pairs.parent / "1.jpg").read_bytes()   # file order, bytes as they were
    assert s0["000001.txt"] == b"a green square number 1" and s0["000001.cls"] == b"1"
    r = invoke("shards", pairs, tmp_path / "o2", "--label-column", "colour")
    assert r.exit_code == 2 and "no column 'colour'" in r.stderr


# -- the source ------------------------------------------------------------------------------
def test_labels_and_class_names(invoke, pairs, tmp_path):
    from clipft.errors import ClipftUsageError
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "4", "--label-column", "kind")
    b = bundle_of({"urls": str(out)})   # label_key=auto: shards.json names cls, classnames.txt beside
    assert b.classnames == ["blue", "green", "red"] and b.has_labels and b.has_captions
    assert bundle_of({"urls": str(out), "label_key": "none"}).classnames is None
    (out / "classnames.txt").unlink()
    with pytest.raises(ClipftUsageError, match="needs class names"):
        bundle_of({"urls": str(out)})
    (tmp_path / "names.txt").write_text("bleu\nvert\n\nrouge\n")
    assert bundle_of({"urls": str(out), "classnames": f"@{tmp_path / 'names.txt'}"}).classnames == [
        "bleu", "vert", "rouge"]
    b = bundle_of({"urls": str(out), "classnames": "b,g,r", "caption_key": "none", "templates": "a {} one"})
    caps, _ = _captions(b.val)
    assert caps == ["a b one", "a r one", "a g one", "a b one"] and not b.has_captions


def test_readers_cover_each_shard_exactly_once():
    from clipft_webdataset.stream import shards_for
    urls = [f"s{i}.tar" for i in range(10)]
    for seed in (None, 0, 7):
        got = [u for rank in range(2) for worker in range(2) for u in shards_for(urls, rank, 2, worker, 2, seed)]
        assert sorted(got) == sorted(urls)
    assert shards_for(urls, 1, 2, 0, 2, 7) != shards_for(urls, 1, 2, 0, 2, 8)   # reshuffled per epoch


def test_fewer_shards_than_readers_is_a_clear_error(invoke, folder, tmp_path):
    from clipft.errors import ClipftUsageError
    from clipft_webdataset.stream import shards_for
    with pytest.raises(ClipftUsageError, match=r"3 train shard\(s\) for 2 rank\(s\) × 2 DataLoader worker\(s\) "
                                               r"= 4 readers.*hangs"):
        shards_for(["a", "b", "c"], 0, 2, 0, 2)
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "12")   # 3 shards: 2 train, 1 val
    r = invoke(*RUN, "--strategy", "full", "--data", f"webdataset:urls={out}", "--num-workers", "3",
               "--out", tmp_path / "run")
    assert r.exit_code == 2
    assert "2 train shard(s) for 1 rank(s) × 3 DataLoader worker(s) = 3 readers" in r.stderr
    assert "resampled=true" in r.stderr
    assert not (tmp_path / "run").exists()


def _captions(stream, readers=None, epoch_seed=None):
    """Captions and indices of one epoch of a stream, read as each (rank, worker) reader would."""
    if epoch_seed is not None:
        stream.set_epoch(epoch_seed)
    caps, idx = [], []
    try:
        for reader in readers or [(0, 1, 0, 1)]:
            stream._readers = lambda reader=reader: reader
            for i, _, cap, _ in stream:
                caps.append(cap)
                idx.append(i)
    finally:
        del stream._readers
    return caps, idx


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(invoke, pairs, tmp_path):
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "2", "--label-column", "kind")   # 6 shards
    b = bundle_of({"urls": str(out), "val_shards": "1", "shuffle_buffer": "4"})
    assert (b.train_length, b.val_length, b.has_captions) == (10, 2, True)
    readers = [(r, 2, w, 2) for r in range(2) for w in range(2)]
    orders = []
    for epoch_seed in (11, 12):
        caps, idx = _captions(b.train, readers, epoch_seed)
        assert sorted(caps) == sorted(f"a {('red', 'green', 'blue')[i % 3]} square number {i}" for i in range(10))
        assert len(set(idx)) == 10   # indices unique within the epoch
        orders.append(caps)
    assert orders[0] != orders[1]   # shards and samples reshuffled per epoch
    caps, _ = _captions(b.val, [(0, 1, 0, 1)])
    assert caps == ["a green square number 10", "a blue square number 11"]


def test_a_real_dataloader_with_two_workers_and_a_resume_part_way(invoke, pairs, tmp_path):
    from clipft.engine.loaders import Loaders
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "3", "--label-column", "kind")   # 4 shards: 3 train
    b = bundle_of({"urls": str(out), "shuffle_buffer": "0"}, num_workers=2)
    loaders = Loaders(b, batch_size=4, seed=0, device="cpu", num_workers=2)
    assert loaders.n_batches(b.train) == 3
    batches = list(loaders.train(epoch=1))
    # each worker ends on a short batch of its own; re-cut, the epoch has ceil(9 / 4) batches
    assert [len(x["index"]) for x in batches] == [4, 4, 1] and [x["position"] for x in batches] == [0, 1, 2]
    caps = [c for x in batches for c in x["captions"]]
    assert sorted(caps) == sorted(f"a {('red', 'green', 'blue')[i % 3]} square number {i}" for i in range(9))
    again = list(loaders.train(epoch=1, skip_batches=1))   # a resume after batch 1: the rest, as before
    assert [x["position"] for x in again] == [1, 2]
    assert [x["captions"] for x in again] == [x["captions"] for x in batches[1:]]
    assert [c for x in loaders.val() for c in x["captions"]] == [f"a {c} square number {i}" for i, c in
                                                                 zip((9, 10, 11), ("red", "green", "blue"))]


def test_a_stream_leaves_its_short_last_batch_out_with_drop_last(invoke, pairs, tmp_path):
    from clipft.engine.loaders import Loaders
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "3", "--label-column", "kind")   # 9 train samples
    b = bundle_of({"urls": str(out), "shuffle_buffer": "0"})
    loaders = Loaders(b, batch_size=4, seed=0, device="cpu", drop_last=True)
    assert loaders.n_train_batches() == 2 and loaders.dropped_per_epoch == 1
    batches = list(loaders.train(epoch=1))
    assert [len(x["index"]) for x in batches] == [4, 4] and [x["position"] for x in batches] == [0, 1]
    again = list(loaders.train(epoch=1, skip_batches=1))   # a resume after batch 1
    assert [x["captions"] for x in again] == [batches[1]["captions"]]


def test_resampled_gives_samples_per_epoch(invoke, pairs, tmp_path):
    from clipft.engine.loaders import Loaders
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "3")   # 4 shards, no labels
    b = bundle_of({"urls": str(out), "resampled": "true", "samples_per_epoch": "50"})
    assert b.train_length == 50 and b.classnames is None
    readers = [(r, 2, w, 2) for r in range(2) for w in range(2)]   # 4 readers from 3 train shards: fine
    caps, idx = _captions(b.train, readers, epoch_seed=5)
    assert len(caps) == 50 and len(set(idx)) == 50 and len(set(caps)) <= 9
    batches = list(Loaders(b, batch_size=8, seed=0, device="cpu").train(epoch=0))
    assert [len(x["index"]) for x in batches] == [8] * 6 + [2]
    r = invoke(*RUN, "--strategy", "full", "--data", f"webdataset:urls={out},resampled=true",
               "--out", tmp_path / "run")
    assert r.exit_code == 2 and "needs samples_per_epoch" in r.stderr


def _append_corrupt(shard: Path, key: str) -> None:
    with tarfile.open(shard, "a") as tar:
        for name, data in ((f"{key}.png", b"\x89PNG not really"), (f"{key}.txt", b"broken"),
                           (f"{key}.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = shard.parent / "shards.json"
    doc = json.loads(manifest.read_text())
    for s in doc["shards"]:
        if s["name"] == shard.name:
            s["samples"] += 1
    doc["samples"] += 1
    manifest.write_text(json.dumps(doc))


def test_train_and_evaluate_on_image_folder_shards_with_a_corrupt_sample(invoke, folder, tmp_path):
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "6", "--shuffle-seed", "0")   # 6 shards: 5 train, 1 val
    _append_corrupt(out / "shard-000001.tar", "999999")
    run = tmp_path / "run"
    r = invoke(*RUN, "--strategy", "full", "--lr", "1e-3", "--data", f"webdataset:urls={out}",
               "--epochs", "2", "--out", run, "--json", "--no-drop-last")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s == read_summary(run)
    assert (s["data"]["train_size"], s["data"]["val_size"], s["data"]["classes"]) == (31, 6, 6)
    assert s["data"]["skipped_images"] == 1   # read in both epochs, counted once
    [why] = s["data"]["skipped_reasons"]      # named by shard and key, with the decoder's reason
    assert why["name"] == f"{out / 'shard-000001.tar'} sample 999999"
    assert why["reason"].startswith("UnidentifiedImageError: cannot identify image file")
    assert "unreadable_shards" not in s["data"]
    assert s["train"]["samples"] == 60 and s["train"]["steps"] == 8   # ceil(31 / 8) a epoch
    assert {"top1"} <= set(s["eval"]["after"]) and "recall@1" not in s["eval"]["after"]   # class prompts
    assert 'urls = "' in (run / "config.toml").read_text()
    ev = invoke("eval", run, "--data", f"webdataset:urls={out}", "--json")
    assert ev.exit_code == 0, ev.stderr
    doc = json.loads(ev.stdout)
    assert doc["samples"] == 6 and doc["metrics"]["top1"] == pytest.approx(s["eval"]["after"]["top1"])


def test_train_on_caption_shards_with_val_urls_and_the_cache_note(invoke, pairs, tmp_path):
    out = tmp_path / "shards"
    shards(invoke, pairs, out, "--shard-size", "4", "--label-column", "kind")   # 3 shards
    run = tmp_path / "run"
    urls = f"{out}/shard-{{000000..000001}}.tar"
    r = invoke(*RUN, "--head", "zero-shot", "--loss", "cross-entropy",
               "--data", f"webdataset:urls={urls},val_urls={out}/shard-000002.tar", "--out", run, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["data"]["train_size"], s["data"]["val_size"]) == (8, 4)
    assert {"top1", "head_top1", "recall@1"} <= set(s["eval"]["after"])
    # the frozen image tower is not cached for a stream, and the summary says why
    assert s["cache"]["train_image"].startswith("live (streamed data")
    assert s["cache"]["val_image"].startswith("live (streamed data")


class _Killed(BaseException):
    """Stops a run at once, as a pre-empted machine would (no checkpoint on the way out)."""


def test_a_run_killed_part_way_into_an_epoch_resumes_bit_identical(invoke, folder, tmp_path, monkeypatch):
    """A stream cannot seek: the resume reads the epoch again up to the step
    checkpoint and drops those batches, and ends where the run left alone ends."""
    import torch
    from safetensors.torch import load_file

    from clipft.engine import session
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "6", "--shuffle-seed", "0")   # 30 train samples: 4 batches
    args = [*RUN, "--strategy", "full", "--lr", "1e-3", "--data", f"webdataset:urls={out},shuffle_buffer=8",
            "--epochs", "2", "--checkpoint-every", "2", "--no-drop-last"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = invoke(*args, "--out", straight)
    assert r.exit_code == 0, r.stderr
    real = session.MetricsLog.on_step_end

    def on_step_end(self, s):
        real(self, s)
        if s.stepped and s.step == 3:   # the step checkpoint at step 2 is on disk, step 3 is lost
            raise _Killed()
    monkeypatch.setattr(session.MetricsLog, "on_step_end", on_step_end)
    with pytest.raises(_Killed):
        invoke(*args, "--out", killed)
    monkeypatch.undo()
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["loop"]["batch"] == 2
    r = invoke("run", "--resume", killed)
    assert r.exit_code == 0, r.stderr
    assert "its first 2 batches are read again and dropped" in r.stderr
    a, b = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_summary(straight), read_summary(killed)
    assert sa["train"]["steps"] == sb["train"]["steps"] == 8
    assert sa["train"]["samples"] == sb["train"]["samples"] == 60
    assert sa["eval"]["after"] == sb["eval"]["after"]


def test_a_truncated_shard_is_named_and_its_lost_samples_counted(invoke, folder, tmp_path):
    """A shard cut short: the samples before the cut train, the shard is reported
    (name, reason, samples lost) in summary.json and a warning."""
    out = tmp_path / "shards"
    shards(invoke, folder, out, "--shard-size", "6", "--shuffle-seed", "0")
    cut = out / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[:1536])   # the first member's header and part of its data
    r = invoke(*RUN, "--strategy", "full", "--lr", "1e-3", "--data", f"webdataset:urls={out}",
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    [shard] = s["data"]["unreadable_shards"]
    assert shard["name"] == str(cut) and shard["samples"] == 6 and shard["reason"]
    assert s["train"]["samples"] < 30
    assert re.search(r"1 shard\(s\) could not be read while training", " ".join(r.stderr.split()))
