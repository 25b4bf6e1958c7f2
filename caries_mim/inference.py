"""Prediction from a model package: ``load_package(path) -> Predictor``, ``Predictor.predict(radiograph) -> Findings``.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image (x along columns). When the radiograph says its
pixel spacing, each box is also given in millimetres from the image's top-left corner: x times the column spacing,
y times the row spacing. Nothing here logs or returns patient identifiers or file names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from caries_mim.detection.detector import CariesDetector
from caries_mim.detection.preprocessing import Detections, detect_batch
from caries_mim.errors import InvalidArgumentError, InvalidCheckpointError
from caries_mim.io import Radiograph, read_radiograph
from caries_mim.io.options import ReadOptions
from caries_mim.package import ModelPackage


@dataclass(frozen=True)
class Finding:
    """One detected lesion.

    Attributes:
        label: class name (from the package's ``class_names``).
        score: detection score in [0, 1].
        box: ``(x0, y0, x1, y1)`` in pixels of the original image.
        box_mm: the same box in millimetres, or None when the pixel spacing is unknown.
        above_threshold: ``score >= threshold`` of the package's operating point.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    box_mm: tuple[float, float, float, float] | None
    above_threshold: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "box": list(self.box),
            "box_mm": list(self.box_mm) if self.box_mm is not None else None,
            "above_threshold": self.above_threshold,
        }


