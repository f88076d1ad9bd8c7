"""Typed reading of params values: YAML scalars -> annotated dataclass fields, one-line errors.

Shared by the section builders (`wsjax.config.sections`, `wsjax.config.model`) and the override
parser (`wsjax.config`). Every error is a one-line ConfigError naming the file, the key, the
value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from wsjax.errors import ConfigError

# YAML 1.1 reads "1e-4" (no dot) as a string; float fields accept such strings.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# ---------------------------------------------------------------- types


def suggest(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """' (did you mean <prefix><closest>?)' or ''."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def options(tp: Any) -> tuple[type, ...]:
    """The scalar types a field annotation allows (containers are handled by their builders)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for t in typing.get_args(tp) if t in (int, float, bool, str, type(None)))
    return (tp,)


def type_name(opts: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in opts)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    opts = options(tp)
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None and type(None) in opts:
        return None
    if isinstance(value, bool) and bool in opts:
        return value
    if int in opts and is_num and float(value).is_integer():
        return int(value)
    if float in opts and is_num:
        return float(value)
    if float in opts and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    if str in opts and isinstance(value, str):
        return value
    got = "null" if value is None else type(value).__name__
    raise ConfigError(f"{source}: {key}={value!r} is a {got}, expected {type_name(opts)}")


def build_section(
    cls: type, body: Mapping[str, Any], prefix: str, source: str, **given: Any
) -> Any:
    """Coerce each present field to its annotated type; `given` fields are already built."""
    hints = field_types(cls)
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if f.name in body:
            kwargs[f.name] = coerce(body[f.name], hints[f.name], f"{prefix}.{f.name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {prefix}.{f.name}")
    return cls(**kwargs)


def check_subkeys(value: Mapping[str, Any], cls: type, key: str, source: str) -> None:
    valid = field_names(cls)
    for sub in value:
        if sub not in valid:
            raise ConfigError(f"{source}: unknown key {key}.{sub}{suggest(sub, valid, key + '.')}")


# ---------------------------------------------------------------- checks


def bad(source: str, key: str, value: Any, valid: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key}={value!r} is invalid; {valid}")


def check_choice(value: Any, choices: Iterable[str], source: str, key: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        hint = suggest(str(value), choices)
        raise ConfigError(f"{source}: {key}={value!r}{hint} is invalid; use {' | '.join(choices)}")


def check_min(obj: Any, prefix: str, source: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            bad(source, f"{prefix}.{name}", value, f"must be >= {minimum}")


def check_rate(obj: Any, prefix: str, source: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            bad(source, f"{prefix}.{name}", value, "must be in [0, 1)")
