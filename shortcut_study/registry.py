"""Name -> implementation tables (methods, schedules, test-time augmentations, groupings), checked by name.

A leaf module: it imports nothing of the package but `errors`. Each registry names its *home*, the
module whose import fills it; the first lookup imports the home. So `config` can check that
`train.method=groupdro` names a method without importing `methods` (which imports `config`), and
adding an entry is one decorated definition in its home module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, field: str, home: str) -> None:
        self.field, self.home = field, home  # the config field it serves; the module that fills it
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.field}: {name!r} registered twice")
            self._entries[name] = entry
            return entry

        return add

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.home)
        return self._entries

    def names(self) -> list[str]:
        return list(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._load())

    def items(self) -> list[tuple[str, T]]:
        return list(self._load().items())

    def values(self) -> list[T]:
        return list(self._load().values())

    def __getitem__(self, name: str) -> T:
        entries = self._load()
        if name not in entries:
            raise UserError(f"unknown {self.field} {name!r}: choose one of {', '.join(entries)}")
        return entries[name]

    def check(self, value: Any) -> None:
        """A one-line config error unless `value` names an entry."""
        if value not in self._load():
            raise UserError(f"bad config value {self.field}={value!r}: must be one of {', '.join(self.names())}")


METHODS: Registry[Any] = Registry("train.method", "shortcut_study.methods")
SCHEDULES: Registry[Any] = Registry("train.schedule", "shortcut_study.schedules")
TTA: Registry[Any] = Registry("train.tta", "shortcut_study.tta")
GROUPINGS: Registry[Any] = Registry("train.groups", "shortcut_study.groups")
