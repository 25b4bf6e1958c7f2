"""Decode cache: every epoch after the first reads pixels from disk instead of decoding DICOM again.

An entry is keyed by the SHA-256 of the source file's *content* (renamed or copied files hit, an edited file
misses), the :class:`~caries_mim.io.ReadOptions` it was read with, and :data:`CACHE_FORMAT_VERSION`. One entry is
one file::

    magic b"CMIMDC" + u16 format version      8 bytes
    u32 header length (little endian)         4 bytes
    header: UTF-8 JSON                        key, kind, shape, payload CRC-32, Radiograph metadata
    payload: uint16 little endian (H * W)     round(pixels * 65535)

uint16 keeps 1/65535 steps, finer than any 12- or 16-bit detector after windowing, at half the size of float32.
Misses return the same quantized pixels as hits, so a training run never depends on whether the cache was warm.

Writers put the entry in a unique temporary file in the entry's folder and ``os.replace`` it into place, so two
DataLoader workers or processes writing the same key each publish a complete file and readers never see a partial
one. No fsync: an entry torn by a power loss fails the length or CRC check below and is decoded again, which is
what fsync would have bought, without paying for it on every write.

Entries hold the DICOM UIDs the :class:`~caries_mim.io.Radiograph` carries (never patient names or IDs); keep the
cache folder under the same access rules as the images it was made from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import CariesMimError, MissingDecoderError, UnreadableFileError, error_class_for
from caries_mim.io import Radiograph, ReadOptions, read_radiograph, read_source_bytes

logger = logging.getLogger(__name__)

#: Bump when the entry layout or the meaning of a field changes: old entries then simply stop matching.
CACHE_FORMAT_VERSION = 1

_MAGIC = b"CMIMDC"
_PREAMBLE = struct.Struct("<6sHI")  # magic, format version, header length
_QUANT_MAX = 65535.0

#: Formats whose header names a separate data file: hashing the header alone would miss an edited data file, so
#: these are read directly, never cached (they are rare for dental radiographs).
_DETACHED_HEADER_SUFFIXES = (".mhd", ".nhdr")

#: Errors that depend on this machine rather than on the file's content, so a cached copy could go stale.
_ENVIRONMENT_ERRORS = (MissingDecoderError, UnreadableFileError)


def options_fingerprint(options: ReadOptions) -> str:
    """Stable text form of ``options`` (sets sorted), so equal options give equal cache keys in every process."""
    fields = {}
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        fields[field.name] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return json.dumps(fields, sort_keys=True)


def quantize(pixels: np.ndarray) -> np.ndarray:
    """float32 (H, W) in [0, 1] -> uint16 (H, W), round(pixels * 65535)."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * _QUANT_MAX).astype("<u2")


def dequantize(stored: np.ndarray) -> np.ndarray:
    """uint16 (H, W) -> float32 (H, W) in [0, 1]."""
    return stored.astype(np.float32) * np.float32(1.0 / _QUANT_MAX)


class _CorruptEntryError(Exception):
    """An entry that is truncated, mangled or belongs to another key: treated as a miss."""


