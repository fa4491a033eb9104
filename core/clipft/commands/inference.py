"""``clipft eval`` and ``clipft predict``: a :class:`~clipft.commands.source.Source`
applied to a data split, or to image files.

Two classifiers score an image embedding: zero-shot (cosine similarity to the
class-prompt embeddings, scaled by the model's logit scale, so that softmax
gives CLIP's own probabilities) and the run's head when it has one. Each
prediction command says which one it used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import attrs
import torch

from clipft import atomic
from clipft.data import DEFAULT_TEMPLATES, IMAGE_EXTENSIONS
from clipft.data import Batches, DataContext, DecodeFailures, collate, guard, is_iterable, load_image
from clipft.encode import class_scores, class_text_features, embed_batches, embed_unique_texts, encode_images, encode_texts
from clipft.engine.evaluate import HeadScores, ZeroShot, evaluate_features, logit_scale
from clipft.errors import ClipftUsageError
from clipft.options import build_options
from clipft.protocols import conditional_class_text

SPLITS = ("val", "train", "all")
RECALL_KS = (1, 5, 10)


def zero_shot(source, classnames: Sequence[str], templates: Sequence[str]) -> ZeroShot:
    """Zero-shot scores of ``source`` against its class-prompt embeddings (the
    model's learned prompts when it has a class-prompt encoder, else the
    template ensemble), encoded once; a conditional class-prompt encoder
    (CoCoOp) prompts each image anew."""
    model, names, templates = source.model, list(classnames), tuple(templates)
    if conditional_class_text(model):
        def scores(feats):
            with torch.no_grad():
                return class_scores(model, source.tokenizer, names, templates, source.device, feats).float()
        clip_logits = None
    else:
        with torch.no_grad():
            weights = class_text_features(model, source.tokenizer, names, templates, source.device).float()

        def scores(feats):
            return feats @ weights.t()

        def clip_logits(feats):
            return scale * feats @ weights.t()
    scale = logit_scale(model).to(source.device)
    return ZeroShot(scores, lambda: scale, clip_logits)


def head_scores(source, classnames: Sequence[str]) -> HeadScores:
    """The source's head, its columns put in the order of ``classnames``."""
    return HeadScores(source.head, HeadScores.columns_for(source.classnames, classnames))


def head_applies(source, classnames: Sequence[str]) -> bool:
    return (source.head is not None and source.classnames is not None
            and sorted(source.classnames) == sorted(classnames))


# -- data -------------------------------------------------------------------------------
def build_data(data_ref, registry, source):
    """The data source's bundle, both splits with the model's val transform, the
    split seeded as the run seeded it."""
    spec = registry.get("data", data_ref.name)
    opts = build_options("data", spec, data_ref.options)
    ctx = DataContext(transform_train=source.preprocess, transform_val=source.preprocess,
                      seed=source.seed, deterministic_train=True)
    return spec.build(opts, ctx)


def split_dataset(bundle, split: str):
    if split == "val":
        return bundle.val
    if split == "train":
        return bundle.train
    if is_iterable(bundle.train) or is_iterable(bundle.val):
        return torch.utils.data.ChainDataset([bundle.train, bundle.val])
    return torch.utils.data.ConcatDataset([bundle.train, bundle.val])


def _split_size(bundle, split: str):
    """Samples in a split (None: a stream of unknown length)."""
    if split == "all":
        sizes = [bundle.size("train"), bundle.size("val")]
        return None if None in sizes else sum(sizes)
    return bundle.size(split)


