"""The one place where a decoder's failure, whatever it raises, becomes a typed error.

Pixel data goes through native code (Rust: pylibjpeg-rle; C/C++: OpenJPEG, GDCM, CharLS, libjpeg-turbo, zlib,
ITK). Hostile input makes them raise more than ``Exception``: a Rust panic arrives as
``pyo3_runtime.PanicException``, which derives from ``BaseException`` so that ``except Exception`` code does not
swallow it by accident. For a reader, though, a decoder that panics on a file has said only that the file is
broken. Everything a decoder raises becomes the caller's typed error, except the exceptions that stop the
program (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``), which pass through untouched.

Crashes that kill the process (a segmentation fault) and hangs cannot be caught in the process at all: for those,
:mod:`caries_mim.io.isolation` decodes in worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from caries_mim.errors import CariesMimError, ImageTooLargeError, first_line

#: What a decoder may raise that must never be turned into a file error.
PROGRAM_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def decoder_failures_as(error_type: type[CariesMimError], what: str) -> Iterator[None]:
    """Run decoder code; whatever it raises becomes ``error_type(f"{what}: <first line of the cause>")``.

    Typed errors pass through unchanged, ``MemoryError`` becomes :class:`ImageTooLargeError` (the decode needs
    more memory than the process may have), and :data:`PROGRAM_EXITS` are re-raised as they are.
    """
    try:
        yield
    except (CariesMimError, *PROGRAM_EXITS):
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(f"{what}: decoding needs more memory than this process may use") from exc
    except BaseException as exc:  # a Rust panic is a BaseException; see the module docstring
        raise error_type(f"{what}: {first_line(exc)}") from exc
