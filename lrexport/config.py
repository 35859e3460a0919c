"""Typed method configs: a registry that gives every config a JSON form.

Every method (a factorization, an allocator, a schedule, a KV layout) has its own frozen
dataclass that validates itself in ``__post_init__``. ``@register_config`` records the
class under its name so that plans can store ``{"type": "WhitenSvd", ...}`` and read it
back, and so that dispatch goes through a table keyed by config type, not strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from lrexport.errors import ConfigError

T = TypeVar("T")
_CONFIGS: dict[str, type] = {}


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: make a dataclass config (de)serialisable by its class name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    _CONFIGS[cls.__name__] = cls
    return cls


def config_to_dict(cfg: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"type": type(cfg).__name__}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = config_to_dict(v)
        elif isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        d[f.name] = v
    return d


def config_from_dict(d: dict[str, Any]) -> Any:
    d = dict(d)
    name = d.pop("type", None)
    if name not in _CONFIGS:
        raise ConfigError(f"unknown config type {name!r}; known: {', '.join(sorted(_CONFIGS))}")
    cls = _CONFIGS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{name} has no field(s) {', '.join(unknown)}; its fields: {', '.join(sorted(known))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if isinstance(v, dict) and "type" in v:
            v = config_from_dict(v)
        elif isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[f.name] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from e


def check_ratio(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` lies in (0, 1) (or [0, 1) with allow_zero)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value >= 0 if allow_zero else value > 0) and value < 1
    if not ok:
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{name} must be in {rng}, got {value!r}")


class Registry:
    """Dispatch table from config type to handler, with a clear error for unknown types."""

    def __init__(self, what: str):
        self.what = what
        self._handlers: dict[type, Any] = {}

    def register(self, cfg_type: type):
        def deco(fn):
            self._handlers[cfg_type] = fn
            return fn

        return deco

    def __call__(self, cfg: Any):
        fn = self._handlers.get(type(cfg))
        if fn is None:
            known = ", ".join(t.__name__ for t in self._handlers)
            raise ConfigError(f"unknown {self.what} {type(cfg).__name__}; known: {known}")
        return fn

    def types(self) -> list[type]:
        return list(self._handlers)
