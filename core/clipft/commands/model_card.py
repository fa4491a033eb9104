"""The ``README.md`` every export writes: a Hugging Face Hub model card.

YAML front matter (``library_name``, ``tags``, ``base_model`` when the run
started from a published open_clip tag, ``pipeline_tag``, ``metrics`` and a
``model-index`` with the run's after-training figures), then the base model,
the data, the strategies, before/after metrics from ``summary.json``, how to
load the export, and what plain open_clip loses (from the manifest).

The front matter is written value by value as JSON, which is YAML too: no YAML
library is needed to write it, and any YAML parser reads it back. Nothing here
touches the network: ``base_model`` comes from open_clip's own pretrained table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

CARD = "README.md"
#: summary.json metrics that are counts, not measurements
_COUNTS = ("_queries",)


def base_model(model: str, pretrained: Optional[str]) -> Optional[str]:
    """The Hub repository of an open_clip pretrained tag (its ``hf_hub`` entry),
    or None for random init, a local file, or a tag open_clip does not list."""
    if not pretrained or pretrained == "none" or "/" in pretrained or "\\" in pretrained:
        return None
    try:
        import open_clip
        cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    except Exception:   # noqa: BLE001 - a card without base_model beats no export
        return None
    hub = (cfg.get("hf_hub") or "").strip("/")
    return hub or None


def read_summary(run_dir) -> dict:
    """The run's summary.json, or {} when there is none (a run stopped before it finished)."""
    try:
        doc = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _numbers(d) -> dict:
    if not isinstance(d, dict):
        return {}
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(_COUNTS)}


def _metric_type(name: str) -> str:
    if name.endswith("top1") or name.endswith("top5") or "acc" in name:
        return "accuracy"
    if "recall" in name:
        return "recall"
    return name


def front_matter(manifest: dict, summary: dict, data_name: str) -> dict:
    after = _numbers(summary.get("eval", {}).get("after"))
    meta = {"library_name": "open_clip",
            "tags": ["clip", "clipft", "open_clip", "zero-shot-image-classification"],
            "pipeline_tag": "zero-shot-image-classification"}
    base = base_model(manifest.get("model", ""), manifest.get("pretrained"))
    if base:
        meta["base_model"] = base
    if after:
        meta["metrics"] = sorted({_metric_type(k) for k in after})
        meta["model-index"] = [{
            "name": Path(manifest.get("source_run", "model")).name,
            "results": [{"task": {"type": "zero-shot-image-classification"},
                         "dataset": {"name": data_name, "type": data_name, "split": "val"},
                         "metrics": [{"type": _metric_type(k), "name": k, "value": v}
                                     for k, v in after.items()]}]}]
    return meta