@torch.no_grad()
def embed_dataset(source, dataset, batch_size: int = 64, num_workers: int = 0):
    """Normalised image embeddings, labels and captions of every decodable
    sample, and the number of samples that could not be decoded."""
    loader = torch.utils.data.DataLoader(guard(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate)
    failures = DecodeFailures()
    batches = ((b["images"], b["labels"], b["captions"]) for b in Batches(loader, failures, "eval"))
    feats, labels, captions = embed_batches(
        batches, lambda images: encode_images(source.model, images.to(source.device)), source.device)
    return feats, labels, captions, failures.count


def trims_text(source) -> bool:
    """Whether captions skip the padding the causal text tower cannot see, as
    the run did (``--no-trim-text`` turns it off); on by default, as for a run."""
    return bool(getattr(source.config, "trim_text", True))


@torch.no_grad()
def caption_embeddings(source, captions: list[str]) -> torch.Tensor:
    """Features of the distinct captions, in order of first appearance."""
    trim = trims_text(source)
    return embed_unique_texts(
        captions, lambda chunk: encode_texts(source.model, source.tokenizer(chunk).to(source.device), trim=trim))


def pick_templates(explicit: Optional[Sequence[str]], data_ref, source, bundle) -> tuple:
    """``--templates``, then templates named in ``--data``, then the ones the
    model was trained with, then the data source's default."""
    if explicit:
        return tuple(explicit)
    if "templates" not in data_ref.options and source.templates:
        return tuple(source.templates)
    return tuple(bundle.templates or DEFAULT_TEMPLATES)


# -- eval -------------------------------------------------------------------------------
@attrs.define
class EvalResult:
    doc: dict
    #: classifier name -> [true, predicted] counts, for the confusion plot
    confusion: dict = attrs.field(factory=dict)
    classnames: Optional[list] = None


def evaluate_source(source, bundle, data_ref, split: str = "val", templates=None,
                    batch_size: int = 64, num_workers: int = 0) -> EvalResult:
    if split not in SPLITS:
        raise ClipftUsageError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    dataset = split_dataset(bundle, split)
    if _split_size(bundle, split) == 0:
        raise ClipftUsageError(f"the {split} split of {bundle.description or data_ref.name} is empty")
    feats, labels, captions, failed = embed_dataset(source, dataset, batch_size, num_workers)
    if len(feats) == 0:
        raise ClipftUsageError(f"no image of the {split} split could be decoded ({failed} failed)")
    doc = {"source": source.description, "data": bundle.description or data_ref.name, "split": split,
           "samples": len(feats), "unreadable": failed, "metrics": {}, "notes": []}
    result = EvalResult(doc)
    classifiers = []
    if bundle.has_labels:
        names = list(bundle.classnames)
        tmpl = pick_templates(templates, data_ref, source, bundle)
        doc["classes"], doc["templates"] = names, list(tmpl)
        classifiers.append(zero_shot(source, names, tmpl))
        if head_applies(source, names):
            classifiers.append(head_scores(source, names))
        elif source.head is not None:
            doc["notes"].append(f"head skipped: it was trained for {len(source.classnames or [])} other "
                                f"classes than the data's {len(names)}")
        result.classnames = names
    captions_of = (lambda caps: caption_embeddings(source, caps)) if bundle.has_captions else None
    metrics, details = evaluate_features(feats, labels, captions, classifiers, captions_of, ks=RECALL_KS)
    doc["metrics"].update(metrics)
    if classifiers:
        per_class = [{"class": c} for c in result.classnames]
        doc["reliability"] = {}
        for clf in classifiers:
            for row, (n, acc) in zip(per_class, details[clf.name]["per_class"]):
                row["samples"], row[f"{clf.prefix}top1"] = n, acc
            doc["reliability"][clf.name] = details[clf.name]["reliability"]
            result.confusion[clf.name] = details[clf.name]["confusion"]
        doc["per_class"] = per_class
    if not doc["metrics"]:
        doc["notes"].append("the data has neither class labels nor captions: nothing to measure")
    return result


def write_per_class_csv(result: EvalResult, path: Path) -> None:
    import csv
    rows = result.doc.get("per_class")
    if not rows:
        raise ClipftUsageError("--per-class needs data with class labels")
    cols = ["class", "samples"] + [k for k in rows[0] if k not in ("class", "samples")]
    with atomic.writing(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])


