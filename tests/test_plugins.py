"""Plugin discovery through real entry points: third-party install, failures,
conflicts, in-process registration."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clipft.errors import ClipftUsageError, PluginConflictError
from clipft.plugins import Registry

ROOT = Path(__file__).resolve().parents[1]


def make_dist(site: Path, dist: str, module: str, source: str, ep_name: str | None = None):
    """Write an installed distribution (module + .dist-info with entry_points.txt)
    into ``site``: the same files pip writes on install."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(f"[clipft]\n{ep_name or module} = {module}\n")


STRATEGY_SRC = """
    import attrs
    from clipft import Selection, Strategy, StrategySpec, hookimpl

    @attrs.frozen
    class Opts:
        pass

    class S(Strategy):
        def apply(self, model, ctx):
            return [Selection("ls", [("logit_scale", model.logit_scale)])]

    @hookimpl
    def clipft_register_strategies(register):
        register(StrategySpec(name="{name}", summary="test", options=Opts, build=lambda o: S()))
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    return d


def test_third_party_distribution_installed_with_pip_is_discovered_and_used(tmp_path):
    """pip-install the example plugin bitfit-example (a separate distribution with a real
    entry point) into a fresh target dir, then use it from the CLI."""
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "examples" / "clipft-bitfit-example")],
        check=True, capture_output=True)
    # prepend: an inherited PYTHONPATH (a checkout tested against another's venv) must stay
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(target), os.environ.get("PYTHONPATH")) if p)}
    cli = [sys.executable, "-m", "clipft.cli"]
    plugins = subprocess.run(cli + ["plugins", "--json"], env=env, capture_output=True, text=True)
    rows = {p["distribution"]: p for p in json.loads(plugins.stdout)["plugins"]}
    assert rows["clipft-bitfit-example"]["provides"] == {"strategy": ["bitfit-example"]}
    assert rows["clipft-bitfit-example"]["status"] == "active"
    out = tmp_path / "run"
    r = subprocess.run(cli + ["run", "--model", "tiny-vit", "--data", "shapes:n=32,val_n=16",
                              "--strategy", "bitfit-example:tower=vision", "--batch-size", "16",
                              "--out", str(out), "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["strategies"] == [{"name": "bitfit-example", "tower": "vision"}]
    groups = summary["params"]["groups"]
    assert [g["name"] for g in groups] == ["bias/no_decay"]
    # every trainable tensor is a vision bias
    from safetensors.torch import load_file
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert saved and all(k.startswith("visual.") and k.endswith("bias") for k in saved)


def test_plugin_that_fails_to_import_is_recorded_and_others_work(site, invoke, tmp_path):
    make_dist(site, "clipft-broken", "clipft_broken", "raise ImportError('needs libfoo')")
    reg = Registry().load()
    rec = next(r for r in reg.records if r.distribution == "clipft-broken")
    assert rec.status == "failed" and "needs libfoo" in rec.error
    assert "full" in reg.names("strategy")
    assert invoke("--help").exit_code == 0
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    row = next(p for p in json.loads(r.stdout)["plugins"] if p["distribution"] == "clipft-broken")
    assert row["status"] == "failed"
    r = invoke("plugins")
    assert "failed" in r.stdout and "needs libfoo" in r.stdout    # its row in the listing
    assert "failed" in r.stderr and "needs libfoo" in r.stderr    # and the error
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--strategy", "full",
               "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    # the run says once that an installed plugin is broken
    assert r.stderr.count("plugins that failed to load") == 1 and "clipft-broken" in r.stderr


def test_plugin_whose_hook_raises_is_failed_without_partial_registration(site):
    make_dist(site, "clipft-halfway", "clipft_halfway", STRATEGY_SRC.format(name="halfway") + """
    @hookimpl
    def clipft_register_losses(register):
        raise RuntimeError("loss hook exploded")
    """)
    reg = Registry().load()
    rec = next(r for r in reg.records if r.distribution == "clipft-halfway")
    assert rec.status == "failed" and "loss hook exploded" in rec.error
    assert "halfway" not in reg.names("strategy")
    with pytest.raises(ClipftUsageError, match="failed to load: clipft-halfway"):
        reg.get("strategy", "halfway")


def test_registering_a_wrong_spec_type_fails_the_plugin(site):
    make_dist(site, "clipft-wrongtype", "clipft_wrongtype", """
    from clipft import LossSpec, hookimpl
    @hookimpl
    def clipft_register_strategies(register):
        register(LossSpec(name="x", summary="", build=lambda o: None))
    """)
    rec = next(r for r in Registry().load().records if r.distribution == "clipft-wrongtype")
    assert rec.status == "failed" and "StrategySpec" in rec.error


def test_two_distributions_registering_one_name_fail_only_its_lookup(site, invoke, tmp_path):
    make_dist(site, "clipft-alpha", "clipft_alpha", STRATEGY_SRC.format(name="twin"))
    make_dist(site, "clipft-beta", "clipft_beta", STRATEGY_SRC.format(name="twin") + """
    @hookimpl
    def clipft_register_losses(register):
        from clipft import LossSpec
        register(LossSpec(name="beta-loss", summary="", build=lambda o: None))
    """)
    reg = Registry().load()  # loading is not fatal
    with pytest.raises(PluginConflictError) as exc:
        reg.get("strategy", "twin")
    msg = str(exc.value)
    assert "'clipft-alpha' (clipft_alpha) and 'clipft-beta' (clipft_beta)" in msg
    # beta was installed last: it is the one to disable; keeping beta is shown too
    assert "disable the newer install with --disable-plugin clipft-beta " in msg
    assert "to keep 'clipft-beta' instead: --disable-plugin clipft-alpha" in msg
    with pytest.raises(PluginConflictError):
        reg.distribution_of("strategy", "twin")
    # the rest of both plugins, and everything else, still works
    assert reg.distribution_of("loss", "beta-loss") == "clipft-beta"
    assert reg.get("strategy", "full").name == "full"

    assert invoke("--help").exit_code == 0
    r = invoke("plugins", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {p["distribution"]: p for p in json.loads(r.stdout)["plugins"]}
    for dist, other in (("clipft-alpha", "clipft-beta"), ("clipft-beta", "clipft-alpha")):
        assert rows[dist]["status"] == "active"
        assert rows[dist]["provides"]["strategy"] == ["twin"]
        assert rows[dist]["conflicts"] == [{"kind": "strategy", "name": "twin", "with": [other]}]
    assert rows["clipft-full"]["conflicts"] == []
    r = invoke("plugins")
    assert r.exit_code == 0
    assert "twin (conflict)" in r.stdout         # the listing marks it
    assert "conflict: strategy 'twin' is registered by two distributions" in r.stderr
    r = invoke("describe", "strategy", "twin")
    assert r.exit_code == 2 and "clipft-alpha" in r.stderr and "clipft-beta" in r.stderr
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--strategy", "twin",
               "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--disable-plugin clipft-beta" in r.stderr
    # both remedies the message suggests work
    assert Registry(disabled=["clipft-beta"]).load().distribution_of("strategy", "twin") == "clipft-alpha"
    assert Registry(disabled=["clipft-alpha"]).load().distribution_of("strategy", "twin") == "clipft-beta"
    r = invoke("--disable-plugin", "clipft-beta", "describe", "strategy", "twin")
    assert r.exit_code == 0 and "clipft-alpha" in r.stdout


def test_conflict_with_a_builtin_suggests_disabling_the_newcomer(site, invoke):
    # entry point "clipft_myfull" sorts (and loads) before the built-in "full": the
    # suggestion must still not be to disable the built-in
    make_dist(site, "clipft-myfull", "clipft_myfull", STRATEGY_SRC.format(name="full"))
    reg = Registry().load()
    with pytest.raises(PluginConflictError) as exc:
        reg.get("strategy", "full")
    msg = str(exc.value)
    assert "clipft-full" in msg and "clipft-myfull" in msg
    assert "disable the newer install with --disable-plugin clipft-myfull " in msg
    assert "to keep 'clipft-myfull' instead: --disable-plugin clipft-full" in msg
    r = invoke("plugins")
    assert r.exit_code == 0 and "clipft-myfull" in r.stdout
    r = invoke("--disable-plugin", "clipft-myfull", "describe", "strategy", "full")
    assert r.exit_code == 0 and "(clipft-full)" in r.stdout


def test_three_distributions_on_one_name():
    import clipft
    from clipft.specs import StrategySpec

    def plugin(name):
        class P:
            @clipft.hookimpl
            def clipft_register_strategies(self, register):
                register(StrategySpec(name="same", summary=name, build=lambda o: None))
        P.__name__ = name
        return P()

    reg = Registry(plugins=[plugin("one"), plugin("two"), plugin("three")], entry_points=False).load()
    with pytest.raises(PluginConflictError) as exc:
        reg.get("strategy", "same")
    msg = str(exc.value)
    assert "registered by 3 distributions" in msg
    assert "--disable-plugin two --disable-plugin three" in msg
    assert [c["with"] for c in reg.records[0].conflicts] == [["<in-process:two>", "<in-process:three>"]]


def test_listing_plugins_does_not_import_torch():
    code = ("import sys; from clipft.plugins import Registry; r = Registry().load(); "
            "assert r.names('strategy'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plugin_classes_are_defined_at_module_level():
    """Plugin convention: torch classes live at module level in a sibling module
    that build/apply imports, never inside a function (a class made per call
    does not pickle by name and is a new type each time)."""
    import ast

    nested = []
    for path in sorted((ROOT / "plugins").glob("*/*/**/*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [f"{path.relative_to(ROOT)}:{c.lineno} {c.name}"
                           for c in ast.walk(fn) if isinstance(c, ast.ClassDef)]
    assert not nested, nested


def test_plugins_load_lazily_not_at_import():
    code = "import sys, clipft, clipft.cli; print(any(m.startswith('clipft_') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embedding_example_trains_evaluates_loads_and_classifies(tmp_path, capsys):
    """examples/embed_clipft.py: an in-process plugin's run, evaluated, then
    loaded with clipft.load (the plugin again) and classifying PIL images."""
    import torch
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import embed_clipft
        result = embed_clipft.main(str(tmp_path / "emb"))
        embed_clipft.show(result, str(tmp_path / "emb"))
    finally:
        sys.path.remove(str(ROOT / "examples"))
    summary, report, probs = result["summary"], result["report"], result["probs"]
    assert report["source"] == f"run {tmp_path / 'emb'}" and report["samples"] == 64
    assert report["classes"] == result["classes"] and len(result["classes"]) == 9
    assert probs.shape == (3, 9) and torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)
    feats = result["image_features"]
    assert feats.shape[0] == 3 and torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    shown = capsys.readouterr().out.splitlines()
    assert shown[1].startswith("evaluated on 64 images") and len(shown) == 5
    assert shown[2].startswith("a red circle: ")
    assert summary["strategies"] == [{"name": "norms", "tower": "vision"}]
    # only the vision LayerNorms train
    import open_clip

    from clipft.models import register_tiny_configs
    register_tiny_configs()
    model = open_clip.create_model("tiny-vit")
    expected = sum(p.numel() for m in model.visual.modules() if isinstance(m, torch.nn.LayerNorm)
                   for p in m.parameters())
    assert summary["params"]["trainable"] == expected
    groups = summary["params"]["groups"]
    assert {g["name"] for g in groups} == {"norms/no_decay"}
    assert summary["params"]["trainable"] == groups[0]["params"] > 0
    assert (tmp_path / "emb" / "summary.json").is_file()


def test_in_process_plugin_conflicting_with_entry_point_is_reported():
    import clipft
    from clipft.specs import StrategySpec

    class Dup:
        @clipft.hookimpl
        def clipft_register_strategies(self, register):
            register(StrategySpec(name="full", summary="", build=lambda o: None))

    reg = Registry(plugins=[Dup()]).load()
    with pytest.raises(PluginConflictError, match="<in-process:Dup>") as exc:
        reg.get("strategy", "full")
    # the in-process plugin is the newcomer; it is disabled by its own name
    assert "disable the newer install with --disable-plugin Dup " in str(exc.value)
    assert Registry(plugins=[Dup()], disabled=["Dup"]).load().get("strategy", "full").summary


def test_entry_point_plugin_with_a_misspelt_hook_is_failed(site, invoke):
    make_dist(site, "clipft-typo", "clipft_typo",
              STRATEGY_SRC.format(name="typo").replace("def clipft_register_strategies",
                                                       "def clipft_register_strategy"))
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    rows = {p["distribution"]: p for p in json.loads(r.stdout)["plugins"]}
    assert rows["clipft-typo"]["status"] == "failed"
    assert "'clipft_register_strategy' is not a clipft hook" in rows["clipft-typo"]["error"]
    assert "did you mean 'clipft_register_strategies'?" in rows["clipft-typo"]["error"]
    assert rows["clipft-full"]["status"] == "active"
    r = invoke("plugins")
    assert "clipft_register_strategy" in r.stderr and "failed" in r.stderr


@pytest.mark.parametrize("source,needle", [
    ("import sys\nsys.exit(3)", "SystemExit: 3"),
    ("raise SystemExit('no GPU, bye')", "SystemExit: no GPU, bye"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
], ids=["sys.exit", "SystemExit", "KeyboardInterrupt"])
def test_plugin_that_exits_or_interrupts_at_import_is_contained(site, invoke, source, needle):
    make_dist(site, "clipft-quitter", "clipft_quitter", source)
    rec = next(r for r in Registry().load().records if r.distribution == "clipft-quitter")
    assert rec.status == "failed" and needle in rec.error and "clipft_quitter.py" in rec.error
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    rows = {p["distribution"]: p for p in json.loads(r.stdout)["plugins"]}
    assert rows["clipft-quitter"]["status"] == "failed"
    assert rows["clipft-full"]["status"] == "active"
    assert invoke("describe", "strategy", "full").exit_code == 0


def test_plugin_hook_that_exits_is_contained(site):
    make_dist(site, "clipft-hookexit", "clipft_hookexit", """
    import sys
    from clipft import hookimpl
    @hookimpl
    def clipft_register_strategies(register):
        sys.exit("refusing")
    """)
    reg = Registry().load()
    rec = next(r for r in reg.records if r.distribution == "clipft-hookexit")
    assert rec.status == "failed" and "SystemExit: refusing" in rec.error
    assert "full" in reg.names("strategy")


def test_a_real_ctrl_c_while_plugins_load_still_stops_the_command(site):
    import signal
    make_dist(site, "clipft-slow", "clipft_slow", """
    import os, signal
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during a slow import
    for _ in range(1000):
        pass
    """)
    # Python's own Ctrl-C handler, whatever this process inherited (a job started
    # in the background by a non-interactive shell starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            Registry().load()
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("dist,module,ep", [
    ("clipft-foo", "clipft_foo", None),         # distribution clipft-X
    ("acme-tuners", "acme_foo", "foo"),          # entry point X
], ids=["distribution", "entry-point"])
def test_unknown_name_of_a_failed_plugin_shows_its_error_not_pip_install(site, invoke, tmp_path,
                                                                        dist, module, ep):
    make_dist(site, dist, module, "raise ImportError('needs libfoo')", ep_name=ep)
    with pytest.raises(ClipftUsageError) as exc:
        Registry().load().get("strategy", "foo")
    msg = str(exc.value)
    assert "pip install" not in msg
    assert f"failed to load: {dist}" in msg and "needs libfoo" in msg
    r = invoke("run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--strategy", "foo",
               "--out", tmp_path / "o")
    assert r.exit_code == 2 and "needs libfoo" in r.stderr and "pip install" not in r.stderr


def test_unknown_name_of_a_disabled_plugin_says_so():
    with pytest.raises(ClipftUsageError) as exc:
        Registry(disabled=["clipft-full"]).load().get("strategy", "full")
    msg = str(exc.value)
    assert "is disabled: clipft-full (full)" in msg and "pip install" not in msg


def test_unknown_name_in_the_wrong_kind_points_at_the_right_one():
    with pytest.raises(ClipftUsageError) as exc:
        Registry().load().get("loss", "lora")
    msg = str(exc.value)
    assert "clipft-lora is installed and provides strategy 'lora'" in msg
    assert "pip install" not in msg


def test_unknown_name_close_to_a_known_one_is_suggested():
    with pytest.raises(ClipftUsageError) as exc:
        Registry().load().get("strategy", "last_n")
    msg = str(exc.value)
    assert "unknown strategy 'last_n' (did you mean 'last-n'?)" in msg
    assert "clipft-last-n is installed and provides strategy 'last-n'" in msg
    assert "pip install" not in msg


# -- plugins that break everyone: stdout, import cost, a process that exits -------
def test_a_plugin_that_prints_at_import_leaves_json_valid(site, invoke):
    make_dist(site, "clipft-noisy", "clipft_noisy",
              "print('hello from import')\n" + textwrap.dedent(STRATEGY_SRC.format(name="noisy")))
    printed = ""
    for args in (["plugins", "--json"], ["describe", "strategy", "noisy", "--json"],
                 ["plan", "--model", "tiny-vit", "--strategy", "noisy", "--json"]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        json.loads(r.stdout)                       # one document, nothing else
        printed += r.stderr
    assert "hello from import" in printed          # (imported once: this process keeps the module)


def _cli(site, cache, *args):
    env = {**os.environ, "CLIPFT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "clipft.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


RUN_FULL = ["run", "--model", "tiny-vit", "--data", "shapes:n=16,val_n=8", "--strategy", "full",
            "--epochs", "1", "--batch-size", "8", "--callback", "none", "--json"]


def test_a_run_imports_only_the_distributions_it_uses(tmp_path):
    """After one full load has recorded what each distribution provides, a run
    imports the providers of the components it names, not a plugin it does not use."""
    site, cache, marker = tmp_path / "site", tmp_path / "cache", tmp_path / "imported"
    site.mkdir()
    make_dist(site, "clipft-heavy", "clipft_heavy", f"open({str(marker)!r}, 'a').write('x')\n"
              + textwrap.dedent(STRATEGY_SRC.format(name="heavy")))
    r = _cli(site, cache, "plugins", "--json")                # a full load: fills the cache
    assert r.returncode == 0, r.stderr
    assert marker.read_text() == "x"
    r = _cli(site, cache, *RUN_FULL, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert marker.read_text() == "x"                            # not imported again
    heavy = [a if a != "full" else "heavy" for a in RUN_FULL]
    r = _cli(site, cache, *heavy, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert marker.read_text() == "xx"                           # its own component: imported


def test_a_plugin_that_exits_at_import_breaks_one_command_once(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    make_dist(site, "clipft-exiter", "clipft_exiter", "import os\nos._exit(7)\n")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    # commands that need no plugin load none
    for args in (["--version"], ["--help"], ["runs", runs_dir]):
        r = _cli(site, cache, *args)
        assert r.returncode == 0, (args, r.stderr)
    assert _cli(site, cache, "plugins", "--json").returncode == 7     # the import ends the process
    r = _cli(site, cache, "plugins", "--json")                         # the next one skips it
    assert r.returncode == 0, r.stderr
    row = next(p for p in json.loads(r.stdout)["plugins"] if p["distribution"] == "clipft-exiter")
    assert row["status"] == "failed" and "ended the process that imported it" in row["error"]
    r = _cli(site, cache, *RUN_FULL, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr


def test_a_plugin_that_failed_when_the_cache_was_written_is_retried_when_its_name_is_asked_for(tmp_path):
    """The cache records a failure (a missing dependency); once the dependency is
    installed, a run naming the plugin's component imports it again rather than
    answer "unknown strategy" from the cache."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    make_dist(site, "clipft-needy", "clipft_needy",
              "import needy_dependency\n" + textwrap.dedent(STRATEGY_SRC.format(name="needy")))
    r = _cli(site, cache, "plugins", "--json")
    row = next(p for p in json.loads(r.stdout)["plugins"] if p["distribution"] == "clipft-needy")
    assert row["status"] == "failed" and "needy_dependency" in row["error"]
    (site / "needy_dependency.py").write_text("")          # the dependency arrives
    needy = [a if a != "full" else "needy" for a in RUN_FULL]
    r = _cli(site, cache, *needy, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
