"""``prompt:kg_lambda`` (KgCoOp, Yao et al., CVPR 2023): the term's value at
step 0 against a hand computation, 0 is CoOp bit for bit, a resume is
bit-exact, the export keeps the learned prompts, and a run whose steps never
encode the class prompts is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import clipft
from clipft import testing
from resume_check import assert_same_checkpoints, crash_after_first_checkpoint_then_resume

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "shapes:n=32,val_n=16"
RUN = dict(head="text", loss="cross-entropy", data=DATA, batch_size=16, lr=5e-3, callbacks=["none"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny-vit as a checkpoint file, so the test can rebuild the run's start."""
    from clipft.models import load_model
    torch.manual_seed(0)
    model = load_model("tiny-vit", "none").model
    path = tmp_path_factory.mktemp("kg") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def step_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def run(tmp_path, base, strategy, **kw):
    from pathlib import Path
    s = testing.run_plugin(None, strategy=strategy, pretrained=base, tmp_path=tmp_path, log_every=1,
                           **{**RUN, **kw})
    return s, Path(s["run_dir"])


def test_the_term_at_step_0_is_the_hand_computed_distance(base, tmp_path):
    from clipft.encode import encode_text_trimmed
    from clipft.models import load_model

    s, run_dir = run(tmp_path, base, "prompt:init=a picture of a,kg_lambda=8", epochs=1)
    lm = load_model("tiny-vit", str(base))
    model, tok = lm.model.eval(), lm.tokenizer
    classes = clipft.load(run_dir, device="cpu").classes
    with torch.no_grad():
        clip = F.normalize(encode_text_trimmed(model, tok([f"a photo of a {c}." for c in classes])), dim=-1)
        learned = F.normalize(encode_text_trimmed(model, tok([f"a picture of a {c}." for c in classes])), dim=-1)
    want = 8 * (learned - clip).pow(2).sum(-1).mean().item()
    first = step_rows(run_dir)[0]
    assert first["step"] == 1 and want > 1e-3            # a real distance, not rounding
    assert first["reg.kg"] == pytest.approx(want, rel=1e-4)
    # the context starts as the template's own words: distance 0 (up to rounding)
    s, run_dir = run(tmp_path, base, "prompt:kg_lambda=8", epochs=1)
    assert abs(step_rows(run_dir)[0]["reg.kg"]) < 1e-6


def test_lambda_zero_is_coop_bit_for_bit_and_lambda_trains(base, tmp_path):
    coop, coop_dir = run(tmp_path / "coop", base, "prompt:init=none", epochs=2)
    zero, zero_dir = run(tmp_path / "zero", base, "prompt:init=none,kg_lambda=0", epochs=2)
    kg, kg_dir = run(tmp_path / "kg", base, "prompt:init=none,kg_lambda=8", epochs=2)
    a, b = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (coop_dir, zero_dir))
    assert a.keys() == b.keys() == {"clipft_class_text.ctx"}
    assert torch.equal(a["clipft_class_text.ctx"], b["clipft_class_text.ctx"])
    assert [r["loss"] for r in step_rows(coop_dir)] == [r["loss"] for r in step_rows(zero_dir)]
    assert not any("reg.kg" in r for r in step_rows(zero_dir))
    assert coop["eval"]["after"] == zero["eval"]["after"]
    # random context: far from CLIP's prompts at first, pulled towards them
    kg_terms = [r["reg.kg"] for r in step_rows(kg_dir)]
    assert len(kg_terms) == kg["train"]["steps"] == 4 and kg_terms[0] > 1.0
    assert kg_terms[-1] < kg_terms[0], kg_terms


def test_resume_is_bit_exact_and_export_keeps_the_prompts(base, tmp_path, monkeypatch):
    from clipft.api import RunConfig, export
    from clipft.api import run as api_run

    cfg = RunConfig(model="tiny-vit", pretrained=str(base), data=DATA, strategies=["prompt:kg_lambda=8"],
                    head="text", loss="cross-entropy", epochs=2, batch_size=16, lr=5e-3, device="cpu",
                    callbacks=["none"], log_every=1)
    r = crash_after_first_checkpoint_then_resume(cfg, tmp_path, monkeypatch)
    straight, resumed = r.whole, r.resumed

    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed")
    assert resumed["eval"]["after"] == straight["eval"]["after"]
    tail = [r["reg.kg"] for r in step_rows(tmp_path / "crashed")][-2:]
    assert tail == [r["reg.kg"] for r in step_rows(tmp_path / "straight")][-2:] and len(tail) == 2

    export(tmp_path / "straight", tmp_path / "export")
    exp = clipft.load(tmp_path / "export", device="cpu")
    live = clipft.load(tmp_path / "straight", device="cpu")
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exp.classify(img), live.classify(img), atol=1e-5)
    shutil.rmtree(tmp_path / "crashed")


def test_a_run_that_never_encodes_the_class_prompts_is_refused(base, tmp_path):
    with pytest.raises(clipft.ClipftUsageError, match="use --head text"):
        testing.run_plugin(None, strategy="prompt:kg_lambda=8", loss="contrastive", data=DATA,
                           tmp_path=tmp_path, callbacks=["none"])
    with pytest.raises(clipft.ClipftUsageError, match="kg_lambda must be >= 0"):
        testing.run_plugin(None, strategy="prompt:kg_lambda=-1", head="text", loss="cross-entropy", data=DATA,
                           tmp_path=tmp_path, callbacks=["none"])
