"""Tests for data source `example-name`, written with clipft.testing."""
import pytest

import clipft_example_name
from clipft import testing
from clipft.data import DataContext


@pytest.fixture(scope="module")
def registry():
    return testing.plugin_registry(clipft_example_name)


def test_builds_a_labelled_captioned_bundle(registry):
    spec = registry.get("data", "example-name")
    _, _, preprocess = testing.tiny_model()
    bundle = spec.build(spec.options(n=12, val_n=5),
                        DataContext(transform_train=preprocess, transform_val=preprocess, seed=0))
    assert (len(bundle.train), len(bundle.val)) == (12, 5)
    index, image, caption, label = bundle.train[3]
    assert index == 3 and image.shape[0] == 3
    assert caption == bundle.templates[0].format(bundle.classnames[label])
    again = bundle.train[3]
    assert again[2] == caption and bool((again[1] == image).all())  # the seed decides everything


def test_a_run_trains_on_it(registry, tmp_path):
    summary = testing.run_plugin(clipft_example_name, data="example-name:n=16,val_n=8", steps=2, tmp_path=tmp_path,
                                 registry=registry)
    assert summary["data"]["name"] == "example-name"
    assert (summary["data"]["train_size"], summary["data"]["val_size"]) == (16, 8)
    assert summary["data"]["classes"] == len(clipft_example_name.COLOURS)
    assert "top1" in summary["eval"]["after"] and "recall@1" in summary["eval"]["after"]