#: characters a YAML stream may not hold unescaped, and the line breaks YAML 1.1
#: adds to JSON's (a break inside a quoted scalar is read as a space)
_NOT_YAML = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _yaml(meta: dict) -> str:
    # one key a line, each value as JSON (a YAML flow value). Not ensure_ascii:
    # PyYAML reads a \ud83d\ude00 pair as two lone surrogates, not one character
    def line(k, v):
        text = _NOT_YAML.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(v, ensure_ascii=False))
        return f"{k}: {text}\n"
    return "".join(line(k, v) for k, v in meta.items())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _diff(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _md(text) -> str:
    """A value inside a Markdown table cell or inline code: no pipes or newlines."""
    return " ".join(str(text).replace("|", "\\|").split())


def render(manifest: dict, summary: dict, data: Optional[dict] = None, out_name: str = "OUT") -> str:
    """The card's text. ``data``: the run's data reference ``{"name", "options"}``."""
    data = data or {}
    data_name = data.get("name") or summary.get("data", {}).get("name") or "unknown"
    meta = front_matter(manifest, summary, data_name)
    model, pretrained = manifest.get("model"), manifest.get("pretrained")
    onnx = manifest.get("format_name") == "onnx"
    lines = ["---", _yaml(meta).rstrip("\n"), "---", "",
             f"# {_md(model)} fine-tuned with clipft", "",
             f"Exported by clipft {manifest.get('clipft_version', '')} from run `{_md(manifest.get('source_run'))}` "
             f"({manifest.get('source_checkpoint', {}).get('name', 'final')} weights"
             + (f", WiSE-FT α={manifest['wise_ft']['alpha']}" if manifest.get("wise_ft") else "")
             + (", as ONNX graphs" if onnx else ", in open_clip's format") + ").", ""]

    lines += ["## Base model", ""]
    if meta.get("base_model"):
        lines.append(f"open_clip `{_md(model)}` with pretrained weights `{_md(pretrained)}` "
                     f"([{meta['base_model']}](https://huggingface.co/{meta['base_model']})).")
    elif pretrained in (None, "none"):
        lines.append(f"open_clip `{_md(model)}`, randomly initialised (no pretrained weights).")
    else:
        lines.append(f"open_clip `{_md(model)}` with weights `{_md(pretrained)}` (not a published tag).")
    lines.append("")

    d = summary.get("data", {}) if isinstance(summary.get("data"), dict) else {}
    classes = manifest.get("classnames") or []
    opts = ", ".join(f"{k}={v}" for k, v in (data.get("options") or {}).items())
    lines += ["## Data", "",
              f"- source: `{_md(data_name)}`" + (f" (`{_md(opts)}`)" if opts else ""),
              f"- training images: {_fmt(d.get('train_size'))}, validation images: {_fmt(d.get('val_size'))}",
              f"- classes: {len(classes) if classes else _fmt(d.get('classes'))}"
              + (": " + ", ".join(f"`{_md(c)}`" for c in classes[:30]) + (", ..." if len(classes) > 30 else "")
                 if classes else ""),
              f"- prompt templates: " + (", ".join(f"`{_md(t)}`" for t in manifest.get("templates") or [])
                                         or "-"), ""]

    lines += ["## Training", ""]
    for s in manifest.get("strategies") or []:
        rest = ", ".join(f"{k}={v}" for k, v in s.items() if k != "name")
        lines.append(f"- strategy `{_md(s.get('name'))}`" + (f": `{_md(rest)}`" if rest else ""))
    for key in ("loss", "head"):
        part = summary.get(key)
        if isinstance(part, dict) and part.get("name"):
            rest = ", ".join(f"{k}={v}" for k, v in part.items() if k != "name")
            lines.append(f"- {key} `{_md(part['name'])}`" + (f": `{_md(rest)}`" if rest else ""))
    train, params = summary.get("train", {}) or {}, summary.get("params", {}) or {}
    if train:
        lines.append(f"- epochs {_fmt(train.get('epochs'))}, steps {_fmt(train.get('steps'))}, "
                     f"lr {_fmt(train.get('lr'))}, seed {_fmt(manifest.get('seed'))}")
    if params:
        lines.append(f"- trainable parameters: {_fmt(params.get('trainable'))} of {_fmt(params.get('total'))}")
    if manifest.get("merged_adapter_layers"):
        lines.append(f"- {manifest['merged_adapter_layers']} adapter layers merged into the base weights")
    lines.append("")

    ev = summary.get("eval", {}) if isinstance(summary.get("eval"), dict) else {}
    before, after = _numbers(ev.get("before")), _numbers(ev.get("after"))
    lines += ["## Results", ""]
    if before or after:
        lines += [f"On the validation split of `{_md(data_name)}` (from the run's `summary.json`):", "",
                  "| metric | before | after |", "|---|---:|---:|"]
        for k in list(dict.fromkeys([*before, *after])):
            lines.append(f"| {_md(k)} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |")
    else:
        lines.append("The run recorded no evaluation (no `summary.json` figures).")
    lines.append("")

    lines += ["## How to use", ""]
    if onnx:
        lines += _onnx_usage(manifest)
    else:
        lines += ["With open_clip alone (no clipft needed):", "", "```python", "import open_clip",
                  f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_name}")',
                  f'tokenizer = open_clip.get_tokenizer("local-dir:{out_name}")', "```", ""]
    if onnx:
        lines += ["With clipft (onnxruntime runs the graphs):", "", "```bash",
                  f"clipft predict {out_name} image.jpg                 # the run's classes, classifier.onnx",
                  f'clipft predict {out_name} image.jpg --labels "a dog,a cat"   # zero-shot, the encoders',
                  "```", ""]
    else:
        lines += ["With clipft (the learned prompts, adapters and head put back):", "", "```bash",
                  f"clipft predict {out_name} image.jpg", f"clipft eval {out_name} --data DATA", "```", "",
                  "```python", "import clipft",
                  f'model = clipft.load("{out_name}")   # encode_image, encode_text, classify, classes',
                  "```", ""]

    lines += ["## Limitations", ""]
    lines += _limitations(manifest)
    return "\n".join(lines) + "\n"


