"""Checking plain config values (from YAML, JSON or a dict) against dataclass field annotations.

Dataclasses do not check types, and a wrong type deep in a model surfaces as an unrelated TypeError far from the
key that caused it. Every config-like dataclass in the project (ViT configs, objective options, pipeline configs)
validates through :func:`dataclass_kwargs`, so a bad value is reported by its key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from typing import Any

from caries_mim.errors import InvalidArgumentError

#: A number in scientific notation without a dot (1e-4, 5E3), which YAML 1.1 loaders leave as text.
_SCIENTIFIC = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


class ValueTypeError(ValueError):
    """A value that does not fit its annotation; the message says what was expected, not where (callers add that)."""


def check_value(hint: Any, value: Any) -> Any:
    """Validate one value against a type hint, lightly coercing (int -> float, list -> tuple); returns the value.

    Supported hints: bool, int, float, str, Any, ``X | None`` unions, ``list[X]``, ``tuple[X, Y]``,
    ``tuple[X, ...]`` and ``dict[...]``.
    """
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = [arg for arg in arguments if arg is not type(None)]
        for option in options[:-1]:
            with contextlib.suppress(ValueTypeError):
                return check_value(option, value)
        return check_value(options[-1], value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueTypeError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueTypeError(f"expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, where 1e-4 (no dot) is a string, not a float; users write it everywhere.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        raise ValueTypeError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueTypeError(f"expected text, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueTypeError(f"expected a list, got {value!r}")
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            if len(value) != len(arguments):
                raise ValueTypeError(f"expected {len(arguments)} values, got {value!r}")
            return tuple(check_value(arg, item) for arg, item in zip(arguments, value, strict=True))
        items = [check_value(arguments[0] if arguments else Any, item) for item in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueTypeError(f"expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported annotation {hint!r}")


def dataclass_kwargs(schema: type, values: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Check ``values`` against the leaf fields of dataclass ``schema``.

    Returns:
        (checked keyword arguments, unknown keys sorted, {key: problem} for values of the wrong type). Fields that
        are themselves dataclasses are passed through unchecked, for the caller to recurse into.
    """
    hints = typing.get_type_hints(schema)
    names = {field.name for field in dataclasses.fields(schema)}
    unknown = sorted(set(values) - names)
    checked: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, value in values.items():
        if name not in names:
            continue
        if dataclasses.is_dataclass(hints[name]):
            checked[name] = value
            continue
        try:
            checked[name] = check_value(hints[name], value)
        except ValueTypeError as exc:
            problems[name] = str(exc)
    return checked, unknown, problems


def checked_kwargs(schema: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """:func:`dataclass_kwargs` for library configs rebuilt from stored dicts (``ViTConfig``, ``DetectorConfig``):
    the checked keyword arguments, or :class:`~caries_mim.errors.InvalidArgumentError` naming the first unknown key
    (with the known ones) or the first wrongly typed value, prefixed with ``what`` (e.g. "ViT config")."""
    checked, unknown, problems = dataclass_kwargs(schema, values)
    if unknown:
        known = sorted(field.name for field in dataclasses.fields(schema))
        raise InvalidArgumentError(f"unknown {what} key(s): {', '.join(unknown)} (known: {known})")
    if problems:
        key, problem = next(iter(problems.items()))
        raise InvalidArgumentError(f"{what} {key}: {problem}")
    return checked
