"""Training methods (how a batch becomes a loss), one class per file, found by name in
`registry.METHODS`. Importing this package imports every module in it, so a new method is one file
with one `@method("name")` class (plus, at most, a preset)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method, TrainContext, method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "TrainContext", "method"]
