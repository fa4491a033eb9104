"""Shared fixtures: offline, tiny models, CLI runner."""
import json
import os

import pytest

# never touch the network from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner
    return CliRunner()


@pytest.fixture
def invoke(cli_runner):
    """invoke("run", "--model", ...) -> click Result; stdout/stderr kept apart."""
    from clipft.cli import cli

    def _invoke(*args, env=None):
        return cli_runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    return _invoke


@pytest.fixture
def small_shapes():
    """A shapes data spec small enough for a few-second run."""
    return "shapes:n=64,val_n=32"


def read_summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are faster and steadier on one thread when the other core is
    busy; modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
