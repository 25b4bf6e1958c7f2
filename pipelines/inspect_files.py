"""``caries-mim inspect``: one JSON line per file saying what it is, or exactly why it cannot be read.

Files are decoded in an isolated worker process (:class:`~caries_mim.io.isolation.IsolatedReader`): a file that
crashes or hangs a native decoder gets its error line and the listing goes on, which is what inspecting a
PACS export or a folder from elsewhere needs.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from caries_mim.errors import CariesMimError
from caries_mim.io import ReadOptions
from caries_mim.io.isolation import IsolatedReader

#: A person waits for these commands: a slow decode (a 50-megapixel JPEG 2000) may take this long.
CLI_DECODE_TIMEOUT_S = 120.0


def expand_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, and every file below a given folder (sorted, hidden entries skipped)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


def isolated_cli_reader() -> IsolatedReader:
    """The one-worker isolated reader of a command that reads the user's files (``inspect``, ``predict``)."""
    return IsolatedReader(1, timeout_s=CLI_DECODE_TIMEOUT_S, relay_warnings=True)


def inspect_file(
    path: Path, options: ReadOptions, reader: IsolatedReader, *, reveal_uids: bool = False
) -> dict[str, Any]:
    """Read one file fully (pixels included, so corrupt data is caught) and describe it as a JSON-ready dict.

    Warnings raised while reading (pydicom's notes on non-conformant files) go into the file's own record
    instead of interleaving with other files' output on stderr.
    """
    record: dict[str, Any] = {"file": str(path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            radiograph = reader.read(path, options)
        except CariesMimError as exc:
            record.update(ok=False, error=exc.to_dict())
        except Exception as exc:  # a reader bug must not hide the other files' answers
            message = f"unexpected {type(exc).__name__} while reading: {str(exc)[:200]}"
            record.update(ok=False, error={"code": "internal_error", "message": message})
        else:
            pixels = radiograph.pixels
            record.update(
                ok=True,
                **radiograph.describe(reveal_uids=reveal_uids),
                pixel_mean=round(float(pixels.mean()), 4),
                pixel_std=round(float(pixels.std()), 4),
            )
    notes = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    if notes:
        record["warnings"] = notes
    return record


def inspect_files(
    paths: Iterable[str | os.PathLike], options: ReadOptions, out: TextIO, *, reveal_uids: bool = False
) -> tuple[int, int]:
    """Write one JSON line per file to ``out``; return (files seen, files readable)."""
    seen = readable = 0
    with isolated_cli_reader() as reader:
        for path in expand_paths(paths):
            record = inspect_file(path, options, reader, reveal_uids=reveal_uids)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            seen += 1
            readable += bool(record["ok"])
    return seen, readable
