"""The bad-input table: what a hostile (or tired) user can type, and what clipft
does about it. Every case asserts four things:

- the exit code: 2 for usage and config errors, 1 for runtime failures;
- a message on stderr that names the problem (the option, file or row);
- no traceback;
- the state of the command's output directory afterwards: ``absent`` (nothing
  created, no temporary sibling left), ``unchanged`` (every file's bytes as
  before) or ``resumable`` (a complete checkpoint that ``--resume`` accepts).

Cases that need a finished run copy one module-scoped run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = "shapes:n=16,val_n=8"
BASE = ["run", "--model", "tiny-vit", "--epochs", "1", "--batch-size", "8", "--strategy", "full"]
RUN = BASE + ["--data", SHAPES]


# -- helpers -----------------------------------------------------------------
def snapshot(d: Path) -> dict:
    """Every entry under ``d``: a file's bytes, a directory as None."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def images(ctx, n: int = 4) -> list[str]:
    for i in range(n):
        write_image(ctx.tmp / "imgs" / f"{i}.png", i)
    return [f"imgs/{i}.png" for i in range(n)]


def folder(ctx) -> Path:
    """An image folder with two classes."""
    root = ctx.tmp / "folder"
    for c in ("red", "blue"):
        for i in range(3):
            write_image(root / c / f"{i}.png", i + (10 if c == "red" else 0))
    return root


def non_utf8_class(ctx) -> Path:
    """The two-class folder plus a class whose folder name is not UTF-8."""
    import os
    root = folder(ctx)
    odd = Path(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9"))
    write_image(odd / "0.png", 3)
    return root


def one_class_folder(ctx) -> Path:
    root = ctx.tmp / "one"
    for i in range(3):
        write_image(root / "cat" / f"{i}.png", i)
    return root


def unterminated_quote_csv(ctx) -> Path:
    names = [f"imgs/{i % 4}.png" for i in range(24)]
    images(ctx)
    rows = [f"{n},caption {i}" for i, n in enumerate(names)]
    rows[2] = f'{names[2]},"caption with an open quote'
    return csv_file(ctx, "image,caption\n" + "\n".join(rows) + "\n")


class Payload:
    """An object weights_only=True must refuse to unpickle."""


def local_dir(ctx, scale: int = 1, pickle_weights: bool = False) -> str:
    """An export-shaped folder: tiny-vit's config (its widths times ``scale``),
    and with ``pickle_weights`` a .bin that pickles more than tensors."""
    from clipft.models import CONFIG_DIR
    d = ctx.tmp / "local"
    d.mkdir()
    cfg = json.loads((CONFIG_DIR / "tiny-vit.json").read_text())
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["width"] *= scale
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    if pickle_weights:
        import torch
        torch.save({"x": Payload(), "t": torch.zeros(1)}, d / "open_clip_pytorch_model.bin")
    return f"local-dir:{d}"


def csv_file(ctx, text: str, name: str = "pairs.csv") -> Path:
    images(ctx)
    f = ctx.tmp / name
    f.write_text(text)
    return f


def good_csv(ctx) -> Path:
    return csv_file(ctx, "image,caption\n" + "".join(f"imgs/{i}.png,caption {i}\n" for i in range(4)))


def jsonl_file(ctx, bad_line: str) -> Path:
    """A JSONL file whose third line is ``bad_line``."""
    images(ctx)
    lines = [json.dumps({"image": f"imgs/{i}.png", "caption": f"caption {i}"}) for i in range(4)]
    lines.insert(2, bad_line)
    f = ctx.tmp / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def toml_file(ctx, text, name: str = "c.toml") -> Path:
    f = ctx.tmp / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


SHAPES_TOML = '[data]\nname = "shapes"\nn = 16\nval_n = 8\n[[strategy]]\nname = "full"\n'


def corrupt(path: Path) -> None:
    """Garbage of the same size, so the size check in state.json passes."""
    path.write_bytes(b"\x07" * path.stat().st_size)


def a_run(ctx) -> Path:
    """A copy of the module's finished run, as ``ctx.out``."""
    ctx.out = ctx.tmp / "run"
    shutil.copytree(ctx.finished, ctx.out)
    return ctx.out


def export_into(ctx, prepare_out) -> list:
    run = a_run(ctx)
    ctx.out = ctx.tmp / "export"
    prepare_out(ctx.out)
    return ["export", run, ctx.out]


def export_of_corrupt(ctx, name: str) -> list:
    run = a_run(ctx)
    corrupt(run / "checkpoint" / name)
    ctx.out = ctx.tmp / "export"
    return ["export", run, ctx.out]


def resume_of_corrupt(ctx, name: str) -> list:
    run = a_run(ctx)
    corrupt(run / "checkpoint" / name)
    return ["run", "--resume", run, "--epochs", "2"]


def resume_of_garbage_rng(ctx) -> list:
    run = a_run(ctx)
    path = run / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["python_random"] = ["garbage", 7]
    path.write_text(json.dumps(state))
    return ["run", "--resume", run, "--epochs", "2"]


def non_clipft_dir(ctx) -> Path:
    ctx.out = ctx.tmp / "mine"
    (ctx.out / "checkpoint").mkdir(parents=True)
    (ctx.out / "checkpoint" / "weights.pt").write_text("w")
    (ctx.out / "notes.txt").write_text("keep me")
    return ctx.out


def readonly_parent(ctx) -> list:
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 0555 directory does not stop root from writing "
                    "(the out-under-a-file case covers root)")
    parent = ctx.tmp / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    ctx.cleanup.append(lambda: parent.chmod(0o755))
    ctx.out = parent / "x"
    return RUN + ["--out", ctx.out]


