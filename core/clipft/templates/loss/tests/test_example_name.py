"""Tests for loss `example-name`, written with clipft.testing."""
import math

import pytest
import torch
import torch.nn.functional as F

import clipft_example_name
from clipft import ForwardRecord, testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_example_name)


def features(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_hook_registers_the_loss(registry):
    spec = registry.get("loss", "example-name")
    assert spec.needs == {"text"}


def test_aligned_pairs_cost_less_than_shuffled_ones(registry):
    loss = registry.get("loss", "example-name").build(clipft_example_name.ExampleNameOptions(scale=10.0))
    img = features()
    aligned = loss(ForwardRecord(image_features=img, text_features=img))
    shuffled = loss(ForwardRecord(image_features=img, text_features=img.roll(1, dims=0)))
    assert set(aligned) == {"total", "image_to_text", "text_to_image"}
    assert aligned["total"] < shuffled["total"]
    assert torch.isclose(aligned["total"], (aligned["image_to_text"] + aligned["text_to_image"]) / 2)


def test_identical_captions_are_positives(registry):
    loss = registry.get("loss", "example-name").build(clipft_example_name.ExampleNameOptions(scale=10.0))
    img = features(n=2)
    txt = torch.stack([img[0], img[0]])  # both images carry the same caption
    ids = torch.tensor([0, 0])
    out = loss(ForwardRecord(image_features=img, text_features=txt, caption_ids=ids))
    # the target is uniform over the two equal captions: image->text costs exactly log 2
    assert math.isclose(float(out["image_to_text"]), math.log(2), rel_tol=1e-5)


def test_trains_in_a_run(registry, tmp_path):
    summary = testing.run_plugin(clipft_example_name, loss="example-name", strategy="logit-scale", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    assert summary["loss"]["name"] == "example-name"
    assert summary["train"]["steps"] == 2 and math.isfinite(summary["train"]["final_loss"])
