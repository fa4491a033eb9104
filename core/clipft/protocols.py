"""The contract between clipft's engine and its plugins, in one place.

A plugin meets this contract and nothing else: the engine calls only what is
declared here (no ``hasattr`` probing, no magic attribute names), and a plugin
imports only ``clipft``'s public modules, never ``clipft.engine``.

- :class:`Strategy` is what ``StrategySpec.build(options)`` returns: a
  *selector* (``apply``) or, with ``role = "modifier"``, a modifier
  (``modify``). See ``core/clipft/engine/compose.py`` for how they compose.
- :class:`InsertedModule` is a mixin for the ``nn.Module`` objects a strategy
  inserts into the model (LoRA layers, prompt tokens, adapters). It declares how
  the module enters the forward pass, whether it folds into the base weights,
  how it is exported and uninstalled, and whether it can run on top of cached
  frozen features.
- :class:`ClassTextEncoder` is the inserted module that encodes class prompts
  (prompt tuning; a ``conditional`` one conditions them on each image, CoCoOp).
  :func:`install` puts it, or an embedding adapter, in its slot.
- :class:`FitsTrainFeatures` is a mixin for a head or an inserted module that
  is built from the training split's embeddings before training starts
  (Tip-Adapter's key-value cache).
- :class:`AddsLossTerms` is a mixin for a head that adds regularisation terms
  to the loss (CLAP's penalty towards the zero-shot prototypes).
- :class:`UpdatesPerEpoch` is a mixin for a head that updates its own state at
  the end of every training epoch (CLAP's augmented-Lagrangian multipliers).
- :class:`Loss` is an optional base for what ``LossSpec.build`` returns: a loss
  that needs the assembled model, or has trainable parameters of its own.

Errors: raise :class:`clipft.errors.ClipftUsageError` for anything the user can
fix (bad options, an incompatible model or data); the CLI turns it into a
message and exit code 2. Any other exception is a runtime failure (exit 1).

This module imports no torch, so ``import clipft`` stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from clipft.context import BuildContext
    from clipft.specs import Selection

SELECTOR, MODIFIER = "selector", "modifier"
TOWERS = ("image", "text")


class Strategy:
    """A built strategy: decides what trains.

    Subclass it and override :meth:`apply` (a selector) or set
    ``role = "modifier"`` and override :meth:`modify` (a modifier, e.g.
    ``differential-lr``). The model reaches ``apply`` fully frozen; the engine
    trains exactly the union of the returned selections.
    """

    role: ClassVar[str] = SELECTOR
    #: True: every training step's ``ForwardRecord.frozen_image_features`` holds
    #: the batch's image embeddings by the model without its inserted modules
    #: (the frozen pretrained model), for this strategy's :meth:`loss_terms`
    #: (PromptSRC's agreement with the frozen model). The image tower then runs
    #: live, and every ``layer``/``hook`` module must support
    #: :meth:`InsertedModule.bypass`.
    frozen_image_features: ClassVar[bool] = False

    def apply(self, model, ctx: "BuildContext") -> list["Selection"]:
        """Freeze/insert/replace as needed and return the parameters to train.
        May insert modules (see :class:`InsertedModule`) and replace layers."""
        raise NotImplementedError(f"{type(self).__name__} is a selector but does not implement apply()")

    def modify(self, selections: list["Selection"], model, ctx: "BuildContext") -> list["Selection"]:
        """(modifiers) Rescale or regroup ``selections``; never add parameters."""
        raise NotImplementedError(f"{type(self).__name__} is a modifier but does not implement modify()")

    def keeps_frozen(self, model, ctx: "BuildContext") -> Iterable[str]:
        """Parameter names this strategy insists stay frozen; another strategy
        selecting one of them is reported as a contradiction."""
        return ()

    def live_towers(self, model, ctx: "BuildContext") -> Iterable[str]:
        """Towers (``"image"``, ``"text"``) whose embeddings must never be served
        from the frozen-tower cache, for a change the engine's checks cannot see
        (a tower whose output depends on something outside the model, say)."""
        return ()

    def loss_terms(self, record) -> dict:
        """Regularisation terms this strategy (of the stage being trained)
        adds to the loss of every training step: ``{name: weighted scalar
        tensor}``, default ``{}``. The engine calls it after the loss, under
        the same autocast, adds
        every term to the loss's total (so gradient accumulation, gradient
        scaling and the non-finite check see them) and logs each term's value
        as ``reg.<name>`` beside the loss's own terms (``StepView.terms``,
        ``metrics.jsonl``); same-named terms of several sources add up. Weight
        them yourself (an option of yours). ``record`` is the step's
        :class:`clipft.record.ForwardRecord`: its ``class_text_features`` are the
        class prompts the forward encoded, so a term on them costs no second
        encoding. In a run on several processes, build terms from the record's
        tensors or from parameters the forward uses: DDP sees those (it may
        reject a parameter that only a term reaches).
        Evaluation never calls it."""
        return {}

    def stages(self) -> Optional[list]:
        """A *staged* strategy returns the stages of the run
        (``[clipft.specs.Stage, ...]``, e.g. ``lp-ft``: a linear probe, then
        fine-tuning); the engine then runs them in order, each with its own
        strategies, parameter groups, optimizer and cache plan, and never calls
        this strategy's ``apply``. A staged strategy is the run's only strategy.
        Default: None (an ordinary strategy)."""
        return None


class StrategyModifier(Strategy):
    """Base for modifier strategies (override :meth:`Strategy.modify`)."""

    role: ClassVar[str] = MODIFIER


#: how an inserted module takes part in the forward pass
ENTERS_LAYER = "layer"                      # it is (or replaced) a layer inside a tower
ENTERS_HOOK = "hook"                        # forward (pre-)hooks on a tower module
ENTERS_CLASS_TEXT = "class-text"            # the class-prompt encoder (see ClassTextEncoder)
ENTERS_IMAGE_EMBEDDING = "image-embedding"  # maps the image tower's output embedding
ENTERS_TEXT_EMBEDDING = "text-embedding"    # maps the text tower's output embedding
ENTERS_NONE = "none"                        # takes no part in the forward pass (state beside the model)
ENTERS = (ENTERS_LAYER, ENTERS_HOOK, ENTERS_CLASS_TEXT, ENTERS_IMAGE_EMBEDDING, ENTERS_TEXT_EMBEDDING,
          ENTERS_NONE)

#: the model attribute each installed slot lives under (so it is a submodule:
#: saved, checkpointed and moved with the model)
SLOTS = {
    ENTERS_CLASS_TEXT: "clipft_class_text",
    ENTERS_IMAGE_EMBEDDING: "clipft_image_adapter",
    ENTERS_TEXT_EMBEDDING: "clipft_text_adapter",
}


class InsertedModule:
    """Mixin for an ``nn.Module`` that a strategy inserts into the model.

    ``class MyAdapter(InsertedModule, nn.Module)``; set the class attributes and
    override what applies:

    - ``enters``: how it takes part in the forward pass (one of :data:`ENTERS`).
      ``layer`` and ``hook`` modules are placed by the strategy itself; the
      others go in their slot with :func:`install`, and the engine calls them:
      an ``image-embedding`` module maps ``encode_image``'s output ``[B, D]`` to
      a new ``[B, D]`` (before normalisation), likewise ``text-embedding``.
    - ``folds_into_base``: True when :meth:`fold_into_base` can merge the module
      into the base weights, leaving a plain open_clip model (LoRA).
    - :meth:`export_info`: for a module that does not fold, how ``clipft
      export`` writes it to a file of its own (``load_export`` re-installs it by
      rebuilding its strategy; plain open_clip drops it, and export says so).
    - :meth:`uninstall`: remove hooks before the module is detached.
    - ``runs_on_cached_features``: True (for the embedding slots) means the
      module only reads the tower's output, so the frozen tower can be served
      from the cache and the module runs live on the cached embedding.
    - :meth:`after_optimizer_step`: called by the engine after every optimizer
      step (a module that keeps state about training: ``ema``'s averages).
    - :meth:`use_eval_weights`: put the weights evaluation should use into the
      model (``ema``: the averages); the engine evaluates between it and the
      function it returns, and ``load_run`` (eval, predict, export) calls it
      and keeps them.
    - :meth:`loss_terms`: regularisation terms added to every training step's
      loss (as :meth:`Strategy.loss_terms`).
    - :meth:`after_epoch`: called at the end of every training epoch (state
      kept per epoch: PromptSRC's Gaussian prompt aggregation).
    - :meth:`bypass`: take no part in the forward pass for a while (how the
      engine computes the frozen model's features without a second model).
    """

    enters: ClassVar[str] = ENTERS_HOOK
    folds_into_base: ClassVar[bool] = False

    @property
    def runs_on_cached_features(self) -> bool:
        return self.enters in (ENTERS_IMAGE_EMBEDDING, ENTERS_TEXT_EMBEDDING)

    def fold_into_base(self) -> None:
        """Merge into the base weights and leave a plain open_clip module behind."""
        raise NotImplementedError(f"{type(self).__name__} does not fold into the base weights")

    def export_info(self) -> Optional[dict]:
        """``{"file": NAME.safetensors, "strategy": NAME, "options": {...}, ...}``
        for a module exported to its own file; None for one that folds."""
        return None

    def uninstall(self) -> None:
        """Undo side effects (hooks) of the installation."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step of training, ``step`` being the
        number of optimizer steps so far (1 after the first). Runs before the
        step's callbacks, so a checkpoint written for that step includes what it
        did. Default: nothing."""

    def after_epoch(self, epoch: int, epochs: int) -> None:
        """Called at the end of every training epoch, ``epoch`` 1-based out of
        the run's ``epochs`` (``--epochs``, every stage counted), after its last
        optimizer step and before its evaluation and checkpoint, so both see
        what it did. Not called for an epoch a run stops inside. Default:
        nothing."""

    def bypass(self) -> Optional[Callable[[], None]]:
        """Make the module take no part in the forward pass (the tower computes
        what it computed before the module was inserted) and return a function
        that brings it back; None (the default): it cannot. The engine calls it,
        under no gradient, for :attr:`Strategy.frozen_image_features`; a
        ``layer`` or ``hook`` module without it makes such a run a usage error.
        Slot modules need nothing (the frozen features skip the image-embedding
        adapter)."""
        return None

    def loss_terms(self, record) -> dict:
        """Regularisation terms this module adds to the loss of every training
        step, ``{name: weighted scalar tensor}`` (default ``{}``), exactly as
        :meth:`Strategy.loss_terms`; every inserted module of the model is
        asked, whichever stage inserted it."""
        return {}

    def use_eval_weights(self) -> Optional[Callable[[], None]]:
        """Swap the weights evaluation should use into the model and return a
        function that swaps the training weights back; None (the default) when
        there is nothing to swap. The engine calls it around every evaluation
        of a run; ``load_run`` calls it once and never swaps back, so ``clipft
        eval``, ``predict`` and ``export`` see the evaluated weights."""
        return None


class ClassTextEncoder(InsertedModule):
    """Encodes class prompts in place of CLIP's fixed templates (prompt tuning).

    Installed with :func:`install`; from then on zero-shot evaluation, the
    ``zero-shot`` and ``text`` heads, and the paired text of labelled training
    images use it. Called as ``encoder(model, tokenizer, classnames,
    templates)`` (its ``forward``) and returns unnormalised class embeddings
    ``[C, D]``. A class-text side with a trainable encoder is never cached;
    one whose parameters are all frozen is.

    ``conditional = True`` declares prompts that depend on the image being
    classified (CoCoOp). Wherever images are classified, the engine then calls
    ``encoder(model, tokenizer, classnames, templates, image_features=F)`` with
    the images' L2-normalised embeddings ``F`` ``[B, D]`` and expects
    ``[B, C, D]`` (class ``c``'s prompt for image ``b``); called without
    ``image_features`` (the ``zero-shot`` head's initialisation) it returns its
    unconditioned prompts ``[C, D]``. Conditional class embeddings are never
    cached. :func:`clipft.encode.class_scores` is the one call that serves both.
    """

    enters: ClassVar[str] = ENTERS_CLASS_TEXT
    conditional: ClassVar[bool] = False


class FitsTrainFeatures:
    """Mixin for a head, or an :class:`InsertedModule`, that is built from the
    training split's embeddings before training starts (Tip-Adapter's cache of
    training features and labels).

    At the start of a fresh run (not on ``--resume``, and not when a model is
    rebuilt from a run directory or an export, where the fitted tensors come
    back from the checkpoint), after the strategies and the head are built and
    before the optimizer exists, the engine makes one pass over the training
    split, encoding each image once through the frozen-tower cache when it
    applies (the pass fills the cache that the epochs then replay), and calls
    :meth:`fit_train_features` once under ``torch.no_grad()``.

    A fitted tensor whose shape depends on the data (``[N, D]`` keys) must keep
    its ``nn.Parameter`` object (assign ``param.data``), and the module must
    accept that shape when a checkpoint is loaded into a freshly built one
    (resize in ``_load_from_state_dict``), because it is rebuilt from its
    options alone.
    """

    def fit_train_features(self, data) -> Optional[dict]:
        """Fit to ``data`` (a :class:`clipft.context.TrainFeatures`). Returns a
        JSON-able record of what was fitted (sizes, chosen hyperparameters, and
        whether they were chosen on the val split), or None; the engine writes
        it to ``summary.json`` under ``fit.<name>`` (``head``, or the module's
        qualified name) and keeps it across a resume."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fit_train_features()")


class AddsLossTerms:
    """Mixin for a head that adds regularisation terms to the loss of every
    training step (strategies and inserted modules have :meth:`Strategy.loss_terms`
    already; a head is neither). ``class MyHead(clipft.AddsLossTerms, nn.Module)``.
    The engine asks the run's head while it trains (not in a stage that keeps
    it frozen)."""

    def loss_terms(self, record) -> dict:
        """``{name: weighted scalar tensor}`` added to the step's loss and
        logged as ``reg.<name>``, exactly as :meth:`Strategy.loss_terms`."""
        return {}


class UpdatesPerEpoch:
    """Mixin for a head that updates its own state once per training epoch, as
    the outer step of an augmented-Lagrangian scheme does (CLAP's multipliers,
    ``constraint=alm``). ``class MyHead(clipft.UpdatesPerEpoch, nn.Module)``.

    The engine calls :meth:`end_epoch` after the epoch's last optimizer step and
    before the epoch's evaluation and checkpoint, under ``torch.no_grad()``,
    while the head trains (not in a stage that keeps it frozen). Keep what it
    updates in buffers: the checkpoint then carries it, so a run stopped inside
    an epoch and resumed updates exactly once at that epoch's end, as an
    uninterrupted run does, and ``clipft.load`` and exports get the last value."""

    def end_epoch(self, epoch: int) -> None:
        """Update after training epoch ``epoch`` (1-based) of the run."""


class Loss:
    """Optional base for a built loss (what ``LossSpec.build(options)`` returns).

    A plain callable ``loss(record)`` is a loss too. Subclass this when the loss
    needs to see the assembled model, or owns trainable parameters:

    - :meth:`setup` is called once per run, after the strategies and the head
      are built and before the optimizer is, with the run's ``BuildContext``
      (``ctx.model`` is the model being trained). Create parameters here, from
      what the model has or lacks (``siglip`` adds a ``logit_bias`` only when the
      model has none).
    - A loss that is also a ``torch.nn.Module`` (``class L(clipft.Loss,
      nn.Module)``) trains its parameters that require grad: they go in the
      optimizer group ``loss`` (names ``loss.<name>``, per-tensor weight decay as
      for a selection) at the base learning rate, and its ``state_dict`` goes into
      every checkpoint (``checkpoint/loss.safetensors``), so ``--resume`` restores
      it. The engine moves it to the run's device after ``setup``. It is not part
      of the model: ``clipft export`` and ``load_run`` do not keep it.
    """

    def setup(self, ctx: "BuildContext") -> None:
        """Called with the run's ``BuildContext`` once the model is assembled."""


def install(model, module) -> str:
    """Put ``module`` in the model slot its ``enters`` names; returns the
    attribute name. One module per slot: a second is a usage error."""
    from clipft.errors import ClipftUsageError

    slot = SLOTS.get(getattr(module, "enters", None))
    if slot is None:
        raise ValueError(f"{type(module).__name__}.enters={getattr(module, 'enters', None)!r} "
                         f"has no slot; place {ENTERS_LAYER}/{ENTERS_HOOK} modules yourself")
    if getattr(model, slot, None) is not None:
        raise ClipftUsageError(
            f"another strategy already installed a {module.enters} module on the model "
            f"({type(getattr(model, slot)).__name__}); use one of them")
    model.add_module(slot, module)
    return slot


def installed(model, enters: str):
    """The module in slot ``enters`` (class-text, image-/text-embedding), or None."""
    return getattr(model, SLOTS[enters], None)


def class_text_encoder(model) -> Optional[ClassTextEncoder]:
    """The class-prompt encoder a strategy installed on ``model``, or None."""
    return installed(model, ENTERS_CLASS_TEXT)


def conditional_class_text(model) -> bool:
    """True when ``model``'s class-prompt encoder conditions the prompts on each
    image (:attr:`ClassTextEncoder.conditional`)."""
    encoder = class_text_encoder(model)
    return encoder is not None and bool(encoder.conditional)


def inserted_modules(model) -> list:
    """``[(qualified name, module)]`` of every :class:`InsertedModule` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, InsertedModule)]


def bypass_inserted(model) -> Callable[[], None]:
    """Call :meth:`InsertedModule.bypass` of every ``layer``/``hook`` module of
    ``model``; returns one function that brings all of them back (in reverse).
    A module that cannot be bypassed is a :class:`clipft.errors.ClipftUsageError`
    (the ones bypassed so far are brought back first)."""
    from clipft.errors import ClipftUsageError

    undo = []

    def restore() -> None:
        for f in reversed(undo):
            f()
    for name, module in inserted_modules(model):
        if module.enters not in (ENTERS_LAYER, ENTERS_HOOK):
            continue
        back = module.bypass()
        if back is None:
            restore()
            raise ClipftUsageError(
                f"the frozen model's image features are computed by bypassing every inserted module, but "
                f"{name} ({type(module).__name__}) cannot be bypassed; drop the strategy that inserted it")
        undo.append(back)
    return restore


def swap_in(pairs) -> Callable[[], None]:
    """For a module's :meth:`InsertedModule.use_eval_weights`: copy each
    ``(parameter, value)`` pair's value into the parameter and return the
    function that copies the live values back, bit for bit."""
    import torch

    with torch.no_grad():
        live = [param.detach().clone() for param, _ in pairs]
        for param, value in pairs:
            param.copy_(value)

    def restore() -> None:
        with torch.no_grad():
            for (param, _), value in zip(pairs, live):
                param.copy_(value)
    return restore


def use_eval_weights(model) -> Callable[[], None]:
    """Call :meth:`InsertedModule.use_eval_weights` of every inserted module of
    ``model``; returns one function that swaps all of them back (in reverse)."""
    undo = [f for f in (m.use_eval_weights() for _, m in inserted_modules(model)) if f is not None]

    def restore() -> None:
        for f in reversed(undo):
            f()
    return restore
