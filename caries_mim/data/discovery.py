"""Find radiograph files in folder trees, the way users and PACS exports lay them out."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from caries_mim.errors import InvalidDatasetError

#: Suffixes read by :func:`caries_mim.io.read_radiograph` (compared in lower case).
RADIOGRAPH_SUFFIXES = (
    ".dcm",
    ".dicom",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".mha",
    ".mhd",
    ".nrrd",
    ".nii",
    ".nii.gz",
)

#: The DICOMDIR index of a DICOM media set: DICOM Part 10, but it describes files and holds no image.
_DICOMDIR = "DICOMDIR"
_DICOM_MAGIC_OFFSET = 128


def has_dicom_preamble(path: Path) -> bool:
    """True when the file carries 'DICM' at byte 128 (DICOM Part 10), whatever its name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def _may_be_unnamed_dicom(name: str) -> bool:
    """No suffix, or a numeric one: PACS exports name files by SOP Instance UID ('1.2.840.....123')."""
    suffix = Path(name).suffix
    return suffix == "" or suffix[1:].isdigit()


def _is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.upper() == _DICOMDIR:
        return False
    lowered = name.lower()
    if lowered.endswith(RADIOGRAPH_SUFFIXES):
        return True
    return _may_be_unnamed_dicom(name) and has_dicom_preamble(path)


def _walk(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(root):
        # Hidden folders hold tool state (.git, .ipynb_checkpoints, a decode cache), never source images.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(path for path in (Path(folder) / name for name in files) if _is_candidate(path))
    return sorted(found)


def find_radiographs(roots: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Radiograph files under one or more folders (or files), in a deterministic order.

    Files are matched by suffix (:data:`RADIOGRAPH_SUFFIXES`, any case), plus files without a suffix or with a
    numeric one that carry the DICOM 'DICM' marker at byte 128. Hidden files and folders and DICOMDIR are
    skipped. Paths are sorted within each root, roots keep the given order, and a file reached twice is listed
    once. Files are not decoded here; see :func:`caries_mim.data.indexing.index_readable`.

    Raises:
        InvalidDatasetError: a root does not exist.
    """
    root_list = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(root) for root in roots]
    missing = [str(root) for root in root_list if not root.exists()]
    if missing:
        raise InvalidDatasetError(f"data folder(s) not found: {', '.join(missing)}")

    seen: set[Path] = set()
    ordered: list[Path] = []
    for root in root_list:
        for path in [root] if root.is_file() else _walk(root):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                ordered.append(path)
    return ordered
