"""The decode worker process of :class:`~caries_mim.io.isolation.IsolatedReader`, and the wire format both sides use.

Run as ``python -m caries_mim.io.decode_worker FD MEMORY_BYTES MODULE:FUNCTION``: it reads requests from the
socket ``FD`` (inherited from the parent), answers each with one reply, and exits when the parent closes it.

Frames are ``<u32 header length><u64 payload length><JSON header><payload>``. A request's header names a path, or
carries the file as its payload, with the read options; a reply's header is ``{"status": "ok", "radiograph":
{...}}`` with the float32 pixels as payload, or ``{"status": "error", "code", "message"}``. No pickles cross the
boundary: a worker runs native decoders on hostile files, and a pickle from a subverted worker would run code in
the parent; JSON and raw pixels cannot.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from caries_mim.errors import CariesMimError, first_line
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph

_PREFIX = struct.Struct("<IQ")
#: Largest JSON header either side accepts (a reply's header is a few hundred bytes).
MAX_HEADER_BYTES = 1 << 20
#: Distinct warnings a reply relays (first lines, 300 characters at most each).
MAX_WARNINGS = 20


class ProtocolError(Exception):
    """A frame that breaks the wire format (a bug, or a worker that no longer behaves)."""


# ----------------------------------------------------------------------------------------------------- frames


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    sock.sendall(_PREFIX.pack(len(encoded), len(payload)) + encoded)
    if len(payload):
        sock.sendall(payload)


def recv_frame(
    sock: socket.socket, *, deadline: float | None = None, max_payload: int = 1 << 40
) -> tuple[dict[str, Any], bytearray]:
    """One frame. ``deadline`` (``time.monotonic()``) bounds the whole frame.

    Raises:
        TimeoutError: the deadline passed.
        EOFError: the other side closed the connection (at a frame boundary or inside one).
        ProtocolError: sizes past the limits, or a header that is not a JSON object.
    """
    header_size, payload_size = _PREFIX.unpack(_recv_exactly(sock, _PREFIX.size, deadline))
    if header_size > MAX_HEADER_BYTES or payload_size > max_payload:
        raise ProtocolError(f"frame sizes {header_size} + {payload_size} bytes are past the limits")
    try:
        header = json.loads(_recv_exactly(sock, header_size, deadline))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"the frame header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("the frame header is not a JSON object")
    return header, _recv_exactly(sock, payload_size, deadline)


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete frame before the deadline")
            sock.settimeout(remaining)
        else:
            sock.settimeout(None)
        try:
            count = sock.recv_into(view[received:], size - received)
        except TimeoutError:
            raise
        except OSError as exc:  # ECONNRESET and friends: the other side is gone
            raise EOFError(str(exc)) from None
        if count == 0:
            raise EOFError("the connection closed")
        received += count
    return buffer


# ---------------------------------------------------------------------------------------- what crosses the wire


def options_to_json(options: ReadOptions) -> dict[str, Any]:
    return {
        "allowed_modalities": sorted(options.allowed_modalities),
        "allow_non_dicom": options.allow_non_dicom,
        "max_pixels": options.max_pixels,
        "voi_index": options.voi_index,
    }


def options_from_json(value: dict[str, Any]) -> ReadOptions:
    return ReadOptions(
        allowed_modalities=frozenset(str(item) for item in value["allowed_modalities"]),
        allow_non_dicom=bool(value["allow_non_dicom"]),
        max_pixels=int(value["max_pixels"]),
        voi_index=int(value["voi_index"]),
    )


def radiograph_to_json(radiograph: Radiograph) -> dict[str, Any]:
    """Its metadata and shape; the pixels travel as the frame's payload (float32, this machine's byte order)."""
    return {"shape": list(radiograph.pixels.shape), **radiograph.metadata()}


def radiograph_from_json(header: dict[str, Any], payload: bytearray) -> Radiograph:
    """The parent's side of :func:`radiograph_to_json`; every field is checked, nothing is evaluated.

    Raises:
        ProtocolError: a field of the wrong type, or pixels that do not match the shape.
    """
    try:
        rows, columns = (int(n) for n in header["shape"])
        if rows <= 0 or columns <= 0 or rows * columns * 4 != len(payload):
            raise ProtocolError(f"{len(payload)} pixel bytes do not make a {rows} x {columns} float32 image")
        pixels = np.frombuffer(payload, dtype=np.float32).reshape(rows, columns)
        return Radiograph.from_metadata(pixels, header)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ProtocolError(f"malformed radiograph in the reply ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------------ the worker


def function_reference(function: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, as the worker imports it."""
    reference = f"{function.__module__}:{function.__qualname__}"
    if "<" in reference or function.__module__ == "__main__":
        raise ValueError(f"{reference} is not importable by name; pass a module-level function of a module")
    return reference


