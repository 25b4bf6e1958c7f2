"""A detector small enough for CPU tests: one 32-wide block, 16 pyramid channels, 64 px inputs and windows."""

from __future__ import annotations

from typing import Any

import torch

from caries_mim.detection import CariesDetector, DetectorConfig
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


def fit(detector: CariesDetector, image: torch.Tensor, targets: list[dict], steps: int, lr: float) -> dict:
    """Train ``detector`` with AdamW on ``image`` (B, 1, H, W) and its per-image ``targets`` for ``steps`` steps,
    then return the eval-mode prediction for the first image."""
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        detector.losses(image, targets)["total"].backward()
        optimizer.step()
    return detector.eval().predict(image[:1])[0]
