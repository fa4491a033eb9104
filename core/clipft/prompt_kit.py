"""The pieces a prompt-learning strategy needs (CoOp and its descendants): the
class-prompt token rows, the learned context's initialisation, the usage
checks, and the learner that splices the context into open_clip's own text
encoder. ``prompt`` (CoOp) and ``cocoop`` are built from them; a new method
(KgCoOp, ProGrad, ...) starts from :func:`install_prompt_learner` or
:class:`ContextLearner` instead of copying them.

It imports torch: import it inside ``Strategy.apply`` (as the built-in
strategies do), so listing plugins stays cheap. Every error names the calling
strategy (the ``strategy`` argument).

A class prompt is the token sequence ``[SOT] ctx_1 .. ctx_n name . [EOT]``
(``position=end``; ``front`` puts the name first, ``middle`` splits the context
around it). The context positions hold placeholder tokens; while the prompts
are encoded, a forward hook on the text tower's ``token_embedding`` overwrites
the embeddings at exactly those positions with the learned vectors. Everything
after the embedding (positional embedding, causal transformer, ``ln_final``,
EOT pooling by argmax, ``text_projection``) is open_clip's unmodified
``encode_text``, run on the positions up to the last end-of-text token of the
prompts (:func:`clipft.encode.encode_text_trimmed`; the causal tower never lets
the padding reach the pooled token). The hook exists only for the duration of
one call; plain captions encode as before.

Deep prompts (``depth`` J > 1; IVLP, MaPLe's text side): ``deep_ctx``
``[J-1, n_ctx, W]`` holds fresh context for the text transformer's blocks
1..J-1; for the same call, a forward pre-hook on each of those blocks
overwrites the context positions of its input (the previous block's outputs
there are dropped; no positional embedding is added, as in IVLP/MaPLe).

Vision prompts (VPT, the image side of IVLP and PromptSRC):
:class:`VisionPrompts` holds learnable tokens that hooks on a vision
transformer insert after the class token, overwrite at blocks 1..J-1
(``depth`` J) and drop at the transformer's output; :func:`install_vision_prompts`
puts them on ``model.visual``. They can be bypassed
(:meth:`clipft.InsertedModule.bypass`), so the engine can compute the frozen
model's image features with them in place.
"""
from __future__ import annotations

import torch
from torch import nn

import math

from clipft.encode import encode_text_trimmed
from clipft.errors import ClipftError, ClipftUsageError
from clipft.protocols import ClassTextEncoder, InsertedModule, install
from clipft.specs import Selection

__all__ = ["POSITIONS", "RANDOM_N_CTX", "RANDOM_STD", "Tokens", "build_rows", "check_prompt_context",
           "initial_context", "token_embedding_of", "text_blocks_of", "ContextLearner", "PromptLearner",
           "install_prompt_learner", "VISION_PROMPTS_ATTR", "VisionPrompts", "install_vision_prompts"]

POSITIONS = ("end", "middle", "front")
#: CoOp's context without an init text: this many vectors from N(0, RANDOM_STD^2)
RANDOM_N_CTX = 16
RANDOM_STD = 0.02
#: class prompts are encoded in chunks of this many classes
CHUNK = 256


def token_embedding_of(model: nn.Module, strategy: str = "prompt") -> nn.Embedding:
    """The token embedding of open_clip's own text transformer (``CLIP`` keeps
    it on the model, ``CustomTextCLIP``/``CoCa`` on ``model.text``)."""
    for owner in (model, getattr(model, "text", None)):
        emb = getattr(owner, "token_embedding", None) if owner is not None else None
        if isinstance(emb, nn.Embedding):
            return emb
    text = getattr(model, "text", None)
    kind = type(text).__name__ if text is not None else type(model).__name__
    raise ClipftUsageError(
        f"strategy '{strategy}' needs open_clip's own text transformer (a token_embedding to splice "
        f"the learned context into); this model's text tower is {kind}")


def text_blocks_of(model: nn.Module, strategy: str = "prompt") -> nn.ModuleList:
    """The blocks of open_clip's own text transformer (``resblocks``, batch first),
    next to its :func:`token_embedding_of`."""
    for owner in (model, getattr(model, "text", None)):
        emb = getattr(owner, "token_embedding", None) if owner is not None else None
        transformer = getattr(owner, "transformer", None) if isinstance(emb, nn.Embedding) else None
        if transformer is not None and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList):
            if not getattr(transformer, "batch_first", True):
                break
            return transformer.resblocks
    raise ClipftUsageError(
        f"strategy '{strategy}' puts deep prompts into open_clip's own batch-first text transformer "
        "(transformer.resblocks); this model has none")


