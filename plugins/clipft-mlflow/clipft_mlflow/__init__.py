"""Callback ``mlflow``: the run tracked in MLflow.

- **params**: the resolved run config (``config.toml``) flattened to dotted keys
  (``lr``, ``data.name``, ``strategies.lora.r``); a value longer than MLflow's
  limit is cut, with a note (``config.toml`` among the artifacts has it whole);
- **metrics** against the optimizer step: ``train/loss``, ``train/lr``,
  ``train/samples_per_s``, ``train/grad_norm`` (when clipping applied) and
  ``train/<term>`` for a loss's named terms, every ``every`` steps; at each
  evaluation ``eval/<metric>`` (``@``, which MLflow refuses in a name, becomes
  ``_at_``: ``eval/recall_at_1``), ``eval/epoch`` and ``eval/train_loss``;
- **tags**: ``clipft.model``, ``clipft.strategies``, ``clipft.data`` and the
  other components, ``clipft.version`` and ``clipft.run_dir`` (absolute);
- **artifacts** at the end: ``summary.json``, ``config.toml``, ``curves.png``
  and ``data_split.json`` when the run has them.

The store: ``tracking_uri=``, else ``MLFLOW_TRACKING_URI``, else a sqlite
database in the run, ``RUN/mlflow/mlflow.db`` with the artifacts beside it in
``RUN/mlflow/artifacts`` (files a run writes stay in the run). A run ended by an
error is marked FAILED, one ended by a signal KILLED; ``--resume`` continues
the same MLflow run (its id is in the callback's checkpointed state).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs

from clipft import Callback, CallbackSpec, __version__, hookimpl, run_file_option
from clipft.errors import ClipftUsageError, Interrupted

INSTALL = "pip install mlflow-skinny sqlalchemy alembic"
#: MLflow's limits (mlflow.utils.validation): a param's value, a key, one log_batch call
MAX_VALUE, MAX_KEY, PARAMS_PER_BATCH, METRICS_PER_BATCH = 6000, 250, 100, 1000
#: buffered metrics go to the store at least this often (a round trip per step
#: costs tens of milliseconds with sqlite), and at every evaluation and checkpoint
FLUSH_SECONDS = 5.0
DEFAULT_EXPERIMENT = "clipft"
ARTIFACTS = ("summary.json", "config.toml", "curves.png", "data_split.json")
TRUNCATED = "...[cut: the whole value is in config.toml]"


def _positive(inst, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class MlflowOptions:
    tracking_uri: Optional[str] = attrs.field(default=None, metadata={
        "help": "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow/mlflow.db)"})
    experiment: Optional[str] = attrs.field(default=None, metadata={
        "help": f"experiment name (default: MLFLOW_EXPERIMENT_NAME, else '{DEFAULT_EXPERIMENT}')"})
    run_name: Optional[str] = attrs.field(default=None, metadata={
        "help": "MLflow run name (default: the run directory's name)"})
    every: int = attrs.field(default=1, validator=_positive, metadata={
        "help": "log the train metrics every N optimizer steps"})
    dir: str = attrs.field(default="mlflow", validator=run_file_option, metadata={
        "help": "folder in the run directory of the default store and its artifacts"})


def metric_name(name: str) -> str:
    """``name`` as MLflow accepts it (letters, digits, ``_ - . / : space``)."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))[:MAX_KEY]


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def flatten(config, prefix: str = "") -> dict:
    """A TOML-shaped config as ``{dotted key: string}``: tables nest with dots,
    a list of named tables (``strategies``) by each one's name (its position
    when names repeat), other lists as JSON."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            names = [x.get("name") for x in v]
            unique = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
            for i, x in enumerate(v):
                sub = {kk: vv for kk, vv in x.items() if kk != "name"} if unique else x
                label = names[i] if unique else str(i)
                out.update(flatten(sub, f"{key}.{label}.") if sub else {f"{key}.{label}": "true"})
        else:
            out[key] = _value(v)
    return out


def params(config) -> dict:
    """The MLflow params of a run config: keys MLflow accepts, values cut to its limit."""
    out = {}
    for k, v in flatten(config).items():
        if len(v) > MAX_VALUE:
            v = v[:MAX_VALUE - len(TRUNCATED)] + TRUNCATED
        out[metric_name(k)] = v
    return out


def redacted(uri: str) -> str:
    """``uri`` without a password (what summary.json and the messages show)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _warn(message: str) -> None:
    print(f"warning: callback 'mlflow': {message}", file=sys.stderr)


