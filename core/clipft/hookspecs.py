"""The registration hooks a clipft plugin may implement, one per component kind.

The table in :mod:`clipft.kinds` names the hook and spec class of each kind; a
new kind adds its hookspec here. Each hook receives a ``register`` callback. Call
it once per component with a frozen spec object from :mod:`clipft.specs`. Keep
torch imports inside the spec's ``build`` factory so that listing plugins stays
fast. A plugin function marked ``@hookimpl`` whose name is none of these hooks
fails that plugin (a misspelt hook would otherwise register nothing, silently),
unless it is marked ``@hookimpl(optionalhook=True)``.
"""
import pluggy

PROJECT = "clipft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def clipft_register_strategies(register):
    """Register fine-tuning strategies: ``register(StrategySpec(...))``.

    A strategy decides what trains. Its built object has ``apply(model, ctx)``
    returning a list of :class:`clipft.specs.Selection`, or, for modifiers,
    ``modify(selections, model, ctx)`` returning rescaled selections.
    """


@hookspec
def clipft_register_losses(register):
    """Register losses: ``register(LossSpec(...))``.

    A loss maps a :class:`clipft.ForwardRecord` to a scalar tensor
    or to a dict of named terms with a ``"total"`` entry. ``LossSpec.needs`` states
    what the record must hold (``text``, ``labels``, ``head``).
    """


@hookspec
def clipft_register_heads(register):
    """Register classification heads: ``register(HeadSpec(...))``.

    ``build(options, ctx)`` returns an ``nn.Module`` mapping L2-normalised image
    embeddings ``[B, D]`` to class logits ``[B, C]``.
    """


@hookspec
def clipft_register_data_sources(register):
    """Register data sources: ``register(DataSourceSpec(...))``.

    ``build(options, ctx)`` returns a :class:`clipft.data.DataBundle` with the
    train/val datasets, class names and prompt templates.
    """


@hookspec
def clipft_register_callbacks(register):
    """Register callbacks: ``register(CallbackSpec(...))``.

    ``build(options)`` returns a :class:`clipft.callbacks.Callback`, whose
    ``on_*`` methods observe the run (steps, evaluations, checkpoints, the
    summary). ``CallbackSpec.default=True`` turns it on in every run while the
    plugin is installed; otherwise ``--callback NAME`` (or ``[[callback]]`` in
    TOML) selects it. Every callback also takes the option ``required`` (its
    failure stops the run instead of disabling it).
    """
