"""The run configuration: TOML file + command-line overrides.

A resolved config is written to ``RUN_DIR/config.toml``; running
``clipft run --config RUN_DIR/config.toml`` repeats the run.
"""
from __future__ import annotations

import math
import numbers
import tomllib
from pathlib import Path
from typing import Any, Optional

import attrs

from clipft import kinds
from clipft.errors import ClipftUsageError
from clipft.options import ComponentRef, data_ref, parse_ref, ref_from_table


def _one_of(*choices):
    def check(inst, attribute, value):
        if value not in choices:
            raise ClipftUsageError(
                f"'{attribute.name}' must be one of {', '.join(choices)}, got {value!r}")
    return check


#: the largest run seed. Not 2**63: the sampler seeds each epoch with
#: ``seed * 100003 + epoch`` (engine/loaders.py) and a torch generator takes 64
#: bits, so 2**47 is what fits with room for epochs (numpy gets ``seed % 2**32``).
MAX_SEED = 2**47 - 1
#: any int field: a 64-bit signed integer (what torch, numpy and TOML hold)
MAX_INT = 2**63 - 1
#: DataLoader workers beyond this are a typo, not a machine
MAX_WORKERS = 1024


def _check_number(name, value, *, integer: bool = False) -> None:
    """Numbers are finite (floats) and fit 64 bits (ints); the message names the field."""
    if integer:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ClipftUsageError(f"'{name}' must be an integer, got {value!r}")
        if abs(value) > MAX_INT:
            raise ClipftUsageError(f"'{name}' is out of range (at most {MAX_INT}), got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ClipftUsageError(f"'{name}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ClipftUsageError(f"'{name}' must be a finite number, got {value!r}")


def _is_int(attribute) -> bool:
    return "int" in str(attribute.type)   # "int", "Optional[int]" (annotations are strings here)


def _positive(inst, attribute, value):
    if value is None:
        raise ClipftUsageError(f"'{attribute.name}' must be > 0, got {value!r}")
    _check_number(attribute.name, value, integer=_is_int(attribute))
    if value <= 0:
        raise ClipftUsageError(f"'{attribute.name}' must be > 0, got {value!r}")


def _zero_or_more(inst, attribute, value):
    """An integer count where 0 means "none" (``epochs = 0``: evaluate without training)."""
    if value is None:
        raise ClipftUsageError(f"'{attribute.name}' must be >= 0, got {value!r}")
    _check_number(attribute.name, value, integer=_is_int(attribute))
    if value < 0:
        raise ClipftUsageError(f"'{attribute.name}' must be >= 0, got {value!r}")


def _non_negative(inst, attribute, value):
    if value is None:
        return
    _check_number(attribute.name, value, integer=_is_int(attribute))
    if value < 0:
        raise ClipftUsageError(f"'{attribute.name}' must be >= 0, got {value!r}")


def _between(low, high, high_text=None):
    """An int field in ``[low, high]``; the message gives the range."""
    def check(inst, attribute, value):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ClipftUsageError(f"'{attribute.name}' must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ClipftUsageError(
                f"'{attribute.name}' must be an integer from {low} to {high_text or high}, got {value!r}")
    return check


def _momentum(inst, attribute, value):
    _check_number(attribute.name, value)
    if not 0.0 <= value < 1.0:
        raise ClipftUsageError(f"'{attribute.name}' must be in [0, 1), got {value!r}")


def parse_every(value, name: str = "checkpoint_every") -> tuple:
    """``("steps", N)``, ``("minutes", X)`` or ``("epoch", 0)`` from a
    ``--checkpoint-every`` (or ``--eval-every``) value; a usage error naming
    the option otherwise."""
    text = str(value).strip().lower()
    try:
        if text == "epoch":
            return ("epoch", 0)
        if text.endswith("m"):
            minutes = float(text[:-1])
            if math.isfinite(minutes) and minutes > 0:
                return ("minutes", minutes)
        elif int(text) > 0:
            return ("steps", int(text))
    except ValueError:
        pass
    raise ClipftUsageError(
        f"'{name}' must be a number of steps (500), of minutes (30m) or 'epoch', got {value!r}")


#: metrics where lower is better (the rest, accuracies and recalls, are higher-better)
def metric_mode(metric: str) -> str:
    """``min`` for a loss-like metric (its name has ``loss``), else ``max``."""
    return "min" if "loss" in metric.lower() else "max"


def parse_early_stop(value) -> dict:
    """``{"patience", "metric", "min_delta", "mode"}`` from an ``--early-stop``
    value ``PATIENCE[:metric=NAME,min_delta=X,mode=max|min]`` (metric None:
    the run's headline metric, mode None: from the metric); a usage error
    naming what is wrong otherwise."""
    text = str(value).strip()
    head, _, rest = text.partition(":")
    usage = "'early_stop' is PATIENCE[:metric=NAME,min_delta=X,mode=max|min] (e.g. 3:min_delta=0.01)"
    try:
        patience = int(head)
    except ValueError:
        raise ClipftUsageError(f"{usage}; the patience must be a whole number of evaluations, got {head!r}") from None
    if patience < 1:
        raise ClipftUsageError(f"{usage}; the patience must be at least 1, got {patience}")
    out = {"patience": patience, "metric": None, "min_delta": 0.0, "mode": None}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, v = part.partition("=")
        key, v = key.strip(), v.strip()
        if not eq or key not in ("metric", "min_delta", "mode") or not v:
            raise ClipftUsageError(f"{usage}; got {part!r}")
        if key == "min_delta":
            try:
                out[key] = float(v)
            except ValueError:
                out[key] = float("nan")
            if not (math.isfinite(out[key]) and out[key] >= 0):
                raise ClipftUsageError(f"{usage}; min_delta must be a number >= 0, got {v!r}")
        elif key == "mode" and v not in ("max", "min"):
            raise ClipftUsageError(f"{usage}; mode must be max or min, got {v!r}")
        else:
            out[key] = v
    return out


def _ref(value):
    if value is None or isinstance(value, ComponentRef):
        return value
    return parse_ref(value)


def _data(value):
    return data_ref(_ref(value))


def _refs(values):
    return [_ref(v) for v in values]


def _stages(values):
    """``[[stages]]`` tables (or :class:`clipft.specs.Stage` objects) to Stages."""
    from clipft.specs import Stage
    out = []
    for i, v in enumerate(values or ()):
        if isinstance(v, Stage):
            out.append(v)
            continue
        if not isinstance(v, dict) or "name" not in v:
            raise ClipftUsageError(f"stages[{i}] must be a table with a 'name' (and epochs, strategies, lr, head)")
        unknown = set(v) - {"name", "epochs", "strategies", "lr", "head"}
        if unknown:
            raise ClipftUsageError(f"stage '{v['name']}': unknown key '{sorted(unknown)[0]}'. "
                                   "Valid keys: name, epochs, strategies, lr, head")
        try:
            out.append(Stage(**v))
        except (TypeError, ValueError) as exc:
            raise ClipftUsageError(str(exc)) from None
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ClipftUsageError(f"stage '{max(names, key=names.count)}' is named twice; stage names are unique")
    return out


def option(help: str, default=attrs.NOTHING, *, choices: tuple = (), metavar: Optional[str] = None,
           directory: bool = False, resumable: bool = False, **field_kw):
    """A :class:`RunConfig` field that is also a ``clipft run``/``plan``/``sweep``
    flag: the field is the one source of its name, type, default, help and
    choices; ``clipft.cli`` generates the click option from this metadata.
    ``resumable``: the flag may change when a run is resumed."""
    if choices:
        field_kw["validator"] = _one_of(*choices)
    meta = {"help": help, "choices": tuple(choices), "metavar": metavar, "directory": directory,
            "resumable": resumable}
    return attrs.field(default=default, metadata=meta, **field_kw)


def flag_fields() -> tuple:
    """The RunConfig fields that are command-line flags, in declaration order."""
    return tuple(f for f in attrs.fields(RunConfig) if "help" in f.metadata)


def flag_name(field_name: str) -> str:
    """``batch_size`` -> ``--batch-size``: how a field is spelt on the command line."""
    return "--" + field_name.replace("_", "-")


@attrs.define
class RunConfig:
    """Everything that defines a run. Fields map 1:1 to TOML keys; those made
    with :func:`option` are also command-line flags (the component fields take
    their flags from :mod:`clipft.kinds`)."""

    model: str = option("open_clip model name (tiny-vit, tiny-rn, ViT-B-32, RN50, ...).", "tiny-vit")
    pretrained: str = option(
        "Pretrained tag, local checkpoint file, 'none' (random init) or 'auto' (none for the "
        "embedded tiny configs, open_clip's first tag otherwise).", "auto")
    data: ComponentRef = attrs.field(factory=lambda: ComponentRef("shapes"), converter=_data)
    strategies: list = attrs.field(factory=list, converter=_refs)
    #: callbacks selected on top of the default ones ("none" turns the defaults off)
    callbacks: list = attrs.field(factory=list, converter=_refs)
    #: None: cross-entropy through the head when there is one, else contrastive
    loss: Optional[ComponentRef] = attrs.field(default=None, converter=_ref)
    head: Optional[ComponentRef] = attrs.field(default=None, converter=_ref)
    #: a multi-stage run: ``[[stages]]`` tables (clipft.specs.Stage), run in order
    #: (with ``strategies`` left empty; a staged strategy such as lp-ft fills them instead)
    stages: list = attrs.field(factory=list, converter=_stages)

    epochs: int = option("Epochs; 0 evaluates the model as built and trains nothing (training-free "
                         "methods such as Tip-Adapter).", 1, validator=_zero_or_more, resumable=True)
    batch_size: int = option("Samples per micro-batch (per process with --nproc).", 32, validator=_positive)
    lr: Optional[float] = option("Base learning rate (default: the first strategy's recommendation, "
                                 "1e-3 for a head-only probe; from random weights, --pretrained none, at "
                                 "least 5e-4: the recommendations are for pretrained weights).", None,
                                 validator=_non_negative)
    weight_decay: float = option("AdamW/SGD weight decay (not on biases, norms and logit_scale).", 0.01,
                                 validator=_non_negative)
    optimizer: str = option("Optimizer.", "adamw", choices=("adamw", "sgd"))
    optimizer_impl: str = option(
        "Optimizer kernels: auto (default: fused where torch has them for the device, else foreach), "
        "fused, foreach, for-loop (torch's reference).", "auto", choices=("auto", "fused", "foreach", "for-loop"))
    momentum: float = option("SGD momentum, in [0, 1).", 0.9, validator=_momentum)
    schedule: str = option("Learning-rate schedule after the warmup.", "cosine", choices=("cosine", "constant"))
    warmup_steps: Optional[int] = option("Linear warmup steps (default: 10% of the optimizer steps; 5% let "
                                         "high-lr runs from random weights collapse).", None,
                                         validator=_non_negative)
    grad_clip: float = option("Max grad norm; 0 disables.", 1.0, validator=_non_negative)
    grad_accum: int = option("Micro-batches per optimizer step.", 1, validator=_positive)
    precision: str = option("auto (default): bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.",
                            "auto", choices=("auto", "fp32", "bf16", "fp16"))
    tf32: bool = option("TF32 matmuls for fp32 on Ampere+ GPUs (default on; no effect elsewhere).", True)
    device: str = option("Where to train.", "auto", choices=("auto", "cpu", "cuda"), resumable=True)
    seed: int = option("Seed of every random draw, 0 to 2**47 - 1.", 0, validator=_between(0, MAX_SEED, "2**47 - 1"))
    # 0 by default: on 2 CPU cores workers compete with the compute threads
    # (measured within ~10% either way, docs/performance.md)
    num_workers: int = option("DataLoader worker processes.", 0, validator=_between(0, MAX_WORKERS),
                              resumable=True)
    persistent_workers: bool = option("Keep DataLoader workers alive across epochs (with --num-workers > 0).",
                                      True)
    log_every: int = option("Log the training loss every N optimizer steps.", 10, validator=_positive)
    augment: bool = option("open_clip's random train augmentation (turns frozen-tower caching off).", False)
    cache: bool = option("Cache embeddings of frozen towers across epochs and evaluation.", True)
    cache_dir: Optional[str] = option("Keep frozen-tower caches on disk here (large data; reused by later "
                                      "runs).", None, directory=True)
    grad_checkpointing: bool = option("Recompute activations in backward to save memory (open_clip's own).",
                                      False)
    compile: bool = option("torch.compile the transformer blocks (opt-in; compiling takes a while).", False)
    # the same result up to float rounding (tests/test_trim.py bounds it,
    # gradients too), several times cheaper on short captions
    trim_text: bool = option("Skip caption padding in the causal text tower (default on; same result up to "
                             "rounding); --no-trim-text runs captions on all positions (class prompts "
                             "are always cut).", True)
    checkpoint_every: str = option(
        "Step checkpoints every N optimizer steps or N minutes (default 30m), besides one per epoch; "
        "'epoch': epochs only.", "30m", metavar="N|Nm|epoch", converter=str,
        validator=lambda i, a, v: parse_every(v), resumable=True)
    keep_checkpoints: int = option("Checkpoints to keep: the newest in checkpoint/, older ones beside it "
                                   "(default 1).", 1, validator=_positive, resumable=True)
    drop_last: Optional[bool] = option(
        "Leave each epoch's last incomplete batch out of training (default: on for losses over the "
        "batch's pairs, such as contrastive and siglip, whose value on a few samples is not comparable; "
        "off for per-sample losses such as cross-entropy).", None)
    parallel: str = option(
        "How several processes (--nproc, torchrun) share the model: ddp (a replica on each) or fsdp "
        "(FSDP2: parameters, gradients and optimizer state sharded; docs/scaling.md). One process "
        "ignores it.", "ddp", choices=("ddp", "fsdp"))
    collective_timeout: Optional[float] = option(
        "Minutes a distributed collective may wait for a rank before the job fails (exit 1) instead of "
        "hanging on a stalled or dead rank (default: 10 on GPUs, 20 on CPUs, where rank 0's "
        "evaluation, the longest legitimate wait, is slower).", None, validator=_non_negative,
        metavar="MIN", resumable=True)
    eval_every: str = option(
        "Evaluate also every N optimizer steps or N minutes (Nm) within epochs, besides each epoch end "
        "(default 'epoch': epoch ends only).", "epoch", metavar="N|Nm|epoch", converter=str,
        validator=lambda i, a, v: parse_every(v, "eval_every"))
    early_stop: Optional[str] = option(
        "Stop the run (normally, exit 0) when the val metric has not improved for PATIENCE evaluations; "
        "metric defaults to the headline one (head_top1 with a head, else top1, else recall@1), mode to "
        "min for losses and max otherwise.", None, metavar="PATIENCE[:metric=M,min_delta=X,mode=max|min]",
        validator=attrs.validators.optional(lambda i, a, v: parse_early_stop(v)))
    keep_best: Optional[str] = option(
        "Keep the checkpoint with the best value of this val metric in checkpoint-best/ (export, eval "
        "and predict load it with --best).", None, metavar="METRIC")
    skip_nonfinite: int = option("Skip up to N steps whose loss is NaN/inf instead of stopping (default 0).",
                                 0, metavar="N", validator=_non_negative)
    out: Optional[str] = None

    def resolved_lr(self, default: float) -> float:
        return self.lr if self.lr is not None else default

    def resolved_drop_last(self, loss_spec) -> bool:
        """``drop_last`` as given, else whether the loss couples a batch's samples."""
        return self.drop_last if self.drop_last is not None else bool(getattr(loss_spec, "batch_coupled", False))

    # -- TOML --------------------------------------------------------------
    def to_toml_dict(self) -> dict:
        d: dict[str, Any] = {}
        components = {k.config_field for k in kinds.KINDS}
        for f in attrs.fields(RunConfig):
            v = getattr(self, f.name)
            if f.name in components or f.name == "out":
                continue
            if v is None:
                continue
            if f.name == "stages":
                if v:
                    d["stages"] = [s.to_table() for s in v]
                continue
            d[f.name] = v
        # component references: the TOML keys come from the table in clipft.kinds
        for k in kinds.KINDS:
            v = getattr(self, k.config_field)
            if k.repeatable:
                d[k.toml_key] = [r.to_table() for r in v]
            elif v is not None:
                d[k.toml_key] = v.to_table()
        return d

    @classmethod
    def from_toml_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        d = dict(d)
        kwargs: dict[str, Any] = {}
        # component references: ``[key]`` tables, or ``[[key]]`` arrays for the
        # repeatable kinds, keys and fields from the table in clipft.kinds
        for k in kinds.KINDS:
            if k.toml_key not in d:
                continue
            raw = d.pop(k.toml_key)
            if k.repeatable:
                raw = raw if isinstance(raw, list) else [raw]
                kwargs[k.config_field] = [
                    ref_from_table(x, f"{where}: [[{k.toml_key}]]") for x in raw]
            elif k.can_be_none and raw in ("none", None):
                kwargs[k.config_field] = None
            else:
                kwargs[k.config_field] = ref_from_table(raw, f"{where}: [{k.toml_key}]")
        names = {f.name: f for f in attrs.fields(cls)}
        # a component's RunConfig field is spelt by its TOML key in a file
        shadowed = {k.config_field for k in kinds.KINDS} - {k.toml_key for k in kinds.KINDS}
        for key, value in d.items():
            f = names.get(key)
            if f is None or key in shadowed:
                valid = ", ".join(sorted(set(names) - shadowed | {k.toml_key for k in kinds.KINDS}))
                raise ClipftUsageError(f"{where}: unknown key '{key}'. Valid keys: {valid}")
            kwargs[key] = _check_type(key, value, f.type, where)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ClipftUsageError(f"{where}: {exc}") from None
        except ClipftUsageError as exc:
            raise ClipftUsageError(f"{where}: {exc}") from None


def _check_type(key, value, tp, where):
    tp = {"int": int, "float": float, "str": str, "bool": bool}.get(tp, tp) if isinstance(tp, str) else tp
    text = str(tp)
    ok = True
    if tp is bool or text in ("bool", "Optional[bool]"):
        ok = isinstance(value, bool)
    elif tp is int or text == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in text:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif "int" in text:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "str" in text:
        ok = isinstance(value, str)
    if not ok:
        raise ClipftUsageError(f"{where}: '{key}' has the wrong type ({type(value).__name__}); expected {text}")
    return value


def load_toml(path: str | Path) -> dict:
    from clipft.data import read_text_utf8

    p = Path(path)
    if not p.is_file():
        raise ClipftUsageError(f"config file not found: {p}")
    try:
        return tomllib.loads(read_text_utf8(p, "config file"))
    except tomllib.TOMLDecodeError as exc:
        raise ClipftUsageError(f"{p}: invalid TOML: {exc}") from None


# -- a tiny TOML writer: the config only holds scalars, lists of scalars and
#    (arrays of) flat tables, so a dependency would be overkill.
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: dict) -> str:
    lines = []
    tables = []
    for k, v in d.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            tables.append((k, v))
        elif isinstance(v, list) and not v:
            continue  # an empty array of tables is simply absent
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        for table in (v if isinstance(v, list) else [v]):
            lines.append("")
            lines.append(f"[[{k}]]" if isinstance(v, list) else f"[{k}]")
            for tk, tv in table.items():
                lines.append(f"{tk} = {_toml_value(tv)}")
    return "\n".join(lines) + "\n"