class Tokens:
    """Token-id pieces from an open_clip tokenizer: ``[SOT] ids [EOT] 0 ...``."""

    def __init__(self, tokenizer, strategy: str = "prompt"):
        self.tokenizer, self.strategy = tokenizer, strategy
        empty = tokenizer([""])[0]
        if empty.ndim != 1 or int((empty != 0).sum()) != 2:
            raise ClipftUsageError(
                f"strategy '{strategy}' needs a CLIP-style tokenizer that frames text as [SOT] ... [EOT] "
                f"with 0 padding; {type(tokenizer).__name__} does not")
        self.sot, self.eot = int(empty[0]), int(empty[1])
        self.length = int(empty.shape[0])

    def ids(self, text: str) -> list[int]:
        row = self.tokenizer([text])[0]
        n = int((row != 0).sum())
        return [int(t) for t in row[1:n - 1]]


def check_prompt_context(ctx, strategy: str) -> None:
    """Usage errors for a class-prompt learner: it needs class names, and a
    loss that reaches the prompts, through paired text (contrastive) or a head
    that encodes them live (``text``). A loss that only reads a weight head's
    logits never trains them."""
    if not ctx.classnames:
        raise ClipftUsageError(
            f"strategy '{strategy}' learns class prompts, so it needs a data source with classes "
            "(imagefolder, shapes, or captions with labels); this one has none")
    if ctx.loss is not None and "text" not in ctx.loss_needs and ctx.head in (None, "linear", "zero-shot"):
        raise ClipftUsageError(
            f"strategy '{strategy}' trains through the class prompts, but --loss {ctx.loss} "
            f"only sees the {ctx.head or 'missing'} head's own weights, so the prompts would never "
            "train; use --head text (or the contrastive loss)")


def initial_context(model, tokens: Tokens, init, n_ctx, strategy: str = "prompt",
                    n_random: int = RANDOM_N_CTX, std: float = RANDOM_STD):
    """``(vectors [n, W], placeholder token ids)``: the token embeddings of
    ``init`` (n its token count; ``n_ctx``, when given, must match), or
    ``n_ctx`` (default ``n_random``) vectors drawn from N(0, std^2) (the global
    random stream) when ``init`` is None."""
    weight = token_embedding_of(model, strategy).weight.detach()
    if init is not None:
        placeholder = tokens.ids(init)
        if not placeholder:
            raise ClipftUsageError(f"strategy '{strategy}': init {init!r} tokenizes to nothing")
        if n_ctx is not None and n_ctx != len(placeholder):
            raise ClipftUsageError(
                f"strategy '{strategy}': n_ctx={n_ctx}, but init {init!r} is {len(placeholder)} "
                f"tokens; give one of them (or init=none for {n_ctx} random vectors)")
        return weight[torch.tensor(placeholder, device=weight.device)].clone().float(), placeholder
    n = n_ctx or n_random
    vectors = torch.empty(n, weight.shape[1]).normal_(0.0, std).to(weight.device)
    return vectors, tokens.ids("X") * n


def build_rows(tokens: Tokens, classnames, n_ctx: int, position: str, placeholder: list[int]):
    """Token rows ``[C, L]`` and the context index ``[C, L]`` (-1 where a
    position is not context, else which context vector goes there)."""
    if position not in POSITIONS:
        raise ClipftUsageError(f"strategy '{tokens.strategy}': position must be one of "
                               f"{', '.join(POSITIONS)}, got {position!r}")
    period = tokens.ids(".")
    rows, index = [], []
    for name in classnames:
        name_ids = tokens.ids(name)
        if not name_ids:
            raise ClipftUsageError(f"strategy '{tokens.strategy}': class name {name!r} tokenizes to nothing")
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
                f"strategy '{tokens.strategy}': the prompt for class {name!r} needs {len(ids)} tokens with "
                f"{n_ctx} context tokens, but the text encoder takes {tokens.length}; lower n_ctx or "
                "shorten the name")
        pad = tokens.length - len(ids)
        rows.append(ids + [0] * pad)
        index.append(idx + [-1] * pad)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(index, dtype=torch.long)


