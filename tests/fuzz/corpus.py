"""A seeded generator of hostile DICOM files: synthetic radiographs broken in the ways real archives and attackers
break them.

Every file starts as a small synthetic intra-oral radiograph (the product's own generator, cropped so that a
decode costs milliseconds) written in each transfer syntax the generator writes, plus Deflated Explicit VR Little
Endian, then goes through one mutation family:

==================  ===================================================================================
``truncate``        cut anywhere: in the preamble, the meta group, an element header, the pixel data
``flip_header``     random bytes overwritten between the meta group and the pixel data
``flip_pixels``     random bytes overwritten inside the pixel data (RLE segments, J2K codestream, raw)
``size_bomb``       Rows, Columns, NumberOfFrames, BitsAllocated, BitsStored, HighBit, SamplesPerPixel or
                    PixelRepresentation set to values that lie about the pixel data or ask for huge buffers
``wrong_vr``        an element's explicit VR replaced by another (or by two bytes that are no VR)
``wrong_length``    an element's length set to undefined, odd, huge or past the end of the file
``transfer_syntax`` the meta group's TransferSyntaxUID replaced: garbage, unknown, or a real syntax other
                    than the one the data set is encoded in
``fragments``       encapsulated pixel data whose tables lie: Basic/Extended Offset Table entries, item
                    lengths, RLE segment counts and offsets, J2K image size
``deflate_bomb``    a deflated data set that inflates to about 1 GiB of zeros (about 1 MB on the wire)
==================  ===================================================================================

Used by the CI fuzz tests (``tests/fuzz/``), the soak benchmark and the longer documented run
``python -m tests.fuzz --count 20000``. The same (seed, index) always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from caries_mim.synth import SynthConfig, render_indexed, write_dicom

#: Cropped size of the seed images (rows, columns): big enough for every codec's structure, cheap to decode.
SEED_SHAPE = (96, 128)
#: Transfer syntax name -> UID of the seed files.
SEED_SYNTAXES = {
    "explicit_vr_little_endian": ExplicitVRLittleEndian,
    "rle_lossless": RLELossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "deflated": DeflatedExplicitVRLittleEndian,
}
PREAMBLE_END = 132  # 128-byte preamble + "DICM"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = b"\xfe\xff\x00\xe0"
#: VRs whose explicit-VR length field is 4 bytes after two reserved bytes (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class HostileFile:
    """One generated file: ``name`` says how it was made (``<syntax>-<family>-<index>``)."""

    name: str
    family: str
    syntax: str
    data: bytes


@functools.cache
def seed_files() -> dict[str, bytes]:
    """Valid synthetic radiographs, one per transfer syntax name of :data:`SEED_SYNTAXES`."""
    image = render_indexed(0, "labeled", 0, SynthConfig())
    rows, columns = SEED_SHAPE
    image = dataclasses.replace(image, pixels=np.ascontiguousarray(image.pixels[:rows, :columns]))
    files = {}
    for name in ("explicit_vr_little_endian", "rle_lossless", "jpeg2000_lossless"):
        buffer = _BytesPath()
        write_dicom(image, buffer.path, index=0, seed=0, transfer_syntax=name, photometric="MONOCHROME2")
        files[name] = buffer.read()
    ds = pydicom.dcmread(io.BytesIO(files["explicit_vr_little_endian"]))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    files["deflated"] = _to_bytes(ds)
    return files


class _BytesPath:
    """A temporary file path for writers that only write to paths (the synthetic generator writes atomically)."""

    def __init__(self) -> None:
        import tempfile

        self._folder = tempfile.TemporaryDirectory()
        self.path = f"{self._folder.name}/seed.dcm"

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            data = handle.read()
        self._folder.cleanup()
        return data


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- where things are


@dataclass(frozen=True)
class Element:
    """A top-level explicit-VR little-endian element: where its header, VR, length field and value are."""

    tag: int
    offset: int  # of the tag
    vr: bytes
    length_offset: int
    length_size: int  # 2 or 4
    length: int
    value_offset: int


def top_level_elements(data: bytes, start: int = PREAMBLE_END) -> list[Element]:
    """Walk explicit VR little-endian elements from ``start`` until undefined length, EOF or nonsense."""
    elements, offset = [], start
    while offset + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, offset)
        vr = data[offset + 4 : offset + 6]
        if not vr.isalpha():
            break
        if vr in LONG_VRS:
            length_offset, length_size = offset + 8, 4
            (length,) = struct.unpack_from("<I", data, length_offset) if offset + 12 <= len(data) else (0,)
            value_offset = offset + 12
        else:
            length_offset, length_size = offset + 6, 2
            (length,) = struct.unpack_from("<H", data, length_offset)
            value_offset = offset + 8
        elements.append(Element(group << 16 | number, offset, vr, length_offset, length_size, length, value_offset))
        if length == 0xFFFFFFFF:
            break
        offset = value_offset + length
    return elements


def meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group."""
    end = PREAMBLE_END
    for element in top_level_elements(data):
        if element.tag >> 16 != 0x0002:
            break
        end = element.value_offset + element.length
    return end


