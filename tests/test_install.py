"""Installing into one's own environment: the core alone names the plugin a
missing component comes with; the built-in table stays true to plugins/; the
documented command is the one .ci/fresh-install runs in a fresh venv."""
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest

from clipft import api
from clipft.errors import ClipftUsageError
from clipft.plugins import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, Registry

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = "pip install . ./plugins/*"
RUN = ["run", "--model", "tiny-vit", "--pretrained", "none", "--data", "shapes:n=16,val_n=8",
       "--strategy", "full", "--epochs", "1"]


def test_the_builtin_table_is_what_the_plugins_register():
    folders = {p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file()}
    assert set(BUILTIN_PLUGINS) == folders, "clipft.plugins.BUILTIN_PLUGINS lists every folder of plugins/"
    reg = Registry().load()
    reg.conflicts()     # every pending distribution imported
    seen = {r.distribution: r for r in reg.records if r.distribution in BUILTIN_PLUGINS}
    assert set(seen) == folders
    for dist, rec in seen.items():
        assert rec.status == "active", (dist, rec.error)
        assert {k: sorted(v) for k, v in rec.provides.items() if v} == \
            {k: sorted(v) for k, v in BUILTIN_PLUGINS[dist].items()}, dist


@pytest.fixture
def installed(monkeypatch):
    """``installed(*dists)``: the ``clipft`` entry points as if only ``dists`` were installed."""
    real = md.entry_points

    def only(*dists):
        def entry_points(**kw):
            eps = real(**kw)
            if kw.get("group") != ENTRY_POINT_GROUP:
                return eps
            return [ep for ep in eps if ep.dist is not None and ep.dist.name in dists]
        monkeypatch.setattr(md, "entry_points", entry_points)
    return only


def test_the_core_alone_says_what_to_install(invoke, installed, tmp_path):
    installed()
    r = invoke(*RUN, "--out", tmp_path / "a")
    assert r.exit_code == 2
    msg = " ".join(r.stderr.split())    # rich may wrap the line
    assert "no clipft plugins are installed (strategy 'full' comes with clipft-full)" in msg
    assert DOCUMENTED in msg and "pip install clipft-full (or pip install ./plugins/clipft-full from a clone)" in msg
    assert not (tmp_path / "a").exists()


def test_a_kind_with_nothing_installed_names_its_distribution(invoke, installed, tmp_path):
    installed("clipft-full", "clipft-losses", "clipft-plots")
    r = invoke(*RUN, "--out", tmp_path / "a")
    assert r.exit_code == 2
    msg = " ".join(r.stderr.split())
    assert "no data sources are installed (data 'shapes' comes with clipft-data): pip install " \
        "clipft-data (or pip install ./plugins/clipft-data from a clone)" in msg


def test_a_missing_builtin_among_installed_ones_names_its_distribution(invoke, installed, tmp_path):
    installed("clipft-data", "clipft-losses", "clipft-full", "clipft-plots")
    r = invoke(*RUN, "--strategy", "lora", "--out", tmp_path / "a")
    assert r.exit_code == 2
    msg = " ".join(r.stderr.split())    # rich may wrap the line
    assert "strategy 'lora' is not installed: pip install clipft-lora (or pip install " \
        "./plugins/clipft-lora from a clone)" in msg
    assert "Available: full" in msg


def test_the_api_with_no_plugins_says_the_same():
    reg = api.make_registry(entry_points=False)
    with pytest.raises(ClipftUsageError, match=r"no clipft plugins are installed \(loss 'siglip' comes "
                                               r"with clipft-losses\).*pip install clipft-losses "):
        reg.get("loss", "siglip")
    with pytest.raises(ClipftUsageError, match="no clipft plugins are installed.*pip install clipft-full "):
        api.run({"model": "tiny-vit", "pretrained": "none", "data": {"name": "shapes"},
                 "strategy": [{"name": "full"}]}, entry_points=False)
    # a name no built-in provides: a guess at a third-party plugin, and the all-at-once command
    with pytest.raises(ClipftUsageError, match=re.escape(DOCUMENTED)) as exc:
        reg.get("strategy", "warp-drive")
    assert "unknown strategy 'warp-drive'" in str(exc.value)


def test_a_disabled_builtin_is_reported_as_disabled_not_missing():
    with pytest.raises(ClipftUsageError) as exc:
        Registry(disabled=["clipft-data"]).load().get("data", "shapes")
    assert "is disabled: clipft-data" in str(exc.value) and "pip install" not in str(exc.value)


def test_the_documented_install_keeps_a_users_torch():
    """The core's torch, torchvision and open_clip requirements are ranges (a user's
    CUDA build is kept), and they admit the release CI installs first."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    fresh = (ROOT / ".ci" / "fresh-install").read_text()
    pinned = dict(re.findall(r"(torch|torchvision)==([\d.]+)", fresh))
    for name in ("torch", "torchvision", "open_clip_torch"):
        (req,) = [d for d in deps if re.match(rf"{name}\b(?![-_])", d)]
        assert "==" not in req and "<" in req and ">=" in req, req
        if name in pinned:
            lo, hi = re.match(rf"{name}>=([\d.]+),<([\d.]+)", req).groups()
            v = tuple(map(int, pinned[name].split(".")))
            assert tuple(map(int, lo.split("."))) <= v < tuple(map(int, hi.split("."))), (req, v)
    assert DOCUMENTED in fresh and ".ci/fresh-install" in (ROOT / ".ci" / "run").read_text()
    for page in ("README.md", "docs/usage.md"):
        assert DOCUMENTED in (ROOT / page).read_text(), page


def test_the_optional_plugins_the_docs_leave_out_are_real_and_needed_by_none():
    lean = re.search(r"pip install \. \$\(ls -d plugins/\* \| grep -v ([^)]*)\)",
                     (ROOT / "docs" / "usage.md").read_text()).group(1)
    left_out = re.findall(r"-e (\S+)", lean)
    assert left_out and all((ROOT / "plugins" / d / "pyproject.toml").is_file() for d in left_out)
    for pyproject in (ROOT / "plugins").glob("*/pyproject.toml"):
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        assert not set(left_out) & set(deps), (pyproject.parent.name, deps)