class ContextLearner(ClassTextEncoder, nn.Module):
    """Base of a class-prompt learner: the learned context ``ctx`` (a
    parameter, ``[n_ctx, W]``, or ``[C, n_ctx, W]`` with one context per
    class), where the class name goes, and the token rows of the class prompts
    (built once per class list and device). ``strategy`` is the strategy that
    installed it: its errors name it, and ``clipft export`` rebuilds it from
    ``export_info``. Subclasses implement ``forward``."""

    #: the file ``clipft export`` writes the learned context to
    export_file = "prompts.safetensors"

    def __init__(self, ctx: torch.Tensor, placeholder: list[int], position: str, classnames: list[str],
                 options: dict, strategy: str = "prompt"):
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = int(ctx.shape[-2])
        self.placeholder, self.position = list(placeholder), position
        self.classnames, self.options = list(classnames), dict(options)
        self.strategy = strategy
        self._rows: dict = {}

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, position={self.position}, classes={len(self.classnames)}"

    def rows_for(self, tokenizer, classnames: tuple, device):
        """``(rows, index)`` of :func:`build_rows` for ``classnames``, on ``device``."""
        key = (tuple(classnames), str(device))
        hit = self._rows.get(key)
        if hit is None:
            rows, index = build_rows(Tokens(tokenizer, self.strategy), tuple(classnames), self.n_ctx,
                                     self.position, self.placeholder)
            hit = (rows.to(device), index.to(device))
            if len(self._rows) >= 4:
                self._rows.clear()
            self._rows[key] = hit
        return hit

    # -- clipft.InsertedModule ----------------------------------------------------
    def export_info(self) -> dict:
        """How ``clipft export`` writes this module: its own file, with what is
        needed to re-install it (by rebuilding ``strategy``) on a plain open_clip model."""
        return {"file": self.export_file, "kind": "class-prompts", "strategy": self.strategy,
                "options": self.options, "classnames": self.classnames, "n_ctx": self.n_ctx,
                "position": self.position}


