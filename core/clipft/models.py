"""Model loading through open_clip's normal factory, plus the embedded tiny configs.

``tiny-vit`` and ``tiny-rn`` are registered with open_clip so that tests, the demo
and CI run offline on 2 CPU cores. Real names (ViT-B-32, RN50, ...) go through
``open_clip.create_model_and_transforms`` unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import attrs

from clipft.errors import ClipftError, ClipftUsageError

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
_registered = False


def register_tiny_configs() -> None:
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@attrs.define
class LoadedModel:
    model: object
    preprocess_train: object
    preprocess_val: object
    tokenizer: object
    name: str
    pretrained: str  # what was actually loaded ("none" for random init)


def resolve_pretrained(model_name: str, pretrained: str) -> str:
    if pretrained != "auto":
        return pretrained
    if model_name in TINY_MODELS or model_name.startswith(("local-dir:", "hf-hub:")):
        return "none"
    import open_clip
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else "none"


def random_init(model_name: str, pretrained: str) -> bool:
    """Whether the model starts from random weights: ``--pretrained none`` (or
    ``auto`` on a tiny config), except for local-dir:/hf-hub: models, which
    bring their own weights whatever ``--pretrained`` says."""
    return (resolve_pretrained(model_name, pretrained) in ("none", "")
            and not model_name.startswith(("local-dir:", "hf-hub:")))


def _offline_message(model_name: str, pretrained: str, exc: BaseException) -> str:
    return (
        f"could not fetch pretrained weights '{pretrained}' for model '{model_name}' "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
        "This machine looks offline. Download the checkpoint on a machine with network "
        "(open_clip stores it under ~/.cache/huggingface/hub), copy it here and pass the "
        "local file instead: --pretrained /path/to/open_clip_model.safetensors "
        f"(or a .bin/.pt state dict), e.g. `clipft run --model {model_name} "
        f"--pretrained ./{model_name}-{pretrained}.safetensors ...`. "
        "Use --pretrained none for a randomly initialised model."
    )


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_logging(level: int = logging.ERROR):
    """The root logger at ``level`` for the block: open_clip logs freely while it loads."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


