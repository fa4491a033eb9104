"""The table of component kinds (clipft.kinds) and what derives from it."""
import json
import subprocess
import sys

import attrs
import pluggy
import pytest

from clipft import hookimpl, hookspecs, kinds
from clipft.errors import ClipftUsageError
from clipft.plugins import Registry


def hookspec_names():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return {name for name in vars(pm.hook) if not name.startswith("_")}


def test_every_hookspec_has_one_kind_and_every_kind_a_hookspec():
    assert sorted(k.hook for k in kinds.KINDS) == sorted(hookspec_names())
    assert kinds.kind_names() == ("strategy", "loss", "head", "data", "callback")


def test_kind_names_and_aliases_are_unambiguous():
    spellings = [n.lower() for k in kinds.KINDS for n in k.names]
    assert len(spellings) == len(set(spellings))
    for k in kinds.KINDS:
        assert k.flag == f"--{k.name}"
        assert {"name", "summary", "build", "options"} <= {f.name for f in attrs.fields(k.spec)}
    assert [k.name for k in kinds.KINDS if k.repeatable] == ["strategy", "callback"]


def test_names_derive_from_the_table():
    from clipft import cli
    assert cli.KIND_ALIASES["data-sources"] == "data"
    assert cli.KIND_ALIASES["strategies"] == "strategy"
    assert set(cli.KIND_ALIASES.values()) == set(kinds.kind_names())
    assert set(Registry(entry_points=False).load().components) == set(kinds.kind_names())


@pytest.mark.parametrize("spelling,kind", [
    ("strategies", "strategy"), ("Loss", "loss"), ("heads", "head"), ("data-source", "data"),
])
def test_lookup_accepts_plurals_and_aliases(spelling, kind):
    assert kinds.lookup(spelling).name == kind


def test_unknown_kind_lists_the_kinds_and_suggests_one():
    with pytest.raises(ClipftUsageError) as exc:
        kinds.lookup("stratgy")
    msg = str(exc.value)
    assert "did you mean 'strategy'" in msg
    assert "strategy, loss, head, data" in msg


def test_describe_accepts_a_plural_kind(invoke):
    r = invoke("describe", "data-sources", "shapes", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "data"
    r = invoke("describe", "widgets", "x")
    assert r.exit_code == 2 and "use one of strategy, loss, head, data, callback" in r.stderr
    assert "strategy, loss, head, data or callback" in " ".join(invoke("describe", "--help").stdout.split())


def test_a_fifth_kind_is_one_table_entry_plus_its_hookspec_and_spec(monkeypatch):
    @attrs.frozen
    class WidgetSpec:
        name: str
        summary: str
        build: object
        options: type = object

    @hookspecs.hookspec
    def clipft_register_widgets(register):
        """Register widgets."""

    monkeypatch.setattr(hookspecs, "clipft_register_widgets", clipft_register_widgets, raising=False)
    widget = kinds.Kind(name="widget", plural="widgets", hook="clipft_register_widgets",
                        spec=WidgetSpec, flag="--widget", toml_key="widget",
                        config_field="widgets", repeatable=True)
    monkeypatch.setattr(kinds, "KINDS", kinds.KINDS + (widget,))

    class Plugin:
        @hookimpl
        def clipft_register_widgets(self, register):
            register(WidgetSpec(name="spinner", summary="spins", build=lambda o: None))

    reg = Registry(plugins=[Plugin()], entry_points=False).load()
    rec = reg.records[0]
    assert rec.status == "active", rec.error
    assert rec.to_json()["provides"] == {"widget": ["spinner"]}
    assert reg.get("widgets", "spinner").summary == "spins"
    assert kinds.lookup("widgets") is widget


def test_plugins_command_does_not_import_torch():
    code = ("import sys\nfrom clipft.cli import cli\n"
            "try:\n    cli(['plugins', '--json'], prog_name='clipft')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["plugins"]
    assert out.stderr.strip().splitlines()[-1] == "False"


# -- hooks are verified per plugin --------------------------------------------------

def strategy_spec(name):
    from clipft import StrategySpec
    return StrategySpec(name=name, summary="test", build=lambda o: None)


class Good:
    @hookimpl
    def clipft_register_strategies(self, register):
        register(strategy_spec("good"))


class Typo:
    @hookimpl
    def clipft_register_strategy(self, register):  # the hook is ..._strategies
        register(strategy_spec("typo"))

    @hookimpl
    def clipft_register_losses(self, register):
        from clipft import LossSpec
        register(LossSpec(name="typo-loss", summary="", build=lambda o: None))


def test_misspelt_hook_fails_only_that_plugin_with_a_suggestion():
    reg = Registry(plugins=[Typo(), Good()], entry_points=False).load()
    typo, good = reg.records
    assert typo.status == "failed"
    assert "'clipft_register_strategy' is not a clipft hook" in typo.error
    assert "did you mean 'clipft_register_strategies'?" in typo.error
    assert "test_registry.py" in typo.error  # where the bad function is
    assert good.status == "active" and good.provides["strategy"] == ["good"]
    # nothing of the failed plugin is registered, its correct hooks included
    assert reg.names("strategy") == ["good"] and reg.names("loss") == []
    assert typo.to_json()["provides"] == {}


def test_unknown_hook_without_close_match_lists_the_hooks():
    class Odd:
        @hookimpl
        def frobnicate(self):
            pass

    rec = Registry(plugins=[Odd()], entry_points=False).load().records[0]
    assert rec.status == "failed" and "'frobnicate' is not a clipft hook" in rec.error
    assert all(k.hook in rec.error for k in kinds.KINDS)


def test_optional_hook_of_a_newer_clipft_does_not_fail_the_plugin():
    class Ahead(Good):
        @hookimpl(optionalhook=True)
        def clipft_register_gadgets(self, register):
            pass

    rec = Registry(plugins=[Ahead()], entry_points=False).load().records[0]
    assert rec.status == "active", rec.error
    assert rec.provides["strategy"] == ["good"]


# -- the config's TOML keys come from the table ------------------------------------

def test_config_toml_keys_follow_the_table():
    from clipft.config import RunConfig, dumps_toml
    from clipft.options import ComponentRef
    d = {"strategy": [{"name": "last-n", "n": 2}, "logit-scale"], "loss": {"name": "contrastive"},
         "head": "none", "data": {"name": "shapes", "n": 8}}
    cfg = RunConfig.from_toml_dict(d)
    assert cfg.strategies == [ComponentRef("last-n", {"n": 2}), ComponentRef("logit-scale")]
    assert cfg.head is None and cfg.loss.name == "contrastive" and cfg.data.options == {"n": 8}
    out = cfg.to_toml_dict()
    assert {k.toml_key for k in kinds.KINDS} - {"head"} <= set(out) and "head" not in out
    assert "[[strategy]]" in dumps_toml(out) and "[data]" in dumps_toml(out)
    assert RunConfig.from_toml_dict(out) == cfg
    # a single [strategy] table is one strategy
    assert len(RunConfig.from_toml_dict({"strategy": {"name": "full"}}).strategies) == 1


def test_config_field_name_of_a_component_is_not_a_toml_key():
    from clipft.config import RunConfig
    with pytest.raises(ClipftUsageError) as exc:
        RunConfig.from_toml_dict({"strategies": ["full"]})
    msg = str(exc.value)
    assert "unknown key 'strategies'" in msg
    valid = msg.split("Valid keys: ")[1].split(", ")
    assert "strategy" in valid and "strategies" not in valid and "head" in valid