def _import_function(reference: str) -> Callable[..., Any]:
    module_name, _, name = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def serve(sock: socket.socket, read_function: Callable[[Any, ReadOptions], Radiograph]) -> None:
    """Answer requests until the parent closes the socket."""
    while True:
        try:
            header, payload = recv_frame(sock)
        except (EOFError, ProtocolError):
            return
        options = options_from_json(header["options"])
        source: Path | bytes = Path(header["path"]) if "path" in header else bytes(payload)
        del payload
        limit_cpu_time(float(header["cpu_limit_s"]))
        reply: dict[str, Any]
        pixels: np.ndarray | None = None
        with warnings.catch_warnings(record=True) as noted:
            warnings.simplefilter("always")
            try:
                radiograph = read_function(source, options)
            except CariesMimError as exc:
                reply = {"status": "error", "code": exc.code, "message": exc.message}
            except MemoryError:
                reply = {"status": "memory"}
            except Exception as exc:  # a reader bug: the parent reports its kind (the text may quote the file)
                reply = {"status": "bug", "kind": type(exc).__name__}
            else:
                try:
                    pixels = np.ascontiguousarray(radiograph.pixels, dtype=np.float32)
                    reply = {"status": "ok", "radiograph": radiograph_to_json(radiograph)}
                except MemoryError:
                    reply = {"status": "memory"}
        reply["warnings"] = sorted({first_line(Warning(str(note.message))) for note in noted})[:MAX_WARNINGS]
        send_frame(sock, reply, b"" if pixels is None else memoryview(pixels).cast("B"))


def limit_cpu_time(seconds: float) -> None:
    """Let the kernel kill this process (SIGXCPU) once the coming read has used ``seconds`` of CPU time.

    The parent kills a read that overruns its wall-time limit; this bound holds even when the parent itself died
    while a decoder spins, so no orphan burns a core for ever. Unix only (a no-op elsewhere).
    """
    import math
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(spent + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def forbid_core_dumps() -> None:
    """No core file when a decoder crashes: it would hold the upload and its pixels (patient data) on the host's
    disk, and one crashing file sent again and again would fill that disk."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def exit_with_the_parent() -> None:
    """End this process when its parent is gone, also while a read blocks without using CPU (where the CPU limit
    does not help). A watcher thread polls the parent's pid: ``PR_SET_PDEATHSIG`` would follow the parent's
    *thread* that started us, and the pool starts replacements from short-lived threads."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def limit_memory(extra_bytes: int) -> None:
    """Cap this process's data segment at what it uses now plus ``extra_bytes`` (Linux; a no-op elsewhere).

    ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: it counts the heap and private anonymous mappings (numpy's large
    arrays, decoder buffers) but not shared libraries and reserved-but-unused address space.
    """
    import resource

    used = _data_segment_bytes()
    if used is not None:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_DATA, (used + extra_bytes, used + extra_bytes))


def _data_segment_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _quiet_native_output() -> None:
    """stdout and stderr to /dev/null: decoders print diagnostics that can quote file contents."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        os.dup2(devnull, descriptor)
    os.close(devnull)


def main(argv: list[str]) -> int:
    descriptor, memory_bytes, reference = int(argv[0]), int(argv[1]), argv[2]
    sock = socket.socket(fileno=descriptor)
    try:
        read_function = _import_function(reference)
    except Exception as exc:  # told to the parent, which says it cannot start decoders
        send_frame(sock, {"status": "failed", "message": f"cannot import {reference}: {first_line(exc)}"})
        return 1
    # pydicom logs each decoder plugin that fails, with its traceback; the reply says what failed. (Its warnings,
    # which can quote header values, are recorded per read and relayed only to callers that ask for them.)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    if memory_bytes > 0:
        limit_memory(memory_bytes)
    forbid_core_dumps()
    exit_with_the_parent()
    _quiet_native_output()
    send_frame(sock, {"status": "ready", "pid": os.getpid()})
    serve(sock, read_function)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