def require_matplotlib(flag: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ClipftUsageError(f"{flag} draws with matplotlib, which is not installed; install the "
                               "'plots' extra: pip install 'clipft[plots]' (or pip install matplotlib)") from None
    return plt


def write_confusion_png(result: EvalResult, path: Path) -> None:
    if not result.confusion:
        raise ClipftUsageError("--confusion needs data with class labels")
    plt = require_matplotlib("--confusion")
    name = "head" if "head" in result.confusion else "zero-shot"
    cm = result.confusion[name].cpu().numpy()
    names = result.classnames
    size = min(4 + 0.35 * len(names), 30)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    try:
        ax.imshow(cm, cmap="Blues")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion ({name}), {int(cm.sum())} images")
        if len(names) <= 50:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            if len(names) <= 20:
                for i in range(len(names)):
                    for j in range(len(names)):
                        if cm[i, j]:
                            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                                    color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)


def _save_png(fig, path: Path) -> None:
    with atomic.writing_path(path) as tmp:
        fig.savefig(tmp, format="png")   # the temporary name has no extension to tell it


# -- predict ----------------------------------------------------------------------------
def image_paths(args: Iterable[str]) -> list[Path]:
    """Files as given, and the images under each folder (sorted, recursive)."""
    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_EXTENSIONS and x.is_file())
            if not found:
                raise ClipftUsageError(f"{p} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        else:
            out.append(p)
    return out


def classifier_for_predict(source, labels: Optional[list], templates: Optional[Sequence[str]]):
    """Ad-hoc labels: zero-shot over them. Otherwise the run's classes, through
    its head when it has one."""
    if labels:
        return zero_shot(source, labels, tuple(templates or source.templates or DEFAULT_TEMPLATES)), labels
    if not source.classnames:
        raise ClipftUsageError(f"{source.description} has no class names: pass --labels a,b,c or "
                               "--labels-file FILE for zero-shot prediction")
    names = list(source.classnames)
    if source.head is not None and not templates:
        return head_scores(source, names), names
    return zero_shot(source, names, tuple(templates or source.templates or DEFAULT_TEMPLATES)), names


@torch.no_grad()
def predict(source, paths: Sequence[Path], classifier, names: list, top_k: int = 5,
            batch_size: int = 32) -> Iterator[dict]:
    """One record per path, in order: ``{"image", "used", "top": [{"label",
    "prob"}]}``, or ``{"image", "error"}`` for a file that cannot be read."""
    def logits(images):
        return classifier.logits(encode_images(source.model, images.to(source.device)).float())
    return predict_with(paths, source.preprocess, logits, classifier.name, names, top_k, batch_size)


def predict_with(paths: Sequence[Path], preprocess, logits, used: str, names: list, top_k: int = 5,
                 batch_size: int = 32) -> Iterator[dict]:
    """:func:`predict` for any ``logits(images [B, 3, H, W]) -> [B, C]`` (an
    ONNX export's graphs, :mod:`clipft.commands.onnx_export`)."""
    k = min(top_k, len(names))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        records, tensors, slots = [None] * len(chunk), [], []
        for i, p in enumerate(chunk):
            if not p.is_file():
                records[i] = {"image": str(p), "error": "no such file"}
                continue
            img = load_image(p)
            if img is None:
                records[i] = {"image": str(p), "error": "cannot decode the image"}
                continue
            try:
                tensors.append(preprocess(img))
            except Exception as exc:  # noqa: BLE001 - a bad image is reported, the rest go on
                records[i] = {"image": str(p), "error": f"cannot transform the image: {exc}"}
                continue
            slots.append(i)
        if tensors:
            with torch.no_grad():
                probs = torch.as_tensor(logits(torch.stack(tensors))).float().softmax(dim=1)
            top = probs.topk(k, dim=1)
            for row, i in enumerate(slots):
                records[i] = {"image": str(chunk[i]), "used": used,
                              "top": [{"label": names[j], "prob": float(v)}
                                      for v, j in zip(top.values[row].tolist(), top.indices[row].tolist())]}
        yield from records


# -- base-to-novel ----------------------------------------------------------------------
#: which half of the classes each part of ``--base-to-novel`` evaluates
HALVES = ("base", "novel")


def class_split_key(spec) -> Optional[str]:
    """The option of a data source that picks ``all|base|novel`` (declared by
    ``class_split`` in the field's metadata: ``classes``, ``hf``'s ``class_half``)."""
    if not attrs.has(spec.options):
        return None
    return next((f.name for f in attrs.fields(spec.options) if f.metadata.get("class_split")), None)


def base_to_novel_refs(data_ref, registry, own_data: bool = False) -> dict:
    """``{"base": ref, "novel": ref}``: ``data_ref`` with its class half set
    (``own_data``: a run's own data, whose half, if any, is replaced)."""
    from clipft.options import ComponentRef
    key = class_split_key(registry.get("data", data_ref.name))
    if key is None:
        able = [n for n in registry.names("data") if class_split_key(registry.get("data", n))]
        raise ClipftUsageError(f"--base-to-novel: data source '{data_ref.name}' cannot keep half of its classes "
                               f"(no classes=all|base|novel option); sources that can: {', '.join(able)}")
    given = str(data_ref.options.get(key, "all"))
    if given != "all" and not own_data:
        raise ClipftUsageError(f"--base-to-novel evaluates {key}=base and {key}=novel itself; "
                               f"drop {key}={given} from --data")
    return {half: ComponentRef(data_ref.name, {**data_ref.options, key: half}) for half in HALVES}


def novel_scoring(head_spec, has_head: bool = True) -> Optional[str]:
    """How novel classes are scored, from what the head declares: None when
    through the model's class-text path (no head, or a head that encodes text:
    learned prompts apply to the new names); ``"zero-shot fallback"`` for a head
    initialised from class prompts (its trained weights exist for the base
    classes only, so the model's own zero-shot stands in). Any other head
    (``linear``, a Tip-Adapter cache) holds nothing for unseen classes: a usage
    error, never a silent number."""
    if not has_head or (head_spec is not None and head_spec.encodes_text is True):
        return None
    if head_spec is not None and head_spec.zero_shot_init:
        return "zero-shot fallback"
    name = f"'{head_spec.name}'" if head_spec is not None else "of this source"
    raise ClipftUsageError(
        f"--base-to-novel: the head {name} classifies only the classes it was trained on (it neither "
        "encodes text nor starts from class prompts), so it cannot score novel classes; train with "
        "--head text (prompt tuning) or --head zero-shot, or evaluate the novel half alone "
        "(--data SRC,classes=novel) for the backbone's zero-shot number")


def evaluate_base_to_novel(source, refs: dict, registry, split: str = "val", templates=None,
                           batch_size: int = 64, num_workers: int = 0) -> dict:
    """The base-to-novel report of ``source`` on ``refs`` (:func:`base_to_novel_refs`);
    a head that cannot score novel classes is refused before any image is read."""
    novel_by = novel_scoring(source.head_spec, source.head is not None)
    parts = [evaluate_source(source, build_data(refs[half], registry, source), refs[half], split, templates,
                             batch_size, num_workers) for half in HALVES]
    return base_to_novel_doc(source, *parts, novel_by)


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def base_to_novel_doc(source, base: EvalResult, novel: EvalResult, novel_by: Optional[str]) -> dict:
    """Base top-1 (the head's when it has one for these classes), novel top-1
    (zero-shot over the novel names through the class-text path) and their
    harmonic mean, with both parts' full reports."""
    for half, res in zip(HALVES, (base, novel)):
        if "top1" not in res.doc["metrics"]:
            raise ClipftUsageError(f"--base-to-novel needs class labels; the {half} half has none")
    # the novel half's head note ("trained for other classes") is what this report is about
    novel.doc["notes"] = [x for x in novel.doc["notes"] if not x.startswith("head skipped")]
    bm = base.doc["metrics"]
    b, n = bm.get("head_top1", bm["top1"]), novel.doc["metrics"]["top1"]
    notes = []
    if novel_by:
        notes.append(f"novel: {novel_by}: the '{source.head_spec.name}' head's weights exist for the base "
                     "classes only; novel is the model's zero-shot over the novel names")
    return {"source": source.description, "protocol": "base-to-novel", "split": base.doc["split"],
            "metrics": {"base_top1": b, "novel_top1": n, "hm": harmonic_mean(b, n)},
            "base_by": "head" if "head_top1" in bm else "class text",
            "novel_by": novel_by or "class text",
            "base": base.doc, "novel": novel.doc, "notes": notes}


def render_base_to_novel(doc: dict, console, notes=None) -> None:
    from rich.markup import escape
    from rich.table import Table
    notes = notes or console
    t = Table(title=escape(f"{doc['source']}: base-to-novel ({doc['split']})"))
    for col in ("half", "classes", "images", "top1", "scored by"):
        t.add_column(col, justify="left" if col in ("half", "scored by") else "right")
    m = doc["metrics"]
    for half in HALVES:
        d = doc[half]
        t.add_row(half, str(len(d.get("classes") or [])), str(d["samples"]), _fmt(m[f"{half}_top1"]),
                  doc[f"{half}_by"])
    t.add_row("HM", "", "", _fmt(m["hm"]), "2·base·novel/(base+novel)")
    console.print(t)
    for note in doc["notes"] + [f"{half}: {x}" for half in HALVES for x in doc[half]["notes"]]:
        notes.print(f"[yellow]note[/yellow]: {escape(note)}")


# -- output -----------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def render_eval(doc: dict, console, notes=None) -> None:
    """The report on ``console``; its notes on ``notes`` (the CLI passes stderr),
    else on ``console`` too."""
    from rich.markup import escape
    from rich.table import Table
    notes = notes or console
    for part, d in [("data", doc)] + ([("control", doc["control"])] if "control" in doc else []):
        t = Table(title=escape(f"{d['source']} on {d['data']} ({d['split']}, {d['samples']} images"
                               + (f", {d['unreadable']} unreadable" if d["unreadable"] else "") + ")"
                               + (" [control]" if part == "control" else "")))
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in d["metrics"].items():
            t.add_row(k, _fmt(v))
        console.print(t)
        rows = d.get("per_class") or []
        if rows and part == "data":
            key = "head_top1" if "head_top1" in rows[0] else "top1"
            worst = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key])[:10]
            pc = Table(title=f"per-class {key}, worst {len(worst)} of {len(rows)}")
            for col in ("class", "images", key):
                pc.add_column(col)
            for r in worst:
                pc.add_row(escape(r["class"]), str(r["samples"]), _fmt(r[key]))
            console.print(pc)
            rel = d["reliability"].get("head" if key == "head_top1" else "zero-shot", [])
            used = [b for b in rel if b["count"]]
            if used:
                console.print("reliability (confidence bin: images, mean confidence -> accuracy): "
                              + "; ".join(f"({b['lo']:.2f},{b['hi']:.2f}] {b['count']} "
                                          f"{b['confidence']:.2f}->{b['accuracy']:.2f}" for b in used),
                              soft_wrap=True)
        for note in d["notes"]:
            notes.print(f"[yellow]note[/yellow]: {escape(note)}")