class PromptLearner(ContextLearner):
    """Learned context for class prompts (CoOp). Installed on the model as its
    class-prompt encoder (``clipft.install``); called as
    ``learner(model, tokenizer, classnames, templates)`` it returns the
    unnormalised text embeddings ``[C, D]`` of the learned class prompts (the
    templates are replaced by the learned context)."""

    def __init__(self, ctx: torch.Tensor, placeholder: list[int], position: str,
                 classnames: list[str], options: dict, strategy: str = "prompt",
                 deep_ctx: torch.Tensor | None = None):
        super().__init__(ctx, placeholder, position, classnames, options, strategy)
        self.class_specific = ctx.ndim == 3
        if deep_ctx is not None:   # [J-1, n_ctx, W]: blocks 1..J-1 (module docstring)
            self.deep_ctx = nn.Parameter(deep_ctx)

    @property
    def depth(self) -> int:
        deep = getattr(self, "deep_ctx", None)
        return 1 + (0 if deep is None else int(deep.shape[0]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, class_specific={self.class_specific}, depth={self.depth}"

    def forward(self, model, tokenizer, classnames, templates=None) -> torch.Tensor:
        classnames = tuple(classnames)
        if self.class_specific and list(classnames) != self.classnames:
            raise ClipftError(
                f"these class-specific prompts (strategy '{self.strategy}') were learned for "
                f"{len(self.classnames)} classes "
                f"({', '.join(self.classnames[:5])}{', ...' if len(self.classnames) > 5 else ''}); "
                "they cannot encode other class names (train with class_specific=false for that)")
        device = self.ctx.device
        rows, index = self.rows_for(tokenizer, classnames, device)
        emb_module = token_embedding_of(model, self.strategy)
        out = []
        for start in range(0, len(classnames), CHUNK):
            sl = slice(start, start + CHUNK)
            ctx = self.ctx[sl] if self.class_specific else self.ctx
            out.append(self._encode(model, emb_module, rows[sl], index[sl], ctx, getattr(self, "deep_ctx", None)))
        return torch.cat(out)

    @staticmethod
    def _encode(model, emb_module, rows, index, ctx, deep_ctx=None):
        is_ctx = (index >= 0).unsqueeze(-1)
        safe = index.clamp(min=0)
        if ctx.ndim == 3:  # one context per class
            spliced = ctx[torch.arange(ctx.shape[0], device=ctx.device)[:, None], safe]
        else:
            spliced = ctx[safe]

        def splice(module, args, output):
            return torch.where(is_ctx, spliced.to(output.dtype), output)

        def replacer(layer_ctx):
            def replace(module, args, kwargs):
                x = args[0]      # [C, L', W], L' <= L after trimming
                n = x.shape[1]
                x = torch.where(is_ctx[:, :n], layer_ctx[safe[:, :n]].to(x.dtype), x)
                return (x, *args[1:]), kwargs
            return replace

        handles = [emb_module.register_forward_hook(splice)]
        if deep_ctx is not None:
            blocks = text_blocks_of(model)
            handles += [blocks[j + 1].register_forward_pre_hook(replacer(deep_ctx[j]), with_kwargs=True)
                        for j in range(deep_ctx.shape[0])]
        try:
            # the causal tower only as far as the longest prompt reaches: a class
            # prompt is ~10 of 77 positions, and every step runs all of them
            # forward and backward (same result up to rounding, tests/test_trim.py)
            return encode_text_trimmed(model, rows)
        finally:
            for handle in handles:
                handle.remove()

    def export_info(self) -> dict:
        return {**super().export_info(), "class_specific": self.class_specific}


def install_prompt_learner(model, ctx, strategy: str, *, init="a photo of a", n_ctx=None,
                           position: str = "end", class_specific: bool = False, options=None,
                           n_random: int = RANDOM_N_CTX, std: float = RANDOM_STD, depth: int = 1):
    """CoOp's ``apply``, for a strategy built on it: checks the run
    (:func:`check_prompt_context`), initialises the context (from ``init``, or
    ``n_ctx``/``n_random`` random vectors), installs a :class:`PromptLearner`
    as the model's class-prompt encoder, and returns ``(learner, selections)``:
    the context, in the optimizer group named ``strategy``. ``options`` (a dict)
    is what ``export_info`` records to rebuild the strategy; its ``n_ctx`` is
    set to the context's length. ``depth`` J > 1 adds deep prompts (module
    docstring), ``[J-1, n_ctx, W]`` from N(0, std^2), shared by all classes,
    in the same group."""
    check_prompt_context(ctx, strategy)
    tokens = Tokens(ctx.tokenizer, strategy)
    vectors, placeholder = initial_context(model, tokens, init, n_ctx, strategy, n_random, std)
    build_rows(tokens, ctx.classnames, len(placeholder), position, placeholder)  # fits? clear error now
    if class_specific:
        vectors = vectors.unsqueeze(0).repeat(len(ctx.classnames), 1, 1)
    deep = None
    if depth > 1:   # drawn only then: depth 1 consumes the random stream as CoOp always did
        if class_specific:
            raise ClipftUsageError(f"strategy '{strategy}': deep prompts (depth={depth}) are shared by all "
                                   "classes; give class_specific=false or depth=1")
        n_blocks = len(text_blocks_of(model, strategy))
        if depth > n_blocks:
            raise ClipftUsageError(f"strategy '{strategy}': depth={depth}, but the text transformer has "
                                   f"{n_blocks} blocks")
        deep = torch.empty(depth - 1, *vectors.shape[-2:]).normal_(0.0, std).to(vectors.device)
    options = {**(options or {}), "n_ctx": len(placeholder)}
    learner = PromptLearner(vectors, placeholder, position, list(ctx.classnames), options, strategy, deep)
    slot = install(model, learner)
    params = [(f"{slot}.ctx", learner.ctx)] + ([(f"{slot}.deep_ctx", learner.deep_ctx)] if deep is not None else [])
    return learner, [Selection(strategy, params)]


#: the attribute of ``model.visual`` that holds :class:`VisionPrompts`
VISION_PROMPTS_ATTR = "clipft_vision_prompts"


class VisionPrompts(InsertedModule, nn.Module):
    """Prompt tokens ``prompts`` ``[n, width]`` spliced into
    ``visual.transformer``'s input after its class token by a forward pre-hook
    and removed from its output by a forward hook (both on the transformer, so
    every call of it is consistent). With ``depth`` J > 1 (VPT-deep), ``deep``
    ``[J-1, n, width]`` holds fresh tokens for blocks 1..J-1: a pre-hook on each
    of those blocks overwrites the prompt positions of its input. ``std`` None
    draws them from VPT's uniform init (bound from the patch embedding's
    fan-in), else from N(0, std^2). ``strategy`` and ``export_file`` say how
    ``clipft export`` writes them and which strategy rebuilds them."""

    enters = "hook"

    def __init__(self, visual, n_tokens: int, dropout: float, options: dict, depth: int = 1,
                 strategy: str = "vision-prompt", export_file: str = "vision_prompts.safetensors",
                 std: float | None = None):
        super().__init__()
        width = visual.conv1.out_channels
        weight = visual.conv1.weight

        def draw(*shape):
            t = torch.empty(*shape, device=weight.device, dtype=torch.float32)
            if std is not None:
                return t.normal_(0.0, std)
            patch = visual.conv1.kernel_size
            bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
            return t.uniform_(-bound, bound)

        self.prompts = nn.Parameter(draw(n_tokens, width))
        if depth > 1:   # drawn only then: depth 1 consumes the random stream as VPT-shallow always did
            self.deep = nn.Parameter(draw(depth - 1, n_tokens, width))
        self.dropout = nn.Dropout(dropout)
        self.prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        self.options, self.strategy, self.export_file = dict(options), strategy, export_file
        self._bypassed = False

    @property
    def depth(self) -> int:
        deep = getattr(self, "deep", None)
        return 1 + (0 if deep is None else int(deep.shape[0]))

    def extra_repr(self) -> str:
        return f"n_tokens={self.prompts.shape[0]}, depth={self.depth}, after {self.prefix} prefix token(s)"

    def insert(self, module, args, kwargs):
        if self._bypassed:
            return None
        x = args[0]
        p = self.dropout(self.prompts).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        k = self.prefix
        return (torch.cat([x[:, :k], p, x[:, k:]], dim=1), *args[1:]), kwargs

    def replacer(self, layer: int):
        """The pre-hook of block ``layer`` (>= 1): its prompt positions get ``deep[layer-1]``."""
        def replace(module, args, kwargs):
            if self._bypassed:
                return None
            x = args[0]
            k, n = self.prefix, self.prompts.shape[0]
            p = self.dropout(self.deep[layer - 1]).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :k], p, x[:, k + n:]], dim=1), *args[1:]), kwargs
        return replace

    def remove(self, module, args, kwargs, output):
        if self._bypassed:
            return None
        k, n = self.prefix, self.prompts.shape[0]
        return torch.cat([output[:, :k], output[:, k + n:]], dim=1)

    def hook(self, visual) -> None:
        """Register the hooks on ``visual.transformer`` and its blocks 1..J-1."""
        blocks = visual.transformer.resblocks
        self.__dict__["_handles"] = [
            visual.transformer.register_forward_pre_hook(self.insert, with_kwargs=True),
            visual.transformer.register_forward_hook(self.remove, with_kwargs=True),
        ] + [blocks[j].register_forward_pre_hook(self.replacer(j), with_kwargs=True) for j in range(1, self.depth)]

    def uninstall(self) -> None:
        """Remove the hooks (before the module is detached, e.g. on export)."""
        for handle in self.__dict__.pop("_handles", []):
            handle.remove()

    def bypass(self):
        self._bypassed = True

        def back():
            self._bypassed = False
        return back

    def export_info(self) -> dict:
        return {"file": self.export_file, "kind": "vision-prompts", "strategy": self.strategy,
                "options": self.options, "n_tokens": int(self.prompts.shape[0])}


