"""The run folder every training pipeline writes (config.yaml, checkpoint.pt, metrics.jsonl) and how a resumed
run continues it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError
from pipelines import config as configs

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"


def require_checkpoint(out: Path) -> None:
    if not (out / CHECKPOINT_NAME).is_file():
        raise InvalidArgumentError(f"--resume: {out} holds no {CHECKPOINT_NAME} to resume from")


def read_run_config(out: Path) -> dict[str, Any]:
    """The resolved config of an existing run (``RUN/config.yaml``), the base of ``--resume``."""
    path = out / CONFIG_NAME
    require_checkpoint(out)
    if not path.is_file():
        raise InvalidArgumentError(f"--resume: {out} has a checkpoint but no {CONFIG_NAME}")
    return configs.read_yaml_mapping(path)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric rows past ``last_step``: the interrupted attempt logged them after its last checkpoint, and the
    resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line)
    with atomic_path(path) as temporary:
        temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as metrics:
        metrics.write(json.dumps(row) + "\n")


def changed_keys(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The dotted ``keys`` whose values differ between two config trees."""

    def lookup(tree: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part, {}) if isinstance(tree, dict) else {}
        return tree

    return [key for key in keys if lookup(saved, key) != lookup(current, key)]
