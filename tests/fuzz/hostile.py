"""Stand-ins for native decoders that misbehave on purpose: crash, hang, exhaust memory (for isolation tests)."""

from __future__ import annotations

import ctypes
import time

from caries_mim.errors import InvalidConfigError
from caries_mim.io import read_radiograph
from caries_mim.io.reader import read_source_bytes


def hostile_read(source, options):
    """``read_radiograph``, except for files that start with a command word: CRASH (a segmentation fault), HANG
    (an endless loop that never releases the GIL... of its own process), SLEEP (blocks without using CPU),
    GREEDY (allocates 4 GiB), PANIC (raises a BaseException, as a Rust panic does), FORGE (answers an error code
    no reader gives, as a subverted worker might)."""
    data = read_source_bytes(source)[0]
    if data.startswith(b"CRASH"):
        ctypes.string_at(0)
    if data.startswith(b"HANG"):
        while True:
            pass
    if data.startswith(b"SLEEP"):
        time.sleep(3600)
    if data.startswith(b"GREEDY"):
        bytearray(4 << 30)
    if data.startswith(b"PANIC"):
        raise BaseException("a native panic")
    if data.startswith(b"FORGE"):
        raise InvalidConfigError("not a reader's error")
    return read_radiograph(source, options)
