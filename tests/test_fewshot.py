"""Few-shot splits (``shots``, ``shots_seed``, ``shots_min``) and named prompt
templates (``templates=simple|openai-imagenet|@FILE``) of the file sources."""
import json
import re
import shutil

import pytest

from conftest import read_summary
from test_data import BASE, COLOURS, make_folder, write_image, write_pairs


def ctx(seed=0):
    from clipft.data import DataContext
    return DataContext(transform_train=lambda x: x, transform_val=lambda x: x, seed=seed)


def folder(opts_root, seed=0, **opts):
    from clipft_data.imagefolder import ImageFolderOptions, build_imagefolder
    return build_imagefolder(ImageFolderOptions(root=str(opts_root), **opts), ctx(seed))


def names(dataset, root):
    """The split's files relative to ``root``, in the split's order."""
    return [str(p.relative_to(root)) for p in map(_path, dataset.items)]


def _path(item):
    from pathlib import Path
    return Path(item[0])


@pytest.fixture
def layout(tmp_path):
    """train/ with 8 images a class, val/ with 2."""
    root = tmp_path / "data"
    make_folder(root / "train", per_class=8)
    make_folder(root / "val", per_class=2)
    return root


# -- the sample -----------------------------------------------------------------------------
def test_same_shots_seed_same_files_other_seed_other_files(layout):
    a = folder(layout, shots=2, shots_seed=1)
    b = folder(layout, shots=2, shots_seed=1)
    c = folder(layout, shots=2, shots_seed=2)
    assert names(a.train, layout) == names(b.train, layout)
    assert names(a.train, layout) != names(c.train, layout)
    assert a.split == {"shots": 2, "shots_seed": 1, "shots_min": True,
                       "train": [p for p, _, _ in a.train.items]}
    assert "2-shot" in a.description


def test_sample_ignores_the_run_seed_and_where_the_data_lives(layout, tmp_path):
    """The run's --seed does not choose the shots, and a moved (or copied) data
    folder gives the same files: the sample ranks paths relative to the root."""
    a = folder(layout, seed=0, shots=3, shots_seed=5)
    assert names(folder(layout, seed=123, shots=3, shots_seed=5).train, layout) == names(a.train, layout)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(layout, moved)
    assert names(folder(moved, shots=3, shots_seed=5).train, moved) == names(a.train, layout)


def test_k_per_class_from_train_only_and_val_untouched(layout, tmp_path):
    full = folder(layout)
    few = folder(layout, shots=3)
    labels = [y for _, _, y in few.train.items]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(names(few.train, layout)) <= set(names(full.train, layout))
    assert all(n.startswith("train/") for n in names(few.train, layout))
    assert few.val.items == full.val.items
    # a seeded val split (no val/ folder): the same val files, shots drawn from the rest
    root = make_folder(tmp_path / "flat", per_class=10)
    full, few = folder(root, val_fraction=0.3), folder(root, val_fraction=0.3, shots=4)
    assert [p for p, _, _ in few.val.items] == [p for p, _, _ in full.val.items]
    assert len(few.train) == 12 and set(few.train.items) - set(full.train.items) == set()
    assert not set(p for p, _, _ in few.train.items) & set(p for p, _, _ in full.val.items)


def test_a_class_with_too_few_images_is_named(layout):
    from clipft.errors import ClipftUsageError

    for p in sorted((layout / "train" / "blue").iterdir())[2:]:
        p.unlink()
    with pytest.raises(ClipftUsageError, match=r"shots=3, but class 'blue' has only 2 training image"):
        folder(layout, shots=3)
    few = folder(layout, shots=3, shots_min=False)   # taken whole, with a warning
    assert [y for _, _, y in few.train.items].count(0) == 2       # blue is label 0
    assert len(few.train) == 2 + 3 + 3
    assert len(few.warnings) == 1 and "class 'blue' has 2 training image(s)" in few.warnings[0]
    assert "shots_min=false" in few.warnings[0]