def pixel_data_offset(data: bytes) -> int:
    """Offset of the Pixel Data element's value (the last occurrence of its tag), or the file's midpoint."""
    found = data.rfind(PIXEL_DATA_TAG)
    return found + 12 if found >= 0 else len(data) // 2


# --------------------------------------------------------------------------------------------------- mutations

Mutation = Callable[[random.Random, bytes, str], bytes]


def truncate(rng: random.Random, data: bytes, syntax: str) -> bytes:
    cut = rng.choice(
        [
            rng.randrange(0, PREAMBLE_END + 1),
            rng.randrange(PREAMBLE_END, meta_end(data) + 1),
            rng.randrange(meta_end(data), pixel_data_offset(data) + 1),
            rng.randrange(pixel_data_offset(data), len(data)),
        ]
    )
    return data[:cut]


def flip_header(rng: random.Random, data: bytes, syntax: str) -> bytes:
    start, stop = (PREAMBLE_END, len(data)) if syntax == "deflated" else (meta_end(data), pixel_data_offset(data))
    return _overwrite_random_bytes(rng, data, start, stop, rng.randint(1, 8))


def flip_pixels(rng: random.Random, data: bytes, syntax: str) -> bytes:
    return _overwrite_random_bytes(rng, data, pixel_data_offset(data), len(data), rng.randint(1, 24))


