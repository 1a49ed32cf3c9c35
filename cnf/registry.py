"""Name → object registries: one per choice (data sets, families, flows, SDEs, samplers, ...).

Every named choice in the library and in configs is looked up in a
:class:`Registry`, so an unknown name is always the same one-line error: it
names the kind of choice, lists the valid names and suggests the nearest one::

    >>> LAYERS = Registry("layer type", {"concat": 1, "concatsquash": 2})
    >>> LAYERS["concatsquahs"]
    Traceback (most recent call last):
    ...
    cnf.registry.UnknownChoiceError: unknown layer type 'concatsquahs'; valid: concat, concatsquash (did you mean 'concatsquash'?)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownChoiceError", "suggest"]

T = TypeVar("T")


class UnknownChoiceError(ValueError, KeyError):
    """A name that is not in its registry (the message is one line)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def suggest(name: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Mapping[str, T], Generic[T]):
    """An ordered, read-mostly mapping from names to builders, classes or schemas.

    Args:
        kind: What the names are ("data set", "SDE", ...), used in errors.
        entries: Initial ``name -> value`` pairs.
    """

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, value: T | None = None) -> T | Callable[[T], T]:
        """Add ``name``; usable as ``reg.register("x", obj)`` or as a decorator ``@reg.register("x")``."""
        if value is not None:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = value
            return value

        def decorator(obj: T) -> T:
            self.register(name, obj)
            return obj

        return decorator

    def check(self, name: str, *, key: str | None = None) -> str:
        """Return ``name`` if registered, else raise :class:`UnknownChoiceError`.

        ``key`` (a config key such as ``model.sde.name``) prefixes the message.
        """
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise UnknownChoiceError(
                f"{where}unknown {self.kind} '{name}'; valid: {', '.join(sorted(self._entries))}"
                + suggest(name, self._entries)
            )
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
