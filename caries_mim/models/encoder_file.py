"""``encoder.pt``: a pretrained encoder's weights together with the architecture that rebuilds it.

The file is a plain dict readable with ``torch.load(weights_only=True)`` (no pickled classes, so loading an
untrusted file cannot run code)::

    {"format": "caries-mim-encoder", "version": 2, "config": ViTConfig.to_dict(),
     "state_dict": {...}, "metadata": {...}}

``metadata`` is free-form provenance (objective, steps, final loss, ...) made of plain types. Version 1 files
predate input standardization (:attr:`ViTConfig.input_mean` / ``input_std``): their encoders saw raw [0, 1]
pixels, so they load with mean 0 and std 1, the computation they were trained with.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import CariesMimError, InvalidArgumentError, InvalidCheckpointError, first_line
from caries_mim.models.config import ViTConfig
from caries_mim.models.vit import VisionTransformer

ENCODER_FORMAT = "caries-mim-encoder"
ENCODER_FORMAT_VERSION = 2
#: What an encoder file is, for messages about a file that is not one.
ENCODER_DESCRIPTION = "a caries-mim encoder file (the encoder.pt that `caries-mim pretrain` writes in its run folder)"
#: Config values a version-1 file implies for keys it does not have.
_VERSION_1_DEFAULTS = {"input_mean": 0.0, "input_std": 1.0}


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer
    metadata: dict[str, Any]


def save_encoder(encoder: VisionTransformer, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write ``encoder`` (weights on CPU + config + metadata) to ``path`` atomically."""
    state = {name: tensor.detach().cpu() for name, tensor in encoder.state_dict().items()}
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_FORMAT_VERSION,
        "config": encoder.config.to_dict(),
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def load_encoder(path: str | os.PathLike, **config_overrides: Any) -> LoadedEncoder:
    """Rebuild the encoder stored at ``path``.

    Args:
        config_overrides: architecture-neutral changes for the new use, e.g. ``drop_path_rate=0.1`` or
            ``image_size=(512, 512)`` for fine-tuning (the position embedding is then resampled on the fly).
    Raises:
        InvalidCheckpointError: missing or unreadable file, another kind of file, or weights that do not match.
    """
    return encoder_from_payload(read_weights_file(path, ENCODER_DESCRIPTION), path, **config_overrides)


def is_encoder_payload(payload: Any) -> bool:
    """Whether a loaded weights file is an ``encoder.pt`` (and not, say, an MAE checkpoint)."""
    return isinstance(payload, dict) and payload.get("format") == ENCODER_FORMAT


def encoder_from_payload(payload: Any, source: str | os.PathLike, **config_overrides: Any) -> LoadedEncoder:
    """:func:`load_encoder` for a file already read with :func:`read_weights_file`; ``source`` names it in errors."""
    if not is_encoder_payload(payload):
        raise InvalidCheckpointError(f"{source} is not {ENCODER_DESCRIPTION}{other_kind(payload)}")
    version = payload.get("version")
    if version not in (1, ENCODER_FORMAT_VERSION):
        raise InvalidCheckpointError(f"{source}: encoder file version {version} is not supported")
    try:
        config = payload["config"]
        stored = ViTConfig.from_dict({**_VERSION_1_DEFAULTS, **config} if version == 1 else config)
    except (KeyError, TypeError, CariesMimError) as exc:
        raise InvalidCheckpointError(f"{source}: unusable architecture config ({exc})") from None
    # The stored position embedding belongs to the stored grid: build at that grid, load, then apply overrides.
    encoder = VisionTransformer(stored)
    try:
        encoder.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{source}: weights do not match the stored config ({first_line(exc)})") from None
    if config_overrides:
        encoder = _with_overrides(encoder, config_overrides)
    return LoadedEncoder(encoder=encoder, metadata=dict(payload.get("metadata") or {}))


#: Config keys a stored encoder can be rebuilt with; the others decide parameter shapes or the computation.
OVERRIDABLE = ("image_size", "drop_path_rate")


def _with_overrides(encoder: VisionTransformer, overrides: dict[str, Any]) -> VisionTransformer:
    fixed = sorted(set(overrides) - set(OVERRIDABLE))
    if fixed:
        raise InvalidArgumentError(
            f"cannot override {', '.join(fixed)} of a trained encoder (only {', '.join(OVERRIDABLE)})"
        )
    config = ViTConfig.from_dict({**encoder.config.to_dict(), **overrides})
    rebuilt = VisionTransformer(config)
    state = encoder.state_dict()
    if config.grid_size != encoder.config.grid_size:
        patch_positions = encoder.position_embedding(config.grid_size)
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], patch_positions], dim=1)
    rebuilt.load_state_dict(state)
    return rebuilt


#: How the files ``torch.save`` writes begin: a zip archive (PyTorch 1.6 and later), or a pickle (the legacy
#: format, still readable by ``torch.load``, whose first byte is the pickle protocol marker).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def read_weights_file(path: str | os.PathLike, expected: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with every failure as one typed error that
    says what the file is not.

    ``weights_only`` loads tensors and plain values only: unpickling anything else can run code from the file, so
    a file that needs more is refused as what it is, never with advice to load it unsafely (torch's own message
    suggests ``weights_only=False``; it is not passed on).

    Args:
        expected: what the file should be, in words ("a caries-mim model package (...)"), for the messages.
    Raises:
        InvalidCheckpointError: missing, not a torch archive, truncated, or holding more than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidCheckpointError(f"{path}: no such file; expected {expected}")
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise InvalidCheckpointError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not head.startswith(_TORCH_FILE_STARTS):
        raise InvalidCheckpointError(f"{path} is not {expected}: it is not a file torch.save writes at all")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # an opcode torch does not know: a damaged file, not a risky one
            raise InvalidCheckpointError(f"{path} is not {expected}: its contents are damaged") from None
        raise InvalidCheckpointError(
            f"{path} is not {expected}: it holds Python objects besides weights and plain values, which caries-mim "
            "does not load because loading them could run code from the file"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors ... for a damaged archive
        raise InvalidCheckpointError(
            f"{path} is not {expected}: the archive is damaged or truncated ({first_line(exc)})"
        ) from None


def other_kind(payload: Any) -> str:
    """``" (it is a <format> file)"`` for another caries-mim file kind, else ``""``: for "is not X" messages."""
    kind = payload.get("format") if isinstance(payload, dict) else None
    return f" (it is a {kind!r} file)" if isinstance(kind, str) and kind.startswith("caries-mim") else ""
