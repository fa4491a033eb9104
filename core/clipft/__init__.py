"""clipft: plugin-based fine-tuning of OpenCLIP models.

Importing this package is cheap: torch and the plugins load only when a command
or an API call needs them.
"""
from clipft.hookspecs import hookimpl
from clipft.specs import (
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
    "__version__",
]
