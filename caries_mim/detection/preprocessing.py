"""From a radiograph of any size to detections in its own pixels: resize, predict, map back.

The scale rule (:func:`model_scale`), with S = ``config.image_size`` and K = ``config.max_downscale``:

- long side L <= S * K (every intra-oral image: bitewing and periapical sensors are at most ~2000 px, and
  2048 = 512 * 4): resized, aspect kept, so the long side is S. This is the geometry training sees
  (:func:`~caries_mim.data.transforms.detection_train_transform` letterboxes to S), so lesions appear at the scale
  the model learned.
- L > S * K (panoramic and other extra-oral images, e.g. 1500 x 3000): shrunk by exactly K, never more. A 1500 x
  3000 panoramic becomes 375 x 750 instead of 256 x 512; its teeth keep about the pixel size an intra-oral image
  of long side S * K gets, and the image, now larger than the window, goes through the sliding window.

The rule is continuous (both cases give the same scale at L = S * K). Padding is black, at the bottom and right
only, so the map back to original pixels stays a pure scale (:class:`~caries_mim.data.transforms.Letterbox`):

- an image that fits is padded to the S x S square, exactly the training letterbox. Padding only to a multiple of
  32 would be cheaper, but the encoder resamples its position embedding to the input's patch grid: a 512 x 352
  input would give its pixels other positions than the 512 x 512 letterbox they were trained in;
- a larger image is left to the detector, which pads it to a multiple of 32 and to at least one window; each
  window is an S x S square again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from caries_mim.data.transforms import Letterbox, model_scale_factor
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


def model_scale(height: int, width: int, config: DetectorConfig) -> float:
    """Factor from original to model pixels for an image of ``height`` x ``width`` (the rule in the module doc)."""
    return model_scale_factor(height, width, config.image_size, config.max_downscale)


def model_geometry(height: int, width: int, config: DetectorConfig) -> Letterbox:
    """The resize :func:`prepare_image` applies, as a :class:`Letterbox` whose ``to_original`` maps boxes back.

    ``resized`` is each side times :func:`model_scale`, rounded, at least 1 px (as albumentations'
    ``LongestMaxSize`` rounds); ``size`` is the longer resized side (there is no square padding here).
    """
    if height < 1 or width < 1:
        raise InvalidArgumentError(f"cannot detect on an empty {height} x {width} image")
    scale = model_scale(height, width, config)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    return Letterbox(size=max(resized), original=(height, width), resized=resized)


def prepare_image(pixels: np.ndarray, config: DetectorConfig) -> tuple[torch.Tensor, Letterbox]:
    """(H, W) float32 pixels in [0, 1] -> ((1, 1, h, w) float32 model input in [0, 1], geometry).

    (h, w) is (S, S) for an image that fits, else the resized size (see the module doc). Area averaging when
    shrinking (thin enamel edges stay anti-aliased), bilinear when enlarging: the interpolation of the training
    letterbox, so an image that fits gets exactly the model pixels of
    :func:`~caries_mim.data.transforms.detection_eval_transform`.
    """
    if pixels.ndim != 2:
        raise InvalidArgumentError(f"expected a single-channel (H, W) image, got shape {pixels.shape}")
    geometry = model_geometry(*pixels.shape, config)
    image = np.ascontiguousarray(pixels, dtype=np.float32)
    if geometry.resized != geometry.original:
        interpolation = cv2.INTER_AREA if geometry.scale_xy[0] < 1.0 else cv2.INTER_LINEAR
        image = cv2.resize(image, (geometry.resized[1], geometry.resized[0]), interpolation=interpolation)
    side = config.image_size
    if max(geometry.resized) <= side:
        image = np.pad(image, ((0, side - image.shape[0]), (0, side - image.shape[1])))
    return torch.from_numpy(image)[None, None], geometry


def detect(detector: CariesDetector, pixels: np.ndarray) -> Detections:
    """Detect caries on one radiograph's pixels (H, W) float32 in [0, 1], any size; boxes in its own pixels.

    Runs on the detector's device, in the detector's current mode (call ``eval()`` first).
    """
    return detect_batch(detector, [pixels])[0]


def detect_batch(detector: CariesDetector, images: Sequence[np.ndarray]) -> list[Detections]:
    """:func:`detect` for several radiographs, one :class:`Detections` per image, in order.

    Images that fit the model square (every intra-oral image) become (S, S) inputs and go through the network
    together, in one forward pass: what the service's micro-batching gains on a GPU. Larger images (sliding
    window, each its own size) are predicted one at a time. Results equal :func:`detect` per image.
    """
    prepared = [prepare_image(pixels, detector.config) for pixels in images]
    device = next(detector.parameters()).device
    side = detector.config.image_size
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
