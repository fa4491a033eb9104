"""The example plugin's own tests, written against clipft.testing (what a plugin author does)."""
import pytest

import clipft_bitfit_example
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_bitfit_example)


def is_bias(name):
    return name.endswith("bias")


def is_vision_bias(name):
    return name.startswith("visual.") and name.endswith("bias")


def test_registers_the_bitfit_example_strategy(registry):
    spec = registry.get("strategy", "bitfit-example")
    assert spec.default_lr == 1e-3 and spec.options().tower == "both"


@pytest.mark.parametrize("tower,selected", [("both", is_bias), ("vision", is_vision_bias)])
def test_trains_only_biases(registry, tmp_path, tower, selected):
    summary = testing.run_plugin(clipft_bitfit_example, strategy=f"bitfit-example:tower={tower}", steps=2,
                                 tmp_path=tmp_path, registry=registry)
    model, _, _ = testing.tiny_model()
    biases = {n: p.numel() for n, p in model.named_parameters() if selected(n)}
    # the counts: every selected bias, nothing else, in one no-decay group
    assert summary["params"]["trainable"] == sum(biases.values()) > 0
    assert summary["params"]["groups"] == [
        {"name": "bias/no_decay", "tensors": len(biases), "params": sum(biases.values()),
         "lr": 1e-3, "weight_decay": 0.0}]
    assert summary["train"]["steps"] == 2
    # what actually moved: biases of the chosen tower(s) only
    trained = testing.load_trained(summary["run_dir"], registry).model
    changed = testing.assert_only_selected_changed(testing.initial_state(summary["run_dir"]),
                                                   trained, selected)
    assert len(changed) > len(biases) // 2
    model_t, head_t = testing.checkpoint_tensors(summary["run_dir"])
    assert set(model_t) == set(biases) and head_t == {}


def test_checkpoint_and_export_round_trip(registry, tmp_path):
    summary = testing.run_plugin(clipft_bitfit_example, strategy="bitfit-example", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    testing.assert_checkpoint_roundtrip(summary["run_dir"], registry)
    manifest = testing.assert_export_roundtrip(summary["run_dir"], tmp_path / "export", registry)
    assert manifest["plain_open_clip_drops"] == []  # biases live in the plain open_clip weights
