"""Flat box CSV, one row per box: ``filename,width,height,class,xmin,ymin,xmax,ymax``.

This is the layout of the Kaggle "Dental Radiography" set (a ``_annotations.csv`` per split, classes Cavity,
Fillings, Impacted Tooth, Implant) and of other Roboflow / TensorFlow object-detection exports. Coordinates are
corners in pixels already. A format with one row per box cannot list an image without boxes.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from caries_mim.data.records import AnnotationSet, ClassMapping, RecordBuilder, resolve_image_path
from caries_mim.errors import InvalidDatasetError

#: Kaggle "Dental Radiography" class -> our class name. Fillings, impacted teeth and implants are not caries.
DEFAULT_CSV_CLASS_MAP: Mapping[str, str] = {"Cavity": "caries"}

CSV_COLUMNS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")


def looks_like_box_csv(head: str) -> bool:
    """The first line names the columns this loader needs."""
    first = head.splitlines()[0] if head else ""
    columns = {column.strip().lower() for column in first.split(",")}
    return set(CSV_COLUMNS) <= columns


def _read_rows(source: Path) -> list[dict[str, str]]:
    try:
        with open(source, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip().lower() for name in reader.fieldnames or []]
            missing = [name for name in CSV_COLUMNS if name not in columns]
            if missing:
                raise InvalidDatasetError(
                    f"{source}: missing CSV column(s) {', '.join(missing)} (expected header {','.join(CSV_COLUMNS)})"
                )
            reader.fieldnames = columns
            return list(reader)
    except FileNotFoundError as exc:
        raise InvalidDatasetError(f"{source}: annotation file not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidDatasetError(f"{source}: CSV cannot be read ({exc})") from exc


def _parse_number(text: str | None, column: str, where: str) -> float:
    try:
        return float(text if text is not None else "")  # a short row leaves its last columns as None
    except ValueError as exc:
        raise InvalidDatasetError(f"{where}: column {column} must be a number, got {text!r}") from exc


def load_box_csv(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    class_map: Mapping[str, str] | None = None,
) -> AnnotationSet:
    """A box CSV. Labels come from the ``class`` column mapped by ``class_map`` (default
    :data:`DEFAULT_CSV_CLASS_MAP`); unmapped classes are dropped and counted, and their images kept as negatives.

    Records are in file-name order with integer ids 0, 1, ...; ``filename`` resolves against the CSV's folder
    unless ``image_root`` is given.
    """
    source = Path(path)
    root = Path(image_root) if image_root is not None else source.parent
    rows = _read_rows(source)
    if not rows:
        raise InvalidDatasetError(f"{source}: has a header but no rows")

    class_names = [(row.get("class") or "").strip() for row in rows]
    mapping = ClassMapping(class_names, DEFAULT_CSV_CLASS_MAP if class_map is None else class_map, source)
    builder = RecordBuilder(source, "csv", mapping)

    # Line numbers as a spreadsheet shows them: the header is line 1.
    sizes: dict[str, tuple[float, float, int]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"line {line}"
        file_name = (row.get("filename") or "").strip()
        if not file_name:
            raise InvalidDatasetError(f"{source}: {where}: empty filename")
        size = (
            _parse_number(row["width"], "width", f"{source}: {where}"),
            _parse_number(row["height"], "height", f"{source}: {where}"),
        )
        if file_name in sizes and sizes[file_name][:2] != size:
            first = sizes[file_name][2]
            raise InvalidDatasetError(
                f"{source}: {where}: {file_name} is {size[0]:g} x {size[1]:g} here but "
                f"{sizes[file_name][0]:g} x {sizes[file_name][1]:g} on line {first}"
            )
        sizes.setdefault(file_name, (*size, line))

    image_ids = {file_name: image_id for image_id, file_name in enumerate(sorted(sizes))}
    for file_name, image_id in image_ids.items():
        width, height, line = sizes[file_name]
        builder.add_image(image_id, resolve_image_path(root, file_name), width, height, f"line {line}")

    for line, (row, class_name) in enumerate(zip(rows, class_names, strict=True), start=2):
        where = f"line {line}"
        corners = [_parse_number(row[column], column, f"{source}: {where}") for column in CSV_COLUMNS[4:]]
        builder.add_box(image_ids[row["filename"].strip()], corners, class_name, where)
    return builder.build()
