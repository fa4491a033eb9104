"""clipft: plugin-based fine-tuning of OpenCLIP models.

The public API a plugin (or an embedding codebase) uses lives outside
``clipft.engine``: the specs and hook marker re-exported here, the protocols
(:mod:`clipft.protocols`), the build context (:mod:`clipft.context`), the
loss record (:mod:`clipft.record`), encoding helpers (:mod:`clipft.encode`),
data helpers (:mod:`clipft.data`), model anatomy (:mod:`clipft.anatomy`),
errors (:mod:`clipft.errors`) and :mod:`clipft.api`. :func:`load` gives a
trained model (a run or an export) for inference.

Importing this package is cheap: torch and the plugins load only when a command
or an API call needs them.
"""
from clipft.errors import ClipftError, ClipftUsageError
from clipft.hookspecs import hookimpl
from clipft.protocols import (
    AddsLossTerms,
    ClassTextEncoder,
    FitsTrainFeatures,
    InsertedModule,
    Loss,
    Strategy,
    StrategyModifier,
    UpdatesPerEpoch,
    class_text_encoder,
    install,
    installed,
)
from clipft.record import ForwardRecord
from clipft.callbacks import Callback, run_file_option
from clipft.specs import (
    CallbackSpec,
    DataSourceSpec,
    HeadSpec,
    LossSpec,
    Selection,
    StrategySpec,
)

from clipft.version import __version__


def load(path, **options):
    """A trained model, ready for inference: ``clipft.load("runs/x")`` (a run
    directory: its final weights, ``best=True`` for ``checkpoint-best/``) or
    ``clipft.load("exported")`` (an export directory). Returns a
    :class:`clipft.commands.loaded.LoadedModel` with ``encode_image``,
    ``encode_text``, ``classify``, ``classes``, ``preprocess``, ``tokenizer`` and
    ``model``. The options are :func:`clipft.api.load`'s (``best``, ``device``,
    ``plugins`` ...)."""
    # imported when called, not at import: `import clipft` stays free of torch
    # and of the layers below the front (no module below imports this package)
    from clipft.api import load as load_model
    return load_model(path, **options)

__all__ = [
    "hookimpl",
    "StrategySpec",
    "LossSpec",
    "HeadSpec",
    "DataSourceSpec",
    "Selection",
    "CallbackSpec",
    "Callback",
    "run_file_option",
    "Strategy",
    "StrategyModifier",
    "InsertedModule",
    "ClassTextEncoder",
    "AddsLossTerms",
    "FitsTrainFeatures",
    "UpdatesPerEpoch",
    "Loss",
    "install",
    "installed",
    "class_text_encoder",
    "ForwardRecord",
    "ClipftError",
    "ClipftUsageError",
    "load",
    "__version__",
]