class MlflowTracking(Callback):
    def __init__(self, opts: MlflowOptions):
        try:   # here, not at import: `clipft plugins` and runs without it stay fast
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ClipftUsageError(f"callback 'mlflow' needs MLflow ({exc}); install it: {INSTALL}") from None
        self._client_class = MlflowClient
        self.opts = opts
        self.uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.client = self.experiment_id = self.run_id = None
        self.resume_id: Optional[str] = None
        self.buffer: list = []
        self.flushed = time.monotonic()
        self.out_dir: Optional[Path] = None
        self.artifacts_dir: Optional[Path] = None   # the default store's, in the run
        if self.uri is None or urlsplit(self.uri).scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            try:
                import alembic  # noqa: F401
                import sqlalchemy  # noqa: F401
            except ImportError as exc:
                raise ClipftUsageError(f"callback 'mlflow': a database store needs {exc.name}; "
                                       f"install it: {INSTALL}") from None
        if self.uri is not None:
            # the user's store: a bad URI, an unreachable server or an unusable
            # experiment stops the run here, before it writes anything
            self.client = self._connect(self.uri)
            self.experiment_id = self._experiment(None)

    def _connect(self, uri: str):
        try:
            return self._client_class(tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 - MLflow's reason, with the URI
            raise ClipftUsageError(f"callback 'mlflow': tracking URI '{redacted(uri)}' cannot be used: "
                                   f"{type(exc).__name__}: {exc}") from None

    def _experiment(self, artifact_location: Optional[str]) -> str:
        name = self.opts.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception as exc:  # noqa: BLE001 - the store's reason, with where
            raise ClipftUsageError(f"callback 'mlflow': experiment '{name}' in {redacted(self.uri)}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if exp.lifecycle_stage != "active":
            raise ClipftUsageError(f"callback 'mlflow': experiment '{name}' in {redacted(self.uri)} is "
                                   f"deleted; restore it (mlflow experiments restore) or choose another "
                                   "with experiment=NAME")
        return exp.experiment_id

    # --- state across --resume -------------------------------------------------

    def state_dict(self) -> dict:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state) -> None:
        self.resume_id = state.get("run_id")

    def summary_section(self) -> Optional[dict]:
        if self.run_id is None:
            return None
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": redacted(self.uri)}

    # --- events ----------------------------------------------------------------

    def on_run_start(self, run):
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        self.out_dir = Path(run.out_dir)
        if self.client is None:   # the default: a store inside the run
            folder = run.path(self.opts.dir)
            folder.mkdir(exist_ok=True)
            self.artifacts_dir = (folder / "artifacts").resolve()
            self.uri = "sqlite:///" + str((folder / "mlflow.db").resolve())
            self.client = self._connect(self.uri)
            self.experiment_id = self._experiment(self.artifacts_dir.as_uri())
        tags = {"clipft.version": __version__, "clipft.model": run.model, "clipft.pretrained": run.pretrained,
                "clipft.strategies": "+".join(run.strategies) or "none", "clipft.loss": run.loss,
                "clipft.head": run.head or "none", "clipft.data": run.data, "clipft.device": run.device,
                "clipft.run_dir": str(self.out_dir.resolve())}
        logged = {}
        if self.resume_id is not None:
            logged = self._reopen(self.resume_id, run)
        if self.run_id is None:
            created = self.client.create_run(
                self.experiment_id, run_name=self.opts.run_name or self.out_dir.name,
                tags=resolve_tags({**tags, "mlflow.source.name": "clipft"}))
            self.run_id = created.info.run_id
        else:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
        # MLflow refuses to change a param: a resumed run logs only new keys
        # (``--epochs`` may change on resume: its new value is the tag
        # clipft.resumed.epochs, say)
        new = [Param(k, v) for k, v in params(run.config).items() if k not in logged]
        for k, v in params(run.config).items():
            if k in logged and logged[k] != v:
                self.client.set_tag(self.run_id, f"clipft.resumed.{k}", v[:MAX_VALUE])
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_BATCH])
        self.flushed = time.monotonic()

    def _reopen(self, run_id: str, run) -> dict:
        """Continue the MLflow run a checkpoint names; its logged params, or
        {} (and a new run) when this store does not have it."""
        try:
            found = self.client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a resume with another tracking URI
            _warn(f"MLflow run {run_id} of this run's checkpoint is not in {redacted(self.uri)} "
                  f"({type(exc).__name__}); the resumed run is logged as a new MLflow run")
            return {}
        if found.info.lifecycle_stage != "active":
            _warn(f"MLflow run {run_id} is deleted; the resumed run is logged as a new MLflow run")
            return {}
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "clipft.resumed_from_step", str(run.resumed_from_step))
        return dict(found.data.params)

    def _metric(self, name: str, value, step: int) -> None:
        from mlflow.entities import Metric
        self.buffer.append(Metric(metric_name(name), float(value), int(time.time() * 1000), step))

    def flush(self) -> None:
        buffer, self.buffer = self.buffer, []
        for i in range(0, len(buffer), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=buffer[i:i + METRICS_PER_BATCH])
        self.flushed = time.monotonic()

    def on_step_end(self, s):
        if not s.stepped or s.step % self.opts.every:
            return
        self._metric("train/loss", s.loss, s.step)
        self._metric("train/lr", s.lr, s.step)
        self._metric("train/samples_per_s", s.samples_per_s, s.step)
        if s.grad_norm is not None:
            self._metric("train/grad_norm", s.grad_norm, s.step)
        for name, value in s.terms.items():
            self._metric(f"train/{name}", value, s.step)
        if time.monotonic() - self.flushed >= FLUSH_SECONDS or len(self.buffer) >= METRICS_PER_BATCH:
            self.flush()

    def on_eval(self, ev):
        for name, value in ev.metrics.items():
            self._metric(f"eval/{name}", value, ev.step)
        self._metric("eval/epoch", ev.epoch, ev.step)
        if ev.train_loss is not None:
            self._metric("eval/train_loss", ev.train_loss, ev.step)
        self.flush()

    def on_checkpoint(self, checkpoint):
        self.flush()

    def on_run_end(self, summary):
        self.flush()
        stopped = summary.get("stopped_early")
        if stopped:
            self.client.set_tag(self.run_id, "clipft.stopped_early", str(stopped.get("reason", "")))
        for name in ARTIFACTS:
            path = self.out_dir / name
            if path.is_file():
                self._artifact(path)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def _artifact(self, path: Path) -> None:
        if self.artifacts_dir is not None:
            # the default store's artifacts stay in the run: a run directory
            # moved since the MLflow run began would send them to its old place
            uri = urlsplit(self.client.get_run(self.run_id).info.artifact_uri)
            where = Path(unquote(uri.path)).resolve()
            if uri.scheme == "file" and not where.is_relative_to(self.artifacts_dir):
                _warn(f"the MLflow run's artifacts are at {where}, outside this run (was it moved?); "
                      f"{path.name} not logged")
                return
        self.client.log_artifact(self.run_id, str(path))

    def on_run_abort(self, error):
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
            self.client.set_terminated(self.run_id, status="KILLED" if interrupted else "FAILED")


@hookimpl
def clipft_register_callbacks(register):
    register(CallbackSpec(name="mlflow", summary="MLflow tracking: params, metrics, tags and artifacts of the run",
                          options=MlflowOptions, build=MlflowTracking))
