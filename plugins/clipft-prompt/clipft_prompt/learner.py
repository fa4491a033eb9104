"""The prompt learner: learned context vectors spliced into open_clip's own
text encoder.

A class prompt is the token sequence ``[SOT] ctx_1 .. ctx_n name . [EOT]``
(``position=end``; ``front`` puts the name first, ``middle`` splits the context
around it). The context positions hold placeholder tokens; while the prompts
are encoded, a forward hook on the text tower's ``token_embedding`` overwrites
the embeddings at exactly those positions with the learned vectors. Everything
after the embedding (positional embedding, causal transformer, ``ln_final``,
EOT pooling by argmax, ``text_projection``) is open_clip's unmodified
``encode_text``, so the pooling is open_clip's by construction, run on the
positions up to the last end-of-text token of the prompts
(``clipft.encode.encode_text_trimmed``; the causal tower never lets the padding
reach the pooled token). The hook exists only for the duration of one call;
plain captions encode as before.
"""
from __future__ import annotations

import torch
from torch import nn

from clipft import ClassTextEncoder
from clipft.encode import encode_text_trimmed
from clipft.errors import ClipftError, ClipftUsageError

POSITIONS = ("end", "middle", "front")
PROMPT_FILE = "prompts.safetensors"
#: class prompts are encoded in chunks of this many classes
CHUNK = 256


def token_embedding_of(model: nn.Module) -> nn.Embedding:
    """The token embedding of open_clip's own text transformer (``CLIP`` keeps
    it on the model, ``CustomTextCLIP``/``CoCa`` on ``model.text``)."""
    for owner in (model, getattr(model, "text", None)):
        emb = getattr(owner, "token_embedding", None) if owner is not None else None
        if isinstance(emb, nn.Embedding):
            return emb
    text = getattr(model, "text", None)
    kind = type(text).__name__ if text is not None else type(model).__name__
    raise ClipftUsageError(
        f"prompt tuning needs open_clip's own text transformer (a token_embedding to splice "
        f"the learned context into); this model's text tower is {kind}")


class Tokens:
    """Token-id pieces from an open_clip tokenizer: ``[SOT] ids [EOT] 0 ...``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        empty = tokenizer([""])[0]
        if empty.ndim != 1 or int((empty != 0).sum()) != 2:
            raise ClipftUsageError(
                "prompt tuning needs a CLIP-style tokenizer that frames text as [SOT] ... [EOT] "
                f"with 0 padding; {type(tokenizer).__name__} does not")
        self.sot, self.eot = int(empty[0]), int(empty[1])
        self.length = int(empty.shape[0])

    def ids(self, text: str) -> list[int]:
        row = self.tokenizer([text])[0]
        n = int((row != 0).sum())
        return [int(t) for t in row[1:n - 1]]


def check_prompt_context(ctx, strategy: str) -> None:
    """Usage errors for a class-prompt learner (``prompt``, ``cocoop``): it needs
    class names, and a loss that reaches the prompts, through paired text
    (contrastive) or a head that encodes them live (``text``). A loss that only
    reads a weight head's logits never trains them."""
    if not ctx.classnames:
        raise ClipftUsageError(
            f"strategy '{strategy}' learns class prompts, so it needs a data source with classes "
            "(imagefolder, shapes, or captions with labels); this one has none")
    if ctx.loss is not None and "text" not in ctx.loss_needs and ctx.head in (None, "linear", "zero-shot"):
        raise ClipftUsageError(
            f"strategy '{strategy}' trains through the class prompts, but --loss {ctx.loss} "
            f"only sees the {ctx.head or 'missing'} head's own weights, so the prompts would never "
            "train; use --head text (or the contrastive loss)")


def initial_context(model, tokens: Tokens, init, n_ctx, what: str = "prompt", n_random: int = 16,
                    std: float = 0.02):
    """``(vectors [n, W], placeholder token ids)``: the token embeddings of
    ``init`` (n its token count; ``n_ctx``, when given, must match), or
    ``n_ctx`` (default ``n_random``) vectors drawn from N(0, std^2) when
    ``init`` is None. Shared by the ``prompt`` and ``cocoop`` strategies."""
    weight = token_embedding_of(model).weight.detach()
    if init is not None:
        placeholder = tokens.ids(init)
        if not placeholder:
            raise ClipftUsageError(f"{what} init {init!r} tokenizes to nothing")
        if n_ctx is not None and n_ctx != len(placeholder):
            raise ClipftUsageError(
                f"{what}: n_ctx={n_ctx}, but init {init!r} is {len(placeholder)} "
                f"tokens; give one of them (or init=none for {n_ctx} random vectors)")
        return weight[torch.tensor(placeholder, device=weight.device)].clone().float(), placeholder
    n = n_ctx or n_random
    vectors = torch.empty(n, weight.shape[1]).normal_(0.0, std).to(weight.device)
    return vectors, tokens.ids("X") * n


