"""The validation pass: decode every file once, before training, and set the unreadable ones aside.

Why up front and not in ``__getitem__``: a Dataset cannot drop an item mid-epoch without breaking ``len()``, the
sampler and the batch size, and a skip inside DataLoader workers would warn once per worker and epoch. Decoding
each file once here costs what the first epoch would have cost anyway, because the pass goes through the decode
cache and fills it: the epochs that follow read the cache. It also yields each image's size, which the detection
dataset checks against its annotations.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from caries_mim.errors import CariesMimError
from caries_mim.io import Radiograph

logger = logging.getLogger(__name__)

#: How many skipped paths a summary names; the rest are only counted.
EXAMPLES_SHOWN = 5


@dataclass
class SkippedFiles:
    """Files the validation pass could not read: counts by error code and the first few (path, code) pairs."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, path: Path, error: CariesMimError) -> None:
        self.counts[error.code] += 1
        if len(self.examples) < EXAMPLES_SHOWN:
            self.examples.append((path, error.code))

    def summary(self, scanned: int) -> str:
        """One line: how many of ``scanned`` files were skipped, per code, and a few paths (no pixel data)."""
        by_code = ", ".join(f"{code}: {count}" for code, count in sorted(self.counts.items()))
        shown = "; ".join(f"{path} ({code})" for path, code in self.examples)
        more = f" and {self.total - len(self.examples)} more" if self.total > len(self.examples) else ""
        return f"skipped {self.total} of {scanned} unreadable file(s) [{by_code}]: {shown}{more}"


@dataclass(frozen=True)
class IndexedImage:
    """A file that decoded, with its size in pixels and its (row, column) spacing in mm (None when unknown)."""

    path: Path
    height: int
    width: int
    spacing_mm: tuple[float, float] | None = None


def index_readable(
    paths: Sequence[Path],
    load: Callable[[Path], Radiograph],
    *,
    progress: bool = True,
    description: str = "indexing radiographs",
) -> tuple[list[IndexedImage], SkippedFiles]:
    """Decode each path once with ``load``; keep the readable ones, count the others by error code.

    Logs one summarized warning when anything was skipped. Only :class:`CariesMimError` (a problem with the
    file) is caught: anything else is a bug or an environment failure and propagates.
    """
    readable: list[IndexedImage] = []
    skipped = SkippedFiles()
    for path in tqdm(paths, desc=description, unit="file", disable=not progress or not paths):
        try:
            radiograph = load(path)
        except CariesMimError as exc:
            skipped.add(path, exc)
            continue
        readable.append(
            IndexedImage(path=path, height=radiograph.height, width=radiograph.width, spacing_mm=radiograph.spacing_mm)
        )
    if skipped.total:
        logger.warning(skipped.summary(len(paths)))
    return readable, skipped
