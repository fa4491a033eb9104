"""Tests for head `example-name`, written with clipft.testing."""
import pytest

import clipft_example_name
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_example_name)


def test_hook_registers_the_head(registry):
    spec = registry.get("head", "example-name")
    assert spec.needs_classes and spec.options().scale == 10.0


def test_the_head_alone_trains_and_round_trips(registry, tmp_path):
    summary = testing.run_plugin(clipft_example_name, head="example-name", loss="cross-entropy", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    model, _, _ = testing.tiny_model()
    classes = summary["data"]["classes"]
    # nothing of the model trains: the head's prototypes are all there is
    assert summary["params"]["trainable"] == classes * model.text_projection.shape[1]
    assert "head_top1" in summary["eval"]["after"]
    model_t, head_t = testing.checkpoint_tensors(summary["run_dir"])
    assert model_t == {} and set(head_t) == {"prototypes"}
    loaded = testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    assert loaded.head is not None
    testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", registry)
