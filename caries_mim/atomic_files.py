"""Writing files so that a reader (or a crash) never sees half of one.

Everything the product writes that something else reads later (DICOM files, annotation json, cache entries, and
later checkpoints) goes through :func:`atomic_path`: write a uniquely named sibling, then ``os.replace`` it over
the target, which is atomic on POSIX and Windows when both are on the same file system.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on a clean exit it replaces ``target``, on error it is removed.

    The name is unique per call (pid + uuid), so concurrent writers of the same target in threads or processes
    never share a temporary file; the last one to finish wins with a complete file.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`)."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
