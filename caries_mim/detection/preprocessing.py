"""From a radiograph of any size to detections in its own pixels: resize, predict, map back.

The resize is the config's :class:`~caries_mim.data.scale.ScaleRule`, the one training uses:

- **physical rule** (``config.spacing_mm`` set): the image is resampled to the working spacing from its own
  spacing (or from ``assumed_long_side_mm`` when it has none). An image smaller than the window is padded to it;
  a larger one goes through the sliding window (windows of ``roi_size``, the training crop), so the cost grows
  linearly with the area.
- **letterbox rule** (``config.spacing_mm`` None), with S = ``config.image_size`` and K = ``config.max_downscale``:
  a long side L <= S * K is resized (aspect kept) to S; a larger one (panoramics) is shrunk by exactly K and goes
  through the sliding window. An image that fits is padded to the S x S square, exactly the training letterbox
  (the encoder resamples its position embedding to the input's patch grid, so a 512 x 352 input would give its
  pixels other positions than the 512 x 512 letterbox they were trained in).

Padding is black, at the bottom and right only, so the map back to original pixels stays a pure scale
(:class:`~caries_mim.data.transforms.Letterbox`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from caries_mim.data.transforms import Letterbox
from caries_mim.detection.config import DetectorConfig
from caries_mim.detection.detector import CariesDetector
from caries_mim.errors import InvalidArgumentError


@dataclass(frozen=True, eq=False)
class Detections:
    """Detections in pixels of the original image.

    Attributes:
        boxes: float32 (N, 4) ``[x0, y0, x1, y1]``, inside the image, x1 > x0 and y1 > y0.
        scores: float32 (N,) in [0, 1], descending.
        labels: int64 (N,) indices into the detector's ``class_names``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


#: (row, column) pixel spacing in mm, or None when the image has none.
Spacing = tuple[float, float] | None


def model_scale(height: int, width: int, config: DetectorConfig, spacing_mm: Spacing = None) -> float:
    """Factor from original to model pixels for an image of ``height`` x ``width`` (the rule in the module doc)."""
    return config.scale_rule.factor(height, width, spacing_mm)


def model_geometry(height: int, width: int, config: DetectorConfig, spacing_mm: Spacing = None) -> Letterbox:
    """The resize :func:`prepare_image` applies, as a :class:`Letterbox` whose ``to_original`` maps boxes back.

    ``resized`` is each side times :func:`model_scale`, rounded, at least 1 px (as albumentations'
    ``LongestMaxSize`` rounds); ``size`` is the longer resized side (padding is not part of the geometry).
    """
    if height < 1 or width < 1:
        raise InvalidArgumentError(f"cannot detect on an empty {height} x {width} image")
    resized = config.scale_rule.resized(height, width, spacing_mm)
    return Letterbox(size=max(resized), original=(height, width), resized=resized)


def prepare_image(
    pixels: np.ndarray, config: DetectorConfig, spacing_mm: Spacing = None
) -> tuple[torch.Tensor, Letterbox]:
    """(H, W) float32 pixels in [0, 1] -> ((1, 1, h, w) float32 model input in [0, 1], geometry).

    Letterbox rule: (h, w) is (S, S) for an image that fits, else the resized size. Physical rule: the resized
    size, padded to at least ``roi_size`` on each side. Area averaging when shrinking (thin enamel edges stay
    anti-aliased), bilinear when enlarging: the interpolation of the training transform, so an image gets exactly
    the model pixels :class:`~caries_mim.data.transforms.ModelScale` gives it in training.
    """
    if pixels.ndim != 2:
        raise InvalidArgumentError(f"expected a single-channel (H, W) image, got shape {pixels.shape}")
    geometry = model_geometry(*pixels.shape, config, spacing_mm)
    image = np.ascontiguousarray(pixels, dtype=np.float32)
    if geometry.resized != geometry.original:
        interpolation = cv2.INTER_AREA if geometry.scale_xy[0] < 1.0 else cv2.INTER_LINEAR
        image = cv2.resize(image, (geometry.resized[1], geometry.resized[0]), interpolation=interpolation)
    if config.scale_rule.physical:
        side = config.roi_size
        image = np.pad(image, ((0, max(side - image.shape[0], 0)), (0, max(side - image.shape[1], 0))))
    elif max(geometry.resized) <= config.image_size:
        side = config.image_size
        image = np.pad(image, ((0, side - image.shape[0]), (0, side - image.shape[1])))
    return torch.from_numpy(image)[None, None], geometry


def detect(detector: CariesDetector, pixels: np.ndarray, spacing_mm: Spacing = None) -> Detections:
    """Detect caries on one radiograph's pixels (H, W) float32 in [0, 1], any size, with its (row, column)
    spacing in mm when known; boxes in its own pixels.

    Runs on the detector's device, in the detector's current mode (call ``eval()`` first).
    """
    return detect_batch(detector, [pixels], [spacing_mm])[0]


def detect_batch(
    detector: CariesDetector, images: Sequence[np.ndarray], spacings: Sequence[Spacing] | None = None
) -> list[Detections]:
    """:func:`detect` for several radiographs, one :class:`Detections` per image, in order.

    Images whose model input is one window (every intra-oral image under the letterbox rule) go through the
    network together, in one forward pass: what the service's micro-batching gains on a GPU. Larger images
    (sliding window, each its own size) are predicted one at a time. Results equal :func:`detect` per image.

    Args:
        spacings: one (row, column) spacing in mm or None per image; None for all means none known.
    """
    spacings = [None] * len(images) if spacings is None else list(spacings)
    if len(spacings) != len(images):
        raise InvalidArgumentError(f"{len(images)} images but {len(spacings)} spacings")
    prepared = [
        prepare_image(pixels, detector.config, spacing) for pixels, spacing in zip(images, spacings, strict=True)
    ]
    device = next(detector.parameters()).device
    config = detector.config
    side = config.roi_size if config.scale_rule.physical else config.image_size
    square = [index for index, (image, _) in enumerate(prepared) if image.shape[-2:] == (side, side)]
    found: dict[int, dict[str, torch.Tensor]] = {}
    if square:
        stacked = torch.cat([prepared[index][0] for index in square]).to(device)
        found.update(zip(square, detector.predict(stacked), strict=True))
    for index, (image, _) in enumerate(prepared):
        if index not in found:
            (found[index],) = detector.predict(image.to(device))
    return [_to_original(found[index], geometry) for index, (_, geometry) in enumerate(prepared)]


def _to_original(found: dict[str, torch.Tensor], geometry: Letterbox) -> Detections:
    boxes = geometry.to_original(found["boxes"].float().cpu().numpy())
    # A detection wholly in the black padding is clipped to a line at the image border: no finding.
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Detections(
        boxes=boxes[inside],
        scores=found["scores"].float().cpu().numpy()[inside],
        labels=found["labels"].cpu().numpy().astype(np.int64)[inside],
    )