def other_architecture(ctx) -> list:
    import torch
    f = ctx.tmp / "other.pt"
    torch.save({"some.weight": torch.zeros(2, 2)}, f)
    return RUN + ["--pretrained", f, "--out", ctx.out]


def out(ctx) -> list:
    return ["--out", ctx.out]


def unreadable_shards(ctx) -> Path:
    """Three shards of the two-class folder, every one garbage of its size (the
    manifest's counts still say 2 samples each, so nothing is read at build time)."""
    from clipft.commands.shards import write_shards
    d = ctx.tmp / "shards"
    write_shards(folder(ctx), d, shard_size=2, shuffle_seed=0)
    for tar in sorted(d.glob("*.tar")):
        corrupt(tar)
    return d


def truncated_jpegs(ctx) -> Path:
    """A two-class folder of JPEGs cut in half: their headers pass the check made
    while indexing, the decode at batch time fails."""
    root = ctx.tmp / "jpegs"
    for c in ("red", "blue"):
        for i in range(3):
            p = root / c / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
            p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    return root


def damaged_export(ctx, damage) -> Path:
    """A copy of the module's export, as ``ctx.out``, with ``damage(path)`` done to it."""
    ctx.out = ctx.tmp / "export"
    shutil.copytree(ctx.exported, ctx.out)
    damage(ctx.out)
    return ctx.out


def edit_manifest(**changes):
    def damage(d: Path) -> None:
        f = d / "clipft_export.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return damage