def _onnx_usage(manifest: dict) -> list:
    files = manifest.get("onnx", {}).get("files", {})
    out = ["With onnxruntime alone (`preprocess.json` gives the image size, mean/std and "
           "resize mode, and the tokenizer settings):", "", "```python", "import numpy as np, onnxruntime as ort",
           'image = ort.InferenceSession("image_encoder.onnx")',
           '# pixel_values: float32 [batch, 3, H, W], preprocessed as preprocess.json says',
           'embeds = image.run(None, {"pixel_values": pixel_values})[0]   # L2-normalised']
    if "classifier" in files:
        out += ['classifier = ort.InferenceSession("classifier.onnx")',
                'logits, probs = classifier.run(None, {"pixel_values": pixel_values})   '
                '# classes: preprocess.json "classnames"']
    out += ["```", ""]
    return out


def _limitations(manifest: dict) -> list:
    out = []
    drops = manifest.get("plain_open_clip_drops") or []
    if manifest.get("format_name") == "onnx":
        onnx = manifest.get("onnx", {})
        out.append("- The ONNX graphs hold everything the run learned (adapters merged, prompts and head "
                   "baked into `classifier.onnx`); `text_encoder.onnx` encodes free text (the text tower "
                   "and any text-embedding adapter): learned class prompts live in the classifier only.")
        for part, v in (onnx.get("verification") or {}).items():
            out.append(f"- `{part}`: onnxruntime vs the torch model, max |diff| {v['max_abs_diff']:.2e} "
                       f"(allowed {v['allowed']:.2e}).")
    elif drops:
        for d in drops:
            out.append(f"- Plain open_clip drops `{_md(d['module'])}` ({_md(d['kind'])}, strategy "
                       f"`{_md(d['strategy'])}`, in `{_md(d['file'])}`): loaded without clipft the model "
                       f"differs from the run's (max |diff| {_diff(manifest.get('verified_max_abs_diff'))} "
                       "on a probe); `load_export` keeps it.")
    else:
        out.append("- Plain open_clip reproduces the run's model: nothing was dropped (max |diff| "
                   f"{_diff(manifest.get('verified_max_abs_diff'))} on a probe).")
    if manifest.get("head") and manifest.get("format_name") != "onnx":
        out.append(f"- The head (`{_md(manifest['head']['name'])}`) is not part of open_clip: plain open_clip "
                   "classifies zero-shot only.")
    out.append("- The figures above are from the run's own validation split; they say little about "
               "other data.")
    return out


def write(folder: Path, manifest: dict, data: Optional[dict] = None, out_name: str = "OUT") -> None:
    """Write ``folder/README.md`` (``folder`` is the export's temporary folder:
    the card appears with the rest of the export, or not at all)."""
    summary = read_summary(manifest.get("source_run", ""))
    (Path(folder) / CARD).write_text(render(manifest, summary, data, out_name), encoding="utf-8")


def data_of(run) -> dict:
    """The data reference of a loaded run, as :func:`render` takes it."""
    ref = getattr(run.config, "data", None)
    return {"name": getattr(ref, "name", None), "options": dict(getattr(ref, "options", None) or {})}
