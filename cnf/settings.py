"""Typed per-call settings: frozen dataclasses changed by flat or dotted keys.

Every family declares its evaluation and sampling knobs as one frozen
dataclass (its ``Settings``), whose fields may themselves be frozen
dataclasses (a :class:`~cnf.solve.SolverConfig`, a
:class:`~cnf.divergence.DivergenceConfig`). Command lines and cost grids
speak in flat keys (``method=rk4``, ``steps=8``, ``tol=1e-3``); they are turned
into a typed object **once, at the edge**, by :func:`update`:

* a dotted key (``solver.rtol``) names its field directly;
* a bare key is a field of the top level, else the one nested field of that
  name (``rtol`` → ``solver.rtol``; a name found twice is an error asking for
  the dotted form);
* a settings class may declare ``ALIASES = {"tol": ("solver.rtol",
  "solver.atol"), ...}`` and a ``route(changes)`` hook for the few keys whose
  meaning depends on other keys (the score family's ``steps``);
* each dataclass validates itself in ``__post_init__``; a class may define
  ``check_update(changes)`` to reject combinations that only make sense as a
  change (``steps`` given for an adaptive solver).

:func:`describe` flattens a settings object back into the dotted keys a
result record stores, so every number names the settings that made it.

Example:
    >>> from cnf.solve import SolverConfig
    >>> update(SolverConfig(), {"tol": 1e-3}).rtol
    0.001
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from cnf.registry import suggest

__all__ = ["SettingsError", "describe", "leaf_keys", "update"]

S = TypeVar("S")

# Keys every settings class understands: ``tol`` sets both tolerances of its solver.
COMMON_ALIASES: dict[str, tuple[str, ...]] = {"tol": ("rtol", "atol")}


class SettingsError(ValueError):
    """A setting that does not exist or does not fit (one-line message)."""


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of every non-dataclass field of a (nested) dataclass instance."""
    out = []
    for name, value in _fields(obj).items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += leaf_keys(value, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _resolve_key(obj: Any, key: str) -> list[str]:
    """Dotted paths a flat or dotted ``key`` stands for in ``obj``."""
    aliases = {**COMMON_ALIASES, **getattr(type(obj), "ALIASES", {})}
    leaves = leaf_keys(obj)
    if key in leaves:
        return [key]
    if key in aliases:
        paths: list[str] = []
        for target in aliases[key]:
            paths += _resolve_key(obj, target)
        return paths
    matches = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches
    if len(matches) > 1:
        raise SettingsError(
            f"setting '{key}' is ambiguous for {type(obj).__name__}; use one of "
            f"{', '.join(matches)}"
        )
    # A nested dataclass may alias the key (e.g. a solver's ``method`` for ``name``).
    for name, value in _fields(obj).items():
        if dataclasses.is_dataclass(value):
            sub_aliases = getattr(type(value), "ALIASES", {})
            if key in sub_aliases:
                return [f"{name}.{t}" for t in sub_aliases[key]]
    valid = sorted({p.rsplit(".", 1)[-1] for p in leaves} | set(aliases))
    raise SettingsError(
        f"unknown setting '{key}' for {type(obj).__name__}; valid: {', '.join(valid)}"
        + suggest(key, valid)
    )


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    """Apply dotted ``changes`` to a nested frozen dataclass (validated bottom-up)."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    check = getattr(obj, "check_update", None)
    if check is not None:
        check(direct)
    for head, sub in nested.items():
        direct[head] = _replace(getattr(obj, head), sub)
    try:
        return dataclasses.replace(obj, **direct)
    except (TypeError, ValueError) as e:
        raise SettingsError(str(e).splitlines()[0]) from None


def update(settings: S, changes: Mapping[str, Any] | None = None, **kwargs: Any) -> S:
    """A copy of ``settings`` with flat/dotted ``changes`` applied and validated.

    Raises:
        SettingsError: an unknown or ambiguous key, or a value its field rejects.
    """
    flat = {**dict(changes or {}), **kwargs}
    if not flat:
        return settings
    route = getattr(settings, "route", None)
    if route is not None:
        flat = route(dict(flat))
    resolved: dict[str, Any] = {}
    for key, value in flat.items():
        for path in _resolve_key(settings, key):
            resolved[path] = value
    return _replace(settings, resolved)


def describe(settings: Any) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` of every setting (what a result record stores)."""
    out: dict[str, Any] = {}
    for name, value in _fields(settings).items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            short = getattr(value, "describe", None)
            inner = short() if short is not None else describe(value)
            out.update({f"{name}.{k}": v for k, v in inner.items()})
        else:
            out[name] = value
    return out