def _overwrite_random_bytes(rng: random.Random, data: bytes, start: int, stop: int, count: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(count):
        if stop > start:
            mutable[rng.randrange(start, stop)] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(mutable)


#: Header attributes a size bomb lies about, with the values it tries.
SIZE_BOMBS: dict[str, list[object]] = {
    "Rows": [0, 1, 4096, 65535],
    "Columns": [0, 1, 8000, 65535],
    "NumberOfFrames": ["0", "2", "1000", "99999999", "-1", b"x ", b"1\\2", b"\xff\xfe"],
    "BitsAllocated": [0, 1, 7, 8, 12, 32, 64, 255, 65535],
    "BitsStored": [0, 16, 17, 32, 65535],
    "HighBit": [0, 15, 31, 65535],
    "SamplesPerPixel": [0, 3, 65535],
    "PixelRepresentation": [1, 2],
}


def size_bomb(rng: random.Random, data: bytes, syntax: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    raw = {}  # values pydicom refuses to set: patched into the written bytes instead
    for keyword in rng.sample(sorted(SIZE_BOMBS), rng.randint(1, 2)):
        value = rng.choice(SIZE_BOMBS[keyword])
        if isinstance(value, bytes):
            setattr(ds, keyword, "1")
            raw[pydicom.datadict.tag_for_keyword(keyword)] = value
        else:
            setattr(ds, keyword, value)
    written = _to_bytes(ds)
    for tag, value in raw.items():
        written = replace_value(written, tag, value)
    return written


#: Two-byte VR fields to swap in: real VRs of both length layouts and non-VRs.
VR_SWAPS = [
    b"OB",
    b"OW",
    b"SQ",
    b"UN",
    b"UT",
    b"US",
    b"UL",
    b"DS",
    b"IS",
    b"AE",
    b"FD",
    b"\x00\x00",
    b"zz",
    b"\xff\xff",
]


def wrong_vr(rng: random.Random, data: bytes, syntax: str) -> bytes:
    elements = [e for e in top_level_elements(data) if syntax != "deflated" or e.tag >> 16 == 0x0002]
    element = rng.choice(elements)
    mutable = bytearray(data)
    mutable[element.offset + 4 : element.offset + 6] = rng.choice(VR_SWAPS)
    return bytes(mutable)


def wrong_length(rng: random.Random, data: bytes, syntax: str) -> bytes:
    elements = [e for e in top_level_elements(data) if syntax != "deflated" or e.tag >> 16 == 0x0002]
    element = rng.choice(elements)
    top = (1 << (8 * element.length_size)) - 1
    value = rng.choice([top, top - 1, element.length + 1, element.length * 3 + 7, len(data) * 2, 0, 0x7FFFFFFF & top])
    mutable = bytearray(data)
    fmt = "<H" if element.length_size == 2 else "<I"
    struct.pack_into(fmt, mutable, element.length_offset, value & top)
    return bytes(mutable)


TRANSFER_SYNTAX_LIES = [
    "",
    "garbage",
    "1.2.3.4.5.6.7",
    "1.2.840.10008.1.2.4.999",
    str(ImplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(ExplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(RLELossless),
    str(JPEGBaseline8Bit),
    str(JPEGLSLossless),
    str(JPEG2000Lossless),
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.5\x00\x00",
]


def transfer_syntax(rng: random.Random, data: bytes, syntax: str) -> bytes:
    """Rewrite (0002,0010), keeping the meta group length consistent."""
    lie = rng.choice(TRANSFER_SYNTAX_LIES).encode("ascii")
    return _fix_meta_group_length(replace_value(data, 0x00020010, lie + b"\x00" * (len(lie) % 2)))


def replace_value(data: bytes, tag: int, value: bytes) -> bytes:
    """``data`` with the top-level element ``tag`` holding ``value`` (its length field updated)."""
    for element in top_level_elements(data):
        if element.tag == tag:
            head = data[: element.length_offset]
            tail = data[element.value_offset + element.length :]
            fmt = "<H" if element.length_size == 2 else "<I"
            return head + struct.pack(fmt, len(value)) + value + tail
    return data


def _fix_meta_group_length(data: bytes) -> bytes:
    elements = top_level_elements(data)
    if not elements or elements[0].tag != 0x00020000:
        return data
    group_length = meta_end(data) - (elements[0].value_offset + elements[0].length)
    mutable = bytearray(data)
    struct.pack_into("<I", mutable, elements[0].value_offset, group_length)
    return bytes(mutable)


def fragments(rng: random.Random, data: bytes, syntax: str) -> bytes:
    """Lie in the encapsulation: offset tables, item lengths, the RLE header or the J2K image size."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        ds = pydicom.dcmread(io.BytesIO(seed_files()[rng.choice(["rle_lossless", "jpeg2000_lossless"])]))
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    frame = bytearray(frames[0])
    lie = rng.choice(["bot", "eot", "item_length", "extra_items", "codec_header"])
    if lie == "codec_header":
        _lie_in_codec_header(rng, frame, ds.file_meta.TransferSyntaxUID)
    offsets = [0]
    if lie == "bot":
        offsets = [rng.choice([1, 7, len(frame) * 4, 0xFFFFFFF0]) for _ in range(rng.randint(1, 3))]
    pixel_data = _encapsulate(bytes(frame), offsets)
    if lie == "extra_items":
        pixel_data = pixel_data[:-8] + _item(bytes(rng.randrange(0, 64))) * rng.randint(1, 5) + pixel_data[-8:]
    if lie == "item_length":
        mutable = bytearray(pixel_data)
        second_item = pixel_data.find(ITEM_TAG, 8)  # the frame's item, after the offset table's
        struct.pack_into("<I", mutable, second_item + 4, rng.choice([0, 1, len(frame) + 9, 0xFFFFFFFE, 0xFFFFFFFF]))
        pixel_data = bytes(mutable)
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    if lie == "eot":
        ds.ExtendedOffsetTable = struct.pack("<Q", rng.choice([3, len(frame) * 10, 2**63]))
        ds.ExtendedOffsetTableLengths = struct.pack("<Q", rng.choice([1, len(frame) * 10, 2**64 - 1]))
    return _to_bytes(ds)


def _lie_in_codec_header(rng: random.Random, frame: bytearray, syntax: pydicom.uid.UID) -> None:
    if syntax == RLELossless and len(frame) >= 64:
        # The 64-byte RLE header: a segment count, then 15 segment offsets.
        struct.pack_into("<I", frame, 0, rng.choice([0, 2, 3, 15, 16, 0xFFFFFFFF]))
        slot = rng.randrange(1, 16)
        struct.pack_into("<I", frame, 4 * slot, rng.choice([0, 1, 63, len(frame), len(frame) * 8, 0xFFFFFFFF]))
        return
    siz = frame.find(b"\xff\x51")
    if siz >= 0 and len(frame) >= siz + 14:
        # SIZ: Xsiz and Ysiz, the reference grid the decoder allocates for.
        struct.pack_into(">I", frame, siz + 6, rng.choice([1, 0xFFFF, 60000, 0x7FFFFFFF, 0xFFFFFFFF]))
        struct.pack_into(">I", frame, siz + 10, rng.choice([1, 0xFFFF, 60000, 0x7FFFFFFF, 0xFFFFFFFF]))


def _item(value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return ITEM_TAG + struct.pack("<I", len(value)) + value


def _encapsulate(frame: bytes, offsets: list[int]) -> bytes:
    table = b"" if offsets == [0] else struct.pack(f"<{len(offsets)}I", *offsets)
    return _item(table) + _item(frame) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


#: The inflated size of a deflate bomb: far beyond any radiograph's data set.
DEFLATE_BOMB_BYTES = 1 << 30


#: Extra meta group elements a bomb may carry, to lead astray a reader that walks the meta group by its own rules:
#: a 4-byte-length VR that is rare (UV), and a sequence of undefined length.
META_DETOURS = {
    "plain": b"",
    "uv_meta": b"\x02\x00\xf0\x00UV\x00\x00" + struct.pack("<I", 8) + bytes(8),
    "sq_meta": b"\x02\x00\xf1\x00SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
}


def deflate_bomb(rng: random.Random, data: bytes, syntax: str, detour: str | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to ~1 GiB: a Pixel Data element declaring
    that length, then zeros. Compressed once per MiB with a full flush, so the deflate stream is one block
    repeated (about 1 KB per inflated MiB) and costs nothing to build. ``detour`` (one of :data:`META_DETOURS`,
    drawn when None) adds an element to the meta group."""
    extra = META_DETOURS[detour if detour is not None else rng.choice(sorted(META_DETOURS))]
    deflated = seed_files()["deflated"]
    ds = pydicom.dcmread(io.BytesIO(seed_files()["explicit_vr_little_endian"]))
    del ds.PixelData
    plain = _to_bytes(ds)
    data_set = plain[meta_end(plain) :]
    declared = DEFLATE_BOMB_BYTES + rng.choice([0, 2, 1 << 20])
    pixel_header = PIXEL_DATA_TAG + b"OW\x00\x00" + struct.pack("<I", declared)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = compressor.compress(data_set + pixel_header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block_again = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == block_again, "a fully flushed block of zeros deflates to the same bytes every time"
    blocks = block * ((DEFLATE_BOMB_BYTES >> 20) - 1)
    meta = bytearray(deflated[: meta_end(deflated)] + extra)
    # (0002,0000) is the first element (UL, 4 bytes at 140): the length of the group after it.
    struct.pack_into("<I", meta, PREAMBLE_END + 8, len(meta) - (PREAMBLE_END + 12))
    return bytes(meta) + first + block + blocks + compressor.flush()


MUTATIONS: dict[str, Mutation] = {
    "truncate": truncate,
    "flip_header": flip_header,
    "flip_pixels": flip_pixels,
    "size_bomb": size_bomb,
    "wrong_vr": wrong_vr,
    "wrong_length": wrong_length,
    "transfer_syntax": transfer_syntax,
    "fragments": fragments,
    "deflate_bomb": deflate_bomb,
}
#: Relative frequency of each family (bombs are few: each costs the reader a refusal, not a finding).
WEIGHTS = {name: 1.0 for name in MUTATIONS} | {"flip_pixels": 2.0, "flip_header": 1.5, "deflate_bomb": 0.1}


def hostile_file(seed: int, index: int) -> HostileFile:
    """File ``index`` of the corpus for ``seed``: a function of (seed, index) alone."""
    rng = random.Random(f"caries-mim-fuzz-{seed}-{index}")
    family = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    syntax = rng.choice(sorted(SEED_SYNTAXES))
    data = MUTATIONS[family](rng, seed_files()[syntax], syntax)
    return HostileFile(f"{syntax}-{family}-{index:06d}", family, syntax, data)


def hostile_files(seed: int, count: int, *, start: int = 0) -> Iterator[HostileFile]:
    """``count`` files of the corpus for ``seed``, from ``start``."""
    for index in range(start, start + count):
        yield hostile_file(seed, index)


def every_family(seed: int) -> Iterator[HostileFile]:
    """One file of each mutation family and seed syntax (the families' smallest cover)."""
    rng_index = 0
    for family, mutation in MUTATIONS.items():
        for syntax in sorted(SEED_SYNTAXES):
            rng = random.Random(f"caries-mim-fuzz-cover-{seed}-{rng_index}")
            rng_index += 1
            data = mutation(rng, seed_files()[syntax], syntax)
            yield HostileFile(f"{syntax}-{family}-cover", family, syntax, data)