@contextlib.contextmanager
def _offline_if_unreachable(enabled: bool):
    """Without network, huggingface_hub retries for about a minute before it
    falls back to its cache. Probe once; if the hub is unreachable, switch the
    hub client to offline mode so cached weights still load and missing ones
    fail at once."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    if not old and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


CHECKPOINT_EXPECTED = ("expected open_clip weights: a .safetensors file or a torch state dict "
                       "(.pt, .pth, .bin), or a pretrained tag, or 'none'")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_checkpoint_file(path: str) -> None:
    """A usage error naming ``path`` unless it looks like weights open_clip can
    read: a safetensors file whose header parses, a torch zip archive or a
    (legacy) pickle, or big_vision ``.npz``/``.npy``."""
    p = Path(path)
    if p.is_dir():
        raise ClipftUsageError(
            f"--pretrained {path} is a directory; {CHECKPOINT_EXPECTED} "
            f"(an export directory loads with --model local-dir:{path})")
    suffix = p.suffix.lower()
    if suffix in (".npz", ".npy"):
        return
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ClipftUsageError(f"cannot read --pretrained {path}: {exc.strerror or exc}") from None

    def safetensors_error():
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
            return None
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            return _first_line(exc)

    if suffix == ".safetensors":
        err = safetensors_error()
        if err is not None:
            raise ClipftUsageError(f"--pretrained {path} is not a valid safetensors file ({err}); "
                                   f"{CHECKPOINT_EXPECTED}")
        return
    import zipfile
    if zipfile.is_zipfile(p) or head[:1] == b"\x80":    # torch.save: a zip, or a pickle before torch 1.6
        return
    if len(head) == 8 and safetensors_error() is None:
        raise ClipftUsageError(
            f"--pretrained {path} is a safetensors file without the .safetensors suffix; "
            "open_clip picks the reader by suffix, so rename it")
    raise ClipftUsageError(
        f"--pretrained {path} is not a checkpoint (it starts with {head!r}); {CHECKPOINT_EXPECTED}")


#: checkpoint files open_clip reads as a state dict and loads with ``strict=True``:
#: every parameter and persistent buffer of the model comes from the file
#: (``.npz``/``.npy`` go through big_vision's converter instead, which is not strict)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _skip_random_init():
    """A torch function mode under which random fills do nothing (in-place draws
    leave their tensor as allocated, ``randn``/``rand`` return ``empty``), for a
    model whose weights a checkpoint then overwrites: ViT-B-32 would draw 151M
    numbers (about a second on one core) to throw away, and the global RNG is left
    where it was. ``mode.skipped`` keeps the unfilled tensors alive (so no later
    tensor reuses their memory) for :func:`_unfilled_buffers`."""
    import torch
    from torch.overrides import TorchFunctionMode

    init, T = torch.nn.init, torch.Tensor
    in_place = {T.uniform_, T.normal_, T.random_, T.exponential_, T.log_normal_, T.cauchy_,
                T.geometric_, init.uniform_, init.normal_, init.trunc_normal_, init.kaiming_uniform_,
                init.kaiming_normal_, init.xavier_uniform_, init.xavier_normal_, init.orthogonal_}
    fresh = {torch.randn: torch.empty, torch.rand: torch.empty,
             torch.randn_like: torch.empty_like, torch.rand_like: torch.empty_like}

    class SkipRandomInit(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.skipped: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in in_place:
                tensor = args[0] if args else kwargs["tensor"]
                self.skipped.append(tensor)
                return tensor
            if func in fresh:
                kwargs.pop("generator", None)
                out = fresh[func](*args, **kwargs)
                self.skipped.append(out)
                return out
            return func(*args, **kwargs)

    return SkipRandomInit()


def _unfilled_buffers(model, skipped: list) -> list:
    """Names of ``model``'s non-persistent buffers (which no checkpoint
    restores) that sit in the memory of a tensor a skipped random fill left
    unfilled."""
    ptrs = {t.untyped_storage().data_ptr() for t in skipped if t.device.type != "meta"}
    saved = set(model.state_dict().keys())
    return [name for name, buf in model.named_buffers()
            if name not in saved and buf.untyped_storage().data_ptr() in ptrs]


def _build_over_checkpoint(create, model_name: str, pretrained: str, device: str):
    """open_clip's ``create`` (which loads the state-dict file ``pretrained``
    strictly) without the random initialisation (:func:`_skip_random_init`): every
    parameter and persistent buffer is the file's tensor, as after a normal build.
    A model whose non-persistent buffers would hold unfilled memory is built again
    the normal way. Checked on the CPU: moving to ``device`` gives every buffer new
    memory, which could no longer be traced to the unfilled tensors."""
    mode = _skip_random_init()
    with mode:
        built = create(model_name, pretrained=pretrained, device="cpu")
    unfilled = _unfilled_buffers(built[0], mode.skipped)
    mode.skipped.clear()
    if unfilled:
        logging.getLogger(__name__).debug("random buffers %s: building %s with its initialisation",
                                          unfilled, model_name)
        return create(model_name, pretrained=pretrained, device=device)
    if str(device) != "cpu":
        built[0].to(device)
    return built


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def estimate_params(model_cfg: dict) -> int:
    """A rough parameter count of an open_clip model config (transformer blocks
    at 12·width², embeddings and patch projection), good enough to tell a config
    that cannot fit in memory before torch tries to allocate it; 0 when the
    config is of a kind this does not know (timm, Hugging Face towers)."""
    total = 0
    for tower in ("vision_cfg", "text_cfg"):
        cfg = model_cfg.get(tower)
        if not isinstance(cfg, dict):
            continue
        width = _int(cfg.get("width"))
        layers = cfg.get("layers")
        depth = sum(_int(x) for x in layers) if isinstance(layers, (list, tuple)) else _int(layers)
        total += 12 * width * width * depth
        if tower == "vision_cfg":
            patch, image = _int(cfg.get("patch_size")), cfg.get("image_size")
            image = max(image) if isinstance(image, (list, tuple)) and image else _int(image)
            if patch:
                total += 3 * patch * patch * width + (image // patch) ** 2 * width
        else:
            total += (_int(cfg.get("vocab_size")) + _int(cfg.get("context_length"))) * width
    return total


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_local_dir(model_name: str) -> None:
    """A ``local-dir:PATH`` model, checked before open_clip builds it: the
    folder and its ``open_clip_config.json`` exist and parse, the model fits in
    this machine's memory (refused before any allocation), and the weights file
    is one clipft reads (no pickles)."""
    import json

    path = Path(model_name[len("local-dir:"):]).expanduser()
    if not path.is_dir():
        raise ClipftUsageError(f"--model {model_name}: no such folder {path}")
    config_file = path / "open_clip_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError:
        raise ClipftUsageError(f"--model {model_name}: {config_file} is missing; a local-dir model is an "
                               "export folder (clipft export RUN OUT)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClipftUsageError(f"--model {model_name}: {config_file} is not valid JSON ({exc})") from None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise ClipftUsageError(f"--model {model_name}: {config_file} has no 'model_cfg' table")
    params, memory = estimate_params(model_cfg), physical_memory_bytes()
    if memory and params * 4 > memory:
        raise ClipftUsageError(
            f"--model {model_name}: its config describes about {params / 1e9:.1f} billion parameters "
            f"({params * 4 / 2**30:.0f} GiB in float32), more than this machine's "
            f"{memory / 2**30:.0f} GiB of memory; check {config_file}")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            check_checkpoint_file(str(path / name))
            return


def load_model(model_name: str, pretrained: str, device: str = "cpu") -> LoadedModel:
    register_tiny_configs()
    import open_clip

    if model_name.startswith("local-dir:"):
        check_local_dir(model_name)

    pretrained = resolve_pretrained(model_name, pretrained)
    known = open_clip.list_models()
    if not model_name.startswith(("local-dir:", "hf-hub:")) and model_name not in known:
        close = [m for m in known if model_name.lower() in m.lower()][:8]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ClipftUsageError(f"unknown model '{model_name}'.{hint} See open_clip.list_models().")
    is_file = pretrained not in ("none", "") and os.path.exists(pretrained)
    if pretrained not in ("none", "") and not is_file:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags and ("/" in pretrained or "." in pretrained):
            raise ClipftUsageError(f"pretrained checkpoint file not found: {pretrained}")
        if pretrained not in tags:
            raise ClipftUsageError(
                f"unknown pretrained tag '{pretrained}' for model '{model_name}'. "
                f"Known tags: {', '.join(tags) or '(none)'}; or pass a local checkpoint file, or 'none'.")
    if is_file:
        check_checkpoint_file(pretrained)
    try:
        # open_clip logs a warning for every random init (for "none" that is the
        # request) and an error before raising on failed downloads (we report it)
        with quiet_logging(logging.CRITICAL), _offline_if_unreachable(pretrained not in ("none", "") and not is_file):
            if (is_file and Path(pretrained).suffix.lower() in STATE_DICT_SUFFIXES
                    and not model_name.startswith(("local-dir:", "hf-hub:"))):
                # every weight comes from the file: no random init to overwrite
                model, pre_train, pre_val = _build_over_checkpoint(
                    open_clip.create_model_and_transforms, model_name, pretrained, device)
            else:
                model, pre_train, pre_val = open_clip.create_model_and_transforms(
                    model_name, pretrained=None if pretrained in ("none", "") else pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
        text = f"{type(exc).__name__} {exc}".lower()
        network = isinstance(exc, (OSError, RuntimeError, ValueError)) and any(s in text for s in (
            "download", "connection", "offline", "resolve", "hub", "timed out",
            "localentrynotfound", "network", "max retries"))
        if network and not is_file:
            raise ClipftError(_offline_message(model_name, pretrained, exc)) from None
        if is_file and isinstance(exc, RuntimeError) and "state_dict" in str(exc):
            # readable weights of another architecture: a wrong input (exit 2), told by
            # the first of torch's missing / unexpected / size-mismatch lines, cut short
            lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
            detail = "; ".join(ln if len(ln) <= 200 else ln[:200] + " ..." for ln in lines[:3])
            raise ClipftUsageError(
                f"could not load checkpoint '{pretrained}' into '{model_name}': the weights are of "
                f"another architecture ({detail or _first_line(exc)}); pass weights of '{model_name}', "
                f"or the --model they were trained as") from None
        if "weights only load failed" in text:   # a pickle of more than tensors, file or local-dir
            raise ClipftUsageError(
                f"{'--pretrained ' + pretrained if is_file else '--model ' + model_name}: the weights are a "
                "pickle of more than tensors, and clipft loads torch files with weights_only=True; "
                f"{CHECKPOINT_EXPECTED}") from None
        if is_file:
            raise ClipftUsageError(
                f"--pretrained {pretrained}: open_clip could not read it as '{model_name}' weights "
                f"({type(exc).__name__}: {_first_line(exc)}); {CHECKPOINT_EXPECTED}") from None
        raise
    return LoadedModel(model, pre_train, pre_val, tokenizer, model_name, pretrained)
