"""What every annotation loader produces: one :class:`DetectionRecord` per image, plus the class list.

Box policy, the same for every format (loaders feed boxes through :class:`RecordBuilder`):

* not four finite numbers -> :class:`InvalidDatasetError`: the file is broken;
* negative extent (COCO width/height < 0, CSV xmax < xmin) -> :class:`InvalidDatasetError`: it means a
  convention mix-up (corners stored where [x, y, w, h] is expected), which is systematic, and dropping those
  boxes quietly would train on a wrong dataset;
* partly outside the image (negative x/y, or past width/height when the file gives the size) -> clipped to
  the image, counted in :attr:`AnnotationStats.clipped`: annotation tools routinely overshoot by a pixel;
* zero area (before or after clipping) -> dropped, counted in :attr:`AnnotationStats.dropped_degenerate`: a click
  without a drag in an annotation tool; it marks nothing a detector can learn.

Ignore regions (COCO's ``iscrowd: 1`` boxes, the synthetic generator's lesions under its visibility floor) are not
findings: they are kept apart in :attr:`DetectionRecord.ignore_boxes` (clipped the same way, counted in
:attr:`AnnotationStats.ignore_regions`) so that training can leave them out of its loss (``data.ignore_regions``);
evaluation never reads them.

Images without any box are kept: they are the negatives that specificity is measured on.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caries_mim.errors import InvalidDatasetError

#: Per-box annotation keys kept for reporting (sensitivity by lesion depth, by conspicuity and by surface) and for
#: repeat factor sampling: a depth class name, a contrast-to-noise ratio and the tooth surface (mesial, distal,
#: occlusal, ...). Other keys are ignored.
BOX_ATTRIBUTES = ("depth", "conspicuity", "surface")
#: Those of :data:`BOX_ATTRIBUTES` whose values are names, so that they can split a class into categories.
CATEGORICAL_BOX_ATTRIBUTES = ("depth", "surface")

#: How many offending items an error message lists before "and N more".
LISTED = 5


@dataclass(frozen=True, eq=False)
class DetectionRecord:
    """One annotated image.

    Attributes:
        image_path: the image file (resolved against the annotation file's folder or ``image_root``).
        boxes: float32 (N, 4), [x0, y0, x1, y1] in pixels of the original image, x1 > x0 and y1 > y0.
        labels: int64 (N,), indices into the annotation set's ``classes``.
        image_id: the source's image id (COCO ``id``), or the row order for formats without one.
        width, height: image size in pixels when the annotation file states it, else None.
        box_attributes: per box (aligned with ``boxes``), the reporting attributes the annotation carries (keys
            of :data:`BOX_ATTRIBUTES`, e.g. the synthetic generator's ``depth`` and ``conspicuity``); empty dicts
            when it carries none, an empty tuple for formats without them.
        ignore_boxes: float32 (K, 4), [x0, y0, x1, y1] in pixels of the original image: regions that hold
            something lesion-like but are not findings (COCO crowd boxes; lesions under the visibility floor),
            where a detection is neither a hit nor, in training, a false positive. Not part of ``boxes``.
    """

    image_path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int | str
    width: int | None = None
    height: int | None = None
    box_attributes: tuple[dict[str, Any], ...] = ()
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))


@dataclass
class AnnotationStats:
    """What loading changed or left out, for the log line and the run's provenance."""

    images: int = 0
    boxes: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    ignore_regions: int = 0
    dropped_unmapped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        unmapped = ", ".join(f"{name}: {count}" for name, count in sorted(self.dropped_unmapped.items()))
        return (
            f"{self.images} image(s), {self.boxes} box(es); clipped {self.clipped}, "
            f"dropped {self.dropped_degenerate} zero-area box(es); {self.ignore_regions} ignore region(s)"
            + (f", unmapped classes dropped [{unmapped}]" if unmapped else "")
        )


@dataclass(frozen=True)
class AnnotationSet:
    """The records of one annotation file and the class names their labels index."""

    records: list[DetectionRecord]
    classes: tuple[str, ...]
    source: Path
    format: str
    stats: AnnotationStats

    def classes_outside(self, class_names: Sequence[str]) -> list[str]:
        """Sorted names of this set's classes that label at least one box but are not in ``class_names``."""
        used = {self.classes[label] for record in self.records for label in record.labels.tolist()}
        return sorted(used - set(class_names))

    def label_map(self, class_names: Sequence[str]) -> np.ndarray:
        """int64 (C,): this set's label -> index of the same name in ``class_names``, -1 where it has none.

        Index it with a record's labels (``label_map[record.labels]``) to relabel by name; check
        :meth:`classes_outside` first, since a -1 is not a label."""
        names = list(class_names)
        return np.array([names.index(name) if name in names else -1 for name in self.classes], dtype=np.int64)


class ClassMapping:
    """Source category names -> label indices into ``classes``.

    Without ``class_map`` every source category becomes a class, in the given order. With one, ``classes`` are its
    distinct values in insertion order (so two datasets mapped to the same names share label indices) and
    categories it does not name are dropped (counted).
    """

    def __init__(self, source_names: Sequence[str], class_map: Mapping[str, str] | None, source: Path) -> None:
        if class_map is None:
            self.classes = tuple(dict.fromkeys(source_names))
            self._index = {name: i for i, name in enumerate(self.classes)}
            return
        if not class_map:
            raise InvalidDatasetError(f"{source}: the class map is empty, so every box would be dropped")
        if not set(class_map) & set(source_names):
            raise InvalidDatasetError(
                f"{source}: the class map names {sorted(class_map)} but the file's categories are "
                f"{sorted(set(source_names))}; no box would be kept"
            )
        self.classes = tuple(dict.fromkeys(class_map.values()))
        self._index = {name: self.classes.index(target) for name, target in class_map.items()}

    def label(self, source_name: str) -> int | None:
        return self._index.get(source_name)


def resolve_image_path(root: Path, file_name: str) -> Path:
    """``file_name`` as written in the annotation file, relative to ``root`` unless absolute."""
    path = Path(file_name)
    return path if path.is_absolute() else root / path


def _number(value: object, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidDatasetError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _as_size(value: object, what: str, where: str) -> int | None:
    """Optional positive integer image size (COCO files from some tools omit it)."""
    if value is None:
        return None
    number = _number(value, what, where)
    if number <= 0 or number != int(number):
        raise InvalidDatasetError(f"{where}: {what} must be a positive integer, got {value!r}")
    return int(number)


class RecordBuilder:
    """Collects boxes per image, applying the module's box policy, and builds the :class:`AnnotationSet`."""

    def __init__(self, source: Path, format_name: str, mapping: ClassMapping) -> None:
        self.source = source
        self.format = format_name
        self.mapping = mapping
        self.stats = AnnotationStats()
        self._images: dict[int | str, tuple[Path, int | None, int | None]] = {}
        self._boxes: dict[int | str, list[tuple[float, float, float, float]]] = {}
        self._labels: dict[int | str, list[int]] = {}
        self._attributes: dict[int | str, list[dict[str, Any]]] = {}
        self._ignore: dict[int | str, list[tuple[float, float, float, float]]] = {}

    def add_image(self, image_id: int | str, path: Path, width: object, height: object, where: str) -> None:
        if image_id in self._images:
            raise InvalidDatasetError(f"{self.source}: {where}: image id {image_id!r} appears twice")
        self._images[image_id] = (
            path,
            _as_size(width, "width", f"{self.source}: {where}"),
            _as_size(height, "height", f"{self.source}: {where}"),
        )
        self._boxes[image_id] = []
        self._labels[image_id] = []
        self._attributes[image_id] = []
        self._ignore[image_id] = []

    def has_image(self, image_id: object) -> bool:
        return image_id in self._images

    def add_box(
        self,
        image_id: int | str,
        corners: Sequence[object],
        category: str,
        where: str,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Add [x0, y0, x1, y1] for ``category`` (a source name) to an image added before, with the
        :data:`BOX_ATTRIBUTES` among ``attributes`` (a depth must be a string, a conspicuity a finite number >= 0;
        other values are left out rather than refused: they only feed reports)."""
        where = f"{self.source}: {where}"
        valid = _valid_corners(corners, where)  # a broken box is refused even when its class is not kept
        label = self.mapping.label(category)
        if label is None:
            self.stats.dropped_unmapped[category] += 1
            return
        clipped = self._clipped(image_id, valid)
        if clipped is None:
            return
        self._boxes[image_id].append(clipped)
        self._labels[image_id].append(label)
        self._attributes[image_id].append(_reporting_attributes(attributes or {}))

    def add_ignore_region(self, image_id: int | str, corners: Sequence[object], where: str) -> None:
        """Add [x0, y0, x1, y1] as an ignore region of an image added before (see the module doc); validated and
        clipped as a box is."""
        clipped = self._clipped(image_id, _valid_corners(corners, f"{self.source}: {where}"))
        if clipped is not None:
            self._ignore[image_id].append(clipped)
            self.stats.ignore_regions += 1

    def _clipped(
        self, image_id: int | str, corners: tuple[float, float, float, float]
    ) -> tuple[float, float, float, float] | None:
        """Valid corners clipped to the image, or None (counted) when nothing of them is left."""
        x0, y0, x1, y1 = corners
        _, width, height = self._images[image_id]
        clipped = (
            max(x0, 0.0),
            max(y0, 0.0),
            min(x1, float(width)) if width is not None else x1,
            min(y1, float(height)) if height is not None else y1,
        )
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            self.stats.dropped_degenerate += 1
            return None
        if clipped != (x0, y0, x1, y1):
            self.stats.clipped += 1
        return clipped

    def build(self) -> AnnotationSet:
        """Records in image order; raises when no image is listed or listed images do not exist."""
        if not self._images:
            raise InvalidDatasetError(f"{self.source}: lists no images")
        records = [
            DetectionRecord(
                image_path=path,
                boxes=np.asarray(self._boxes[image_id], dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(self._labels[image_id], dtype=np.int64),
                image_id=image_id,
                width=width,
                height=height,
                box_attributes=tuple(self._attributes[image_id]),
                ignore_boxes=np.asarray(self._ignore[image_id], dtype=np.float32).reshape(-1, 4),
            )
            for image_id, (path, width, height) in self._images.items()
        ]
        check_images_exist((record.image_path for record in records), self.source)
        self.stats.images = len(records)
        self.stats.boxes = sum(len(record.labels) for record in records)
        return AnnotationSet(records, self.mapping.classes, self.source, self.format, self.stats)


def _valid_corners(corners: Sequence[object], where: str) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] as floats; raises on a non-number or a negative extent (see the module doc)."""
    x0, y0, x1, y1 = (_number(v, "box coordinate", where) for v in corners)
    if x1 < x0 or y1 < y0:
        raise InvalidDatasetError(
            f"{where}: box has negative width or height ({x0:g}, {y0:g}, {x1:g}, {y1:g} as x0, y0, x1, y1); "
            "are corners stored where [x, y, width, height] is expected?"
        )
    return x0, y0, x1, y1


def _reporting_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    conspicuity = attributes.get("conspicuity")
    number = isinstance(conspicuity, (int, float)) and not isinstance(conspicuity, bool)
    if number and math.isfinite(conspicuity) and conspicuity >= 0:
        kept["conspicuity"] = float(conspicuity)
    for name in CATEGORICAL_BOX_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and value:
            kept[name] = value
    return kept


def box_categories(record: DetectionRecord, attribute: str | None = None) -> list[int | tuple[int, str | None]]:
    """Per box of ``record``, its category for repeat factor sampling: its class index, or with ``attribute`` (one
    of :data:`CATEGORICAL_BOX_ATTRIBUTES`) the pair (class index, the box's value of it, None where it has none)."""
    labels = [int(label) for label in record.labels]
    if attribute is None:
        return labels
    if attribute not in CATEGORICAL_BOX_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {', '.join(CATEGORICAL_BOX_ATTRIBUTES)}, got {attribute!r}")
    attributes = record.box_attributes or ({},) * len(labels)
    return [(label, values.get(attribute)) for label, values in zip(labels, attributes, strict=True)]


def check_images_exist(paths: Iterable[Path], source: Path) -> None:
    """Raise naming the first few missing image files (one check up front beats a crash in epoch 3)."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        listed = ", ".join(str(path) for path in missing[:LISTED])
        more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
        raise InvalidDatasetError(
            f"{source}: {len(missing)} image file(s) not found: {listed}{more} (pass image_root if the images "
            "are not next to the annotation file)"
        )
