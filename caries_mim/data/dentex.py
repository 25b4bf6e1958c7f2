"""DENTEX (MICCAI 2023) hierarchical COCO json: diagnosis boxes from ``train_quadrant_enumeration_disease.json``.

Each annotation carries ``category_id_1`` (quadrant, 0-based), ``category_id_2`` (tooth 1-8, 0-based) and
``category_id_3`` (diagnosis, ids into ``categories_3``: 0 Impacted, 1 Caries, 2 Periapical Lesion, 3 Deep
Caries). Only the diagnosis is a detection label here; quadrant and tooth are ignored. The release keeps the
images in an ``xrays/`` folder beside the json, with bare file names in ``file_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caries_mim.data.coco import parse_coco_like, read_json
from caries_mim.data.records import AnnotationSet
from caries_mim.errors import InvalidDatasetError

#: DENTEX diagnosis name -> our class name. Impacted teeth and periapical lesions are not caries: dropped.
DEFAULT_DENTEX_CLASS_MAP: Mapping[str, str] = {"Caries": "caries", "Deep Caries": "deep_caries"}

#: The folder the DENTEX release puts the images in, next to the json.
DENTEX_IMAGE_FOLDER = "xrays"


def looks_like_dentex(data: Any) -> bool:
    """A json object with DENTEX's hierarchical category lists."""
    return isinstance(data, dict) and any(f"categories_{level}" in data for level in (1, 2, 3))


def parse_dentex(
    data: Any,
    source: Path,
    *,
    image_root: Path | None,
    class_map: Mapping[str, str] | None,
) -> AnnotationSet:
    """Records from a parsed DENTEX json; see :func:`load_dentex`."""
    if isinstance(data, dict) and "categories_3" not in data:
        raise InvalidDatasetError(
            f"{source}: no 'categories_3' (diagnoses); of the DENTEX files only "
            "train_quadrant_enumeration_disease.json has diagnosis labels"
        )
    if image_root is None:
        beside = source.parent / DENTEX_IMAGE_FOLDER
        image_root = beside if beside.is_dir() else source.parent
    return parse_coco_like(
        data,
        source,
        format_name="dentex",
        categories_key="categories_3",
        category_id_key="category_id_3",
        image_root=image_root,
        class_map=DEFAULT_DENTEX_CLASS_MAP if class_map is None else class_map,
    )


def load_dentex(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    class_map: Mapping[str, str] | None = None,
) -> AnnotationSet:
    """A DENTEX diagnosis json. Labels come from ``category_id_3`` mapped by ``class_map``
    (default :data:`DEFAULT_DENTEX_CLASS_MAP`); unmapped diagnoses are dropped and counted.

    Images resolve against ``image_root``, else the ``xrays/`` folder beside the json when it exists (the
    release layout), else the json's own folder.
    """
    source = Path(path)
    return parse_dentex(
        read_json(source),
        source,
        image_root=Path(image_root) if image_root is not None else None,
        class_map=class_map,
    )