def build_rows(tokens: Tokens, classnames, n_ctx: int, position: str, placeholder: list[int]):
    """Token rows ``[C, L]`` and the context index ``[C, L]`` (-1 where a
    position is not context, else which context vector goes there)."""
    period = tokens.ids(".")
    rows, index = [], []
    for name in classnames:
        name_ids = tokens.ids(name)
        if not name_ids:
            raise ClipftUsageError(f"class name {name!r} tokenizes to nothing")
        half = n_ctx // 2 if position == "middle" else (n_ctx if position == "end" else 0)
        parts = [
            (placeholder[:half], list(range(half))),
            (name_ids, [-1] * len(name_ids)),
            (placeholder[half:], list(range(half, n_ctx))),
            (period, [-1] * len(period)),
        ]
        if position == "front":
            parts = [parts[1], parts[2], parts[0], parts[3]]
        ids = [tokens.sot] + [t for p, _ in parts for t in p] + [tokens.eot]
        idx = [-1] + [i for _, ix in parts for i in ix] + [-1]
        if len(ids) > tokens.length:
            raise ClipftUsageError(
                f"the prompt for class {name!r} needs {len(ids)} tokens with {n_ctx} context "
                f"tokens, but the text encoder takes {tokens.length}; lower n_ctx or shorten the name")
        pad = tokens.length - len(ids)
        rows.append(ids + [0] * pad)
        index.append(idx + [-1] * pad)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(index, dtype=torch.long)


class PromptLearner(ClassTextEncoder, nn.Module):
    """Learned context for class prompts (CoOp). Installed on the model as its
    class-prompt encoder (``clipft.install``); called as
    ``learner(model, tokenizer, classnames, templates)`` it returns the
    unnormalised text embeddings ``[C, D]`` of the learned class prompts (the
    templates are replaced by the learned context)."""

    def __init__(self, ctx: torch.Tensor, placeholder: list[int], position: str,
                 classnames: list[str], options: dict):
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        self.class_specific = ctx.ndim == 3
        self.n_ctx = int(ctx.shape[-2])
        self.placeholder = list(placeholder)
        self.position = position
        self.classnames = list(classnames)
        self.options = dict(options)
        self._rows: dict = {}

    def extra_repr(self) -> str:
        return (f"n_ctx={self.n_ctx}, position={self.position}, "
                f"class_specific={self.class_specific}, classes={len(self.classnames)}")

    def _rows_for(self, tokenizer, classnames: tuple, device):
        key = (classnames, str(device))
        hit = self._rows.get(key)
        if hit is None:
            rows, index = build_rows(Tokens(tokenizer), classnames, self.n_ctx, self.position,
                                     self.placeholder)
            hit = (rows.to(device), index.to(device))
            if len(self._rows) >= 4:
                self._rows.clear()
            self._rows[key] = hit
        return hit

    def forward(self, model, tokenizer, classnames, templates=None) -> torch.Tensor:
        classnames = tuple(classnames)
        if self.class_specific and list(classnames) != self.classnames:
            raise ClipftError(
                f"these class-specific prompts were learned for {len(self.classnames)} classes "
                f"({', '.join(self.classnames[:5])}{', ...' if len(self.classnames) > 5 else ''}); "
                "they cannot encode other class names (train with class_specific=false for that)")
        device = self.ctx.device
        rows, index = self._rows_for(tokenizer, classnames, device)
        emb_module = token_embedding_of(model)
        out = []
        for start in range(0, len(classnames), CHUNK):
            sl = slice(start, start + CHUNK)
            ctx = self.ctx[sl] if self.class_specific else self.ctx
            out.append(self._encode(model, emb_module, rows[sl], index[sl], ctx))
        return torch.cat(out)

    @staticmethod
    def _encode(model, emb_module, rows, index, ctx):
        is_ctx = (index >= 0).unsqueeze(-1)
        safe = index.clamp(min=0)
        if ctx.ndim == 3:  # one context per class
            spliced = ctx[torch.arange(ctx.shape[0], device=ctx.device)[:, None], safe]
        else:
            spliced = ctx[safe]

        def splice(module, args, output):
            return torch.where(is_ctx, spliced.to(output.dtype), output)

        handle = emb_module.register_forward_hook(splice)
        try:
            # the causal tower only as far as the longest prompt reaches: a class
            # prompt is ~10 of 77 positions, and every step runs all of them
            # forward and backward (same result up to rounding, tests/test_trim.py)
            return encode_text_trimmed(model, rows)
        finally:
            handle.remove()

    # -- clipft.InsertedModule ----------------------------------------------------
    def export_info(self) -> dict:
        """How ``clipft export`` writes this module: its own file, with what is
        needed to re-install it on a plain open_clip model."""
        return {
            "file": PROMPT_FILE,
            "kind": "class-prompts",
            "strategy": "prompt",
            "options": self.options,
            "classnames": self.classnames,
            "n_ctx": self.n_ctx,
            "position": self.position,
            "class_specific": self.class_specific,
        }