def test_shots_must_be_positive(invoke, layout, tmp_path):
    r = invoke(*BASE, "--data", f"imagefolder:root={layout},shots=0", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "shots must be > 0" in r.stderr and "Traceback" not in r.stderr


def test_captions_with_a_label_column(tmp_path):
    from clipft_data.captions import CaptionsOptions, build_captions

    f = write_pairs(tmp_path, "csv")          # 12 pairs, 4 of each colour
    def build(**opts):
        return build_captions(CaptionsOptions(file=str(f), label_column="cls", val_fraction=0.25, **opts), ctx())
    full, few = build(), build(shots=2, shots_seed=3)
    assert few.val.items == full.val.items
    assert sorted(y for _, _, y in few.train.items) == [0, 0, 1, 1, 2, 2]
    assert set(few.train.items) <= set(full.train.items)
    assert [p for p, _, _ in build(shots=2, shots_seed=3).train.items] == few.split["train"]
    # each class keeps its own pairs' captions
    assert all(few.classnames[y] in caption for _, caption, y in few.train.items)


def test_captions_shots_need_a_label_column(invoke, tmp_path):
    f = write_pairs(tmp_path, "csv")
    r = invoke(*BASE, "--data", f"captions:file={f},shots=2", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "needs class labels" in r.stderr and "label_column" in r.stderr


def test_too_few_is_a_usage_error_before_the_run_directory(invoke, layout, tmp_path):
    out = tmp_path / "run"
    r = invoke(*BASE, "--data", f"imagefolder:root={layout},shots=9", "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "class 'blue' has only 8 training image(s)" in r.stderr
    assert not out.exists()


def test_run_writes_data_split_and_its_config_repeats_it(invoke, layout, tmp_path):
    """A real run: data_split.json lists the shots, summary.json says how many,
    a class with too few is taken whole with a warning, and `clipft run --config
    RUN/config.toml` chooses the same files; config.toml keeps the template set's name."""
    for p in sorted((layout / "train" / "green").iterdir())[1:]:
        p.unlink()
    out, again = tmp_path / "run", tmp_path / "again"
    data = f"imagefolder:root={layout},shots=2,shots_seed=4,shots_min=false,templates=openai-imagenet"
    r = invoke(*BASE, "--data", data, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "class 'green' has 1 training image(s)" in r.stderr
    split = json.loads((out / "data_split.json").read_text())
    assert (split["shots"], split["shots_seed"], split["shots_min"]) == (2, 4, False)
    assert len(split["train"]) == 2 + 1 + 2
    s = json.loads(r.stdout)
    assert s["data"]["shots"] == 2 and s["data"]["train_size"] == 5 and s["data"]["val_size"] == 6
    cfg = (out / "config.toml").read_text()
    assert 'templates = ["openai-imagenet"]' in cfg and "shots = 2" in cfg
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert len(state["templates"]) == 80          # what the run used: the expanded set

    r = invoke("run", "--config", out / "config.toml", "--out", again, "--json")
    assert r.exit_code == 0, r.stderr
    assert (again / "data_split.json").read_text() == (out / "data_split.json").read_text()
    assert read_summary(again)["data"]["shots"] == 2
    assert json.loads((again / "checkpoint" / "state.json").read_text())["templates"] == state["templates"]
    # the split file is the run's own: --overwrite replaces the run without complaint
    r = invoke(*BASE, "--data", f"imagefolder:root={layout}", "--out", out, "--overwrite", "--json")
    assert r.exit_code == 0, r.stderr
    assert not (out / "data_split.json").exists() and "shots" not in read_summary(out)["data"]


def test_a_run_that_died_before_its_checkpoint_is_reused(tmp_path):
    """data_split.json is written after the marker: a run that stopped before its
    first checkpoint (the marker not yet listing the file) holds only clipft's
    files, so the same command may reuse the directory."""
    from clipft.engine import rundir

    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.MARKER).write_text(json.dumps({"format": rundir.MARKER_FORMAT, "entries": [rundir.MARKER]}))
    (out / "config.toml").write_text("")
    (out / "data_split.json").write_text("{}")
    assert rundir.foreign_entries(out) == []
    rundir.check_out_dir(out, overwrite=False)   # no error


# -- named templates --------------------------------------------------------------------
def test_openai_imagenet_is_open_clips_list():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from clipft.data import check_templates, resolve_templates

    got = resolve_templates("openai-imagenet")
    assert len(got) == 80 and got[0] == "a bad photo of a {}."
    assert [t.format("dog") for t in got] == [t("dog") for t in OPENAI_IMAGENET_TEMPLATES]
    check_templates(got)
    assert resolve_templates(["openai-imagenet"], keep_names=True) == ("openai-imagenet",)


def test_simple_lists_and_mixtures():
    from clipft.data import DEFAULT_TEMPLATES, resolve_templates

    assert resolve_templates("simple") == ("a photo of a {}.",) == DEFAULT_TEMPLATES
    assert resolve_templates(["a {} thing", "simple"]) == ("a {} thing", "a photo of a {}.")
    assert len(resolve_templates(["simple", "openai-imagenet"])) == 81


def test_template_file(tmp_path):
    from clipft.data import resolve_templates
    from clipft.errors import ClipftUsageError

    f = tmp_path / "prompts.txt"
    f.write_text("\ufeffa photo of a {}.\n\n  a drawing of a {}.  \r\nitap of a {}\n", encoding="utf-8")
    assert resolve_templates(f"@{f}") == ("a photo of a {}.", "a drawing of a {}.", "itap of a {}")
    f.write_text("a photo of a {}.\na {} and a {}\n")
    with pytest.raises(ClipftUsageError, match=re.escape(f"templates file {f}:2: template 'a {{}} and a {{}}' has 2")):
        resolve_templates(f"@{f}")
    f.write_text("a photo of a {}.\n\nno placeholder here\n")
    with pytest.raises(ClipftUsageError, match=re.escape(f"{f}:3: template 'no placeholder here' has no")):
        resolve_templates(f"@{f}")
    with pytest.raises(ClipftUsageError, match="cannot read templates file"):
        resolve_templates(f"@{tmp_path}/missing.txt")
    f.write_bytes(b"a photo of a {}.\n\xff{}\n")
    with pytest.raises(ClipftUsageError, match="not UTF-8 text .* on line 2"):
        resolve_templates(f"@{f}")


def test_unknown_word_lists_the_sets(invoke, tmp_path):
    from clipft.data import resolve_templates
    from clipft.errors import ClipftUsageError

    with pytest.raises(ClipftUsageError, match="template 'imagenet' has no .*simple, openai-imagenet"):
        resolve_templates("imagenet")
    root = make_folder(tmp_path / "data", per_class=2)
    r = invoke(*BASE, "--data", f"imagefolder:root={root},templates=openai", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "template 'openai' has no '{}'" in r.stderr and "simple, openai-imagenet" in r.stderr


def test_the_option_keeps_names_and_records_a_files_content(tmp_path):
    """config.toml keeps a set's name (exact and short) but a file's templates
    (the file may change or move); both round-trip through the option."""
    from clipft.options import build_options, options_to_dict
    from clipft.api import make_registry

    spec = make_registry().get("data", "imagefolder")
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of a {}.\na sketch of a {}.\n")
    for raw, kept in [("openai-imagenet", ("openai-imagenet",)),
                      ("simple,a {} thing", ("simple", "a {} thing")),
                      (f"@{f}", ("a photo of a {}.", "a sketch of a {}."))]:
        opts = build_options("data", spec, {"root": "x", "templates": raw})
        assert opts.templates == kept
        as_toml = options_to_dict(opts)["templates"]
        assert build_options("data", spec, {"root": "x", "templates": list(as_toml)}).templates == kept


def test_templates_reach_the_bundle_resolved(tmp_path):
    from clipft_data.captions import CaptionsOptions, build_captions

    root = make_folder(tmp_path / "data", per_class=3)
    b = folder(root, templates=("openai-imagenet",))
    assert len(b.templates) == 80
    # class-prompt captions rotate through the resolved templates
    assert {c for _, c, _ in b.train.items} <= {t.format(n) for t in b.templates for n in b.classnames}
    f = write_pairs(tmp_path, "csv")
    c = build_captions(CaptionsOptions(file=str(f), label_column="cls", templates="simple"), ctx())
    assert tuple(c.templates) == ("a photo of a {}.",)


def test_nested_class_folders(tmp_path):
    """A class folder may hold nested folders: the relative path is the key."""
    root = tmp_path / "data"
    for c in COLOURS:
        for i in range(4):
            write_image(root / c / f"sub{i % 2}" / f"{i}.jpg", COLOURS[c], seed=i)
    few = folder(root, val_fraction=0.25, shots=2)
    assert len(few.train) == 6 and len({p for p, _, _ in few.train.items}) == 6
