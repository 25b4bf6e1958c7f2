"""A detector small enough for CPU tests: one 32-wide block, 16 pyramid channels, 64 px inputs and windows."""

from __future__ import annotations

from typing import Any

from caries_mim.detection import DetectorConfig
from caries_mim.models import ViTConfig

TINY_ENCODER = ViTConfig(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def tiny_config(**overrides: Any) -> DetectorConfig:
    """Score threshold 0 so an untrained detector still returns boxes; window step 32 (overlap 0.5 of 64)."""
    values: dict[str, Any] = {
        "encoder": TINY_ENCODER,
        "image_size": 64,
        "pyramid_channels": 16,
        "sliding_window_overlap": 0.5,
        "score_threshold": 0.0,
        "detections_per_image": 20,
    }
    return DetectorConfig(**{**values, **overrides})
