"""Typed pipeline configs: YAML files and ``--set key=value`` overrides checked against dataclass schemas.

A schema is a tree of dataclasses with defaults. Layers are merged in order (defaults, then a YAML file, then
overrides), and the result is validated field by field, so a mistake is reported with its dotted key and where it
came from: ``optim.lr: expected a number, got 'fast' (from --set)``. Fields typed ``dict[str, Any]`` are open
sections validated by their consumer (e.g. an objective's options).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidConfigError

Schema = TypeVar("Schema")

#: Folder of the configs shipped with the package (``--config tiny`` finds ``pretrain_tiny.yaml`` there).
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; anything else is an :class:`InvalidConfigError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise InvalidConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def parse_overrides(assignments: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=1e-4", "data.workers=0"]`` -> nested dict; values are parsed as YAML (numbers, lists, null)."""
    nested: dict[str, Any] = {}
    for assignment in assignments or []:
        key, separator, text = assignment.partition("=")
        key = key.strip()
        if not separator or not key or any(not part for part in key.split(".")):
            raise InvalidConfigError(
                f"--set expects key=value with a dotted key such as optim.lr=1e-4, got {assignment!r}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidConfigError(f"--set {key}: {part} was already given a value")
            node = child
        node[leaf] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins on leaves."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def shipped_config(prefix: str, name_or_path: str) -> Path:
    """``name_or_path`` if it is an existing file, else the shipped ``{prefix}_{name}.yaml``; error listing both."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{prefix}_{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem.removeprefix(f"{prefix}_") for p in SHIPPED_CONFIGS.glob(f"{prefix}_*.yaml"))
    raise InvalidConfigError(f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(names)})")


def build(schema: type[Schema], values: dict[str, Any], origin: str) -> Schema:
    """Instantiate ``schema`` from ``values`` (missing fields take their defaults); errors name the dotted key."""
    return _build(schema, values, prefix="", origin=origin)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-type tree of a config (tuples become lists) for YAML, checkpoints and TensorBoard."""
    return _plain(dataclasses.asdict(config))


def write_yaml(path: str | os.PathLike, values: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _build(schema: type, values: Any, prefix: str, origin: str) -> Any:
    section = prefix.rstrip(".") or "config"
    if not isinstance(values, dict):
        raise InvalidConfigError(f"{section}: expected a mapping of keys, got {values!r} ({origin})")
    hints = typing.get_type_hints(schema)
    fields = {field.name: field for field in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidConfigError(
            f"{prefix}{unknown[0]}: unknown key ({origin}); {section} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.", origin)
        else:
            kwargs[name] = _check(hint, value, key, origin)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{section}: {exc} ({origin})") from None


def _check(hint: Any, value: Any, key: str, origin: str) -> Any:
    """Validate (and lightly coerce: int -> float, list -> tuple) one leaf against its type hint."""
    origin_type = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = [arg for arg in arguments if arg is not type(None)]
        for option in options[:-1]:
            with contextlib.suppress(InvalidConfigError):
                return _check(option, value, key, origin)
        return _check(options[-1], value, key, origin)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InvalidConfigError(f"{key}: expected true or false, got {value!r} ({origin})")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InvalidConfigError(f"{key}: expected a whole number, got {value!r} ({origin})")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InvalidConfigError(f"{key}: expected a number, got {value!r} ({origin})")
    if hint is str:
        if isinstance(value, str):
            return value
        raise InvalidConfigError(f"{key}: expected text, got {value!r} ({origin})")
    if origin_type in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InvalidConfigError(f"{key}: expected a list, got {value!r} ({origin})")
        if origin_type is tuple and arguments and arguments[-1] is not Ellipsis:
            if len(value) != len(arguments):
                raise InvalidConfigError(f"{key}: expected {len(arguments)} values, got {value!r} ({origin})")
            return tuple(_check(arg, item, key, origin) for arg, item in zip(arguments, value, strict=True))
        item_type = arguments[0] if arguments else Any
        items = [_check(item_type, item, key, origin) for item in value]
        return tuple(items) if origin_type is tuple else items
    if origin_type is dict:
        if not isinstance(value, dict):
            raise InvalidConfigError(f"{key}: expected a mapping, got {value!r} ({origin})")
        return dict(value)
    raise TypeError(f"config schema uses an unsupported type {hint!r} for {key}")
