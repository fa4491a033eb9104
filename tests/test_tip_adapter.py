"""Tip-Adapter (plugin clipft-tip-adapter, head ``tip-adapter``): the cache
logits as the paper writes them, alpha=0 is zero-shot CLIP exactly, the cache
is built from one pass over the training split (each image encoded once),
the training-free model beats zero-shot with K shots of a task the base never
saw, Tip-Adapter-F trains only the keys and resumes bit for bit, tune=true
says it tuned on val, and exports round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_base import base_checkpoint, wanted

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=48,val_n=32"
EMBED_DIM = 64          # tiny-vit's embed_dim (core/clipft/model_configs/tiny-vit.json)
NOVEL = ("purple", "orange")
SHAPES = ("circle", "square", "triangle")


def run_cli(invoke, out, *args, data=DATA, epochs=0):
    r = invoke("run", "--model", "tiny-vit", "--data", data, "--epochs", epochs, "--batch-size", "16",
               "--callback", "none", "--out", out, "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def novel_folder(tmp_path_factory) -> Path:
    """The base's unseen colours as an image folder: 24 train and 16 val images per class."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from shapes_folder import write_folder
    root = tmp_path_factory.mktemp("novel-folder")
    write_folder(root / "train", 24, NOVEL, SHAPES, seed=0)
    write_folder(root / "val", 16, NOVEL, SHAPES, seed=1)
    return root


def test_the_logits_are_zero_shot_plus_the_cache_term():
    """logits = 100 f W^T + alpha exp(-beta (1 - f K^T)) V, computed independently."""
    from clipft import testing
    from clipft.context import BuildContext, TrainFeatures
    from clipft.encode import class_text_features
    from clipft_tip_adapter import TipAdapterOptions, build_tip_adapter

    model, tok, _ = testing.tiny_model()
    names = ["red circle", "blue square", "green triangle"]
    ctx = BuildContext(model=model, model_name="tiny-vit", tokenizer=tok, device=torch.device("cpu"),
                       classnames=names)
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(7, EMBED_DIM, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    f = torch.nn.functional.normalize(torch.randn(5, EMBED_DIM, generator=g), dim=-1)
    with torch.no_grad():
        w = class_text_features(model, tok, names, ("a photo of a {}.",), "cpu")
        head = build_tip_adapter(TipAdapterOptions(alpha=0.7, beta=3.0), ctx)
        assert head.keys.shape == (0, EMBED_DIM)                    # sized by the data it is fitted to
        record = head.fit_train_features(TrainFeatures(keys, labels, names))
        want = 100 * f @ w.t() + 0.7 * torch.exp(-3.0 * (1 - f @ keys.t())) @ torch.eye(3)[labels]
        got = head(f)
    # the same products in the same order, except the one-hot matmul (a sum of
    # exact zeros and the affinities): rounding of a few terms only
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-4)
    assert torch.equal(head.keys, keys) and torch.equal(head.values, torch.eye(3)[labels])
    assert record["cache"] == {"keys": 7, "dim": EMBED_DIM, "classes": 3, "shots_min": 2, "shots_max": 3}
    with torch.no_grad():
        head.alpha.fill_(0.0)
        # alpha = 0: the zero-shot logits and nothing else, bit for bit
        assert torch.equal(head(f), 100 * (f @ w.t()))


def test_alpha_0_is_zero_shot_and_each_train_image_is_encoded_once(invoke, tmp_path):
    zs = run_cli(invoke, tmp_path / "a0", "--head", "tip-adapter:alpha=0")
    # the head's classifier is CLIP's zero-shot one exactly: the same predictions
    assert zs["eval"]["after"]["head_top1"] == zs["eval"]["after"]["top1"]
    assert zs["eval"]["before"] == zs["eval"]["after"] and zs["train"]["steps"] == 0
    assert zs["fit"]["head"]["cache"]["keys"] == 48
    # the frozen image tower: one pass over train fills the cache, one over val;
    # Tip-Adapter-F's epochs then replay it and encode nothing again
    f = run_cli(invoke, tmp_path / "f", "--head", "tip-adapter:finetune=true", epochs=2)
    for s in (zs, f):
        assert s["cache"]["image"].startswith("output (image tower frozen")
        assert s["cache"]["image_misses"] == 48 + 32, s["cache"]
    assert f["cache"]["image_hits"] >= 2 * 48
    assert f["train"]["steps"] == 2 * 3


