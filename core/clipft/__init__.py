"""clipft: plugin-based fine-tuning of OpenCLIP models.

The public API a plugin (or an embedding codebase) uses lives outside
``clipft.engine``: the specs and hook marker re-exported here, the protocols
(:mod:`clipft.protocols`), the build context (:mod:`clipft.context`), the
loss record (:mod:`clipft.record`), encoding helpers (:mod:`clipft.encode`),
data helpers (:mod:`clipft.data`), model anatomy (:mod:`clipft.anatomy`),
errors (:mod:`clipft.errors`) and :mod:`clipft.api`.

Importing this package is cheap: torch and the plugins load only when a command
or an API call needs them.
"""
from clipft.errors import ClipftError, ClipftUsageError
from clipft.hookspecs import hookimpl
from clipft.protocols import (
    ClassTextEncoder,
    FitsTrainFeatures,
    InsertedModule,
    Loss,
    Strategy,
    StrategyModifier,
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

__version__ = "0.1.0"

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
    "FitsTrainFeatures",
    "Loss",
    "install",
    "installed",
    "class_text_encoder",
    "ForwardRecord",
    "ClipftError",
    "ClipftUsageError",
    "__version__",
]
