"""The detector's encoder: from a pretrained ``encoder.pt`` or freshly initialized, with a report of every key.

Loading is strict. The encoder file carries its own architecture; if it differs from the detector config's
encoder in anything but the input size and stochastic depth (the two settings a fine-tune may change), that is an
:class:`~caries_mim.errors.InvalidCheckpointError` naming the differences, never a partial load.
"""

from __future__ import annotations

import os

import torch

from caries_mim.detection.config import DetectorConfig
from caries_mim.errors import InvalidCheckpointError
from caries_mim.models.encoder_file import (
    ENCODER_DESCRIPTION,
    OVERRIDABLE,
    encoder_from_payload,
    read_weights_file,
)
from caries_mim.models.mae_import import ImportReport
from caries_mim.models.vit import VisionTransformer


def load_detector_encoder(
    config: DetectorConfig, encoder_path: str | os.PathLike | None = None
) -> tuple[VisionTransformer, ImportReport]:
    """Build the encoder for ``config``: weights from ``encoder_path``, or a fresh MAE-style initialization.

    The encoder's reference grid is the detector's input (``config.encoder.image_size``); a pretrained position
    embedding is resampled to it, and its stochastic depth is the detector config's.

    Returns:
        (encoder, report). From a file: every encoder key is in ``report.mapped`` (loaded as stored) or
        ``report.adapted`` (``pos_embed`` when the grid changed, with how); ``missing`` and ``unexpected`` are
        empty, since anything else raises. Without a file every key is in ``report.missing`` (left at its
        initialization).
    Raises:
        InvalidCheckpointError: the file is missing, unreadable, not an encoder file, inconsistent with its own
            config, or of another architecture than ``config.encoder``.
    """
    target = config.encoder
    if encoder_path is None:
        encoder = VisionTransformer(target)
        return encoder, ImportReport(missing=list(encoder.state_dict()))
    stored = encoder_from_payload(read_weights_file(encoder_path, ENCODER_DESCRIPTION), encoder_path).encoder
    # Compared before rebuilding at the detector's grid: another patch size may not even fit its input size.
    stored_values = stored.config.to_dict()
    differences = [
        f"{key} {stored_values[key]!r} (config: {value!r})"
        for key, value in target.to_dict().items()
        if key not in OVERRIDABLE and stored_values[key] != value
    ]
    if differences:
        raise InvalidCheckpointError(
            f"{encoder_path}: the encoder's architecture differs from the detector config's: {', '.join(differences)}"
        )
    state = stored.state_dict()
    report = ImportReport(mapped=list(state))
    if stored.config.grid_size != target.grid_size:
        patch_positions = stored.position_embedding(target.grid_size)
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], patch_positions], dim=1)
        report.mapped.remove("pos_embed")
        report.adapted["pos_embed"] = f"resampled from the {stored.config.grid_size} patch grid to {target.grid_size}"
    encoder = VisionTransformer(target)
    encoder.load_state_dict(state)
    return encoder, report