def test_finetune_trains_only_the_keys(invoke, tmp_path):
    out = tmp_path / "f"
    s = run_cli(invoke, out, "--head", "tip-adapter:finetune=true", "--lr", "1e-2", epochs=1)
    assert s["params"]["trainable"] == 48 * EMBED_DIM            # N keys of width D
    assert [(g["name"], g["params"]) for g in s["params"]["groups"]] == [("head", 48 * EMBED_DIM)]
    model_t = load_file(str(out / "checkpoint" / "model.safetensors"))
    head_t = load_file(str(out / "checkpoint" / "head.safetensors"))
    assert model_t == {}                                          # CLIP itself is untouched
    assert sorted(head_t) == ["alpha", "beta", "clip_weights", "keys", "values"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["trainable"] == []
    # the keys moved away from the training features they started as; the
    # values (one-hot labels) and the zero-shot classifier did not
    from clipft import testing
    zs = run_cli(invoke, tmp_path / "zs", "--head", "tip-adapter")
    init = load_file(str(tmp_path / "zs" / "checkpoint" / "head.safetensors"))
    assert not torch.equal(head_t["keys"], init["keys"])
    for k in ("values", "clip_weights", "alpha", "beta"):
        assert torch.equal(head_t[k], init[k]), k
    assert torch.allclose(init["keys"].norm(dim=-1), torch.ones(48))
    testing.assert_checkpoint_roundtrip(out)
    assert zs["eval"]["after"]["top1"] == s["eval"]["before"]["top1"]


def test_finetune_resumes_bit_exactly(invoke, tmp_path, monkeypatch):
    from test_clip_adapter import stop_after_step
    args = ("run", "--model", "tiny-vit", "--data", DATA, "--epochs", "2", "--batch-size", "16",
            "--head", "tip-adapter:finetune=true,tune=true", "--lr", "1e-2", "--callback", "none")
    assert invoke(*args, "--out", tmp_path / "straight").exit_code == 0
    with monkeypatch.context() as m:
        stop_after_step(m, 2)
        assert invoke(*args, "--out", tmp_path / "resumed").exit_code == 143
    assert invoke("run", "--resume", tmp_path / "resumed").exit_code == 0
    a, b = (tmp_path / "straight" / "checkpoint", tmp_path / "resumed" / "checkpoint")
    for name in ("head.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    sa, sb = (json.loads((d.parent / "summary.json").read_text()) for d in (a, b))
    assert sa["fit"] == sb["fit"] and sa["fit"]["head"]["tuned"]["on"] == "val"   # not refitted on resume
    hist = [[{k: v for k, v in h.items() if k != "epoch_seconds"} for h in s["eval"]["history"]] for s in (sa, sb)]
    assert hist[0] == hist[1]


def test_tune_searches_alpha_and_beta_on_val_and_says_so(invoke, tmp_path):
    s = run_cli(invoke, tmp_path / "t", "--head", "tip-adapter:tune=true")
    fit = s["fit"]["head"]
    tuned = fit["tuned"]
    assert tuned["on"] == "val" and "optimistic" in tuned["note"]
    assert (fit["alpha"], fit["beta"]) == (tuned["alpha"], tuned["beta"])
    # the best of the grid is at least as good on val as the options it started from
    assert tuned["val_top1"] >= tuned["val_top1_with_options"]
    assert s["eval"]["after"]["head_top1"] == pytest.approx(tuned["val_top1"])
    head_t = load_file(str(tmp_path / "t" / "checkpoint" / "head.safetensors"))
    assert float(head_t["alpha"]) == pytest.approx(tuned["alpha"]) and float(head_t["beta"]) == tuned["beta"]
    plain = run_cli(invoke, tmp_path / "p", "--head", "tip-adapter")
    assert "tuned" not in plain["fit"]["head"] and (plain["fit"]["head"]["alpha"], plain["fit"]["head"]["beta"]) == (1.0, 5.5)


def test_export_round_trip(invoke, tmp_path):
    from clipft import testing
    run_dir = tmp_path / "run"
    run_cli(invoke, run_dir, "--head", "tip-adapter:finetune=true", epochs=1)
    manifest = testing.assert_export_roundtrip(run_dir, tmp_path / "export")
    assert manifest["head"]["name"] == "tip-adapter" and manifest["head"]["file"] == "head.safetensors"
    from clipft.commands.export import load_export
    head = load_export(tmp_path / "export")["head"]
    assert head.keys.shape == (48, EMBED_DIM) and head.values.shape == (48, 9)   # resized on load
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from shapes_folder import write_folder
    (image,) = write_folder(tmp_path / "img", 1, ["red"], ["circle"])
    r = invoke("predict", tmp_path / "export", image, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["used"] == "head"   # the Tip-Adapter logits


def test_options_and_errors(invoke, tmp_path):
    cases = [("tip-adapter:alpha=-1", "alpha must be >= 0"), ("tip-adapter:scale=0", "scale must be > 0"),
             ("tip-adapter:k=3", "Valid options: alpha, beta, finetune, tune, scale")]
    for head, message in cases:
        r = invoke("plan", "--model", "tiny-vit", "--data", DATA, "--head", head)
        assert r.exit_code == 2 and message in r.stderr, (head, r.stderr)
    # training-free: with epochs it has nothing to train, and says what to do
    r = invoke("run", "--model", "tiny-vit", "--data", DATA, "--head", "tip-adapter", "--epochs", "1",
               "--out", tmp_path / "e1")
    assert r.exit_code == 2 and "--epochs 0" in r.stderr
    (tmp_path / "c.csv").write_text("image,caption\n")
    r = invoke("run", "--model", "tiny-vit", "--data", f"captions:file={tmp_path / 'c.csv'}", "--head",
               "tip-adapter", "--epochs", "0", "--out", tmp_path / "caps")
    assert r.exit_code == 2


@pytest.mark.numerics
def test_training_free_tip_adapter_beats_zero_shot_with_16_shots(invoke, tmp_path_factory, tmp_path, novel_folder):
    """16 shots per class of the two colours the base never saw. Over 12 bases
    (peft_base.wanted; zero-shot top-1 0.00-0.33 on eleven, 0.62 on one) the
    paper's training-free defaults (alpha 1, beta 5.5) gained 0.083-0.39 over
    zero-shot with 16 shots on the eleven and +0.01 on the high one, whose
    features barely separate the new colours; more shots never hurt (4 -> 16).
    Asked: a quarter of the smallest gain, or 0.55 (chance is 1/6)."""
    base = base_checkpoint(tmp_path_factory)
    top = {}
    for k in (4, 16):
        s = run_cli(invoke, tmp_path / f"k{k}", "--pretrained", base["weights"], "--head", "tip-adapter",
                    "--batch-size", "32", data=f"imagefolder:root={novel_folder},shots={k}")
        assert s["data"]["shots"] == k and s["fit"]["head"]["cache"]["keys"] == 6 * k
        assert s["cache"]["image_misses"] == 6 * k + 6 * 16       # each image encoded once
        top[k] = (s["eval"]["after"]["top1"], s["eval"]["after"]["head_top1"])
    print(f"tip-adapter, unseen colours: zero-shot {top[16][0]:.3f}, 4 shots {top[4][1]:.3f}, "
          f"16 shots {top[16][1]:.3f}")
    assert top[16][1] >= wanted(top[16][0], 0.02, 0.55), top
    assert top[16][1] >= top[4][1], top
