"""Tests for strategy `example-name`, written with clipft.testing."""
import pytest

import clipft_example_name
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_example_name)


def is_norm(name):
    """``...ln_1.weight``, ``visual.ln_post.bias``, ``ln_final.weight``: open_clip's LayerNorms."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].startswith("ln_")


def is_vision_norm(name):
    return name.startswith("visual.") and is_norm(name)


def test_hook_registers_the_strategy(registry):
    spec = registry.get("strategy", "example-name")
    assert spec.options().tower == "both" and spec.default_lr == 1e-3


@pytest.mark.parametrize("tower,selected", [("vision", is_vision_norm), ("both", is_norm)])
def test_trains_only_the_selected_layernorms(registry, tmp_path, tower, selected):
    summary = testing.run_plugin(clipft_example_name, strategy=f"example-name:tower={tower}", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    model, _, _ = testing.tiny_model()
    expected = {n: p.numel() for n, p in model.named_parameters() if selected(n)}
    assert summary["params"]["trainable"] == sum(expected.values()) > 0
    assert [(g["name"], g["tensors"]) for g in summary["params"]["groups"]] == [
        ("norms/no_decay", len(expected))]
    trained = testing.load_trained(summary["run_dir"], registry).model
    testing.assert_only_selected_changed(testing.initial_state(summary["run_dir"]), trained, selected)


def test_checkpoint_and_export_round_trip(registry, tmp_path):
    summary = testing.run_plugin(clipft_example_name, strategy="example-name", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", registry)
