"""The run folder every training pipeline writes (config.yaml, checkpoint.pt, metrics.jsonl) and how a resumed
run continues it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError, InvalidCheckpointError, InvalidConfigError
from caries_mim.models.encoder_file import other_kind, read_weights_file
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


def read_resumable_checkpoint(
    path: Path,
    *,
    checkpoint_format: str,
    version: int,
    kind: str,
    config: Any,
    frozen: tuple[str, ...],
    version_advice: str = "",
    frozen_reason: str,
) -> dict[str, Any]:
    """Read a training checkpoint for ``--resume`` and refuse one this run cannot continue.

    Args:
        checkpoint_format, version: what the pipeline writes (its ``format`` and ``version`` keys).
        kind: names the pipeline in the message for a foreign file ("fine-tuning", "pretraining").
        config: the run's config now; the ``frozen`` dotted keys must equal the checkpoint's.
        version_advice: appended to the message for another version (e.g. how to start over from it).
        frozen_reason: why those keys may not change, and what to do instead.
    Raises:
        InvalidCheckpointError: not this pipeline's checkpoint, or another version.
        InvalidConfigError: a frozen key changed.
    """
    expected = f"a caries-mim {kind} checkpoint (the checkpoint.pt of a {kind} run folder)"
    payload = read_weights_file(path, expected)
    if not isinstance(payload, dict) or payload.get("format") != checkpoint_format:
        raise InvalidCheckpointError(f"{path} is not {expected}{other_kind(payload)}")
    if payload.get("version") != version:
        raise InvalidCheckpointError(
            f"{path}: checkpoint version {payload.get('version')} cannot be resumed by this version (which writes "
            f"{version}){version_advice}"
        )
    changed = changed_keys(payload["config"], configs.to_dict(config), frozen)
    if changed:
        raise InvalidConfigError(f"cannot resume with a changed {', '.join(changed)}: {frozen_reason}")
    return payload


def prepare_run_folder(out: Path, *, resume: bool, outputs: tuple[str, ...], kind: str, is_main: bool) -> None:
    """Check ``out`` for a new run or a resumed one; a new run never overwrites an earlier run's ``outputs``.

    Raises:
        InvalidArgumentError: ``--resume`` without a checkpoint, or a new run in a folder holding one of
            ``outputs``.
    """
    if resume:
        require_checkpoint(out)
        return
    for existing in outputs:
        if (out / existing).exists():
            raise InvalidArgumentError(
                f"{out} already holds a {kind} run ({existing}); pass --resume to continue it or choose another --out"
            )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_NAME).unlink(missing_ok=True)


def check_finite_loss(loss: float, step: int, lr_key: str) -> None:
    """Raise when the logged loss diverged. Checked where the value is read anyway, not per step (a per-step check
    stalls GPUs); checkpoints are written after this check, so a diverged model never replaces a good one."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} by step {step}; lower {lr_key}, set optim.clip_grad, or use train.precision=fp32 "
            "(the last checkpoint is from before)"
        )


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and a rename: a kill never leaves half a checkpoint."""
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def finish_summary(
    out: Path,
    summary: dict[str, Any],
    *,
    seconds: float,
    images: int,
    device: torch.device,
    processes: int,
    precision: str,
    is_main: bool,
) -> dict[str, Any]:
    """Add the run's speed and hardware to ``summary`` and write it as ``RUN/summary.json`` (rank 0)."""
    summary = {
        **summary,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
        "device": str(device),
        "processes": processes,
        "precision": precision,
    }
    if device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if is_main:
        with atomic_path(out / "summary.json") as temporary:
            temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
