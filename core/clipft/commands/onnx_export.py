"""``clipft export RUN OUT --format onnx``: a trained run as ONNX graphs.

``OUT`` holds:

- ``image_encoder.onnx``: ``pixel_values`` float32 ``[batch, 3, H, W]`` ->
  ``image_embeds`` ``[batch, D]``, L2-normalised, as clipft embeds images
  (adapters merged, VPT tokens and image-embedding adapters in the graph).
- ``text_encoder.onnx``: ``input_ids`` int64 ``[batch, context_length]`` ->
  ``text_embeds`` ``[batch, D]``, L2-normalised: the text tower for free text
  (learned class prompts are not text; they are baked into the classifier).
- ``classifier.onnx`` when the run knows its classes: ``pixel_values`` ->
  ``logits``, ``probs`` ``[batch, C]``, the classifier ``clipft predict`` uses
  (the head when the run has one, else zero-shot: the class-prompt embeddings,
  learned prompts included, times the logit scale, softmax).
- ``preprocess.json``: what a client does before the graphs (image size,
  mean/std, resize mode; context length and tokenizer) and the class names.
- ``clipft_export.json`` (``format_name: "onnx"``) and ``README.md`` (the card).

``clipft predict OUT IMAGE...`` runs these graphs with onnxruntime (:func:`predict`).

Every graph has a dynamic batch axis. The export checks itself: onnxruntime's
outputs against the torch model's (the run's, adapters unmerged) on probe
inputs of another batch size than the one traced, within :func:`tolerance`; a
failure leaves nothing behind. A part that cannot be traced to a plain function
of its input is refused (usage error): a conditional prompt learner (CoCoOp),
an inserted module that neither folds into the base weights nor exports itself.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from clipft import atomic
from clipft.commands import model_card, wiseft
from clipft.commands.export import FORMAT, MANIFEST, _check_out
from clipft.encode import encode_images, encode_texts, infer_embed_dim, shared_class_text
from clipft.engine.evaluate import logit_scale
from clipft.engine.loadrun import load_run
from clipft.engine.rundir import RunLock
from clipft.engine.signals import Raising
from clipft.errors import ClipftError, ClipftUsageError
from clipft.options import options_to_dict
from clipft.protocols import (ENTERS_IMAGE_EMBEDDING, ENTERS_TEXT_EMBEDDING, conditional_class_text,
                              inserted_modules)
from clipft.version import __version__

IMAGE, TEXT, CLASSIFIER = "image_encoder.onnx", "text_encoder.onnx", "classifier.onnx"
PREPROCESS = "preprocess.json"
FORMAT_NAME = "onnx"
OPSET = 17
#: the graphs are traced at one batch size and verified at another, so a batch
#: size baked into a graph fails the check
TRACE_BATCH, PROBE_BATCH = 2, 3
#: the factor over the random-walk rounding estimate (as tests/numerics.py):
#: LayerNorm and softmax amplify input errors a little, a block has several reductions
SAFETY = 8.0
EPS32 = float(torch.finfo(torch.float32).eps)
INSTALL = "pip install 'clipft[onnx]' (or pip install onnx onnxruntime)"


def require_onnx():
    """onnxruntime (and onnx, which the exporter needs), or a usage error saying what to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ClipftUsageError(f"--format onnx needs onnx and onnxruntime ({exc.name or exc} is not "
                               f"installed): {INSTALL}") from None
    return onnxruntime


def refusal(model) -> Optional[str]:
    """Why the run's model cannot be written as fixed graphs, or None."""
    if conditional_class_text(model):
        return ("its class prompts are conditional on each image (CoCoOp's meta-network): the class-text "
                "side is not a fixed classifier an image graph could hold; export it in open_clip's format")
    for qname, module in inserted_modules(model):
        if not module.folds_into_base and module.export_info() is None:
            return (f"the inserted module {qname} ({type(module).__name__}) neither folds into the base "
                    "weights nor exports itself (clipft.InsertedModule: folds_into_base / export_info), "
                    "so nothing says it is a fixed function of its input")
    return None