class DecodeCache:
    """Content-addressed cache of decoded radiographs under ``root`` (created on first write).

    Safe to share between DataLoader workers and between processes; picklable (it holds only its root path).
    ``hits`` and ``misses`` count this process's lookups, for logging.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"DecodeCache({str(self.root)!r})"

    def key(self, content: bytes, options: ReadOptions) -> str:
        """Hex SHA-256 over the format version, the options fingerprint and the file content."""
        digest = hashlib.sha256(f"caries-mim decode cache v{CACHE_FORMAT_VERSION}\0".encode())
        digest.update(options_fingerprint(options).encode())
        digest.update(b"\0")
        digest.update(content)
        return digest.hexdigest()

    def entry_path(self, key: str) -> Path:
        """Where the entry for ``key`` lives: two-character fan-out folders keep directories small."""
        return self.root / key[:2] / f"{key}.cmimdc"

    def load(self, path: str | os.PathLike, options: ReadOptions | None = None) -> Radiograph:
        """The radiograph in ``path``, from the cache when possible, decoded (and stored) otherwise.

        Returns:
            A :class:`Radiograph` with float32 pixels (H, W) in [0, 1], quantized to 1/65535 steps whether it
            came from the cache or not.
        Raises:
            caries_mim.errors.CariesMimError: the file cannot be read as a radiograph (the same error, with the
                same code, that :func:`caries_mim.io.read_radiograph` raises; content-determined errors are
                cached too, so a bad file is not decoded again on every scan).
        """
        options = options or ReadOptions()
        source = Path(path)
        if source.name.lower().endswith(_DETACHED_HEADER_SUFFIXES):
            radiograph = read_radiograph(source, options)
            return dataclasses.replace(radiograph, pixels=dequantize(quantize(radiograph.pixels)))

        content, _ = read_source_bytes(source)
        key = self.key(content, options)
        entry = self.entry_path(key)
        try:
            cached = self._read_entry(entry, key)
        except CariesMimError:
            self.hits += 1  # a cached decode error, re-raised with its own type
            raise
        if cached is not None:
            self.hits += 1
            return cached

        self.misses += 1
        try:
            radiograph = read_radiograph(content, options)
        except CariesMimError as exc:
            if not isinstance(exc, _ENVIRONMENT_ERRORS):
                self._write_entry(entry, {"key": key, "kind": "error", "code": exc.code, "message": exc.message})
            raise
        stored = quantize(radiograph.pixels)
        header = {
            "key": key,
            "kind": "image",
            "shape": list(stored.shape),
            "crc32": zlib.crc32(stored.data),
            "metadata": radiograph.metadata(),
        }
        self._write_entry(entry, header, stored.tobytes())
        return dataclasses.replace(radiograph, pixels=dequantize(stored))

    def _read_entry(self, entry: Path, key: str) -> Radiograph | None:
        """The cached radiograph, None on a miss; re-raises a cached decode error. Corrupt entries are misses."""
        try:
            blob = entry.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            logger.warning("decode cache entry %s cannot be read (%s); decoding the source instead", entry, exc)
            return None
        try:
            header, payload = self._parse(blob, key)
            if header["kind"] == "error":
                error_class = error_class_for(header["code"])
                if error_class is None:
                    raise _CorruptEntryError(f"unknown error code {header['code']!r}")
                raise error_class(header["message"])
            height, width = header["shape"]
            if len(payload) != 2 * height * width or zlib.crc32(payload) != header["crc32"]:
                raise _CorruptEntryError("pixel payload is truncated or altered")
            pixels = dequantize(np.frombuffer(payload, dtype="<u2").reshape(height, width))
            return Radiograph.from_metadata(pixels, header["metadata"])
        except (_CorruptEntryError, KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            logger.warning("decode cache entry %s is corrupt (%s); decoding the source again", entry, exc)
            return None

    @staticmethod
    def _parse(blob: bytes, key: str) -> tuple[dict[str, Any], memoryview]:
        if len(blob) < _PREAMBLE.size:
            raise _CorruptEntryError("shorter than its preamble")
        magic, version, header_length = _PREAMBLE.unpack_from(blob)
        if magic != _MAGIC or version != CACHE_FORMAT_VERSION:
            raise _CorruptEntryError("wrong magic or format version")
        end = _PREAMBLE.size + header_length
        if len(blob) < end:
            raise _CorruptEntryError("header is truncated")
        header = json.loads(blob[_PREAMBLE.size : end].decode("utf-8"))
        if not isinstance(header, dict) or header.get("key") != key:
            raise _CorruptEntryError("header belongs to another key")
        return header, memoryview(blob)[end:]

    def _write_entry(self, entry: Path, header: dict[str, Any], payload: bytes = b"") -> None:
        """Publish atomically: write a uniquely named sibling, then rename it over the entry."""
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(entry) as temporary, open(temporary, "wb") as handle:
                handle.write(_PREAMBLE.pack(_MAGIC, CACHE_FORMAT_VERSION, len(header_bytes)))
                handle.write(header_bytes)
                handle.write(payload)
        except OSError as exc:
            # A full or read-only cache disk must not stop training: the caller already has the pixels.
            logger.warning("decode cache entry %s cannot be written (%s); continuing without it", entry, exc)


@dataclasses.dataclass(frozen=True)
class RadiographLoader:
    """``path -> Radiograph`` through a :class:`DecodeCache` when one is given, else straight from the file.

    A small picklable object rather than a closure, so datasets holding it work with DataLoader workers that
    start by spawning.
    """

    cache: DecodeCache | None = None
    options: ReadOptions = dataclasses.field(default_factory=ReadOptions)

    def __call__(self, path: str | os.PathLike) -> Radiograph:
        if self.cache is not None:
            return self.cache.load(path, self.options)
        return read_radiograph(path, self.options)
