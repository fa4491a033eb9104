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


def load_model(model_name: str, pretrained: str, device: str = "cpu") -> LoadedModel:
    register_tiny_configs()
    import open_clip

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
    try:
        # open_clip logs a warning for every random init (for "none" that is the
        # request) and an error before raising on failed downloads (we report it)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with _offline_if_unreachable(pretrained not in ("none", "") and not is_file):
                model, pre_train, pre_val = open_clip.create_model_and_transforms(
                    model_name,
                    pretrained=None if pretrained in ("none", "") else pretrained,
                    device=device,
                )
        finally:
            quiet.setLevel(level)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as exc:
        text = f"{type(exc).__name__} {exc}".lower()
        network = any(s in text for s in (
            "download", "connection", "offline", "resolve", "hub", "timed out",
            "localentrynotfound", "network", "max retries"))
        if network:
            raise ClipftError(_offline_message(model_name, pretrained, exc)) from None
        if is_file:
            raise ClipftError(
                f"could not load checkpoint '{pretrained}' into '{model_name}': "
                f"{str(exc).splitlines()[0][:400]}") from None
        raise
    return LoadedModel(model, pre_train, pre_val, tokenizer, model_name, pretrained)
