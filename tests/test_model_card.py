"""The model card (README.md) every export writes: Hub front matter that parses,
figures equal to the run's summary.json, written with the rest of the export."""
from __future__ import annotations

import json

import pytest

from clipft.commands import model_card

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


@pytest.fixture(scope="module")
def lora_head_run(tmp_path_factory):
    from click.testing import CliRunner

    from clipft.cli import cli
    out = tmp_path_factory.mktemp("card") / "run"
    r = CliRunner().invoke(cli, ["run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=16",
                                 "--strategy", "lora", "--head", "linear", "--epochs", "1",
                                 "--batch-size", "16", "--callback", "none", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def test_export_writes_a_card_whose_front_matter_and_figures_match_the_run(lora_head_run, tmp_path, invoke):
    out = tmp_path / "exp"
    res = invoke("export", lora_head_run, out, "--json")
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert "README.md" in manifest["bytes"]    # so --overwrite knows it as the export's own
    text = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["library_name"] == "open_clip"
    assert {"clip", "clipft"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert "base_model" not in meta            # random init: no base model to name
    summary = json.loads((lora_head_run / "summary.json").read_text())
    after = {k: v for k, v in summary["eval"]["after"].items() if not k.endswith("_queries")}
    got = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert got == after
    assert set(meta["metrics"]) == {"accuracy", "recall"}
    # the body: the before/after table and the sections a reader looks for
    for k, v in summary["eval"]["before"].items():
        if not k.endswith("_queries"):
            assert f"| {k} | {v:.4f} | {summary['eval']['after'][k]:.4f} |" in text
    for section in ("## Base model", "## Data", "## Training", "## Results", "## How to use", "## Limitations"):
        assert section in text
    assert "strategy `lora`" in text and "head `linear`" in text
    assert f'create_model_and_transforms("local-dir:{out}")' in text
    assert "nothing was dropped" in text
    # an export with its card is replaced whole
    assert invoke("export", lora_head_run, out, "--overwrite").exit_code == 0


def test_a_card_that_fails_leaves_no_export(lora_head_run, tmp_path, invoke, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("card broke")
    monkeypatch.setattr(model_card, "render", broken)
    out = tmp_path / "exp"
    res = invoke("export", lora_head_run, out)
    assert res.exit_code == 1 and "card broke" in res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_base_model_from_open_clips_pretrained_table():
    assert model_card.base_model("ViT-B-32", "laion2b_s34b_b79k") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert model_card.base_model("ViT-B-32", "openai") == "timm/vit_base_patch32_clip_224.openai"
    for tag in ("none", None, "/weights/base.safetensors", "no-such-tag"):
        assert model_card.base_model("ViT-B-32", tag) is None


def test_front_matter_survives_odd_names_and_records_drops():
    manifest = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                "source_run": '/runs/a: "b" # c \U0001F600 --- |x\x85\u2028\x9f\ufffe',
                "classnames": ["a|b", "ünï", "\U0001F600"], "templates": ["a photo of a {}."],
                "strategies": [{"name": "vpt"}], "seed": 3,
                "plain_open_clip_drops": [{"module": "visual.clipft_vision_prompts", "kind": "hook",
                                           "file": "vision_prompts.safetensors", "strategy": "vpt"}],
                "verified_max_abs_diff": 0.25}
    summary = {"eval": {"before": {"top1": 0.5}, "after": {"top1": 0.75, "i2t_queries": 3}}}
    text = model_card.render(manifest, summary, {"name": "imagefolder", "options": {"root": "./x: y"}})
    meta = front_matter(text)
    assert meta["base_model"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert meta["model-index"][0]["name"] == manifest["source_run"].rsplit("/", 1)[1]
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "name": "top1", "value": 0.75}]
    assert "Plain open_clip drops `visual.clipft_vision_prompts`" in text and "2.50e-01" in text
    assert "`a\\|b`" in text            # a pipe cannot break the table or the list


def test_a_run_without_summary_still_gets_a_card():
    meta = front_matter(model_card.render({"model": "tiny-vit", "pretrained": "none"}, {}))
    assert "model-index" not in meta and meta["library_name"] == "open_clip"
