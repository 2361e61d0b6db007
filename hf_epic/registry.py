"""A name -> entry registry with a decorator, as timm registers its models.

Attacks, defenses, model kinds and data sets each keep one :class:`Registry`; command-line choices,
error messages and documentation lists are read from it, so a new entry is one registration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["LiveChoices", "Registry"]


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Args:
        kind: What the entries are (``"attack"``, ``"defense"``, ...), for error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second registration of one name is an error.

        Args:
            name: The entry's name (what users type).
            entry: The entry.
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its entry (for tests that register their own)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """Return the entry of ``name``; an unknown name raises a ValueError listing the known ones."""
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}.")
        return self._entries[name]

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """Registered names, in registration order (only those whose entry satisfies ``where``)."""
        return tuple(n for n, e in self._entries.items() if where is None or where(e))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order."""
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


class LiveChoices:
    """A read-only view of names computed on every use: argparse ``choices`` that stay current when an
    entry is registered after the argument dataclass was defined.

    Args:
        names: Returns the current names.
        extra: Names accepted beside them (e.g. ``"none"``).
    """

    def __init__(self, names: Callable[[], Iterable[str]], extra: Iterable[str] = ()) -> None:
        self._names = names
        self._extra = tuple(extra)

    def _all(self) -> tuple[str, ...]:
        return (*self._names(), *self._extra)

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return repr(list(self._all()))