@dataclass(frozen=True)
class Findings:
    """All detections on one radiograph (score descending) and the operating threshold they are judged by.

    Attributes:
        findings: every detection the detector returned, above the threshold or not.
        threshold: the package's operating threshold.
        image_shape: (height, width) of the original image in pixels.
        spacing_mm: (row, column) pixel spacing, or None.
        package_version: version string of the package that produced them.
    """

    findings: tuple[Finding, ...]
    threshold: float
    image_shape: tuple[int, int]
    spacing_mm: tuple[float, float] | None
    package_version: str

    @property
    def above_threshold(self) -> tuple[Finding, ...]:
        """The findings at the operating point (score >= threshold, as :mod:`caries_mim.metrics` counts them)."""
        return tuple(finding for finding in self.findings if finding.above_threshold)

    def __len__(self) -> int:
        return len(self.findings)

    def to_dict(self, *, include_below_threshold: bool = True) -> dict[str, Any]:
        """Plain JSON types, for ``caries-mim predict`` and the REST service."""
        chosen = self.findings if include_below_threshold else self.above_threshold
        return {
            "image": {
                "rows": self.image_shape[0],
                "columns": self.image_shape[1],
                "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            },
            "threshold": self.threshold,
            "package_version": self.package_version,
            "findings": [finding.to_dict() for finding in chosen],
        }


class Predictor:
    """A packaged detector, ready to predict on single radiographs.

    Args:
        package: the model package (see :func:`caries_mim.package.read_package`).
        device: "cpu", "cuda", "cuda:N", a ``torch.device``, or None for CUDA when available, else the CPU.
        source: names the package in error messages (a path).
    Raises:
        InvalidCheckpointError: the weights do not fit the package's config.
        InvalidArgumentError: a CUDA device was asked for but none is available.
    """

    def __init__(
        self, package: ModelPackage, device: str | torch.device | None = None, *, source: str = "model package"
    ) -> None:
        self.package = package
        self.device = inference_device(device)
        detector = CariesDetector(package.config)
        try:
            detector.load_state_dict(package.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidCheckpointError(f"{source}: weights do not match the stored config ({first})") from None
        self.detector = detector.to(self.device).eval()

    @property
    def threshold(self) -> float:
        return self.package.threshold

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.package.config.class_names

    def predict(self, image: Radiograph | np.ndarray, *, spacing_mm: tuple[float, float] | None = None) -> Findings:
        """Findings on one radiograph (or its (H, W) float pixels in [0, 1]).

        Args:
            spacing_mm: (row, column) spacing for a bare pixel array; for a :class:`Radiograph` its own spacing is
                used unless this is given.
        Raises:
            InvalidArgumentError: not a single-channel image with finite values in [0, 1], or a bad spacing.
        """
        return self.predict_batch([image], spacing_mm=[spacing_mm])[0]

    def predict_batch(
        self,
        images: Sequence[Radiograph | np.ndarray],
        *,
        spacing_mm: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[Findings]:
        """:meth:`predict` for several radiographs at once (intra-oral images share one forward pass).

        Args:
            spacing_mm: one entry per image, as :meth:`predict`'s argument; None for all means none given.
        Raises:
            InvalidArgumentError: as :meth:`predict`, for the first unusable image (nothing is predicted then).
        """
        spacings = [None] * len(images) if spacing_mm is None else list(spacing_mm)
        if len(spacings) != len(images):
            raise InvalidArgumentError(f"{len(images)} images but {len(spacings)} spacings")
        checked = [_pixels_and_spacing(image, spacing) for image, spacing in zip(images, spacings, strict=True)]
        with torch.inference_mode():
            found = detect_batch(self.detector, [pixels for pixels, _ in checked], [spacing for _, spacing in checked])
        return [
            self._findings(detections, pixels.shape, spacing)
            for detections, (pixels, spacing) in zip(found, checked, strict=True)
        ]

    def _findings(self, found: Detections, shape: tuple[int, ...], spacing: tuple[float, float] | None) -> Findings:
        findings = []
        for box, score, label in zip(found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True):
            box_mm = None
            if spacing is not None:
                row, column = spacing
                box_mm = (box[0] * column, box[1] * row, box[2] * column, box[3] * row)
            findings.append(
                Finding(
                    label=self.class_names[label],
                    score=score,
                    box=tuple(box),
                    box_mm=box_mm,
                    above_threshold=score >= self.threshold,
                )
            )
        return Findings(
            findings=tuple(findings),
            threshold=self.threshold,
            image_shape=(int(shape[0]), int(shape[1])),
            spacing_mm=spacing,
            package_version=self.package.version,
        )

    def predict_file(self, path: str | os.PathLike, options: ReadOptions | None = None) -> Findings:
        """Read a radiograph (DICOM, PNG, ...) with :func:`caries_mim.io.read_radiograph` and predict on it.

        Raises:
            caries_mim.errors.CariesMimError: the reader's typed errors for an unusable file.
        """
        return self.predict(read_radiograph(path, options))


def inference_device(device: str | torch.device | None) -> torch.device:
    """The device a :class:`Predictor` runs on: ``device`` checked, or CUDA when available, else the CPU.

    Raises:
        InvalidArgumentError: an unknown device, CUDA asked for where none is available, or a GPU number past the
            visible ones (a container given one GPU sees it as cuda:0, whatever its number on the host).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"unknown device {device!r} ({exc})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} was asked for but no CUDA device is available")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) are visible "
            "(numbered from cuda:0)"
        )
    if chosen.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device must be cpu or cuda, got {device!r}")
    return chosen


def _pixels_and_spacing(
    image: Radiograph | np.ndarray, spacing_mm: tuple[float, float] | None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Checked pixels and spacing of one input: a :class:`Radiograph` brings its own spacing unless one is given."""
    if isinstance(image, Radiograph):
        pixels = image.pixels
        spacing = spacing_mm if spacing_mm is not None else image.spacing_mm
    else:
        pixels, spacing = image, spacing_mm
    return _checked_pixels(pixels), _checked_spacing(spacing)


def _checked_pixels(pixels: Any) -> np.ndarray:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.floating):
        shape = getattr(pixels, "shape", None)
        raise InvalidArgumentError(f"expected (H, W) float pixels in [0, 1], got {type(pixels).__name__} {shape}")
    if pixels.size == 0:
        raise InvalidArgumentError(f"cannot predict on an empty {pixels.shape[0]} x {pixels.shape[1]} image")
    if not np.isfinite(pixels).all() or float(pixels.min()) < 0.0 or float(pixels.max()) > 1.0:
        raise InvalidArgumentError("pixels must be finite and in [0, 1] (as caries_mim.io.read_radiograph returns)")
    return pixels


def _checked_spacing(spacing: Any) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        row, column = (float(value) for value in spacing)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"spacing_mm must be (row, column) in mm, got {spacing!r}") from None
    if not (row > 0 and column > 0 and np.isfinite(row) and np.isfinite(column)):
        raise InvalidArgumentError(f"spacing_mm must be positive, got {spacing!r}")
    return row, column


__all__ = ["Finding", "Findings", "Predictor", "inference_device"]
