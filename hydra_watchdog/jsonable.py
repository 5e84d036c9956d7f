"""JSON form of our frozen dataclasses: to_jsonable and its inverse from_jsonable.

Kept apart from the policy's state so that `hydra-watchdog status` can read its file without
importing the policy or the observation types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any

# Exact types that are their own JSON form (a str or int Enum is not: it takes the other path).
_PLAIN: frozenset[type] = frozenset({str, int, float, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The field names of a dataclass, None for any other type. Kept per class: the status
    file is rebuilt every cycle, and dataclasses.fields() costs more than the walk itself."""
    if cls not in _FIELD_NAMES:
        is_dc = dataclasses.is_dataclass(cls)
        _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls)) if is_dc else None
    return _FIELD_NAMES[cls]


def to_jsonable(value: Any) -> Any:
    cls = type(value)
    if cls in _PLAIN:
        return value
    names = _field_names(cls)  # a dataclass instance; a dataclass *class* has type `type`
    if names is not None:
        return {name: to_jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    return value


def _from(tp: Any, raw: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None:
            return None
        return _from(next(a for a in typing.get_args(tp) if a is not type(None)), raw)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from(args[0], v) for v in raw)
        return tuple(_from(a, v) for a, v in zip(args, raw, strict=True))
    if origin is frozenset:
        (arg,) = typing.get_args(tp)
        return frozenset(_from(arg, v) for v in raw)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(raw)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(raw, list):  # written as a tuple by an older version (PowerHold)
            names = [f.name for f in dataclasses.fields(tp)]
            raw = dict(zip(names, raw, strict=True))
        return from_jsonable(tp, raw)
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise TypeError(f"expected a number, got {raw!r}")
        return float(raw)
    if tp in (int, str, bool):
        if not isinstance(raw, tp) or (tp is int and isinstance(raw, bool)):
            raise TypeError(f"expected {tp.__name__}, got {raw!r}")
        return raw
    raise TypeError(f"unsupported type {tp!r}")  # pragma: no cover - schema bug


T = typing.TypeVar("T")


def from_jsonable(cls: type[T], raw: Any) -> T:
    """Inverse of to_jsonable for our dataclasses; TypeError/ValueError/KeyError on bad data.
    Unknown keys are ignored (a newer minor writer), missing ones take their defaults."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected an object for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: _from(hints[f.name], raw[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in raw
    }
    return cls(**kwargs)
