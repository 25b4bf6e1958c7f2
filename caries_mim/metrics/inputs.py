"""What every metric consumes: one :class:`EvaluatedImage` (ground truth plus predictions) per image.

Predictions and ground truth live in one object because every metric, and the bootstrap that resamples images,
needs both sides of the same image together. Validation happens once, at construction, so the metric functions
can trust shapes and value ranges; only the class count is checked later (:func:`check_labels`), because an image
does not know how many classes the model has.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from caries_mim.errors import InvalidArgumentError


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _boxes(value: Any, what: str, image: str) -> np.ndarray:
    boxes = _as_numpy(value)
    if boxes.size == 0:
        # An empty list or tensor arrives as shape (0,); it means "no boxes", whatever its shape.
        return np.zeros((0, 4), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidArgumentError(f"{image}: {what} must have shape (N, 4) [x0, y0, x1, y1], got {boxes.shape}")
    if not np.issubdtype(boxes.dtype, np.number) or np.issubdtype(boxes.dtype, np.complexfloating):
        raise InvalidArgumentError(f"{image}: {what} must be real numbers, got dtype {boxes.dtype}")
    boxes = boxes.astype(np.float64)
    if not np.isfinite(boxes).all():
        raise InvalidArgumentError(f"{image}: {what} contain NaN or infinite coordinates")
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if inverted.size:
        first = inverted[0]
        raise InvalidArgumentError(
            f"{image}: {what}[{first}] = {boxes[first].tolist()} has x1 < x0 or y1 < y0 "
            f"({inverted.size} such box(es)); boxes are [x0, y0, x1, y1], not [x, y, w, h]"
        )
    return boxes


def _labels(value: Any, what: str, image: str, count: int) -> np.ndarray:
    labels = _as_numpy(value)
    if labels.size == 0:
        labels = np.zeros((0,), dtype=np.int64)
    if labels.ndim != 1:
        raise InvalidArgumentError(f"{image}: {what} must be one-dimensional (N,), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(f"{image}: {what} must be whole class indices, got dtype {labels.dtype}")
    if labels.shape[0] != count:
        raise InvalidArgumentError(f"{image}: {labels.shape[0]} {what} for {count} box(es)")
    if (labels < 0).any():
        raise InvalidArgumentError(f"{image}: {what} contain a negative class index {int(labels.min())}")
    return labels.astype(np.int64)


def _scores(value: Any, image: str, count: int) -> np.ndarray:
    scores = _as_numpy(value)
    if scores.size == 0:
        scores = np.zeros((0,), dtype=np.float64)
    if scores.ndim != 1:
        raise InvalidArgumentError(f"{image}: pred_scores must be one-dimensional (N,), got shape {scores.shape}")
    if scores.size and (not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating)):
        raise InvalidArgumentError(f"{image}: pred_scores must be real numbers, got dtype {scores.dtype}")
    if scores.shape[0] != count:
        raise InvalidArgumentError(f"{image}: {scores.shape[0]} pred_scores for {count} predicted box(es)")
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise InvalidArgumentError(f"{image}: pred_scores contain NaN")
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise InvalidArgumentError(
            f"{image}: pred_scores must lie in [0, 1], got range [{scores.min():g}, {scores.max():g}]"
        )
    return scores


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class EvaluatedImage:
    """Ground truth and predictions of one image, validated and converted to numpy at construction.

    Array fields accept anything ``np.asarray`` takes, and torch tensors (moved to the CPU); they are stored as
    read-only numpy arrays. Any empty array (``[]``, shape (0,), shape (0, 4)) means "no boxes".

    Attributes:
        image_id: names the image in error messages and reports.
        gt_boxes: float64 (G, 4), [x0, y0, x1, y1] in pixels of the original image, x1 >= x0, y1 >= y0, finite.
            G = 0 marks a negative image (no caries): it counts for specificity and false positives per image.
        gt_labels: int64 (G,), class indices >= 0 (the upper bound is checked against the class names by the
            metrics that use classes).
        pred_boxes: float64 (D, 4), same convention as ``gt_boxes``.
        pred_labels: int64 (D,), class indices >= 0.
        pred_scores: float64 (D,), confidence in [0, 1], no NaN.

    Raises:
        InvalidArgumentError: a shape, length, dtype or value range is wrong; the message names the image.
    """

    image_id: int | str
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    pred_boxes: np.ndarray
    pred_labels: np.ndarray
    pred_scores: np.ndarray

    def __post_init__(self) -> None:
        image = f"image {self.image_id!r}"
        gt_boxes = _boxes(self.gt_boxes, "gt_boxes", image)
        pred_boxes = _boxes(self.pred_boxes, "pred_boxes", image)
        fields = {
            "gt_boxes": gt_boxes,
            "gt_labels": _labels(self.gt_labels, "gt_labels", image, len(gt_boxes)),
            "pred_boxes": pred_boxes,
            "pred_labels": _labels(self.pred_labels, "pred_labels", image, len(pred_boxes)),
            "pred_scores": _scores(self.pred_scores, image, len(pred_boxes)),
        }
        for name, array in fields.items():
            object.__setattr__(self, name, _read_only(array))

    @property
    def is_positive(self) -> bool:
        """True when the image has at least one ground-truth box (it shows caries)."""
        return len(self.gt_boxes) > 0

    @property
    def max_score(self) -> float:
        """The image-level score: the highest prediction score, 0.0 when there is no prediction."""
        return float(self.pred_scores.max()) if len(self.pred_scores) else 0.0


def check_images(images: Sequence[EvaluatedImage]) -> None:
    """Refuse an empty evaluation set or items that are not :class:`EvaluatedImage`.

    Raises:
        InvalidArgumentError: no images, or an item of another type.
    """
    if len(images) == 0:
        raise InvalidArgumentError("no images to evaluate")
    for index, image in enumerate(images):
        if not isinstance(image, EvaluatedImage):
            raise InvalidArgumentError(f"item {index} is a {type(image).__name__}, not an EvaluatedImage")


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Return the class names as a tuple after checking they are distinct, non-empty strings.

    Raises:
        InvalidArgumentError: no names, a non-string or empty name, or a repeated name.
    """
    names = tuple(class_names)
    if not names:
        raise InvalidArgumentError("class_names is empty")
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"class name {name!r} is not a non-empty string")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"class_names {list(names)} repeat a name")
    return names


def check_labels(images: Sequence[EvaluatedImage], class_names: Sequence[str]) -> None:
    """Check every ground-truth and predicted label indexes ``class_names``.

    Raises:
        InvalidArgumentError: a label >= ``len(class_names)``; the message names the image and the label.
    """
    count = len(class_names)
    for image in images:
        for what, labels in (("gt_labels", image.gt_labels), ("pred_labels", image.pred_labels)):
            if labels.size and labels.max() >= count:
                raise InvalidArgumentError(
                    f"image {image.image_id!r}: {what} contain class index {int(labels.max())}, "
                    f"but there are only {count} class(es) {list(class_names)}"
                )


def check_fraction(value: float, name: str, *, allow_zero: bool, allow_one: bool) -> float:
    """Return ``value`` as float after checking it is a real number in [0, 1] (ends open unless allowed).

    Raises:
        InvalidArgumentError: not a real number, or outside the range; the message names ``name``.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    high_ok = value <= 1.0 if allow_one else value < 1.0
    if not (low_ok and high_ok):
        interval = ("[" if allow_zero else "(") + "0, 1" + ("]" if allow_one else ")")
        raise InvalidArgumentError(f"{name} must lie in {interval}, got {value}")
    return value
