"""Tests for callback `example-name`, written with clipft.testing."""
import json
from pathlib import Path

import pytest

import clipft_example_name
from clipft import testing


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_example_name)


def test_hook_registers_the_callback(registry):
    spec = registry.get("callback", "example-name")
    assert spec.default is False and spec.options().every == 1


@pytest.mark.parametrize("every,logged", [(1, [1, 2, 3]), (2, [2])])
def test_logs_the_optimizer_steps(registry, tmp_path, every, logged):
    summary = testing.run_plugin(clipft_example_name, callbacks=[f"example-name:every={every}"], steps=3,
                                 tmp_path=tmp_path, registry=registry)
    doc = json.loads((Path(summary["run_dir"]) / "example-name.json").read_text())
    assert [row["step"] for row in doc["steps"]] == logged
    assert all(row["loss"] > 0 for row in doc["steps"])
    assert doc["eval_after"] == summary["eval"]["after"]
