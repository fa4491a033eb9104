"""Shared fixtures: offline, tiny models, CLI runner."""
import json
import os
import tempfile
from pathlib import Path

import pytest

# never touch the network from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the plugins' provides cache (clipft.plugins.cache_path) of this test process, not the user's
os.environ.setdefault("CLIPFT_CACHE_DIR", tempfile.mkdtemp(prefix="clipft-test-cache-"))
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
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are faster and steadier on one thread when the other core is
    busy; modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry(request):
    """The installed plugins plus the test module's in-process ones (its ``PLUGINS``)."""
    from clipft.api import make_registry
    return make_registry(plugins=list(getattr(request.module, "PLUGINS", ())))


def _use_run(invoke, out, *args):
    from peft_base import SMALL_NOVEL
    res = invoke("run", "--model", "tiny-vit", "--data", SMALL_NOVEL, "--epochs", "1", "--batch-size", "16",
                 "--callback", "none", "--out", out, "--json", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Runs fine-tuned from the shared "pretrained" base (tests/peft_base.py) on
    its novel colours, one epoch each: ``full`` (contrastive), ``head``
    (last-n:n=1 with a zero-shot head, cross-entropy) and ``lora``; built once
    per session for the eval, predict and WiSE-FT tests."""
    from click.testing import CliRunner

    from peft_base import SMALL_NOVEL, base_checkpoint

    from clipft.cli import cli
    base = base_checkpoint(tmp_path_factory)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    root = tmp_path_factory.mktemp("use")
    out = {"base": base, "root": root}
    out["full"] = root / "full"
    out["full_summary"] = _use_run(invoke, out["full"], "--pretrained", base["weights"], "--strategy", "full",
                               "--lr", "1e-3")
    out["head"] = root / "head"
    out["head_summary"] = _use_run(invoke, out["head"], "--pretrained", base["weights"], "--strategy", "last-n:n=1",
                               "--head", "zero-shot", "--loss", "cross-entropy")
    out["lora"] = root / "lora"
    out["lora_summary"] = _use_run(invoke, out["lora"], "--pretrained", base["weights"], "--strategy", "lora")
    return out
