"""The images the representation measures run on: radiographs at the working scale and labelled surface crops.

Measures of attention and spectra need whole fields of teeth at the scale the detector works at; the linear probe
needs a small classification task made from detection labels: square crops centred on each lesion (its class) and
crops of healthy surfaces (class 0). Healthy crops are centred on the image's strongest edges (tooth contours,
contacts, embrasures: where caries would be, and where the look-alikes are) at least a crop's half-diagonal from
every lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from caries_mim.data.scale import ScaleRule
from caries_mim.errors import InvalidArgumentError

#: Edge strength is measured on the image shrunk this much (cheap, and blind to pixel noise).
_EDGE_SHRINK = 4


def to_working_scale(
    pixels: np.ndarray, spacing_mm: tuple[float, float] | None, working_spacing_mm: float
) -> tuple[np.ndarray, float]:
    """(H, W) float32 pixels in [0, 1] resampled to ``working_spacing_mm`` (the physical rule of
    :class:`~caries_mim.data.scale.ScaleRule`, with its fallback for files without a spacing) -> (image, factor)."""
    if working_spacing_mm <= 0:
        raise InvalidArgumentError(f"the working spacing must be > 0 mm/px, got {working_spacing_mm}")
    rule = ScaleRule(image_size=1, max_downscale=1.0, spacing_mm=working_spacing_mm)
    height, width = pixels.shape
    factor = rule.factor(height, width, spacing_mm)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.asarray(pixels, np.float32), size, interpolation=interpolation), factor


def crop_at(image: np.ndarray, centre_yx: tuple[float, float], size: int) -> np.ndarray:
    """The ``size`` x ``size`` window of ``image`` centred on ``centre_yx``, shifted inside the image where it can
    be and padded with 0 (black, as the detector pads) where the image is smaller."""
    height, width = image.shape
    y0 = int(np.clip(round(centre_yx[0] - size / 2), 0, max(height - size, 0)))
    x0 = int(np.clip(round(centre_yx[1] - size / 2), 0, max(width - size, 0)))
    window = image[y0 : y0 + size, x0 : x0 + size]
    out = np.zeros((size, size), np.float32)
    out[: window.shape[0], : window.shape[1]] = window
    return out


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    return crop_at(image, (image.shape[0] / 2, image.shape[1] / 2), size)


@dataclass(frozen=True)
class SurfaceCrop:
    """One probe sample: ``pixels`` (size, size) float32 in [0, 1] and ``label`` (0 healthy, c + 1 for class c)."""

    pixels: np.ndarray
    label: int


def surface_crops(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    size: int,
    healthy: int,
    rng: np.random.Generator,
) -> list[SurfaceCrop]:
    """Crops of one image at the working scale: one per lesion box (``boxes`` (N, 4) xyxy in ``image``'s pixels,
    ``labels`` (N,) class indices) and up to ``healthy`` on strong edges away from every lesion."""
    crops = [
        SurfaceCrop(crop_at(image, ((y0 + y1) / 2, (x0 + x1) / 2), size), int(label) + 1)
        for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist(), strict=True)
    ]
    if healthy < 1:
        return crops
    height, width = image.shape
    small = cv2.resize(image, (max(width // _EDGE_SHRINK, 1), max(height // _EDGE_SHRINK, 1)), cv2.INTER_AREA)
    strength = np.hypot(cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1)).ravel()
    rows, columns = np.divmod(np.arange(strength.size), small.shape[1])
    centres = np.stack([(rows + 0.5) * height / small.shape[0], (columns + 0.5) * width / small.shape[1]], axis=1)
    lesions = (
        np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], axis=1) if len(boxes) else None
    )
    allowed = np.ones(strength.size, bool)
    if lesions is not None:
        nearest = np.min(np.linalg.norm(centres[:, None, :] - lesions[None, :, :], axis=2), axis=1)
        allowed &= nearest > size / np.sqrt(2)
    weights = np.where(allowed, np.square(strength, dtype=np.float64), 0.0)
    if weights.sum() <= 0:
        return crops
    chosen = rng.choice(
        strength.size, size=min(healthy, int(np.count_nonzero(weights))), replace=False, p=weights / weights.sum()
    )
    crops += [SurfaceCrop(crop_at(image, tuple(centres[index]), size), 0) for index in chosen]
    return crops
