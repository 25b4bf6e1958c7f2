"""COCO detection json: ``images``, ``annotations``, ``categories``; ``bbox`` is [x, y, width, height].

This is the only place [x, y, w, h] exists: boxes leave as [x0, y0, x1, y1]. A box's ``depth`` and
``conspicuity`` (the synthetic generator writes both; any COCO file may) are kept for reports (see
:data:`~caries_mim.data.records.BOX_ATTRIBUTES`); other keys a loader does not use (``segmentation``, ``area``,
``surface``, ``tooth``...) are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caries_mim.data.records import AnnotationSet, ClassMapping, RecordBuilder, resolve_image_path
from caries_mim.errors import InvalidDatasetError


def read_json(path: Path) -> Any:
    """Parsed json, with unreadable or malformed files reported as the user's dataset problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InvalidDatasetError(f"{path}: annotation file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDatasetError(f"{path}: annotation file cannot be read ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDatasetError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _list_of_objects(data: Mapping[str, Any], key: str, source: Path) -> list[dict[str, Any]]:
    if key not in data:
        raise InvalidDatasetError(f"{source}: missing top-level key {key!r}")
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidDatasetError(f"{source}: {key!r} must be a list of objects")
    return value


def _field(item: Mapping[str, Any], key: str, where: str, source: Path) -> Any:
    if key not in item:
        raise InvalidDatasetError(f"{source}: {where} has no {key!r}")
    return item[key]


def _category_names(data: Mapping[str, Any], key: str, source: Path) -> dict[Any, str]:
    """Category id -> name, in id order (the order classes take when no class map is given)."""
    names: dict[Any, str] = {}
    for i, category in enumerate(_list_of_objects(data, key, source)):
        category_id = _field(category, "id", f"{key}[{i}]", source)
        name = _field(category, "name", f"{key}[{i}]", source)
        if category_id in names:
            raise InvalidDatasetError(f"{source}: {key} lists category id {category_id!r} twice")
        names[category_id] = str(name)
    # Integer ids sort numerically (COCO's usual case); string ids, which some exporters write, after them.
    return dict(sorted(names.items(), key=lambda item: (isinstance(item[0], str), item[0])))


def parse_coco_like(
    data: Any,
    source: Path,
    *,
    format_name: str,
    categories_key: str,
    category_id_key: str,
    image_root: Path,
    class_map: Mapping[str, str] | None,
) -> AnnotationSet:
    """Records from a parsed COCO-style document whose label lives in ``category_id_key``.

    Crowd annotations (``iscrowd: 1``) mark a region of many objects, not one finding, and an image's
    ``subthreshold_lesions`` (the synthetic generator's lesions under its visibility floor, each with a
    ``field_box`` [x0, y0, x1, y1]) a lesion no reader could see: both become the record's ignore regions
    (:attr:`~caries_mim.data.records.DetectionRecord.ignore_boxes`), not boxes.
    """
    if not isinstance(data, dict):
        raise InvalidDatasetError(f"{source}: expected a JSON object with images, annotations and categories")
    images = _list_of_objects(data, "images", source)
    annotations = _list_of_objects(data, "annotations", source)
    categories = _category_names(data, categories_key, source)
    builder = RecordBuilder(source, format_name, ClassMapping(list(categories.values()), class_map, source))

    for i, image in enumerate(images):
        where = f"images[{i}]"
        file_name = _field(image, "file_name", where, source)
        if not isinstance(file_name, str) or not file_name:
            raise InvalidDatasetError(f"{source}: {where} file_name must be a non-empty string")
        builder.add_image(
            _field(image, "id", where, source),
            resolve_image_path(image_root, file_name),
            image.get("width"),
            image.get("height"),
            where,
        )
        _add_subthreshold_lesions(builder, image, where, source)

    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = _field(annotation, "image_id", where, source)
        if not builder.has_image(image_id):
            raise InvalidDatasetError(f"{source}: {where} refers to image id {image_id!r}, which is not in images")
        category_id = _field(annotation, category_id_key, where, source)
        if category_id not in categories:
            raise InvalidDatasetError(
                f"{source}: {where} has {category_id_key} {category_id!r}, which is not in {categories_key} "
                f"(known: {sorted(categories, key=str)})"
            )
        bbox = _field(annotation, "bbox", where, source)
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InvalidDatasetError(f"{source}: {where} bbox must be [x, y, width, height], got {bbox!r}")
        x, y, width, height = bbox
        # The numbers are validated by the builder; only the arithmetic needs them to be numbers first.
        corners = [x, y, x + width, y + height] if _all_numbers(bbox) else bbox
        if annotation.get("iscrowd", 0):
            builder.add_ignore_region(image_id, corners, where)
        else:
            builder.add_box(image_id, corners, categories[category_id], where, annotation)
    return builder.build()


def _add_subthreshold_lesions(builder: RecordBuilder, image: dict[str, Any], where: str, source: Path) -> None:
    lesions = image.get("subthreshold_lesions", [])
    if not isinstance(lesions, list):
        raise InvalidDatasetError(
            f"{source}: {where} subthreshold_lesions must be a list, got {type(lesions).__name__}"
        )
    for j, lesion in enumerate(lesions):
        box = lesion.get("field_box") if isinstance(lesion, dict) else None
        if not isinstance(box, list) or len(box) != 4:
            raise InvalidDatasetError(
                f"{source}: {where} subthreshold_lesions[{j}] needs a field_box [x0, y0, x1, y1], got {lesion!r}"
            )
        builder.add_ignore_region(image["id"], box, f"{where} subthreshold_lesions[{j}]")


def _all_numbers(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def parse_coco(
    data: Any,
    source: Path,
    *,
    image_root: Path | None,
    class_map: Mapping[str, str] | None,
) -> AnnotationSet:
    """Records from a parsed COCO detection json; see :func:`load_coco`."""
    return parse_coco_like(
        data,
        source,
        format_name="coco",
        categories_key="categories",
        category_id_key="category_id",
        image_root=image_root if image_root is not None else source.parent,
        class_map=class_map,
    )


def load_coco(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    class_map: Mapping[str, str] | None = None,
) -> AnnotationSet:
    """A COCO detection json. Classes are the categories in id order, or ``class_map``'s values.

    ``file_name`` resolves against the json's folder unless ``image_root`` is given.
    """
    source = Path(path)
    return parse_coco(
        read_json(source),
        source,
        image_root=Path(image_root) if image_root is not None else None,
        class_map=class_map,
    )
