"""The mlflow callback, read back from its real sqlite store with MlflowClient:
params, metric histories against steps, tags, artifacts, the run's status; a
--resume continuing the same MLflow run; bad options refused before the run
writes anything."""
from __future__ import annotations

import json
import os

import pytest

from clipft.api import RunConfig, make_registry, run
from clipft.errors import ClipftUsageError

pytest.importorskip("mlflow", reason="clipft-mlflow depends on mlflow-skinny")
pytest.importorskip("sqlalchemy", reason="the default sqlite store needs sqlalchemy")
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, EPOCHS = 8, 2   # 32 samples, batch 8, 2 epochs


def conf(**kw):
    base = dict(model="tiny-vit", pretrained="none", data="shapes:n=32,val_n=8", epochs=EPOCHS, batch_size=8,
                lr=1e-3, strategies=["full"], log_every=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def registry():
    import clipft_data
    import clipft_full
    import clipft_losses
    import clipft_mlflow
    import clipft_plots
    # in-process plugins, whether or not clipft-mlflow is installed
    return make_registry(plugins=[clipft_mlflow, clipft_plots, clipft_data, clipft_full, clipft_losses],
                         entry_points=False)


@pytest.fixture(autouse=True)
def no_user_store(monkeypatch, tmp_path):
    """The default store, whatever the environment says; the working directory
    a fresh folder, to see that nothing is written outside the run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert os.listdir(cwd) == []


def client_for(out):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def jsonl(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_reads_back_from_its_store(registry, tmp_path):
    out = tmp_path / "run"
    summary = run(conf(callbacks=["mlflow:experiment=shapes"]), registry=registry, out=out)
    section = summary["callbacks"]["mlflow"]
    client = client_for(out)
    r = client.get_run(section["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    assert client.get_experiment(r.info.experiment_id).name == "shapes"
    assert section["tracking_uri"] == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"

    p = r.data.params
    assert p["model"] == "tiny-vit" and p["strategy.full"] == "true" and float(p["lr"]) == 1e-3
    assert p["data.name"] == "shapes" and p["data.n"] == "32" and p["epochs"] == "2"
    assert p["callback.mlflow.experiment"] == "shapes"

    steps = [row for row in jsonl(out) if row["type"] == "step"]
    loss = history(client, r.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1))
    assert [v for _, v in loss] == [pytest.approx(row["loss"]) for row in steps]
    assert [s for s, _ in history(client, r.info.run_id, "train/lr")] == list(range(1, STEPS + 1))
    evals = [row for row in jsonl(out) if row["type"] == "eval"]
    top1 = history(client, r.info.run_id, "eval/top1")
    assert [s for s, _ in top1] == [0, STEPS // 2, STEPS]
    assert [v for _, v in top1] == [pytest.approx(row["top1"]) for row in evals]
    assert [v for _, v in history(client, r.info.run_id, "eval/epoch")] == [0, 1, 2]
    assert "eval/recall_at_1" in r.data.metrics and "eval/train_loss" in r.data.metrics

    t = r.data.tags
    assert t["clipft.strategies"] == "full" and t["clipft.model"] == "tiny-vit" and t["clipft.data"] == "shapes"
    assert t["clipft.run_dir"] == str(out.resolve()) and t["clipft.version"]

    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"summary.json", "config.toml", "curves.png"} <= names
    # the default store keeps its artifacts in the run
    assert (out / "mlflow" / "artifacts").is_dir()
    assert any(p.name == "curves.png" for p in (out / "mlflow" / "artifacts").rglob("*"))


def test_failure_interrupt_and_resumes_continue_one_mlflow_run(registry, tmp_path, monkeypatch):
    """An error at step 3 (FAILED), a resume interrupted at step 7 (KILLED), a
    resume to the end (FINISHED): one MLflow run, each step logged once."""
    from clipft.engine.loop import Trainer

    real = Trainer.optimizer_step

    def fail_at(n, error):
        calls = []

        def step(self):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(self)
        monkeypatch.setattr(Trainer, "optimizer_step", step)

    out = tmp_path / "r"
    fail_at(3, RuntimeError("broken step"))
    with pytest.raises(RuntimeError, match="broken step"):
        run(conf(callbacks=["mlflow"], checkpoint_every="2"), registry=registry, out=out)
    client = client_for(out)
    (first,) = client.search_runs([client.get_experiment_by_name("clipft").experiment_id])
    run_id = first.info.run_id
    assert first.info.status == "FAILED"
    assert [s for s, _ in history(client, run_id, "train/loss")] == [1, 2]

    fail_at(5, KeyboardInterrupt())   # optimizer step 7
    with pytest.raises(KeyboardInterrupt):
        run(resume=out, registry=registry)
    r = client.get_run(run_id)
    assert r.info.status == "KILLED" and r.data.tags["clipft.resumed_from_step"] == "2"
    assert [s for s, _ in history(client, run_id, "train/loss")] == list(range(1, 7))

    monkeypatch.undo()
    summary = run(resume=out, registry=registry)
    assert summary["callbacks"]["mlflow"]["run_id"] == run_id
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["clipft.resumed_from_step"] == "6"
    assert [s for s, _ in history(client, run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert [s for s, _ in history(client, run_id, "eval/top1")] == [0, STEPS // 2, STEPS]
    assert len(client.search_runs([r.info.experiment_id])) == 1
    assert "summary.json" in {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.parametrize("ref, message", [
    ("mlflow:every=0", "every must be at least 1"),
    ("mlflow:dir=../out", "leaves the run directory"),
    ("mlflow:tracking_uri=foo://nowhere", "tracking URI 'foo://nowhere' cannot be used"),
])
def test_bad_options_are_refused_before_the_run_writes(registry, tmp_path, ref, message):
    with pytest.raises(ClipftUsageError, match=message) as info:
        run(conf(callbacks=[ref]), registry=registry, out=tmp_path / "r")
    assert info.value.exit_code == 2
    assert not (tmp_path / "r").exists()


def test_params_flattened_within_mlflow_limits():
    from clipft_mlflow import MAX_KEY, MAX_VALUE, metric_name, params

    p = params({"lr": 0.1, "amp": False, "data": {"name": "csv", "path": "x" * 7000},
                "strategies": [{"name": "lora", "r": 4, "targets": ["q", "v"]}, {"name": "full"}],
                "callback": [{"name": "csv"}, {"name": "csv", "steps": "a.csv"}],
                "k" * 300: 1})
    assert p["lr"] == "0.1" and p["amp"] == "false" and p["data.name"] == "csv"
    assert len(p["data.path"]) == MAX_VALUE and p["data.path"].endswith("in config.toml]")
    assert p["strategies.lora.r"] == "4" and p["strategies.lora.targets"] == '["q", "v"]'
    assert p["strategies.full"] == "true"
    assert p["callback.0.name"] == "csv" and p["callback.1.steps"] == "a.csv"   # repeated names: positions
    assert "k" * MAX_KEY in p
    assert metric_name("i2t_recall@5") == "i2t_recall_at_5" and metric_name("a+b") == "a_b"


def test_mlflow_is_imported_only_when_the_callback_is_built(monkeypatch):
    import subprocess
    import sys

    code = "import sys, clipft_mlflow; assert 'mlflow' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from clipft_mlflow import MlflowOptions, MlflowTracking
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)   # as if not installed
    with pytest.raises(ClipftUsageError, match="pip install mlflow-skinny sqlalchemy alembic"):
        MlflowTracking(MlflowOptions())


def test_the_command_line_refuses_a_bad_tracking_uri(invoke, tmp_path):
    from clipft.api import make_registry
    if "mlflow" not in make_registry().names("callback"):
        pytest.skip("clipft-mlflow is not installed (make install installs it)")
    r = invoke("run", "--model", "tiny-vit", "--pretrained", "none", "--data", "shapes:n=16,val_n=8",
               "--strategy", "full",
               "--callback", "mlflow:tracking_uri=foo://nowhere", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "tracking URI 'foo://nowhere' cannot be used" in r.stderr
    assert not (tmp_path / "r").exists()