# -- tolerance -------------------------------------------------------------------------
def graph_size(*modules) -> tuple[int, int]:
    """``(reduction, depth)`` of the computation in ``modules``: the longest dot
    product (Linear inputs, a convolution's window, attention width) and the
    number of layers a rounding error passes through, counted as half the
    normalisation layers plus one (a transformer block has two; the stem, the
    final norm and the projection make up the rest; for a ResNet this counts
    more than its blocks, which only loosens the bound)."""
    reduction, norms = 1, 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if isinstance(m, nn.Linear):
                reduction = max(reduction, m.in_features)
            elif isinstance(m, nn.modules.conv._ConvNd):
                reduction = max(reduction, m.in_channels // m.groups * math.prod(m.kernel_size))
            elif isinstance(m, nn.MultiheadAttention):
                reduction = max(reduction, m.embed_dim)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                norms += 1
    return reduction, norms // 2 + 1


def tolerance(reduction: int, depth: int) -> float:
    """Norm-wise relative tolerance for float32 onnxruntime vs torch eager:
    the same maths on other kernels (MLAS vs oneDNN GEMMs, fused LayerNorm and
    attention) differs by rounding only. One dot product of n terms rounds to
    about eps32·sqrt(n) relative (a random walk), each layer passes its input
    error on and adds its own, so ``SAFETY · eps32 · sqrt(reduction) · depth``,
    times ``max|reference|``."""
    return SAFETY * EPS32 * math.sqrt(max(1, reduction)) * max(1, depth)


# -- the graphs ----------------------------------------------------------------------------
class _Images(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return encode_images(self.model, pixel_values)


class _Texts(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return encode_texts(self.model, input_ids)


class _Classifier(nn.Module):
    def __init__(self, model, scorer):
        super().__init__()
        self.model, self.scorer = model, scorer

    def forward(self, pixel_values):
        logits = self.scorer.logits(encode_images(self.model, pixel_values).float())
        return logits, logits.softmax(dim=1)


def _trace(module, args, path: Path, inputs, outputs, part: str) -> None:
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    axes = {name: {0: "batch"} for name in (*inputs, *outputs)}
    try:
        # the TorchScript exporter: no onnxscript needed; it warns that it is
        # legacy and about shape checks it records as constants (the verification
        # below is what vouches for the graph)
        with warnings.catch_warnings(), _no_fastpath(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, **kw)
    except ClipftError:
        raise
    except Exception as exc:   # noqa: BLE001 - torch.onnx raises many types; the part is named
        text = " ".join(str(exc).split())[:300]
        raise ClipftUsageError(f"--format onnx: the {part} cannot be exported to ONNX "
                               f"({type(exc).__name__}: {text})") from None


@contextlib.contextmanager
def _no_fastpath():
    """nn.MultiheadAttention's inference fast path (taken without gradients) is
    one fused op ONNX has no export for; the explicit path computes the same."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _session(ort, path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check(part: str, got, want: torch.Tensor, reduction: int, depth: int, scale: Optional[float] = None,
           factor: float = 1.0) -> dict:
    got = torch.as_tensor(got)
    if got.shape != want.shape:
        raise ClipftError(f"--format onnx: {part} gives shape {tuple(got.shape)}, the torch model "
                          f"{tuple(want.shape)}; this is a bug, please report it")
    diff = float((got.double() - want.double()).abs().max())
    ref = float(want.abs().max()) if scale is None else scale
    rel = tolerance(reduction, depth)
    allowed = factor * rel * ref
    return {"max_abs_diff": diff, "allowed": allowed, "reduction": reduction, "depth": depth,
            "max_abs_reference": ref, "batch": int(want.shape[0]),
            "rule": f"{factor:g} x {SAFETY:g}*eps32*sqrt({reduction})*{depth} x {ref:.3g}"}


# -- export --------------------------------------------------------------------------------
def export_run(run_dir, out, registry=None, overwrite: bool = False, device: str = "cpu",
               wise_ft: Optional[float] = None, best: bool = False) -> dict:
    """:func:`clipft.commands.export.export_run` for ``--format onnx``: the same
    options, the run locked and signals turned into exceptions the same way;
    returns the manifest."""
    ort = require_onnx()   # before anything is locked or loaded
    stop = Raising(f"export stopped before it finished; {out} is left as it was",
                   late=f"stopped after the export to {out} was complete")
    with stop, RunLock(Path(run_dir)) if Path(run_dir).is_dir() else contextlib.nullcontext():
        return _export(Path(run_dir), Path(out), ort, registry, overwrite, device, wise_ft, stop, best)


def _export(run_dir: Path, out: Path, ort, registry, overwrite: bool, device: str, wise_ft: Optional[float],
            stop, best: bool) -> dict:
    run = load_run(run_dir, registry, device=device, best=best)
    model = run.model
    reason = refusal(model)
    if reason:
        raise ClipftUsageError(f"--format onnx: {run_dir}: {reason}")
    wise, folded = None, 0
    if wise_ft is not None:
        wiseft.check_alpha(wise_ft)
        ends = wiseft.endpoints(run)
        wiseft.apply(run, ends, wise_ft)
        folded = ends.folded
        wise = {"alpha": wise_ft, "zero_shot": f"{run.config.model} pretrained {run.config.pretrained}",
                "head": ends.head_tuned is not None}
    _check_out(out, overwrite)
    atomic.remove_stale(out.parent, {out.name})
    with contextlib.ExitStack() as commit, atomic.building_dir(out) as tmp, shared_class_text(), \
            torch.no_grad():
        manifest = _build(run, tmp, ort, folded)
        manifest.update({"source_run": str(Path(run_dir).resolve()),
                         "source_checkpoint": {"name": "best" if best else "final", "epoch": run.state.get("epoch"),
                                               "step": run.state.get("global_step")},
                         "wise_ft": wise})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        model_card.write(tmp, manifest, model_card.data_of(run), str(out))
        manifest["bytes"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        commit.enter_context(stop.held())
        if out.exists():   # _check_out: an export with nothing its manifest does not list
            shutil.rmtree(out)
    return manifest


def _scorer(run):
    """The classifier ``clipft predict`` uses for the run's classes, or None."""
    if not run.classnames:
        return None, None
    from clipft.commands import inference
    from clipft.commands.source import KIND_RUN, Source
    src = Source(KIND_RUN, "run", run.model, run.tokenizer, run.preprocess, run.head, run.classnames,
                 tuple(run.templates), run.device)
    return inference.classifier_for_predict(src, None, None)


def _build(run, tmp: Path, ort, folded: int) -> dict:
    model = run.model
    dev = next(model.parameters()).device
    size = getattr(model.visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(PROBE_BATCH, 3, h, w, generator=g).to(dev)
    texts = ["a photo of a cat.", "a diagram of a red square", "x"][:PROBE_BATCH]
    tokens = run.tokenizer(texts).to(dev)

    # the references: the run's model as trained, adapters in their slots
    scorer, classes = _scorer(run)
    ref_img = encode_images(model, images).float()
    ref_txt = encode_texts(model, tokens).float()
    ref_logits = scorer.logits(ref_img) if scorer is not None else None

    folded += wiseft.fold_adapters(model)
    adapters = inserted_modules(model)
    img_size = graph_size(model.visual, *(m for _, m in adapters if m.enters == ENTERS_IMAGE_EMBEDDING))
    txt_size = graph_size(getattr(model, "transformer", None), getattr(model, "ln_final", None),
                          *(m for _, m in adapters if m.enters == ENTERS_TEXT_EMBEDDING))
    files, checks = {}, {}
    _trace(_Images(model).eval(), (images[:TRACE_BATCH],), tmp / IMAGE, ["pixel_values"], ["image_embeds"],
           "image encoder")
    _trace(_Texts(model).eval(), (tokens[:TRACE_BATCH],), tmp / TEXT, ["input_ids"], ["text_embeds"],
           "text encoder")
    files["image_encoder"] = {"file": IMAGE, "inputs": {"pixel_values": ["batch", 3, h, w]},
                              "outputs": {"image_embeds": ["batch", infer_embed_dim(model)]}, "normalised": True}
    files["text_encoder"] = {"file": TEXT, "inputs": {"input_ids": ["batch", int(tokens.shape[1])]},
                             "outputs": {"text_embeds": ["batch", int(ref_txt.shape[1])]}, "normalised": True}
    got = _session(ort, tmp / IMAGE).run(None, {"pixel_values": images.cpu().numpy()})[0]
    checks["image_encoder"] = _check("image encoder", got, ref_img.cpu(), *img_size)
    got = _session(ort, tmp / TEXT).run(None, {"input_ids": tokens.cpu().numpy().astype("int64")})[0]
    checks["text_encoder"] = _check("text encoder", got, ref_txt.cpu(), *txt_size)
    used = None
    if scorer is not None:
        used = scorer.name
        _trace(_Classifier(model, scorer).eval(), (images[:TRACE_BATCH],), tmp / CLASSIFIER, ["pixel_values"],
               ["logits", "probs"], f"classifier ({used})")
        files["classifier"] = {"file": CLASSIFIER, "inputs": {"pixel_values": ["batch", 3, h, w]},
                               "outputs": {"logits": ["batch", len(classes)], "probs": ["batch", len(classes)]},
                               "uses": used}
        # one more layer than the image encoder: the class matrix (or the head)
        red = max(img_size[0], *graph_size(run.head)[:1], int(ref_img.shape[1]))
        depth = img_size[1] + 1 + (graph_size(run.head)[1] - 1 if used == "head" else 0)
        logits, probs = _session(ort, tmp / CLASSIFIER).run(None, {"pixel_values": images.cpu().numpy()})
        checks["classifier.logits"] = _check("classifier logits", logits, ref_logits.cpu(), red, depth)
        # softmax's Jacobian has infinity-norm max 2p(1-p) <= 1/2: probabilities
        # move by at most half the logits' error
        checks["classifier.probs"] = _check("classifier probabilities", probs, ref_logits.softmax(dim=1).cpu(),
                                            red, depth, scale=checks["classifier.logits"]["max_abs_reference"],
                                            factor=0.5)
    for part, c in checks.items():
        print(f"onnx: {part}: onnxruntime vs torch, max |diff| {c['max_abs_diff']:.2e} "
              f"(allowed {c['allowed']:.2e} = {c['rule']})", file=sys.stderr)
    bad = {p: c for p, c in checks.items() if not c["max_abs_diff"] <= c["allowed"]}
    if bad:
        raise ClipftError("--format onnx: onnxruntime does not reproduce the torch model ("
                          + "; ".join(f"{p}: max |diff| {c['max_abs_diff']:.3g} > {c['allowed']:.3g}"
                                      for p, c in bad.items()) + "); nothing was written")
    (tmp / PREPROCESS).write_text(json.dumps(_preprocess(run, h, w, int(tokens.shape[1]), classes), indent=2))
    head_info = None
    if run.resolved.head is not None:
        spec, opts = run.resolved.head
        head_info = {"name": spec.name, "options": options_to_dict(opts), "file": None}
    return {
        "format": FORMAT,
        "format_name": FORMAT_NAME,
        "clipft_version": __version__,
        "model": run.config.model,
        "pretrained": run.pretrained,
        "strategies": [{"name": s.name, **options_to_dict(o)} for s, o in run.resolved.strategies],
        "merged_adapter_layers": folded,
        "classnames": run.classnames,
        "templates": list(run.templates),
        "extras": [],
        "plain_open_clip_drops": [],
        "head": head_info,
        "seed": run.config.seed,
        "preprocess": PREPROCESS,
        "onnx": {"opset": OPSET, "logit_scale": float(logit_scale(model)), "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__})",
                 "onnxruntime": ort.__version__, "files": files, "classifier_uses": used,
                 "verification": checks,
                 "tolerance": "SAFETY*eps32*sqrt(reduction)*depth x max|reference| (norm-wise relative; "
                              "probabilities: half the logits' bound)"},
    }


def _preprocess(run, h: int, w: int, context_length: int, classes) -> dict:
    import open_clip
    cfg = open_clip.get_model_preprocess_cfg(run.model)
    tok = run.tokenizer
    text_cfg = (open_clip.get_model_config(run.config.model) or {}).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    return {
        "image": {"input": "pixel_values", "size": [h, w], "mean": list(cfg.get("mean", ())),
                  "std": list(cfg.get("std", ())), "interpolation": cfg.get("interpolation", "bicubic"),
                  "resize_mode": cfg.get("resize_mode", "shortest"),
                  "steps": ["convert to RGB", f"resize ({cfg.get('resize_mode', 'shortest')}, "
                            f"{cfg.get('interpolation', 'bicubic')}) and center-crop to {h}x{w}",
                            "scale to [0, 1]", "subtract mean, divide by std (per channel)", "layout [3, H, W]"]},
        "text": {"input": "input_ids", "context_length": context_length,
                 "tokenizer": hf_name or "open_clip SimpleTokenizer (CLIP BPE, lower-cased)",
                 "load_with": f"open_clip.get_tokenizer({run.config.model!r})",
                 "sot_token_id": getattr(tok, "sot_token_id", None),
                 "eot_token_id": getattr(tok, "eot_token_id", None), "pad_token_id": 0},
        "classnames": classes,
        "templates": list(run.templates),
    }


def render(manifest: dict, out, console) -> None:
    """What ``clipft export --format onnx`` prints on stdout."""
    console.print(f"exported {manifest['source_run']} to {out} as ONNX (opset {manifest['onnx']['opset']})")
    for name, size in manifest["bytes"].items():
        console.print(f"  {name:32s} {size / 2**20:9.2f} MiB")
    if manifest["merged_adapter_layers"]:
        console.print(f"  merged {manifest['merged_adapter_layers']} adapter layers into the base weights")
    if manifest["onnx"]["classifier_uses"]:
        console.print(f"  {CLASSIFIER}: {manifest['onnx']['classifier_uses']} over "
                      f"{len(manifest['classnames'])} classes")
    for part, c in manifest["onnx"]["verification"].items():
        console.print(f"  verified {part}: max |diff| {c['max_abs_diff']:.2e} (allowed {c['allowed']:.2e})")


# -- predict -------------------------------------------------------------------------------
def predict(out: Path, paths, labels=None, templates=None, top_k: int = 5, batch_size: int = 32,
            best: bool = False):
    """``clipft predict`` on an ONNX export, with onnxruntime (open_clip only for
    the image transform and the tokenizer): the records of
    :func:`clipft.commands.inference.predict`. The run's classes go through
    ``classifier.onnx``; ``labels`` (or other ``templates``) are classified
    zero-shot with ``text_encoder.onnx`` (learned class prompts do not apply to them)."""
    import open_clip

    from clipft.commands import inference
    from clipft.commands.export_check import blame, read_manifest
    from clipft.data import DEFAULT_TEMPLATES
    from clipft.models import register_tiny_configs
    if best:
        raise ClipftUsageError(f"--best picks a run's best checkpoint; {out} is an export, not a run directory")
    ort = require_onnx()
    manifest = read_manifest(out / MANIFEST)
    with blame(out / PREPROCESS, "is not the preprocess.json of an ONNX export"):
        pre = json.loads((out / PREPROCESS).read_text(encoding="utf-8"))
        img = pre["image"]
        transform = open_clip.image_transform(tuple(img["size"]), is_train=False, mean=tuple(img["mean"]),
                                              std=tuple(img["std"]), resize_mode=img["resize_mode"],
                                              interpolation=img["interpolation"])
    files = manifest.get("onnx", {}).get("files", {})

    def session(part):
        if part not in files:
            raise ClipftUsageError(f"{out}: this ONNX export has no {part} graph")
        with blame(out / files[part]["file"], "cannot be loaded by onnxruntime"):
            return _session(ort, out / files[part]["file"])

    if labels or templates:
        names = list(labels or manifest.get("classnames") or [])
        if not names:
            raise ClipftUsageError(f"{out} has no class names: pass --labels a,b,c for zero-shot prediction")
        tmpl = tuple(templates or manifest.get("templates") or DEFAULT_TEMPLATES)
        register_tiny_configs()
        tokenizer = open_clip.get_tokenizer(manifest["model"])
        text = session("text_encoder")
        tokens = tokenizer([t.format(c) for c in names for t in tmpl]).numpy().astype("int64")
        feats = torch.as_tensor(text.run(None, {"input_ids": tokens})[0]).view(len(names), len(tmpl), -1)
        weights = torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)
        image, scale = session("image_encoder"), float(manifest["onnx"]["logit_scale"])

        def logits(x):
            return scale * torch.as_tensor(image.run(None, {"pixel_values": x.numpy()})[0]) @ weights.t()
        used = "zero-shot"
    else:
        names = manifest.get("classnames")
        if not names:
            raise ClipftUsageError(f"{out} has no class names: pass --labels a,b,c or --labels-file FILE "
                                   "for zero-shot prediction")
        clf = session("classifier")

        def logits(x):
            return clf.run(["logits"], {"pixel_values": x.numpy()})[0]
        used = files["classifier"].get("uses", "classifier")
    return inference.predict_with(paths, transform, logits, used, list(names), top_k, batch_size)
