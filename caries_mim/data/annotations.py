"""``load_annotations``: one entry point for every labeled-box format, with format detection."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from caries_mim.data.box_csv import load_box_csv, looks_like_box_csv
from caries_mim.data.coco import parse_coco, read_json
from caries_mim.data.dentex import looks_like_dentex, parse_dentex
from caries_mim.data.records import AnnotationSet
from caries_mim.errors import InvalidArgumentError, InvalidDatasetError

logger = logging.getLogger(__name__)

AnnotationFormat = Literal["auto", "coco", "dentex", "csv"]
FORMATS = ("auto", "coco", "dentex", "csv")


def _sniff_csv(source: Path) -> bool:
    if source.suffix.lower() == ".csv":
        return True
    try:
        with open(source, encoding="utf-8-sig", errors="replace") as handle:
            return looks_like_box_csv(handle.read(4096))
    except OSError:
        return False


def load_annotations(
    path: str | Path,
    format: AnnotationFormat = "auto",
    image_root: str | Path | None = None,
    class_map: Mapping[str, str] | None = None,
) -> AnnotationSet:
    """Load detection annotations as :class:`~caries_mim.data.records.AnnotationSet`.

    ``format="auto"`` picks ``csv`` for a ``.csv`` file or a first line with the box-CSV columns, ``dentex`` for a
    json with ``categories_1/2/3``, and ``coco`` for any other json. ``class_map`` maps source category names to
    class names (defaults: every category for COCO, ``{"Caries": "caries", "Deep Caries": "deep_caries"}`` for
    DENTEX, ``{"Cavity": "caries"}`` for the CSV). Image paths resolve against the annotation file's folder
    unless ``image_root`` is given (DENTEX also looks in its ``xrays/`` folder).

    Raises:
        InvalidDatasetError: the file is missing or malformed, lacks keys or columns, refers to unknown images or
            categories, has a box with a negative extent, or lists images that do not exist.
        InvalidArgumentError: ``format`` is not one of :data:`FORMATS`.
    """
    if format not in FORMATS:
        raise InvalidArgumentError(f"annotation format {format!r} is not one of {', '.join(FORMATS)}")
    source = Path(path)
    if not source.is_file():
        raise InvalidDatasetError(f"{source}: annotation file not found")
    root = Path(image_root) if image_root is not None else None

    if format == "csv" or (format == "auto" and _sniff_csv(source)):
        annotation_set = load_box_csv(source, image_root=root, class_map=class_map)
    else:
        data = read_json(source)
        if format == "dentex" or (format == "auto" and looks_like_dentex(data)):
            annotation_set = parse_dentex(data, source, image_root=root, class_map=class_map)
        else:
            annotation_set = parse_coco(data, source, image_root=root, class_map=class_map)
    stats = annotation_set.stats
    # Unmapped classes are expected (DENTEX's impacted teeth); zero-area boxes are worth a look.
    level = logging.WARNING if stats.dropped_degenerate else logging.INFO
    logger.log(level, "%s (%s): %s", source, annotation_set.format, stats.summary())
    return annotation_set