def _curve_columns(curve: list) -> list:
    """(part, metric) pairs shown for a WiSE-FT curve: top-1s and recall@1."""
    return [(part, m) for part in ("data", "control") if part in curve[0]
            for m in ("top1", "head_top1", "recall@1") if m in curve[0][part]]


def render_wise_ft(doc: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table
    curve = doc["wise_ft"]
    t = Table(title=escape(f"WiSE-FT: {doc['source']} ({doc['split']})"))
    t.add_column("α", justify="right")
    cols = _curve_columns(curve)
    for part, m in cols:
        t.add_column(f"{m}" if part == "data" else f"control {m}", justify="right")
    for row in curve:
        t.add_row(f"{row['alpha']:g}", *(_fmt(row[p][m]) for p, m in cols))
    console.print(t)


def write_wise_ft_png(curve: list, path: Path) -> None:
    plt = require_matplotlib("--wise-ft-plot")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        xs = [r["alpha"] for r in curve]
        for part, m in _curve_columns(curve):
            ax.plot(xs, [r[part][m] for r in curve], marker="o",
                    label=m if part == "data" else f"control {m}")
        ax.set_xlabel("α (0 = zero-shot, 1 = fine-tuned)")
        ax.set_ylabel("accuracy")
        ax.set_title("WiSE-FT")
        ax.legend()
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
