"""``multipart/related`` bodies in and out, for DICOMweb (PS3.18 8.6.1.2): STOW-RS requests are read part by part
as they stream in, WADO-RS responses are written file by file.

Reading uses python-multipart's streaming parser (the one Starlette parses forms with), which works for any
multipart subtype. What it leaves to us: the media type's parameters (quoted or not: dicomweb-client quotes
``type``, Orthanc does not quote the boundary), a preamble before the first boundary (RFC 2046 5.1.1 allows one;
a leading CRLF is the common case, which the parser skips itself, any other text is dropped here), and bodies of
unknown length (chunked transfer encoding: the parser never needs the length).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from caries_mim.errors import InvalidArgumentError


@dataclass(frozen=True)
class MediaType:
    """A media type and its parameters, names in lower case (``multipart/related``, ``{"type": ...}``)."""

    name: str
    parameters: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, header: str) -> MediaType:
        name, parameters = parse_options_header(header.encode("latin-1"))
        return cls(
            name.decode("latin-1").strip().lower(),
            {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in parameters.items()},
        )


@dataclass
class Part:
    """One body part: its headers (names in lower case) and content."""

    headers: dict[str, str]
    content: bytes | bytearray

    @property
    def media_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type", ""))


#: Longest boundary accepted (RFC 2046 says 70; see read_parts).
MAX_BOUNDARY_CHARACTERS = 200


class PartTooLargeError(InvalidArgumentError):
    """A body part larger than the reader accepts."""


async def read_parts(chunks: AsyncIterator[bytes], boundary: str, *, max_part_bytes: int) -> AsyncIterator[Part]:
    """Yield the parts of a multipart body as each one ends (memory: the part being read, plus one chunk).

    Args:
        chunks: the body as it arrives (``request.stream()``).
        boundary: the ``boundary`` parameter of the body's media type.
        max_part_bytes: largest part accepted.
    Raises:
        InvalidArgumentError: the body is not multipart with this boundary, or ends before its closing boundary.
        PartTooLargeError: a part is larger than ``max_part_bytes``.
    """
    # RFC 2046 caps boundaries at 70 characters, but Orthanc's DICOMweb client sends 73 (a UUID twice): be lenient
    # up to a length that still bounds the delimiter search.
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARACTERS:
        raise InvalidArgumentError(
            f"the multipart boundary is missing or longer than {MAX_BOUNDARY_CHARACTERS} characters"
        )
    finished: list[Part] = []
    state = _PartState(max_part_bytes)
    parser = MultipartParser(boundary.encode("latin-1"), state.callbacks(finished))
    delimiter = b"--" + boundary.encode("latin-1")
    preamble = bytearray()
    in_body = False
    async for chunk in chunks:
        if not in_body:
            # Hold text before the first delimiter back from the parser, which wants the delimiter first.
            preamble += chunk
            start = preamble.find(delimiter)
            if start < 0:
                if len(preamble) > 64 * 1024:
                    raise InvalidArgumentError("no multipart boundary in the first 64 KiB of the body")
                continue
            chunk, in_body = bytes(preamble[start:]), True
            preamble.clear()
        problem = None
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            problem = InvalidArgumentError(f"the multipart body is malformed: {exc}")
        # The parts that ended before a problem in the same chunk are whole: they go first.
        while finished:
            yield finished.pop(0)
        if problem is not None or state.error is not None:
            raise problem or state.error
    if not state.ended:
        raise InvalidArgumentError("the multipart body ended before its closing boundary")


class _PartState:
    """python-multipart's callbacks: they hand out slices of the chunk being parsed, a header name or value
    possibly split across chunks."""

    def __init__(self, max_part_bytes: int) -> None:
        self.max_part_bytes = max_part_bytes
        self.headers: dict[str, str] = {}
        self.name = bytearray()
        self.value = bytearray()
        self.content = bytearray()
        self.overflowed = False
        self.ended = False
        self.error: Exception | None = None

    def callbacks(self, finished: list[Part]) -> dict:
        def part_begin() -> None:
            self.headers, self.content, self.overflowed = {}, bytearray(), False

        def header_field(data: bytes, start: int, end: int) -> None:
            self.name += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self.value += data[start:end]

        def header_end() -> None:
            self.headers[self.name.decode("latin-1").strip().lower()] = self.value.decode("latin-1").strip()
            self.name, self.value = bytearray(), bytearray()

        def part_data(data: bytes, start: int, end: int) -> None:
            if len(self.content) + end - start > self.max_part_bytes:
                # Raising inside a callback would leave the parser mid-state; the caller raises it after write().
                self.error = self.error or PartTooLargeError(f"a part is larger than {self.max_part_bytes} bytes")
                self.overflowed = True
                return
            self.content += data[start:end]

        def part_end() -> None:
            if self.overflowed:  # a cut part is never handed out as if it were whole
                return
            finished.append(Part(self.headers, self.content))  # handed over, not copied: a part can be 256 MiB
            self.content = bytearray()

        def end() -> None:
            self.ended = True

        return {
            "on_part_begin": part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": part_data,
            "on_part_end": part_end,
            "on_end": end,
        }


def new_boundary() -> str:
    return f"caries-mim-{secrets.token_hex(16)}"


def write_parts(parts: Iterable[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """A multipart body from ``(content type, content)`` pairs, one part at a time (for a streaming response)."""
    for content_type, content in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        yield content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
