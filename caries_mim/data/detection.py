"""Labeled radiographs for detection: records -> image tensors with boxes, and a collate for batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from caries_mim.data.cache import DecodeCache, RadiographLoader
from caries_mim.data.indexing import IndexedImage, SkippedFiles, index_readable
from caries_mim.data.records import LISTED, DetectionRecord
from caries_mim.data.transforms import (
    BOX_WEIGHT_FIELD,
    LABEL_FIELD,
    SPACING_FIELD,
    TrainTransform,
    reseed_for_worker,
)
from caries_mim.data.unlabeled import image_tensor
from caries_mim.errors import InvalidDatasetError
from caries_mim.io import ReadOptions

#: The label an ignore region carries through the transform beside the lesions' class indices (never a class).
IGNORE_LABEL = -1

#: An albumentations-style box-aware transform: ``transform(image=, bboxes=, labels=)`` -> dict.
DetectionTransform = Callable[..., dict[str, Any]]


def _size_mismatch(record: DetectionRecord, height: int, width: int) -> bool:
    return (record.width is not None and record.width != width) or (
        record.height is not None and record.height != height
    )


def _clipped(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 (N, 4) xyxy ``boxes`` clipped to a (height, width) image, and which of them keep an area (bool (N,)):
    the caller drops the others with their labels and weights."""
    clipped = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float32))
    return clipped, (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


@dataclass(frozen=True)
class _Source:
    """An image with its boxes before the random part of the transform: decoded, boxes clipped to it, and for a
    :class:`~caries_mim.data.transforms.TrainTransform` already at the model's scale."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float] | None
    original_size: tuple[int, int]
    box_weights: np.ndarray | None = None


class DetectionDataset(Dataset):
    """Annotated radiographs as detector inputs.

    Item: a dict with
        ``image``: float32 tensor (1, H, W) in [0, 1] (H, W = the transform's output size, else the original),
        ``boxes``: float32 tensor (N, 4), [x0, y0, x1, y1] in pixels of ``image``, inside it, x1 > x0, y1 > y0,
        ``labels``: int64 tensor (N,), class indices, aligned with ``boxes``,
        ``ignore_boxes``: float32 tensor (K, 4), the record's ignore regions in the same pixels (see
        :attr:`~caries_mim.data.records.DetectionRecord.ignore_boxes`); with ``ignore_regions`` False always
        empty (0, 4),
        ``image_id``: the record's image id,
        ``spacing_mm``: (row, col) pixel spacing of the original image in mm, or None,
        ``original_size``: (height, width) of the original image, to map boxes back
        (:class:`~caries_mim.data.transforms.Letterbox`).

    With a :class:`~caries_mim.data.transforms.TrainTransform`, each image's scaled form (its ``scale`` stage) is
    kept in memory, up to ``memo_mb`` megabytes per process (each DataLoader worker keeps its own), so later crops
    of it skip the cache read and the resize; the crops are the same either way. Setting :attr:`transform` forgets
    them.

    :attr:`box_weights` (one float array per record, aligned with its boxes) weighs the lesion a positive training
    crop is built around (:class:`~caries_mim.data.transforms.LesionCrop`); None: every lesion alike.

    With ``ignore_regions`` the records' ignore regions go through the transform with the lesions (label
    :data:`IGNORE_LABEL`, weight 0: cropped, flipped and scaled alike, never the lesion a positive crop is built
    around) and come out apart, as ``ignore_boxes``: the detector leaves the anchors on them out of its loss.

    With ``validate`` (the default) construction decodes every image once through the cache (see
    :mod:`caries_mim.data.indexing`): unreadable images are left out with one summarized warning (recorded in
    :attr:`skipped`), and an image whose size differs from the annotation file's width/height raises, because
    its boxes would then be in another image's coordinates.

    Raises:
        InvalidDatasetError: no records, no readable image, or image sizes that contradict the annotations.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        *,
        cache: DecodeCache | None = None,
        options: ReadOptions | None = None,
        transform: DetectionTransform | None = None,
        validate: bool = True,
        progress: bool = True,
        memo_mb: float = 0.0,
        ignore_regions: bool = False,
    ) -> None:
        if not records:
            raise InvalidDatasetError("the detection dataset has no annotated images")
        if not 0.0 <= memo_mb < math.inf:
            raise InvalidDatasetError(f"memo_mb must be a finite number >= 0, got {memo_mb}")
        self.load = RadiographLoader(cache, options or ReadOptions())
        self.memo_bytes = int(memo_mb * 2**20)
        self._memo: dict[int, _Source] = {}
        self._memo_used = 0
        self.transform = transform
        self._transform_seed: int | None = None
        self._box_weights: list[np.ndarray] | None = None
        self.ignore_regions = ignore_regions
        self.skipped = SkippedFiles()
        self.records = list(records)
        #: Size and spacing of each record's image as decoded, by path; filled by validation.
        self.decoded: dict[Path, IndexedImage] = {}
        if validate:
            self._validate(progress)

    def _validate(self, progress: bool) -> None:
        indexed, self.skipped = index_readable(
            [record.image_path for record in self.records],
            self.load,
            progress=progress,
            description="indexing annotated radiographs",
        )
        sizes = {image.path: (image.height, image.width) for image in indexed}
        self.decoded = {image.path: image for image in indexed}
        kept = [record for record in self.records if record.image_path in sizes]
        if not kept:
            raise InvalidDatasetError(f"none of the {len(self.records)} annotated images can be read")
        mismatched = [
            f"{record.image_path} (annotated {record.width} x {record.height}, "
            f"decoded {sizes[record.image_path][1]} x {sizes[record.image_path][0]})"
            for record in kept
            if _size_mismatch(record, *sizes[record.image_path])
        ]
        if mismatched:
            more = f" and {len(mismatched) - LISTED} more" if len(mismatched) > LISTED else ""
            raise InvalidDatasetError(
                f"{len(mismatched)} image(s) differ in size from their annotations (width x height): "
                f"{'; '.join(mismatched[:LISTED])}{more}; were the images resized after annotation?"
            )
        self.records = kept

    @property
    def box_weights(self) -> list[np.ndarray] | None:
        return self._box_weights

    @box_weights.setter
    def box_weights(self, weights: Sequence[np.ndarray] | None) -> None:
        """Per record, a float (N,) array of positive, finite weights for its N boxes; None for equal weights."""
        if weights is not None:
            weights = [np.asarray(values, dtype=np.float32).reshape(-1) for values in weights]
            if len(weights) != len(self.records) or any(
                len(values) != len(record.boxes) for values, record in zip(weights, self.records, strict=False)
            ):
                raise InvalidDatasetError("box weights must give one weight per box of every record")
            if any(not np.all(np.isfinite(values) & (values > 0)) for values in weights):
                raise InvalidDatasetError("box weights must be finite and > 0")
        self._box_weights = weights
        self._memo, self._memo_used = {}, 0

    @property
    def transform(self) -> DetectionTransform | None:
        return self._transform

    @transform.setter
    def transform(self, transform: DetectionTransform | None) -> None:
        self._transform = transform
        self._memo, self._memo_used = {}, 0

    def __len__(self) -> int:
        return len(self.records)

    def _source(self, index: int) -> _Source:
        """Record ``index`` decoded, its boxes clipped, and scaled when the transform has a scale stage; kept while
        the memory budget lasts."""
        if index in self._memo:
            return self._memo[index]
        record = self.records[index]
        radiograph = self.load(record.image_path)
        height, width = radiograph.height, radiograph.width
        if _size_mismatch(record, height, width):
            raise InvalidDatasetError(
                f"{record.image_path}: decoded {width} x {height} but annotated {record.width} x {record.height}"
            )
        image = radiograph.pixels
        clipped, keep = _clipped(record.boxes, height, width)
        boxes, labels = clipped[keep], record.labels[keep]
        weights = np.ones(len(record.boxes), np.float32) if self._box_weights is None else self._box_weights[index]
        weights = weights[keep]
        if self.ignore_regions and len(record.ignore_boxes):
            ignored, inside = _clipped(record.ignore_boxes, height, width)
            ignored = ignored[inside]
            boxes = np.concatenate([boxes, ignored])
            labels = np.concatenate([labels, np.full(len(ignored), IGNORE_LABEL, np.int64)])
            weights = np.concatenate([weights, np.zeros(len(ignored), np.float32)])
        if not isinstance(self._transform, TrainTransform):
            return _Source(image, boxes, labels, radiograph.spacing_mm, (height, width))
        out = self._transform.scale(
            image=image,
            bboxes=boxes,
            **{LABEL_FIELD: labels, BOX_WEIGHT_FIELD: weights, SPACING_FIELD: radiograph.spacing_mm},
        )
        source = _Source(
            out["image"],
            np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(out[LABEL_FIELD], dtype=np.int64).reshape(-1),
            radiograph.spacing_mm,
            (height, width),
            np.asarray(out[BOX_WEIGHT_FIELD], dtype=np.float32).reshape(-1),
        )
        size = source.image.nbytes + source.boxes.nbytes + source.labels.nbytes + source.box_weights.nbytes
        if self._memo_used + size <= self.memo_bytes:
            self._memo[index] = source
            self._memo_used += size
        return source

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The item described in the class doc. ``key`` is an index, or ``(index, augmentation_seed)`` as
        :class:`~caries_mim.data.sampling.ResumableEpochSampler` yields: the transform is then seeded for this item
        alone, so a resumed run draws the same crops and flips as an uninterrupted one."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        source = self._source(index)
        kept = self._memo.get(index) is source
        image, boxes, labels = source.image, source.boxes, source.labels
        transform = self._transform
        if transform is not None:
            if seed is not None and hasattr(transform, "set_random_seed"):
                transform.set_random_seed(seed)
            else:
                self._transform_seed = reseed_for_worker(transform, self._transform_seed)
            fields: dict[str, Any] = {LABEL_FIELD: labels, SPACING_FIELD: source.spacing_mm}
            random_part = transform
            if isinstance(transform, TrainTransform):
                random_part = transform.augment
                fields[BOX_WEIGHT_FIELD] = source.box_weights
            out = random_part(image=image, bboxes=boxes, **fields)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out[LABEL_FIELD], dtype=np.int64).reshape(-1)
        if kept and np.may_share_memory(image, source.image):
            # A crop can be a view of the kept image: the tensor must not write through to it.
            image = image.copy()
        ignored = labels == IGNORE_LABEL
        return {
            "image": image_tensor(image),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[~ignored], dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels[~ignored], dtype=np.int64)),
            "ignore_boxes": torch.from_numpy(np.ascontiguousarray(boxes[ignored], dtype=np.float32)),
            "image_id": self.records[index].image_id,
            "spacing_mm": source.spacing_mm,
            "original_size": source.original_size,
        }


def collate_detection(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch detection items whose box counts differ.

    Returns:
        ``image``: float32 tensor (B, 1, H, W) (items must share H, W: use a resizing transform);
        ``boxes``: list of B float32 tensors (N_i, 4); ``labels``: list of B int64 tensors (N_i,);
        ``ignore_boxes``: list of B float32 tensors (K_i, 4);
        ``image_id``, ``spacing_mm``, ``original_size``: lists of length B.
    Raises:
        ValueError: the images differ in size.
    """
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"cannot stack images of different sizes {sorted(shapes)}; resize them in the transform")
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "boxes": [item["boxes"] for item in batch],
        "labels": [item["labels"] for item in batch],
        "ignore_boxes": [item["ignore_boxes"] for item in batch],
        "image_id": [item["image_id"] for item in batch],
        "spacing_mm": [item["spacing_mm"] for item in batch],
        "original_size": [item["original_size"] for item in batch],
    }
