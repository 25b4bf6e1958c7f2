"""Typed pipeline configs: YAML files and ``--set key=value`` overrides checked against dataclass schemas.

A schema is a tree of dataclasses with defaults. Layers are merged in order (defaults, then a YAML file, then
overrides), and the result is validated field by field, so a mistake is reported with its dotted key and where it
came from: ``optim.lr: expected a number, got 'fast' (from --set)``. Fields typed ``dict[str, Any]`` are open
sections validated by their consumer (e.g. an objective's options).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from caries_mim.synth.config import SynthConfig
from caries_mim.typed_values import dataclass_kwargs

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


def path_override(key: str, path: str | os.PathLike) -> str:
    """A ``--set`` assignment of a path, quoted: values are parsed as YAML, where ``runs/mim #2/encoder.pt`` would
    lose its tail to a comment, ``a: b`` become a mapping and ``null`` or ``on`` stop being paths."""
    return f"{key}={json.dumps(str(path))}"


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins on leaves. A section chosen by name (``objective: {name: ...}``) that
    ``update`` names differently starts over from ``update``'s keys: the old options belong to the old name (an MAE
    decoder width means nothing to MoCo)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            renamed = "name" in value and value["name"] != merged[key].get("name")
            merged[key] = dict(value) if renamed else merge(merged[key], value)
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
    checked, unknown, problems = dataclass_kwargs(schema, values)
    if unknown:
        accepted = ", ".join(sorted(field.name for field in dataclasses.fields(schema)))
        raise InvalidConfigError(f"{prefix}{unknown[0]}: unknown key ({origin}); {section} accepts: {accepted}")
    if problems:
        key, problem = next(iter(problems.items()))
        raise InvalidConfigError(f"{prefix}{key}: {problem} ({origin})")
    hints = typing.get_type_hints(schema)
    for name, value in checked.items():
        if dataclasses.is_dataclass(hints[name]):
            checked[name] = _build(hints[name], value, f"{prefix}{name}.", origin)
    try:
        return schema(**checked)
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{section}: {exc} ({origin})") from None


def _mapping_defaults(schema: type) -> dict[str, Any]:
    """The defaults of ``schema``'s plain-mapping fields (``objective: {name: mae}``): the layers merge into them, so
    ``--set objective.mask_ratio=0.6`` on the defaults keeps the default objective's name. (Dataclass sections need
    none: :func:`build` fills what a layer leaves out.)"""
    defaults = {}
    for item in dataclasses.fields(schema):
        if item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
            if isinstance(value, dict):
                defaults[item.name] = value
    return defaults


def load_layered(
    schema: type[Schema],
    prefix: str,
    config: str | None,
    overrides: list[str] | None,
    base: dict[str, Any] | None = None,
) -> tuple[Schema, str]:
    """Defaults <- ``base`` (a resumed run's config.yaml) <- ``config`` (a file or the shipped
    ``{prefix}_{name}.yaml``) <- ``--set`` overrides, built into ``schema``; returns it with its origin (for
    messages)."""
    values: dict[str, Any] = merge(_mapping_defaults(schema), base or {})
    origin = "defaults"
    if config is not None:
        path = shipped_config(prefix, config)
        values = merge(values, read_yaml_mapping(path))
        origin = str(path)
    override_values = parse_overrides(overrides)
    if override_values:
        values = merge(values, override_values)
        origin = f"{origin} + --set"
    return build(schema, values, origin), origin


def synth_config(assignments: list[str] | None) -> SynthConfig:
    """A :class:`~caries_mim.synth.SynthConfig` from ``--set field=value`` assignments (YAML values, so ranges are
    ``[low, high]``); an unknown field or a bad value is an :class:`InvalidConfigError` naming it."""
    values = parse_overrides(assignments)
    nested = [key for key, value in values.items() if isinstance(value, dict)]
    if nested:
        raise InvalidConfigError(f"--set {nested[0]}...: generator settings are plain fields, e.g. exposure_photons")
    try:
        return SynthConfig.from_dict(values)
    except (InvalidArgumentError, TypeError, ValueError) as exc:
        raise InvalidConfigError(f"--set: {getattr(exc, 'message', exc)}") from None