def reshaped_weights(d: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    f = d / "open_clip_model.safetensors"
    tensors = load_file(f)
    name = next(k for k in sorted(tensors) if k.endswith("mlp.c_fc.weight"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, f)


def predict_export(ctx, damage) -> list:
    return ["predict", damaged_export(ctx, damage), *images(ctx, 1)]


# -- the table -----------------------------------------------------------------
# (id, args(ctx), exit code, stderr regex, state of ctx.out afterwards)
CASES = [
    # non-finite and out-of-range numbers
    ("lr-nan", lambda c: RUN + ["--lr", "nan", *out(c)], 2, r"--lr nan: 'lr' must be a finite number", "absent"),
    ("lr-inf", lambda c: RUN + ["--lr", "inf", *out(c)], 2, r"--lr inf: 'lr' must be a finite number", "absent"),
    ("weight-decay-inf", lambda c: RUN + ["--weight-decay", "inf", *out(c)], 2,
     r"--weight-decay inf: 'weight_decay' must be a finite number", "absent"),
    ("grad-clip-nan", lambda c: RUN + ["--grad-clip", "nan", *out(c)], 2,
     r"--grad-clip nan: 'grad_clip' must be a finite number", "absent"),
    ("toml-momentum-negative", lambda c: ["run", "--config", toml_file(c, "momentum = -1\n" + SHAPES_TOML),
                                          *out(c)], 2, r"c\.toml: 'momentum' must be in \[0, 1\), got -1", "absent"),
    ("toml-lr-nan", lambda c: ["run", "--config", toml_file(c, "lr = nan\n" + SHAPES_TOML), *out(c)], 2,
     r"c\.toml: 'lr' must be a finite number", "absent"),
    ("seed-10^30", lambda c: RUN + ["--seed", str(10**30), *out(c)], 2,
     r"--seed 10{30}: 'seed' must be an integer from 0 to 2\*\*47 - 1", "absent"),
    ("seed-2^62", lambda c: RUN + ["--seed", str(2**62), *out(c)], 2, r"'seed' must be an integer from 0", "absent"),
    ("seed-negative", lambda c: RUN + ["--seed", "-1", *out(c)], 2, r"'seed' must be an integer from 0", "absent"),
    ("epochs-negative", lambda c: RUN + ["--epochs", "-1", *out(c)], 2, r"--epochs -1: 'epochs' must be >= 0",
     "absent"),
    ("batch-size-negative", lambda c: RUN + ["--batch-size", "-1", *out(c)], 2,
     r"'batch_size' must be > 0, got -1", "absent"),
    ("num-workers-absurd", lambda c: RUN + ["--num-workers", "100000", *out(c)], 2,
     r"'num_workers' must be an integer from 0 to 1024", "absent"),
    ("checkpoint-every-bogus", lambda c: RUN + ["--checkpoint-every", "often", *out(c)], 2,
     r"'checkpoint_every' must be a number of steps", "absent"),
    ("precision-fp8", lambda c: RUN + ["--precision", "fp8", *out(c)], 2, r"Invalid value for '--precision'",
     "absent"),
    # component options
    ("shapes-n-10^20", lambda c: RUN + ["--data", "shapes:n=100000000000000000000", *out(c)], 2,
     r"option 'n' of data 'shapes'.*must fit in 64 bits", "absent"),
    ("shapes-n-over-max", lambda c: RUN + ["--data", "shapes:n=100000000", *out(c)], 2,
     r"n must be from 1 to 10_000_000", "absent"),
    ("shapes-seed-negative", lambda c: RUN + ["--data", "shapes:n=16,val_n=8,seed=-1", *out(c)], 2,
     r"seed must be >= 0", "absent"),
    ("option-float-inf", lambda c: RUN + ["--strategy", "lora:alpha=inf", *out(c)], 2,
     r"bad value 'inf' for option 'alpha' of strategy 'lora'.*finite", "absent"),
    ("unknown-option-key", lambda c: RUN + ["--data", "shapes:bogus=1", *out(c)], 2,
     r"data 'shapes' has no option 'bogus'\. Valid options: n, seed", "absent"),
    ("wrong-option-type", lambda c: RUN + ["--data", "shapes:n=many", *out(c)], 2,
     r"bad value 'many' for option 'n'", "absent"),
    ("template-two-placeholders",
     lambda c: BASE + ["--data", f"imagefolder:root={folder(c)},templates=a {{}} {{}}", *out(c)], 2,
     r"template 'a \{\} \{\}' has 2 placeholders", "absent"),
    ("template-no-placeholder",
     lambda c: BASE + ["--data", f"captions:file={good_csv(c)},templates=a photo", *out(c)], 2,
     r"template 'a photo' has no '\{\}' placeholder", "absent"),
    # unknown components and models
    ("unknown-strategy", lambda c: RUN + ["--strategy", "warp-drive", *out(c)], 2, r"unknown strategy 'warp-drive'.*Available:.*pip install", "absent"),
    ("unknown-loss", lambda c: RUN + ["--loss", "hinge9", *out(c)], 2, r"unknown loss 'hinge9'.*Available:.*pip install", "absent"),
    ("unknown-head", lambda c: RUN + ["--head", "mlp9", *out(c)], 2, r"unknown head 'mlp9'.*Available:.*pip install", "absent"),
    ("unknown-data", lambda c: RUN + ["--data", "webcam", *out(c)], 2, r"unknown data 'webcam'.*Available:.*pip install", "absent"),
    ("data-option-out-of-range", lambda c: RUN + ["--data", "shapes:n=0", *out(c)], 2,
     r"invalid options for data 'shapes'", "absent"),
    ("data-unknown-colour", lambda c: RUN + ["--data", "shapes:colours=mauve", *out(c)], 2, r"unknown colours",
     "absent"),
    ("data-missing-required-option", lambda c: BASE + ["--data", "captions", *out(c)], 2,
     r"data 'captions' needs option 'file' \(CSV, TSV or JSONL", "absent"),
    ("unknown-model", lambda c: RUN + ["--model", "ViT-Q-99", *out(c)], 2, r"unknown model 'ViT-Q-99'", "absent"),
    ("loss-zero-fixed-scale", lambda c: RUN + ["--loss", "contrastive:fixed_scale=0", *out(c)], 2,
     r"fixed_scale must be a finite number > 0", "absent"),
    ("loss-needs-head", lambda c: RUN + ["--loss", "cross-entropy", *out(c)], 2, r"needs a classification head.*--head linear", "absent"),
    # config files
    ("toml-latin-1", lambda c: ["run", "--config", toml_file(c, b'model = "tiny-vit"\n# caf\xe9\n'), *out(c)], 2,
     r"config file .*c\.toml is not UTF-8 text \(byte 0xe9 on line 2\)", "absent"),
    ("toml-missing", lambda c: ["run", "--config", c.tmp / "nope.toml", *out(c)], 2,
     r"config file not found: .*nope\.toml", "absent"),
    ("toml-syntax", lambda c: ["run", "--config", toml_file(c, "model = \n"), *out(c)], 2,
     r"c\.toml: invalid TOML", "absent"),
    ("toml-unknown-key", lambda c: ["run", "--config", toml_file(c, 'modle = "tiny-vit"\n'), *out(c)], 2,
     r"unknown key 'modle'\. Valid keys", "absent"),
    ("toml-wrong-type", lambda c: ["run", "--config", toml_file(c, 'epochs = "three"\n'), *out(c)], 2,
     r"'epochs' has the wrong type", "absent"),
    # data files
    ("data-root-missing", lambda c: BASE + ["--data", f"imagefolder:root={c.tmp / 'nope'}", *out(c)], 2,
     r"data folder not found: .*nope", "absent"),
    ("imagefolder-no-classes", lambda c: (c.tmp.joinpath("empty").mkdir(),
                                          BASE + ["--data", f"imagefolder:root={c.tmp / 'empty'}", *out(c)])[1],
     2, r"empty has no class folders", "absent"),
    ("imagefolder-non-utf8-class", lambda c: BASE + ["--data", f"imagefolder:root={non_utf8_class(c)}", *out(c)],
     2, r"class folder b'caf\\xe9' in .* is not a valid UTF-8 name", "absent"),
    ("captions-file-missing", lambda c: BASE + ["--data", f"captions:file={c.tmp / 'nope.csv'}", *out(c)], 2,
     r"captions: file not found: .*nope\.csv", "absent"),
    ("captions-missing-column",
     lambda c: BASE + ["--data", f"captions:file={good_csv(c)},caption_column=text", *out(c)], 2,
     r"pairs\.csv has no column 'text'\. Columns: image, caption", "absent"),
    ("csv-bad-utf8", lambda c: BASE + ["--data", "captions:file=" + str(toml_file(
        c, b"image,caption\nimgs/0.png,caf\xe9\n", "pairs.csv")), *out(c)], 2,
     r"captions file .*pairs\.csv is not UTF-8 text \(byte 0xe9 on line 2\)", "absent"),
    ("csv-short-row", lambda c: BASE + ["--data", "captions:file=" + str(csv_file(
        c, "image,caption\nimgs/0.png,zero\nimgs/1.png\nimgs/2.png,two\n")), *out(c)], 2,
     r"pairs\.csv:3: the row has fewer fields than the header, so it has no 'caption'", "absent"),
    ("csv-unquoted-comma", lambda c: BASE + ["--data", "captions:file=" + str(csv_file(
        c, "image,caption\nimgs/0.png,zero\nimgs/1.png,a red, square\n")), *out(c)], 2,
     r"pairs\.csv:3: the row has 3 fields, the header 2; quote a field", "absent"),
    ("jsonl-array-line", lambda c: BASE + ["--data", f"captions:file={jsonl_file(c, '[1, 2]')}", *out(c)], 2,
     r"pairs\.jsonl:3: expected a JSON object .*got list", "absent"),
    ("jsonl-string-line", lambda c: BASE + ["--data", "captions:file=" + str(jsonl_file(c, '"x"')), *out(c)], 2,
     r"pairs\.jsonl:3: expected a JSON object .*got str", "absent"),
    ("jsonl-no-caption-key", lambda c: BASE + ["--data", "captions:file=" + str(jsonl_file(
        c, json.dumps({"image": "imgs/0.png"}))), *out(c)], 2, r"pairs\.jsonl:3: no 'caption' key", "absent"),
    ("jsonl-no-image-key", lambda c: BASE + ["--data", "captions:file=" + str(jsonl_file(
        c, json.dumps({"caption": "lost"}))), *out(c)], 2, r"pairs\.jsonl:3: no 'image' key", "absent"),
    ("jsonl-null-caption", lambda c: BASE + ["--data", "captions:file=" + str(jsonl_file(
        c, json.dumps({"image": "imgs/0.png", "caption": None}))), *out(c)], 2,
     r"pairs\.jsonl:3: 'caption' is null", "absent"),
    ("jsonl-invalid-json", lambda c: BASE + ["--data", f"captions:file={jsonl_file(c, '{oops')}", *out(c)], 2,
     r"pairs\.jsonl:3: invalid JSON", "absent"),
    # --pretrained files
    ("pretrained-txt", lambda c: RUN + ["--pretrained", toml_file(c, "hello\n", "x.txt"), *out(c)], 2,
     r"--pretrained .*x\.txt is not a checkpoint .*expected open_clip weights: a \.safetensors file", "absent"),
    ("pretrained-pt-of-text", lambda c: RUN + ["--pretrained", toml_file(c, "hello\n", "x.pt"), *out(c)], 2,
     r"--pretrained .*x\.pt is not a checkpoint .*torch state dict", "absent"),
    ("pretrained-safetensors-of-text",
     lambda c: RUN + ["--pretrained", toml_file(c, "hello, world\n", "x.safetensors"), *out(c)], 2,
     r"--pretrained .*x\.safetensors is not a valid safetensors file", "absent"),
    ("pretrained-other-architecture", other_architecture, 2,
     r"could not load checkpoint '.*other\.pt' into 'tiny-vit': the weights are of another architecture "
     r"\((Missing|Unexpected) key\(s\) in state_dict: ", "absent"),
    # output directories
    ("out-under-a-file", lambda c: (toml_file(c, "x", "afile"),
                                    setattr(c, "out", c.tmp / "afile" / "sub"), RUN + out(c))[2], 2,
     r"cannot write to .*afile/sub", "absent"),
    ("out-readonly-parent", readonly_parent, 2, r"cannot write to .*readonly/x", "absent"),
    ("out-holds-a-run", lambda c: (a_run(c), RUN + ["--seed", "3", *out(c)])[1], 2, r"already holds a run",
     "unchanged"),
    ("overwrite-non-clipft-dir", lambda c: (non_clipft_dir(c), RUN + ["--overwrite", *out(c)])[1], 2,
     r"is not a clipft run \(checkpoint/, notes\.txt\)", "unchanged"),
    ("overwrite-with-bad-lr", lambda c: (a_run(c), RUN + ["--overwrite", "--lr", "nan", *out(c)])[1], 2,
     r"'lr' must be a finite number", "unchanged"),
    # --resume
    ("resume-not-a-run", lambda c: ["run", "--resume", non_clipft_dir(c)], 2,
     r"--resume .*mine: no config\.toml there", "unchanged"),
    ("resume-changed-flag", lambda c: ["run", "--resume", a_run(c), "--lr", "0.5"], 2,
     r"only --epochs, .* can change when resuming \(the run continues in its own directory\); got --lr",
     "resumable"),
    ("resume-out-elsewhere", lambda c: ["run", "--resume", a_run(c), "--epochs", "2", "--out", c.tmp / "elsewhere"],
     2, r"can change when resuming .*; got --out", "resumable"),
    ("resume-overwrite", lambda c: ["run", "--resume", a_run(c), "--epochs", "2", "--overwrite"], 2,
     r"can change when resuming .*; got --overwrite", "resumable"),
    ("resume-changed-strategy", lambda c: ["run", "--resume", a_run(c), "--strategy", "full"], 2,
     r"can change when resuming .*; got --strategy$", "resumable"),
    ("resume-epochs-0", lambda c: ["run", "--resume", a_run(c), "--epochs", "0"], 2,
     r"already finished 1 epoch\(s\); pass --epochs N with N > 1", "resumable"),
    ("resume-finished", lambda c: ["run", "--resume", a_run(c)], 2,
     r"already finished 1 epoch\(s\); pass --epochs N", "resumable"),
    # damage that keeps the size: the checksum finds it, and with no intact checkpoint
    # left the command fails (exit 1) naming the file (tests/test_checksums.py has more)
    ("resume-corrupt-model-safetensors", lambda c: resume_of_corrupt(c, "model.safetensors"), 1,
     r"no intact checkpoint: .*checkpoint/model\.safetensors does not match the checksum", "unchanged"),
    ("resume-corrupt-state-json", lambda c: resume_of_corrupt(c, "state.json"), 2,
     r"no complete checkpoint to resume from: .*checkpoint/state\.json is corrupt", "unchanged"),
    ("resume-corrupt-optimizer", lambda c: resume_of_corrupt(c, "optimizer.safetensors"), 1,
     r"no intact checkpoint: .*checkpoint/optimizer\.safetensors does not match the checksum", "unchanged"),
    ("resume-garbage-rng-state", resume_of_garbage_rng, 2,
     r"state\.json is corrupt: its random-number states cannot be restored", "unchanged"),
    # a run whose only checkpoint is damaged still holds a run: never wiped as an empty one
    ("rerun-over-corrupt-checkpoint", lambda c: (resume_of_corrupt(c, "state.json"),
                                                 [*RUN, "--out", c.out])[1], 2,
     r"already holds a run", "unchanged"),
    # export, describe, plan
    ("export-corrupt-model-safetensors", lambda c: export_of_corrupt(c, "model.safetensors"), 1,
     r"no intact checkpoint: .*checkpoint/model\.safetensors does not match the checksum", "absent"),
    ("export-corrupt-state-json", lambda c: export_of_corrupt(c, "state.json"), 2,
     r"no complete checkpoint: .*checkpoint/state\.json is corrupt", "absent"),
    ("export-not-a-run", lambda c: (non_clipft_dir(c), setattr(c, "out", c.tmp / "export"),
                                    ["export", c.tmp / "mine", c.out])[2], 2,
     r"mine is not a clipft run directory", "absent"),
    ("export-into-non-empty-dir", lambda c: export_into(c, lambda o: (o.mkdir(), (o / "f.txt").write_text("x"))),
     2, r"export already exists and is not empty", "unchanged"),
    ("export-overwrite-non-export-dir",
     lambda c: export_into(c, lambda o: (o.mkdir(), (o / "f.txt").write_text("x"))) + ["--overwrite"], 2,
     r"export is not a clipft export \(no clipft_export\.json\)", "unchanged"),
    # data that would train on nothing useful
    ("imagefolder-one-class", lambda c: BASE + ["--data", f"imagefolder:root={one_class_folder(c)}", *out(c)], 2,
     r"has one class folder \(cat\); a classifier needs two or more", "absent"),
    ("captions-unterminated-quote",
     lambda c: BASE + ["--data", f"captions:file={unterminated_quote_csv(c)}", *out(c)], 2,
     r"pairs\.csv:4: not valid CSV .*the row starting on line 4 could not be read, nor the 21 line", "absent"),
    # files a callback writes stay in the run (tests/test_run_paths.py has more)
    ("callback-file-outside", lambda c: RUN + ["--callback", f"csv:evals={c.tmp / 'victim.txt'}", *out(c)], 2,
     r"'evals' .* is an absolute path; give a file name inside the run directory", "absent"),
    ("option-key-twice", lambda c: RUN + ["--strategy", "last-n:n=1,n=2", *out(c)], 2,
     r"option 'n' is given twice in 'last-n:n=1,n=2'", "absent"),
    ("data-option-key-twice", lambda c: BASE + ["--data", "shapes:n=64,n=128", *out(c)], 2,
     r"option 'n' is given twice", "absent"),
    # local-dir models: checked before open_clip allocates or unpickles anything
    ("local-dir-absurd-size", lambda c: RUN + ["--model", local_dir(c, scale=100_000), *out(c)], 2,
     r"describes about \d+\.\d billion parameters .* more than this machine's", "absent"),
    ("local-dir-pickle", lambda c: RUN + ["--model", local_dir(c, pickle_weights=True), *out(c)], 2,
     r"the weights are a pickle of more than tensors", "absent"),
    ("local-dir-missing", lambda c: RUN + ["--model", f"local-dir:{c.tmp / 'nothing'}", *out(c)], 2,
     r"no such folder", "absent"),
    ("predict-batch-size-0", lambda c: ["predict", "--model", "tiny-vit", *images(c, 1), "--labels", "a,b",
                                        "--batch-size", "0"], 2, r"Invalid value for '--batch-size'", "absent"),
    ("eval-batch-size-0", lambda c: ["eval", "--model", "tiny-vit", "--data", SHAPES, "--batch-size", "0"], 2,
     r"Invalid value for '--batch-size'", "absent"),
    ("predict-labels-empty", lambda c: ["predict", "--model", "tiny-vit", *images(c, 1), "--labels", ""], 2,
     r"--labels '': a label is empty", "absent"),
    ("predict-labels-empty-one", lambda c: ["predict", "--model", "tiny-vit", *images(c, 1), "--labels", "a,,b"],
     2, r"--labels 'a,,b': a label is empty", "absent"),
    ("lora-rank-absurd", lambda c: RUN[:-2] + ["--strategy", "lora:r=100000000", "--data", SHAPES, *out(c)], 2,
     r"lora: r=100000000 exceeds the width of the layers it adapts \(the smallest is 64\)", "absent"),
    ("describe-unknown-kind", lambda c: ["describe", "widget", "x"], 2, r"unknown kind 'widget'", "absent"),
    ("describe-unknown-name", lambda c: ["describe", "strategy", "nope"], 2, r"unknown strategy 'nope'.*Available: ", "absent"),
    ("plan-bad-option", lambda c: ["plan", "--model", "tiny-vit", "--data", "shapes:n=0"], 2,
     r"invalid options for data 'shapes': n must be from 1", "absent"),
    ("plan-lr-nan", lambda c: ["plan", "--model", "tiny-vit", "--strategy", "full", "--lr", "nan"], 2,
     r"'lr' must be a finite number", "absent"),
    # data that decodes to nothing: the run fails (exit 1) with the counts, not "trained 0 steps"
    ("webdataset-every-shard-unreadable",
     lambda c: BASE + ["--data", f"webdataset:urls={unreadable_shards(c)}", *out(c)], 1,
     r"epoch 1 trained on no samples: 3 shard\(s\) could not be read \(6 samples\), "
     r"e\.g\. .*shard-00000\d\.tar \(ReadError", "no-checkpoint"),
    ("imagefolder-every-jpeg-truncated",
     lambda c: BASE + ["--data", f"imagefolder:root={truncated_jpegs(c)}", *out(c)], 1,
     r"epoch 1 trained on no samples: 6 sample\(s\) could not be decoded, e\.g\. .*jpegs/\w+/\d\.jpg "
     r"\(OSError: image file is truncated", "no-checkpoint"),
    # damaged or foreign exports, read by eval, predict and clipft.load
    ("export-manifest-garbage", lambda c: predict_export(
        c, lambda d: (d / "clipft_export.json").write_text("garbage{")), 2,
     r"export/clipft_export\.json: not valid JSON", "unchanged"),
    ("export-manifest-list", lambda c: ["eval", damaged_export(
        c, lambda d: (d / "clipft_export.json").write_text("[1, 2]")), "--data", SHAPES], 2,
     r"export/clipft_export\.json: expected a JSON object, got list", "unchanged"),
    ("export-classnames-not-a-list", lambda c: predict_export(c, edit_manifest(classnames="cat")), 2,
     r"clipft_export\.json: 'classnames' must be a list of strings, got \"cat\"", "unchanged"),
    ("export-classnames-empty-name", lambda c: predict_export(c, edit_manifest(classnames=["cat", " "])), 2,
     r"clipft_export\.json: 'classnames' must hold non-empty names", "unchanged"),
    ("export-classnames-numbers", lambda c: predict_export(c, edit_manifest(classnames=[1, 2])), 2,
     r"clipft_export\.json: 'classnames' must be a list of strings", "unchanged"),
    ("export-extras-foreign", lambda c: predict_export(c, edit_manifest(extras={"file": "x"})), 2,
     r"clipft_export\.json: 'extras' must be a list of objects", "unchanged"),
    ("export-weights-truncated", lambda c: predict_export(c, lambda d: (d / "open_clip_model.safetensors").write_bytes(
        (d / "open_clip_model.safetensors").read_bytes()[:1000])), 2,
     r"export/open_clip_model\.safetensors: cannot be loaded .*\(SafetensorError", "unchanged"),
    ("export-weights-bogus", lambda c: predict_export(c, lambda d: corrupt(d / "open_clip_model.safetensors")), 2,
     r"export/open_clip_model\.safetensors: cannot be loaded .*\(SafetensorError", "unchanged"),
    ("export-weights-wrong-shape", lambda c: ["eval", damaged_export(c, reshaped_weights), "--data", SHAPES], 2,
     r"export/open_clip_model\.safetensors: cannot be loaded .*size mismatch", "unchanged"),
    ("export-config-list", lambda c: predict_export(
        c, lambda d: (d / "open_clip_config.json").write_text("[]")), 2,
     r"export/open_clip_config\.json: expected a JSON object with a 'model_cfg'", "unchanged"),
]


def _id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished one-epoch run; cases copy it."""
    from click.testing import CliRunner

    from clipft.cli import cli

    d = tmp_path_factory.mktemp("finished") / "run"
    r = CliRunner().invoke(cli, [str(a) for a in RUN + ["--lr", "1e-3", "--out", d]], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory):
    """The finished run, exported once; cases copy it."""
    from clipft.commands.export import export_run

    d = tmp_path_factory.mktemp("exported") / "export"
    export_run(finished, d)
    return d


@pytest.mark.parametrize("name,args,code,pattern,state", CASES, ids=[_id(c) for c in CASES])
def test_bad_input(invoke, tmp_path, finished, exported, name, args, code, pattern, state):
    from clipft.engine.checkpoint import newest_complete

    ctx = SimpleNamespace(tmp=tmp_path, out=tmp_path / "out", finished=finished, exported=exported,
                          cleanup=[])
    try:
        argv = args(ctx)
        out = Path(ctx.out)
        before = snapshot(out) if state == "unchanged" else None
        assert state != "unchanged" or before, "an 'unchanged' case needs an existing --out"
        r = invoke(*argv)
        output = r.stdout + r.stderr
        assert r.exit_code == code, output
        assert re.search(pattern, r.stderr), r.stderr
        assert "Traceback" not in output
        if state == "absent":
            assert not out.exists(), snapshot(out)
            if out.parent.is_dir():   # and no temporary or backup sibling either
                assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        elif state == "unchanged":
            assert snapshot(out) == before
        elif state == "no-checkpoint":   # a run that failed while training: nothing to resume or export
            assert newest_complete(out)[0] is None and not (out / "summary.json").exists()
        else:
            assert state == "resumable"
            assert newest_complete(out)[0] is not None
            # --resume rebuilds the run and restores the checkpoint before it finds
            # that the run already finished its epochs
            again = invoke("run", "--resume", out)
            assert again.exit_code == 2 and "already finished" in again.stderr, again.stderr
    finally:
        for undo in ctx.cleanup:
            undo()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({_id(c) for c in CASES}) == len(CASES)


# -- accepted, but said: the run goes on and the warning names what it found ----------
def test_lr_zero_is_warned_about_at_start(invoke, tmp_path):
    r = invoke(*RUN, "--lr", "0", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    assert re.search(r"warning:.*the learning rate is 0: training runs, but no weight will change", r.stderr)
    again = invoke(*RUN, "--lr", "1e-3", "--out", tmp_path / "other")
    assert again.exit_code == 0 and "learning rate is 0" not in again.stderr


def test_a_truncated_jpeg_is_named_with_its_reason(invoke, tmp_path):
    """It passes the header check made while indexing and fails at batch time:
    the run goes on without it, and summary.json and the warning name it."""
    ctx = SimpleNamespace(tmp=tmp_path)
    root = folder(ctx)
    bad = truncated_jpegs(ctx) / "red" / "0.jpg"
    shutil.copy(bad, root / "red" / "bad.jpg")
    r = invoke(*BASE, "--lr", "1e-3", "--data", f"imagefolder:root={root},val_fraction=0.01",
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)["data"]
    name = str(root / "red" / "bad.jpg")
    assert data["skipped_images"] == 1 and data["skipped"] == [name]
    assert data["failed_at_load"]["count"] == 1
    [why] = data["skipped_reasons"]
    assert why["name"] == name and why["reason"].startswith("OSError: image file is truncated")
    assert re.search(r"warning:.*1 sample\(s\) failed to decode while training and were skipped, e\.g\. "
                     r".*bad\.jpg \(OSError: image file is truncated", " ".join(r.stderr.split()))


def test_empty_and_nul_captions_are_counted_and_named_by_line(tmp_path):
    from clipft.data import DataContext
    from clipft.datafiles import read_pairs
    from clipft_data.captions import CaptionsOptions, build_captions

    ctx = SimpleNamespace(tmp=tmp_path)
    rows = ["imgs/0.png,zero", "imgs/1.png,", "imgs/2.png,t\0wo", "imgs/3.png,  ", "imgs/0.png,\0"]
    f = csv_file(ctx, "image,caption\n" + "\n".join(rows) + "\n")
    bundle = build_captions(CaptionsOptions(file=str(f), val_fraction=0.0),
                            DataContext(transform_train=None, transform_val=None, seed=0))
    assert f"captions: {f}: 2 caption(s) held NUL characters, removed (lines 4, 6)" in bundle.warnings
    assert any(w.startswith(f"captions: {f}: 3 caption(s) are empty (lines 3, 5, 6)") for w in bundle.warnings)
    # the NUL is removed the same way for every reader (clipft shards reads the same file)
    assert [c for _, c, _ in read_pairs(f)] == ["zero", "", "two", "  ", ""]
    assert not [c for _, c, _ in bundle.train.items if "\0" in c]


def test_a_clean_captions_file_has_no_caption_warnings(tmp_path):
    from clipft.datafiles import read_pairs

    warnings: list = []
    read_pairs(good_csv(SimpleNamespace(tmp=tmp_path)), warnings=warnings)
    assert warnings == []


def test_load_export_of_a_damaged_manifest_is_a_usage_error(exported, tmp_path):
    """The library entry that eval and predict use raises the same error the CLI prints."""
    from clipft.commands.export import load_export
    from clipft.errors import ClipftUsageError

    ctx = SimpleNamespace(tmp=tmp_path, exported=exported)
    d = damaged_export(ctx, edit_manifest(classnames=["a", 7]))
    with pytest.raises(ClipftUsageError, match=r"clipft_export\.json: 'classnames' must be a list of strings"):
        load_export(d)
    assert load_export(exported)["classnames"]   # the intact export still loads
