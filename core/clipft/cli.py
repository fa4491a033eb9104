"""The ``clipft`` command line.

Streams, as in git or pip: a command's result (a table, listing, report, plan,
predictions, the files it wrote) goes to stdout, so it pipes and redirects;
progress bars, logs, warnings, notes, hints and errors go to stderr. With
``--json`` stdout holds exactly one JSON document (``predict --json``: one JSON
line per image) and the human output stays on stderr. Under torchrun only rank
0 prints a result. Exit codes: 0 ok, 2 usage/config, 1 runtime."""
from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path

import click

from clipft import __version__, kinds
from clipft.errors import ClipftError, ClipftUsageError

#: every spelling ``clipft describe`` accepts for a kind -> the kind's name
#: (derived from the table in clipft.kinds)
KIND_ALIASES = kinds.aliases()


def _err(msg: str) -> None:
    rank = os.environ.get("RANK", "0")   # under torchrun: which process says it
    click.echo(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", err=True)


def guarded(fn):
    """Turn clipft errors into clean messages and exit codes; never a traceback
    from deep inside torch unless CLIPFT_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if kwargs.get("as_json") and sys.stdout is None:
                # started with stdout closed (`>&-`): the document would go nowhere
                raise ClipftUsageError("--json: standard output is closed, so the JSON document cannot "
                                       "be written; redirect it to a file instead")
            return fn(*args, **kwargs)
        except ClipftError as exc:
            _err(str(exc))
            sys.exit(exc.exit_code)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)
        except BrokenPipeError:
            # the reader of stdout left (`clipft predict ... --json | head -1`):
            # stop quietly, as other Unix tools do; stdout goes to devnull so
            # that the interpreter's final flush does not complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as exc:  # noqa: BLE001 - last-resort guard for users
            if os.environ.get("CLIPFT_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.filename:
                # a file-system failure names its file (a read-only or full disk,
                # a permission): say which, and whether it was a write
                writing = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                        getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
                _err(f"{'cannot write to' if writing else 'cannot access'} {exc.filename}: "
                     f"{exc.strerror or exc}")
                sys.exit(1)
            _err(f"unexpected failure: {type(exc).__name__}: {exc} "
                 "(set CLIPFT_DEBUG=1 to see the traceback)")
            sys.exit(1)
    return wrapper


def _registry(ctx: click.Context, only=None):
    """The plugins; ``only``: the ``(kind, name)`` pairs the command looks up,
    so that only the distributions providing them are imported (Registry.load)."""
    from clipft.plugins import Registry
    obj = ctx.find_root().obj
    if obj.get("registry") is None:
        obj["registry"] = Registry(disabled=obj["disabled"]).load(only)
    return obj["registry"]


def _components(cfg, strategies=()) -> set:
    """The ``(kind, name)`` pairs a run of ``cfg`` looks up first (its loss may
    default to either built-in); anything else loads when it is looked up."""
    refs = [(k.name, r) for k in kinds.KINDS
            for r in (getattr(cfg, k.config_field) if k.repeatable else [getattr(cfg, k.config_field)])]
    names = {(kind, r.name) for kind, r in refs if r is not None}
    names |= {("strategy", r.name) for r in strategies} | {("loss", "contrastive"), ("loss", "cross-entropy")}
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clipft")
@click.option("--disable-plugin", "disabled", multiple=True, metavar="NAME",
              help="Do not load this plugin (entry-point or distribution name). Repeatable.")
@click.pass_context
def cli(ctx, disabled):
    """Fine-tune OpenCLIP models with pluggable strategies, losses, heads and data."""
    ctx.obj = {"disabled": set(disabled), "registry": None}


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
@guarded
def plugins_cmd(ctx, as_json):
    """List installed plugin distributions and what they provide."""
    reg = _registry(ctx)
    records = [r.to_json() for r in reg.records]
    if as_json:
        click.echo(json.dumps({"plugins": records}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table
    from clipft.plugins import conflict_message
    from clipft.progress import stderr_console, stdout_console
    t = Table(title="clipft plugins")
    for col in ("distribution", "version", "status", "provides"):
        t.add_column(col)
    for r in records:
        clashing = {(c["kind"], c["name"]) for c in r["conflicts"]}
        provides = "; ".join(
            f"{k}: " + ", ".join(escape(n) + (" [red](conflict)[/]" if (k, n) in clashing else "")
                                 for n in v)
            for k, v in r["provides"].items())
        status = {"active": "[green]active[/]", "failed": "[red]failed[/]",
                  "disabled": "[yellow]disabled[/]"}[r["status"]]
        t.add_row(escape(r["distribution"]), r["version"], status, provides or escape(r["error"] or ""))
    stdout_console().print(t)
    console = stderr_console()      # what went wrong: errors, beside the listing
    for r in records:
        if r["status"] == "failed":
            console.print(f"[red]{escape(r['distribution'])}[/] ({escape(r['name'])}) failed: "
                          f"{escape(r['error'])}", soft_wrap=True)
    for (kind, name), owners in reg.conflicts().items():
        console.print(f"[red]conflict[/]: {escape(conflict_message(kind, name, owners))}",
                      soft_wrap=True)


@cli.command("describe",
             help=f"Show the options of a component: KIND is {kinds.human_list()}.")
@click.argument("kind")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@guarded
def describe_cmd(ctx, kind, name, as_json):
    from clipft.options import describe_options
    k = kinds.lookup(kind).name
    reg = _registry(ctx, {(k, name)})
    spec = reg.get(k, name)
    rows = describe_options(spec)
    doc = {"kind": k, "name": name, "summary": spec.summary,
           "distribution": reg.distribution_of(k, name), "options": rows}
    for extra in ("needs", "default_lr", "default_lr_scratch"):
        if hasattr(spec, extra):
            v = getattr(spec, extra)
            doc[extra] = sorted(v) if isinstance(v, frozenset) else v
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    from rich.markup import escape
    from rich.table import Table
    from clipft.progress import stdout_console
    console = stdout_console()
    console.print(f"[bold]{k} {name}[/bold] ({doc['distribution']}): {spec.summary}")
    if not rows:
        console.print("no options")
        return
    t = Table()
    for col in ("option", "type", "default", "help"):
        t.add_column(col)
    for r in rows:
        # escaped: rich would read `list[str]` or a default like `[1, 2]` as markup
        t.add_row(*(escape(x) for x in (r["name"], r["type"],
                                        "(required)" if r["required"] else repr(r["default"]), r["help"])))
    console.print(t)


def _field_option(f):
    """The click option of a RunConfig field, from the field's metadata
    (clipft.config.option): flag, type, choices and help have one source."""
    from clipft.config import flag_name
    meta, flag, tp = f.metadata, flag_name(f.name), str(f.type)
    if tp in ("bool", "Optional[bool]"):   # --cache/--no-cache; None: not given, the config's value stands
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=meta["help"])
    if meta["choices"]:
        kind = click.Choice(meta["choices"])
    elif meta["directory"]:
        kind = click.Path(file_okay=False)
    else:
        kind = int if "int" in tp else float if "float" in tp else str
    return click.option(flag, f.name, type=kind, metavar=meta["metavar"], help=meta["help"])


def run_options(fn):
    """The options of ``run``, ``plan`` and ``sweep``: the config file, one flag
    per component kind (clipft.kinds) and one per RunConfig flag field."""
    from clipft.config import flag_fields
    opts = [click.option("--config", "config_file", type=click.Path(dir_okay=False),
                         help="TOML config; flags override it.")]
    opts += [click.option(k.flag, k.config_field, multiple=k.repeatable, help=k.help) for k in kinds.KINDS]
    opts += [_field_option(f) for f in flag_fields()]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def build_config(config_file, kw, base: dict | None = None):
    """The RunConfig of a ``config_file`` (or ``base``) with the given flags on top;
    ``kw`` maps RunConfig field names to flag values (None/(): not given)."""
    from clipft.config import RunConfig, flag_fields, flag_name, load_toml
    from clipft.options import parse_ref
    d = dict(base or {})
    if config_file:
        d.update(load_toml(config_file))
    cfg = RunConfig.from_toml_dict(d, where=str(config_file or "config"))
    for f in flag_fields():
        if kw.get(f.name) is not None:
            try:
                setattr(cfg, f.name, kw[f.name])   # runs the field's validator
            except ClipftUsageError as exc:
                raise ClipftUsageError(f"{flag_name(f.name)} {kw[f.name]}: {exc}") from None
    for k in kinds.KINDS:
        given = kw.get(k.config_field)
        if not given:
            continue
        if k.repeatable:
            setattr(cfg, k.config_field, [parse_ref(s) for s in given])
        elif k.can_be_none and given == "none":
            setattr(cfg, k.config_field, None)
        else:
            setattr(cfg, k.config_field, parse_ref(given))
    import attrs
    attrs.validate(cfg)
    return cfg


@cli.command("run")
@run_options
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<time>-<model>-<strategy>).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json on stdout.")
@click.option("--nproc", type=int, metavar="N",
              help="Train on N processes on this machine (launches torchrun; --batch-size is per process).")
@click.pass_context
@guarded
def run_cmd(ctx, config_file, out, overwrite, resume, as_json, nproc, **kw):
    """Fine-tune a model and write a run directory."""
    if nproc is not None:
        from clipft.commands.launch import launch_torchrun
        sys.exit(launch_torchrun(nproc, sys.argv[1:]))
    from clipft.engine.session import execute
    from clipft.progress import RichReporter, stdout_console
    resume_dir, given = None, None
    if resume:
        # the session decides what may change: it gets the options set here, in order
        resume_dir = Path(resume)
        given = [k for k, v in kw.items() if v not in (None, ())] + (["config"] if config_file else [])
        saved = resume_dir / "config.toml"
        config_file = str(saved) if saved.is_file() else None   # missing: the session says so
    cfg = build_config(config_file, kw)
    reg = _registry(ctx, _components(cfg))
    # the closing table is the result: on stdout, unless stdout is the JSON's
    reporter = RichReporter(result=None if as_json else stdout_console())
    summary = execute(cfg, reg, reporter, out_dir=Path(out) if out else None,
                      overwrite=overwrite, resume=resume_dir, given=given)
    if as_json and int(os.environ.get("RANK", "0")) == 0:   # one document, from rank 0
        click.echo(json.dumps(summary))


@cli.command("plan")
@run_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--nproc", type=click.IntRange(min=1), metavar="N", default=1,
              help="Also estimate the memory of each of N processes (under --parallel ddp or fsdp).")
@click.pass_context
@guarded
def plan_cmd(ctx, config_file, as_json, nproc, **kw):
    """Show what a run would train (groups, counts, lr, memory) without training."""
    from clipft.commands.plan import make_plan, render_plan
    cfg = build_config(config_file, kw)
    p = make_plan(cfg, _registry(ctx, _components(cfg)), nproc=nproc)
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    from clipft.progress import stdout_console
    render_plan(p, stdout_console())


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in OUT.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--wise-ft", "wise_ft", type=float, metavar="ALPHA",
              help="Write the WiSE-FT weights (1-ALPHA)*zero-shot + ALPHA*fine-tuned, ALPHA in [0, 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest on stdout.")
@click.option("--best", is_flag=True, help="A run's checkpoint-best/ (kept with --keep-best) instead of its "
                                               "final weights.")
@click.option("--format", "fmt", type=click.Choice(["open_clip", "onnx"]), default="open_clip", show_default=True,
              help="open_clip: safetensors + config; onnx: image/text encoder and classifier graphs "
                   "(needs the 'onnx' extra).")
@click.pass_context
@guarded
def export_cmd(ctx, run_dir, out, overwrite, device, wise_ft, as_json, best, fmt):
    """Write a run as a plain open_clip model: OUT/open_clip_model.safetensors
    (LoRA merged) + open_clip_config.json, loadable with
    open_clip.create_model_and_transforms("local-dir:OUT"); learned prompts and
    head weights go to separate files (see OUT/clipft_export.json). --format onnx
    writes ONNX graphs instead; either way OUT/README.md is a model card."""
    from clipft import api
    manifest = api.export(run_dir, out, registry=_registry(ctx), overwrite=overwrite, device=device,
                          wise_ft=wise_ft, best=best, format=fmt)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    from clipft.progress import stdout_console
    console = stdout_console()
    if fmt == "onnx":
        from clipft.commands.onnx_export import render
        return render(manifest, out, console)
    console.print(f"exported {run_dir} to {out}: load with {manifest['load_with']}")
    if manifest["wise_ft"]:
        console.print(f"  WiSE-FT α={manifest['wise_ft']['alpha']}: (1-α)·zero-shot ({manifest['wise_ft']['zero_shot']})"
                      " + α·fine-tuned")
    for name, size in manifest["bytes"].items():
        console.print(f"  {name:32s} {size / 2**20:9.2f} MiB")
    if manifest["merged_adapter_layers"]:
        console.print(f"  merged {manifest['merged_adapter_layers']} adapter layers into the base weights")
    drops = manifest["plain_open_clip_drops"]
    console.print(f"  plain open_clip vs the run's model: max |diff| {manifest['verified_max_abs_diff']:.2e}"
                  f"{'' if drops else ' (verified)'}")
    for d in drops:
        console.print(f"  [yellow]plain open_clip drops[/yellow] {d['module']} ({d['kind']}, strategy "
                      f"{d['strategy']}, in {d['file']}); clipft.load keeps it")
    if drops:
        console.print(f"  verified: load_export reproduces the run's model "
                      f"(max |diff| {manifest['load_export_max_abs_diff']:.2e})")


def source_options(fn):
    """SOURCE (a run or export directory) or --model/--pretrained, for eval and predict."""
    opts = [
        click.option("--model", "model_name", help="Evaluate a plain open_clip model instead of a SOURCE."),
        click.option("--pretrained", help="With --model: pretrained tag or local checkpoint file."),
        click.option("--templates", help="Prompt templates: simple, openai-imagenet, @FILE or a,b "
                                         "(default: the run's, else the data source's)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--num-workers", type=click.IntRange(0, 1024), default=0, show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout."),
        click.option("--best", is_flag=True, help="A run's checkpoint-best/ (kept with --keep-best) instead of its "
                                               "final weights."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _templates(value):
    from clipft.api import _templates as parse   # one reading of --templates, here and in the API
    return parse(value)


def _run_data(source, model_name):
    """Without --data, a run directory is evaluated on its own data (its split,
    as it trained): the reference its config.toml records, said on stderr."""
    from clipft.commands.source import run_data
    ref = run_data(source, model_name)
    shown = ",".join(f"{k}={v}" for k, v in ref.options.items())
    click.echo(f"note: no --data: evaluating on the run's own data ({ref.name}{':' + shown if shown else ''})",
               err=True)
    return ref


@cli.command("eval")
@click.argument("source", required=False)
@source_options
@click.option("--data", help="Data source to evaluate on, e.g. imagefolder:root=PATH (default for a run "
                             "directory: the run's own data).")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which split of --data (a run's own data splits as the run split it).")
@click.option("--control-data", help="A second data source, to see what was forgotten.")
@click.option("--confusion", type=click.Path(dir_okay=False), help="Write a confusion-matrix PNG.")
@click.option("--per-class", "per_class", type=click.Path(dir_okay=False), help="Write per-class accuracy CSV.")
@click.option("--wise-ft-sweep", "wise_ft_sweep", metavar="A,B,...",
              help="Evaluate the WiSE-FT interpolations of a run at these α (0 = zero-shot, 1 = fine-tuned).")
@click.option("--wise-ft-plot", "wise_ft_plot", type=click.Path(dir_okay=False),
              help="With --wise-ft-sweep: plot the curve to this PNG (e.g. wise_ft.png).")
@click.option("--base-to-novel", "base_to_novel", is_flag=True,
              help="Evaluate --data's base and novel class halves (classes=base, classes=novel): base top-1, "
                   "novel top-1 and their harmonic mean.")
@click.pass_context
@guarded
def eval_cmd(ctx, source, model_name, pretrained, templates, batch_size, num_workers, device, as_json, best,
             data, split, control_data, confusion, per_class, wise_ft_sweep, wise_ft_plot, base_to_novel):
    """Evaluate a run, an export or a plain model on a data source: zero-shot and head
    top-1/top-5, per-class and balanced accuracy, calibration (ECE), caption recall@k."""
    from clipft import api
    from clipft.commands import inference
    from clipft.progress import stderr_console, stdout_console
    # --base-to-novel on a run's own data sets the class half itself (the run's may be classes=base)
    data = data or (None if base_to_novel else _run_data(source, model_name))
    doc = api.evaluate(source, data=data, split=split, model=model_name,
                       pretrained=pretrained, templates=templates, control_data=control_data,
                       batch_size=batch_size, num_workers=num_workers, device=device, best=best,
                       per_class=per_class, confusion=confusion, wise_ft_sweep=wise_ft_sweep,
                       wise_ft_plot=wise_ft_plot, base_to_novel=base_to_novel, registry=_registry(ctx))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif doc.get("protocol") == "base-to-novel":
        inference.render_base_to_novel(doc, stdout_console(), notes=stderr_console())
    elif "wise_ft" in doc:
        inference.render_wise_ft(doc, stdout_console())
    else:
        inference.render_eval(doc, stdout_console(), notes=stderr_console())


@cli.command("predict")
@click.argument("args", nargs=-1, metavar="[SOURCE] IMAGE|FOLDER...")
@source_options
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--labels", help="Comma-separated labels for zero-shot prediction.")
@click.option("--labels-file", type=click.Path(dir_okay=False), help="One label per line.")
@click.pass_context
@guarded
def predict_cmd(ctx, args, model_name, pretrained, templates, batch_size, num_workers, device, as_json, best,
                top_k, labels, labels_file):
    """Top-k labels with probabilities for images: the run's classes (through its head
    when it has one), or ad-hoc --labels for zero-shot use. --json prints JSON Lines."""
    from clipft import api
    args = list(args)
    source = None if model_name else (args.pop(0) if args else None)
    records = api.iter_predict(source, args, model=model_name, pretrained=pretrained, labels=labels,
                               labels_file=labels_file, templates=templates, top_k=top_k,
                               batch_size=batch_size, device=device, best=best, registry=_registry(ctx))
    failed = total = 0
    for rec in records:
        total += 1
        failed += "error" in rec
        if as_json:
            click.echo(json.dumps(rec))
        elif "error" in rec:
            click.echo(f"{rec['image']}\terror: {rec['error']}", err=True)
        else:
            click.echo(rec["image"] + "\t" + "  ".join(f"{t['label']} {t['prob']:.3f}" for t in rec["top"]))
    if failed:
        click.echo(f"{failed} of {total} images could not be read", err=True)
        if failed == total:
            sys.exit(1)


@cli.command("sweep")
@run_options
@click.option("--strategies", "members", required=True, metavar="A,B:k=v,C+D",
              help="Members to compare: commas separate them, '+' composes strategies in one member.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per member (mean ± std).")
@click.option("--control-data", help="A second data source, to measure forgetting.")
@click.option("--out", type=click.Path(file_okay=False), help="Sweep directory (default runs/sweep-<time>).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier sweep in --out (without it, the same "
              "command continues a stopped sweep: finished members are kept, an interrupted one resumes).")
@click.option("--base-to-novel", "base_to_novel", is_flag=True,
              help="Train each member on the base half of --data's classes; report base, novel and HM.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json on stdout.")
@click.pass_context
@guarded
def sweep_cmd(ctx, config_file, members, seeds, control_data, out, overwrite, base_to_novel, as_json, **kw):
    """Run several strategies on the same data, budget and seeds; one table of top-1
    before/after, forgetting, trainable params, time, memory and checkpoint size."""
    from rich.markup import escape

    from clipft import api
    from clipft.commands import sweep
    from clipft.progress import stderr_console, stdout_console
    if kw.get("strategies"):
        raise ClipftUsageError("clipft sweep takes its strategies from --strategies, not --strategy")
    cfg = build_config(config_file, kw)
    refs = sweep.parse_members(members)
    reg = _registry(ctx, _components(cfg, [r for m in refs for r in m]))
    console = stderr_console()      # progress and failures; the table goes to stdout

    def progress(done, total, name, seed):
        console.print(f"[{done + 1}/{total}] {escape(name)} seed {seed}")

    def finished(name, row):
        if row["status"] == "ok":
            shown = " -> ".join("-" if v is None else f"{v:.3f}" for v in (row["top1_before"], row["top1_after"]))
            if "hm" in row:
                shown += f", base {row['base_top1']:.3f} novel {row['novel_top1']:.3f} HM {row['hm']:.3f}"
            how = {"kept": " (finished before: kept)", "resumed": " (resumed from its checkpoint)"}
            console.print(f"  top1 {shown} in {row['train_seconds']:.1f}s{how.get(row.get('how'), '')}")
        else:      # reported now; the sweep goes on with the next member
            console.print(f"  [red]{escape(name)} seed {row['seed']} failed[/red]: {escape(row['error'])}",
                          soft_wrap=True)

    doc = api.sweep(cfg, members, seeds=seeds, control_data=control_data, out=out, overwrite=overwrite,
                    disabled=ctx.find_root().obj["disabled"], registry=reg, on_member=progress,
                    on_done=finished, on_note=lambda note: console.print(f"[yellow]note[/yellow]: {escape(note)}"),
                    base_to_novel=base_to_novel)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        result = stdout_console()
        sweep.render_sweep(doc, result)
        result.print(f"wrote {Path(doc['out']) / sweep.SWEEP_JSON}")
    if all(m["ok"] == 0 for m in doc["members"]):
        sys.exit(1)


@cli.command("new", help=(
    f"Scaffold a plugin distribution: a KIND ({kinds.human_list()}) component NAME, with "
    "its pyproject.toml entry point, a working example component, a README and tests "
    "using clipft.testing. Then: pip install -e DIR && pytest DIR."))
@click.argument("kind")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Where to write the distribution (default ./clipft-NAME); must be empty or absent.")
@click.pass_context
@guarded
def new_cmd(ctx, kind, name, directory):
    from clipft.commands.scaffold import scaffold
    target, written = scaffold(kind, name, Path(directory) if directory else None, _registry(ctx))
    click.echo(f"wrote {kinds.lookup(kind).name} plugin clipft-{name} in {target}:")
    for path in written:
        click.echo(f"  {path.relative_to(target)}")
    click.echo(f"next: pip install -e {target} && pytest {target}", err=True)   # a hint


@cli.command("runs")
@click.argument("directory", required=False, metavar="[DIR]")
@click.option("--compare", nargs=2, metavar="A B",
              help="Compare two runs: paths, or names relative to DIR as the table shows them.")
@click.option("--all", "show_all", is_flag=True, help="With --compare: also list the equal config keys.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
@guarded
def runs_cmd(ctx, directory, compare, show_all, as_json):
    """List the runs under DIR (default runs/, searched a few levels down),
    oldest first: strategy, loss, head, data, trainable %, top-1 before ->
    after, train time, peak RSS. --compare A B shows two runs side by side."""
    from clipft.commands import runs
    from clipft.progress import stdout_console
    base = Path(directory or "runs")
    if show_all and not compare:
        raise ClipftUsageError("--all goes with --compare A B")
    if compare:
        a, b = (runs.resolve_run(x, base) for x in compare)
        doc = runs.compare(a, b)
    else:
        doc = runs.list_runs(base)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    elif compare:
        runs.render_compare(doc, stdout_console(), show_all=show_all)
    else:
        runs.render_runs(doc, stdout_console())


@cli.command("shards")
@click.argument("source", metavar="FOLDER|CSV")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard.")
@click.option("--shuffle-seed", type=int, help="Shuffle the samples with this seed (default: sorted order).")
@click.option("--templates", help="Caption templates for an image folder's class prompts (as in --data); "
                                  "with --clip-benchmark also its zero-shot templates.")
@click.option("--image-column", default="image", show_default=True, help="A table's image column.")
@click.option("--caption-column", default="caption", show_default=True, help="A table's caption column.")
@click.option("--label-column", help="A table's class-name column (written as `cls`).")
@click.option("--overwrite", is_flag=True, help="Replace the shards in a non-empty OUT.")
@click.option("--clip-benchmark", "clip_benchmark", is_flag=True,
              help="Write clip_benchmark's wds/ layout: OUT/test/ (the val split; a plain folder or table) "
                   "and OUT/train/ (FOLDER/train), each 0.tar, ... with nshards.txt, and "
                   "OUT/classnames.txt with OUT/zeroshot_classification_templates.txt.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest on stdout.")
@guarded
def shards_cmd(source, out, shard_size, shuffle_seed, templates, image_column, caption_column,
               label_column, overwrite, clip_benchmark, as_json):
    """Write WebDataset shards OUT/shard-000000.tar, ... from an image folder (one
    sub-folder per class: image, class-prompt `txt`, class index `cls`) or a
    CSV/TSV/JSONL file of image-caption pairs, with OUT/shards.json (sample
    counts) and OUT/classnames.txt. Train on them with --data webdataset:urls=OUT.

    With --clip-benchmark, OUT is a clip_benchmark dataset root: clipft's val
    split is its `test` (FOLDER/val, or the whole FOLDER or table) and
    FOLDER/train its `train`; evaluate an export with `clip_benchmark eval
    --dataset wds/NAME --dataset_root OUT --model local-dir:EXPORT --output R.json`."""
    from clipft.data import DEFAULT_TEMPLATES
    from clipft.commands.shards import write_shards
    m = write_shards(source, out, shard_size=shard_size, shuffle_seed=shuffle_seed, overwrite=overwrite,
                     templates=_templates(templates) or DEFAULT_TEMPLATES, image_column=image_column,
                     caption_column=caption_column, label_column=label_column, clip_benchmark=clip_benchmark)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    if clip_benchmark:
        _report_clip_benchmark(m, shuffle_seed)
        return
    classes = f", {m['classes']} classes" if m["classes"] is not None else ""
    click.echo(f"wrote {len(m['shards'])} shard(s), {m['samples']} samples{classes}, to {m['out']}")
    for sh in m["shards"]:
        click.echo(f"  {sh['name']}  {sh['samples']} samples")
    if m["skipped"]:
        click.echo(f"warning: skipped {len(m['skipped'])} unreadable image(s), e.g. "
                   f"{m['skipped'][0]['path']} ({m['skipped'][0]['reason']})", err=True)
    if m["classes"] is not None and shuffle_seed is None and m["captions"] == "class-prompts":
        click.echo("note: samples are in class order; shuffle them with --shuffle-seed so that every "
                   "shard (the val one too) holds every class", err=True)
    click.echo(f"train on them: clipft run --data webdataset:urls={m['out']} ...", err=True)   # a hint


def _report_clip_benchmark(m, shuffle_seed):
    from clipft.commands.shards import clip_benchmark_command
    classes = f", {m['classes']} classes" if m["classes"] is not None else " (retrieval: captions, no labels)"
    click.echo(f"wrote clip_benchmark's wds layout{classes} to {m['out']}")
    for split, sm in m["splits"].items():
        click.echo(f"  {split}/  {len(sm['shards'])} shard(s), {sm['samples']} samples  (from {sm['source']})")
    if m["skipped"]:
        click.echo(f"warning: skipped {len(m['skipped'])} unreadable image(s), e.g. "
                   f"{m['skipped'][0]['path']} ({m['skipped'][0]['reason']})", err=True)
    if "train" in m["splits"] and shuffle_seed is None and m["captions"] == "class-prompts":
        click.echo("note: samples are in class order; --shuffle-seed shuffles them", err=True)
    click.echo(f"evaluate an export: {clip_benchmark_command(m)}", err=True)   # a hint


def main():
    cli(prog_name="clipft")


if __name__ == "__main__":
    main()