def install_vision_prompts(model, strategy: str, n_tokens: int, depth: int = 1, dropout: float = 0.0,
                           options=None, std: float | None = None,
                           export_file: str = "vision_prompts.safetensors"):
    """VPT's ``apply``: checks that the image tower is a vision transformer with
    at least ``depth`` blocks and has no prompts yet, puts :class:`VisionPrompts`
    on ``model.visual`` (as :data:`VISION_PROMPTS_ATTR`) with its hooks, and
    returns ``(prompts, [(qualified name, parameter)])``."""
    from clipft.anatomy import describe

    tower = describe(model).tower("vision")
    visual = model.visual
    if tower.kind != "vit" or not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ClipftUsageError(
            f"{strategy} inserts prompt tokens into a vision transformer, but the "
            f"{tower.label} is a {tower.kind} tower with no token sequence; use a ViT model, "
            "or --strategy prompt (text side) for this one")
    if VISION_PROMPTS_ATTR in visual._modules:
        raise ClipftUsageError(f"the vision tower already has prompt tokens; give --strategy {strategy} once, "
                               "and no other strategy that adds vision prompts")
    blocks = visual.transformer.resblocks
    if depth > len(blocks):
        raise ClipftUsageError(f"{strategy}: depth={depth}, but the vision transformer has {len(blocks)} blocks")
    prompts = VisionPrompts(visual, n_tokens, dropout, dict(options or {}), depth, strategy, export_file, std)
    visual.add_module(VISION_PROMPTS_ATTR, prompts)
    prompts.hook(visual)
    params = [(f"visual.{VISION_PROMPTS_ATTR}.prompts", prompts.prompts)]
    if depth > 1:
        params.append((f"visual.{VISION_PROMPTS_ATTR}.deep", prompts.deep))
    return prompts, params
