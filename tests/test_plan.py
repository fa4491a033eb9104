"""``clipft plan``: the groups a run would train, counted independently."""
from __future__ import annotations

import json

import pytest
import torch

DATA = "shapes:n=32,val_n=16"


pytestmark = pytest.mark.usefixtures("one_thread")


def open_clip_model(name):
    import open_clip
    from clipft.models import register_tiny_configs
    register_tiny_configs()
    return open_clip.create_model(name, pretrained=None)


def count(*parts) -> int:
    n = 0
    for part in parts:
        n += part.numel() if isinstance(part, torch.nn.Parameter) else sum(p.numel() for p in part.parameters())
    return n


def plan_json(invoke, *args):
    r = invoke("plan", "--data", DATA, *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("projection", [True, False])
def test_last_n_vision_counts_last_block_ln_post_and_projection(invoke, projection):
    p = plan_json(invoke, "--model", "tiny-vit",
                  "--strategy", f"last-n:n=1,tower=vision,projection={str(projection).lower()}")
    m = open_clip_model("tiny-vit")
    want = count(m.visual.transformer.resblocks[-1], m.visual.ln_post)
    if projection:
        want += count(m.visual.proj)
    assert p["params"]["trainable"] == want
    assert sum(g["params"] for g in p["groups"]) == want
    assert p["params"]["total"] == count(m)
    assert p["params"]["trainable_percent"] == pytest.approx(100 * want / count(m))
    assert p["params"]["by_part"]["vision"]["trainable"] == want
    assert p["params"]["by_part"]["text"]["trainable"] == 0
    assert p["towers"]["vision"] == {"class": "VisionTransformer", "kind": "vit", "depth": 4,
                                     "unit": "block", "has_projection": True}


def test_plan_table_has_every_column_and_the_memory_estimate(invoke):
    r = invoke("plan", "--model", "tiny-vit", "--data", DATA,
               "--strategy", "projections", "--strategy", "last-n:n=2")
    assert r.exit_code == 0 and r.stderr == ""   # the plan is the result: on stdout
    out = r.stdout
    for needle in ("group", "from", "tensors", "params", "lr", "weight decay", "% of model",
                   "vision.proj", "text.proj", "vision.last2", "text.last2/no_decay", "projections",
                   "last-n", "trainable", "model total", "adamw optimizer state", "gradients",
                   "towers: vision: VisionTransformer, 4 blocks"):
        assert needle in out, needle
    assert "…" not in out   # nothing truncated at 80 columns


def test_plan_groups_lr_and_memory(invoke):
    p = plan_json(invoke, "--model", "tiny-rn", "--lr", "1e-3", "--strategy", "last-n:n=1",
                  "--strategy", "differential-lr:visual=0.1,proj=10")
    groups = {g["name"]: g for g in p["groups"]}
    assert groups["vision.proj*10"]["lr"] == pytest.approx(1e-2)
    assert groups["vision.last1*0.1"]["lr"] == pytest.approx(1e-4)
    assert groups["text.last1"]["lr"] == pytest.approx(1e-3)
    assert groups["vision.last1*0.1/no_decay"]["weight_decay"] == 0.0
    assert all(g["sources"] == ["last-n"] for g in p["groups"])
    m = open_clip_model("tiny-rn")
    want = count(m.visual.layer4, m.visual.attnpool, m.transformer.resblocks[-1], m.ln_final,
                 m.text_projection)
    assert p["params"]["trainable"] == want
    mem = p["memory"]
    assert mem["gradient_bytes"] == 4 * want                 # fp32
    assert mem["optimizer_state_bytes"] == 2 * 4 * want      # AdamW: two moments
    assert mem["training_state_bytes"] == 3 * 4 * want
    assert mem["weight_bytes"] == 4 * count(m)


def test_plan_memory_follows_the_optimizer(tmp_path):
    from clipft.api import RunConfig, plan
    base = dict(model="tiny-vit", data=DATA, strategies=["logit-scale"])
    assert plan(RunConfig(**base, optimizer="sgd"))["memory"]["optimizer_state_bytes"] == 4
    assert plan(RunConfig(**base, optimizer="sgd", momentum=0.0))["memory"]["optimizer_state_bytes"] == 0


def test_plan_trains_nothing_and_writes_nothing(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan_json(invoke, "--model", "tiny-vit", "--strategy", "freeze-text", "--head", "linear")
    assert [g["name"] for g in p["groups"]][-2:] == ["head", "head/no_decay"]
    assert p["params"]["by_part"]["head"]["trainable"] == 64 * 9 + 9
    assert p["params"]["by_part"]["text"]["trainable"] == 0
    assert list(tmp_path.iterdir()) == []


def test_plan_estimates_each_rank_under_fsdp_and_ddp(invoke):
    """--nproc N: under DDP every rank holds everything; under FSDP each holds
    1/N of the sharded weights, gradients and AdamW moments, the scalars kept
    whole (logit_scale) in full, plus the root unit and two blocks gathered whole."""
    def plan(*args):
        return plan_json(invoke, "--model", "tiny-vit", "--strategy", "full", "--optimizer", "adamw", *args)
    one = plan()["memory"]
    assert "per_rank" not in one
    ddp = plan("--nproc", "4")["memory"]["per_rank"]
    assert ddp["parallel"] == "ddp" and ddp["total_bytes"] == one["weight_bytes"] + one["training_state_bytes"]
    f = plan("--nproc", "4", "--parallel", "fsdp")["memory"]["per_rank"]
    whole = 4   # logit_scale, one fp32 scalar
    assert f["weight_bytes"] == int((one["weight_bytes"] - whole) / 4 + whole)
    assert f["gradient_bytes"] == f["weight_bytes"]          # everything trains
    assert f["optimizer_state_bytes"] == int(2 * f["gradient_bytes"])
    assert 0 < f["gathered_bytes"] < one["weight_bytes"]
    assert f["towers"] == {"text": "blocks", "vision": "blocks"}
    assert f["total_bytes"] < ddp["total_bytes"] / 2
