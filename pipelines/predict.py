"""``caries-mim predict``: findings for radiograph files as JSON lines, optionally with overlay pictures.

One line per file: ``{"file", "ok": true, "image", "threshold", "package_version", "findings": [...]}`` (the
:meth:`~caries_mim.inference.Findings.to_dict` form) or ``{"file", "ok": false, "error": {"code", "message"}}``
for a file that cannot be read; the other files go on. Nothing read from a file's header is printed: no patient
name or ID, no UID. Reader warnings are counted, not echoed, because their text can quote header values.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from caries_mim.atomic_files import atomic_path
from caries_mim.data import RADIOGRAPH_SUFFIXES, find_radiographs
from caries_mim.errors import CariesMimError
from caries_mim.inference import Findings, Predictor
from caries_mim.io import ReadOptions
from caries_mim.io.isolation import IsolatedReader
from caries_mim.package import load_package
from caries_mim.visualization import draw_findings
from pipelines.inspect_files import isolated_cli_reader


def expand_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given (a missing one still gets its error line), and the radiographs found under each folder.

    Folders are searched with :func:`caries_mim.data.find_radiographs`: radiograph suffixes and unnamed DICOM
    files, hidden entries skipped, sorted, so a README or a json beside the images is not reported as a failure.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from find_radiographs(path)
        else:
            yield path


def overlay_path(folder: Path, source: Path, used: set[str]) -> Path:
    """``folder/<source stem>.png``, with ``-2``, ``-3``... when another input already took that name.

    The file stem, never header data, names the picture: the name says which input it belongs to and nothing
    about the patient beyond what the user's own file name says.
    """
    lowered = source.name.lower()
    # Only a radiograph suffix is cut: a PACS export's "1.2.840.....123" is all stem, and ".nii.gz" is one suffix.
    suffix = next((suffix for suffix in RADIOGRAPH_SUFFIXES if lowered.endswith(suffix)), "")
    stem = source.name[: len(source.name) - len(suffix)] or "image"
    name, count = stem, 1
    while name in used:
        count += 1
        name = f"{stem}-{count}"
    used.add(name)
    return folder / f"{name}.png"


def write_overlay(pixels: np.ndarray, findings: Findings, path: Path) -> Path:
    """Draw the findings at the operating point (score >= threshold) on ``pixels`` ((H, W) in [0, 1]) as a PNG."""
    kept = findings.above_threshold
    image = draw_findings(
        pixels,
        np.array([finding.box for finding in kept], dtype=np.float64).reshape(-1, 4),
        [finding.label for finding in kept],
        [finding.score for finding in kept],
    )
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return path


def predict_one(
    predictor: Predictor,
    path: Path,
    options: ReadOptions,
    reader: IsolatedReader,
    *,
    overlay: Path | None = None,
    include_below_threshold: bool = False,
) -> dict[str, Any]:
    """The JSON-ready record of one file (see the module docstring); never raises for a bad file."""
    record: dict[str, Any] = {"file": str(path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            radiograph = reader.read(path, options)
            findings = predictor.predict(radiograph)
        except CariesMimError as exc:
            record.update(ok=False, error=exc.to_dict())
        except Exception as exc:  # a reader bug on one file must not hide the other files' answers
            message = f"unexpected {type(exc).__name__} while predicting: {str(exc)[:200]}"
            record.update(ok=False, error={"code": "internal_error", "message": message})
        else:
            record.update(ok=True, **findings.to_dict(include_below_threshold=include_below_threshold))
            if overlay is not None:
                record["overlay"] = str(write_overlay(radiograph.pixels, findings, overlay))
    if caught:
        record["warnings"] = len(caught)
    return record


def run_predict(
    model: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    *,
    overlay_dir: str | os.PathLike | None = None,
    options: ReadOptions | None = None,
    out: TextIO | None = None,
    device: str | None = None,
    include_below_threshold: bool = False,
) -> tuple[int, int]:
    """Predict on every file and write one JSON line per file to ``out`` (default: standard output).

    Args:
        model: a model package (``model.cmpkg``).
        files: files, or folders to search for radiographs (see :func:`expand_inputs`).
        overlay_dir: when given, ``overlay_dir/<stem>.png`` shows each readable image with its findings at the
            operating point; the folder is created.
        options: what the reader accepts (modalities, size limit).
        out: where the JSON lines go.
        device: "cpu", "cuda", "cuda:N", or None for CUDA when available.
        include_below_threshold: list every detection, not only those at or above the package's threshold.

    Returns:
        (files predicted, files seen).

    Raises:
        InvalidCheckpointError: the package is missing or unusable.
        InvalidArgumentError: an unusable device.
        InvalidDatasetError: a folder that does not exist.
    """
    out = out if out is not None else sys.stdout
    options = options or ReadOptions()
    predictor = load_package(model, device=device)
    folder = Path(overlay_dir) if overlay_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    seen = predicted = 0
    # Files are decoded in an isolated worker: one that crashes or hangs a decoder gets its error line only.
    with isolated_cli_reader() as reader:
        for path in expand_inputs(files):
            overlay = overlay_path(folder, path, used) if folder is not None else None
            record = predict_one(
                predictor, path, options, reader, overlay=overlay, include_below_threshold=include_below_threshold
            )
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            seen += 1
            predicted += bool(record["ok"])
    return predicted, seen


__all__ = ["expand_inputs", "overlay_path", "predict_one", "run_predict", "write_overlay"]
