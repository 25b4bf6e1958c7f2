"""Reading untrusted files in worker processes: a decoder that crashes, hangs or exhausts memory costs the file that
did it, not the process that asked.

The decoders behind :func:`~caries_mim.io.read_radiograph` are native code (OpenJPEG, GDCM, CharLS, libjpeg-turbo,
a Rust RLE decoder, zlib, ITK). In-process, :mod:`caries_mim.io.decoder_failures` turns everything they *raise*
into a typed error, but a segmentation fault ends the process, an endless loop holds a thread for ever, and an
allocation the size of a lying header takes the host's memory. :class:`IsolatedReader` runs ``read_radiograph``
in a small pool of worker processes (:mod:`caries_mim.io.decode_worker`) instead:

- each worker reads one file at a time under a wall-time limit (``timeout_s``: the worker is killed and the file
  gets :class:`~caries_mim.errors.DecodeTimeoutError`) and a memory limit (``memory_mb``: ``RLIMIT_DATA`` above what
  the worker held once started, so an allocation past it fails and the file gets
  :class:`~caries_mim.errors.ImageTooLargeError`);
- a worker that dies while reading (a signal, an abort) is reported as
  :class:`~caries_mim.errors.CorruptPixelDataError` naming the signal; a fresh worker takes its place in the
  background while the other workers go on;
- decoding leaves the caller's process, and its GIL: a server's event loop and model thread keep running while
  files decode.

Workers are plain ``python -m caries_mim.io.decode_worker`` processes (not ``multiprocessing``: it would import
the caller's ``__main__`` in every worker), in a session of their own so that a terminal's Ctrl-C reaches only the
caller, with one thread each for OpenMP and BLAS. Their stdout and stderr go to ``/dev/null`` once they are up:
native decoders print diagnostics (a Rust panic's backtrace, OpenJPEG's complaints) that can quote file contents
and would interleave with a server's JSON logs. Replies are JSON and raw pixels, never pickles (see
:mod:`caries_mim.io.decode_worker`). POSIX only; the memory limit needs Linux.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from caries_mim import errors
from caries_mim.errors import (
    CariesMimError,
    CorruptPixelDataError,
    DecoderUnavailableError,
    DecodeTimeoutError,
    ImageTooLargeError,
)
from caries_mim.io import decode_worker
from caries_mim.io.decode_worker import ProtocolError, recv_frame, send_frame
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph
from caries_mim.io.reader import RadiographSource, read_radiograph, read_source_bytes

ReadFunction = Callable[[Any, ReadOptions], Radiograph]

DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MEMORY_MB = 2048
#: How long a read waits for a free worker before DecoderUnavailableError.
DEFAULT_WAIT_S = 30.0
#: How long a new worker may take to import the readers and say it is ready.
START_TIMEOUT_S = 60.0
#: Socket buffer of each side: a bitewing's bytes (2-5 MB) and pixels (4-20 MB) cross in a few large copies instead
#: of hundreds of 200 KB ones, each a context switch between the two processes.
SOCKET_BUFFER_BYTES = 1024 * 1024
#: Pause before trying again to start a worker that failed to start (doubling up to 30 s).
RESTART_BACKOFF_S = 1.0


class DecoderWarning(UserWarning):
    """A warning a read raised in its worker process (e.g. pydicom's note on a non-conformant element), relayed."""


@dataclass
class IsolationStats:
    """What the pool has done since it started (counts, for metrics and tests)."""

    reads: int = 0
    crashes: int = 0
    timeouts: int = 0
    workers_started: int = 0
    start_failures: int = 0
    replaced: dict[str, int] = field(default_factory=dict)


class IsolatedReader:
    """``read_radiograph`` in a pool of worker processes, with a wall-time and a memory limit per file.

    Thread-safe: each call takes a free worker (waiting up to ``wait_s`` for one), so at most ``workers`` files
    decode at once. Use as a context manager, or call :meth:`close`.

    Args:
        workers: worker processes (>= 1).
        timeout_s: wall-time limit of one read, from the moment a worker takes it.
        memory_mb: memory one read may allocate beyond what its worker held at start (None: no limit).
        wait_s: how long a read waits for a free worker.
        read_function: what a worker runs, ``function(source, options) -> Radiograph``: a module-level function,
            imported by name in the worker. Tests pass hostile stand-ins; the default is the real reader.
        on_replaced: called with "crash", "timeout", "dead", "invalid_reply" or "interrupted" whenever a worker
            is replaced.
        relay_warnings: re-issue the warnings a read raised in its worker (pydicom's notes on non-conformant
            files) as :class:`DecoderWarning` in the caller, as an in-process read would have raised them. Off by
            default: their text can quote header values, which a server must keep out of its logs.
    Raises:
        ValueError: a count or limit below its minimum, or a read function that cannot be imported by name.
        DecoderUnavailableError: the first worker cannot start (the message says why).
    """

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int | None = DEFAULT_MEMORY_MB,
        wait_s: float = DEFAULT_WAIT_S,
        read_function: ReadFunction = read_radiograph,
        on_replaced: Callable[[str], None] | None = None,
        relay_warnings: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"an isolated reader needs at least one worker, got {workers}")
        if timeout_s <= 0 or wait_s < 0 or (memory_mb is not None and memory_mb < 16):
            raise ValueError("timeout_s must be > 0, wait_s >= 0 and memory_mb >= 16 (or None)")
        self.size = workers
        self.timeout_s = timeout_s
        self.memory_bytes = None if memory_mb is None else memory_mb * 1024 * 1024
        self.wait_s = wait_s
        self.stats = IsolationStats()
        self._function = decode_worker.function_reference(read_function)
        self._on_replaced = on_replaced
        self.relay_warnings = relay_warnings
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._closed = threading.Event()
        self.start_problem: str | None = None  # why the last attempt to start a worker failed, while unresolved
        starting: list[_Worker] = []
        try:
            starting += [self._launch() for _ in range(workers)]  # all start at once, then each is awaited
            for worker in starting:
                self._await_ready(worker)
                self._idle.put(worker)
        except BaseException:
            self.close()
            for worker in starting:  # those not yet awaited are not in the pool
                worker.stop()
            raise

    # ------------------------------------------------------------------------------------------------ public

    def read(
        self, source: RadiographSource, options: ReadOptions | None = None, *, wait_s: float | None = None
    ) -> Radiograph:
        """:func:`~caries_mim.io.read_radiograph` in a worker process.

        A path is read by the worker itself (so MHD/NRRD headers find their data files); bytes and file objects
        are sent to it. ``wait_s`` replaces the reader's wait for a free worker for this call.

        Raises:
            CariesMimError: whatever ``read_radiograph`` raises for the file; and
            CorruptPixelDataError: the decoder crashed on the file (the worker died and is being replaced), or
                answered something that is not a reader's answer (the worker is replaced);
            DecodeTimeoutError: the read ran past ``timeout_s`` (the worker was killed and is being replaced);
            ImageTooLargeError: the read needed more memory than ``memory_mb`` (the worker is replaced: its heap
                may stay fragmented);
            DecoderUnavailableError: no worker came free in time, or the reader is closed.
        """
        options = options or ReadOptions()
        request: dict[str, Any] = {
            "options": decode_worker.options_to_json(options),
            "cpu_limit_s": self.timeout_s + 1.0,
        }
        payload = b""
        if isinstance(source, (str, os.PathLike)):
            request["path"] = os.fspath(source)  # relative to the cwd the workers share with this process
        else:
            payload = read_source_bytes(source)[0]
        worker = self._take_worker(self.wait_s if wait_s is None else wait_s)
        try:
            header, pixels = self._exchange(worker, request, payload, options)
        except CariesMimError:
            raise  # the worker died or overran: _exchange has replaced it
        except _WorkerMisbehavedError as problem:
            self._replace(worker, problem.reason)
            raise problem.error from None
        except BaseException:
            self._replace(worker, "interrupted")  # an interrupt mid-read leaves the worker's state unknown
            raise
        try:
            radiograph = self._unpack(header, pixels)
        except _WorkerMisbehavedError as problem:
            self._replace(worker, problem.reason)
            raise problem.error from None
        except BaseException:
            self._idle.put(worker)  # the file's typed error (or a reader bug): the worker itself is fine
            raise
        self._idle.put(worker)
        return radiograph

    def close(self) -> None:
        """Stop every worker: idle ones exit when their socket closes, busy ones are killed."""
        self._closed.set()
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> IsolatedReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def alive(self) -> int:
        """Worker processes running now (idle or busy)."""
        with self._lock:
            return sum(worker.process.poll() is None for worker in self._workers)

    # ------------------------------------------------------------------------------------------------ workers

    def _launch(self) -> _Worker:
        """Start a worker process (not yet known to be ready).

        Raises:
            DecoderUnavailableError: no socket or process could be made (out of file descriptors, memory, ...).
        """
        ends: list[socket.socket] = []
        try:
            ends = list(socket.socketpair())
            for end in ends:
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "caries_mim.io.decode_worker",
                    str(ends[1].fileno()),
                    str(self.memory_bytes or 0),
                    self._function,
                ],
                pass_fds=(ends[1].fileno(),),
                stdin=subprocess.DEVNULL,
                env=worker_environment(),
                start_new_session=True,
            )
        except OSError as exc:
            for end in ends:
                end.close()
            raise DecoderUnavailableError(f"cannot start a decode worker: {exc}") from None
        ends[1].close()
        return _Worker(process, ends[0])

    def _await_ready(self, worker: _Worker) -> None:
        """Wait for the worker's "ready"; on success it joins the pool.

        Raises:
            DecoderUnavailableError: it failed to start (the message says why) or the reader closed meanwhile.
        """
        try:
            header, _ = recv_frame(worker.connection, deadline=time.monotonic() + START_TIMEOUT_S, max_payload=0)
        except (TimeoutError, EOFError, ProtocolError) as exc:
            worker.stop()
            self.stats.start_failures += 1
            raise DecoderUnavailableError(f"a decode worker did not start ({worker.exit_status()}: {exc})") from None
        if header.get("status") != "ready":
            worker.stop()
            self.stats.start_failures += 1
            raise DecoderUnavailableError(f"a decode worker did not start: {header.get('message', header)}")
        with self._lock:
            if self._closed.is_set():
                worker.stop()
                raise DecoderUnavailableError("the isolated reader is closed")
            self._workers.add(worker)
            self.stats.workers_started += 1

    def _take_worker(self, wait_s: float) -> _Worker:
        deadline = time.monotonic() + wait_s
        while True:
            if self._closed.is_set():
                raise DecoderUnavailableError("the isolated reader is closed")
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                problem = f" ({self.start_problem})" if self.start_problem else ""
                raise DecoderUnavailableError(
                    f"no decode worker came free within {wait_s:g} s{problem}; retry shortly"
                ) from None
            if worker.process.poll() is None:
                return worker
            # Died while idle (killed from outside, e.g. by the kernel's OOM killer): not this file's doing.
            self._replace(worker, "dead")

    def _exchange(
        self, worker: _Worker, request: dict[str, Any], payload: bytes, options: ReadOptions
    ) -> tuple[dict[str, Any], bytearray]:
        """One read on ``worker``: its reply, or the typed error of a worker that died, overran or misbehaved
        (that worker is then replaced)."""
        with self._lock:
            self.stats.reads += 1
        deadline = time.monotonic() + self.timeout_s
        try:
            worker.connection.settimeout(self.timeout_s)
            send_frame(worker.connection, request, payload)
            return recv_frame(worker.connection, deadline=deadline, max_payload=4 * options.max_pixels)
        except TimeoutError:
            self._replace(worker, "timeout")
            raise DecodeTimeoutError(
                f"decoding did not finish within {self.timeout_s:g} s; the decoder was stopped"
            ) from None
        except (EOFError, OSError):
            if self._closed.is_set():  # close() stopped it mid-read: not the file's doing
                raise DecoderUnavailableError("the isolated reader closed during the read") from None
            status = worker.exit_status()
            self._replace(worker, "crash")
            raise CorruptPixelDataError(
                f"the pixel decoder crashed on this file ({status}); nothing else was affected"
            ) from None
        except ProtocolError as exc:
            raise _WorkerMisbehavedError("invalid_reply", _nonsense(exc)) from None

    def _unpack(self, header: dict[str, Any], pixels: bytearray) -> Radiograph:
        """The radiograph or the typed error a reply carries. What the worker says is checked, not trusted: it
        has just run native decoders on a hostile file.

        Raises:
            CariesMimError: the file's typed error (only the codes ``read_radiograph`` raises).
            _WorkerMisbehavedError: a reply no reader gives, or a read that ran out of memory (the worker is replaced).
            RuntimeError: the reader failed with an untyped error (a bug; its text stays in the worker, since it
                may quote the file).
        """
        if self.relay_warnings:
            for note in header.get("warnings") or ():
                warnings.warn(str(note), DecoderWarning, stacklevel=3)
        status = header.get("status")
        if status == "ok":
            try:
                return decode_worker.radiograph_from_json(header["radiograph"], pixels)
            except (ProtocolError, KeyError) as exc:
                raise _WorkerMisbehavedError("invalid_reply", _nonsense(exc)) from None
        if status == "error":
            code, message = header.get("code"), header.get("message")
            kind = errors.error_class_for(code) if code in READER_ERROR_CODES else None
            if kind is None or not isinstance(message, str):
                raise _WorkerMisbehavedError("invalid_reply", _nonsense(f"unknown error code {str(code)[:40]!r}"))
            raise kind(message)
        if status == "memory":
            budget = f"the {self.memory_bytes // (1024 * 1024)} MiB" if self.memory_bytes else "the"
            error = ImageTooLargeError(f"decoding this file needs more than {budget} memory a decode may use")
            raise _WorkerMisbehavedError("memory", error)
        if status == "bug":
            raise RuntimeError(f"the reader failed unexpectedly in its worker process ({header.get('kind')})")
        raise _WorkerMisbehavedError("invalid_reply", _nonsense(f"status {str(status)[:40]!r}"))

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Retire ``worker`` and start its successor in the background (the caller answers at once)."""
        worker.stop()
        with self._lock:
            self._workers.discard(worker)
            self.stats.replaced[reason] = self.stats.replaced.get(reason, 0) + 1
            if reason == "crash":
                self.stats.crashes += 1
            elif reason == "timeout":
                self.stats.timeouts += 1
        try:
            threading.Thread(target=self._start_successor, name="caries-mim-decoder-start", daemon=True).start()
        except RuntimeError as exc:  # no thread could be started: the next read's wait reports the shortage
            self.start_problem = f"cannot start a thread to replace a decode worker ({exc})"
        if self._on_replaced is not None:
            with contextlib.suppress(Exception):  # a metrics callback must not turn into the file's error
                self._on_replaced(reason)

    def _start_successor(self) -> None:
        """Start one worker, trying again with a growing pause until it works or the reader closes."""
        pause = RESTART_BACKOFF_S
        while not self._closed.is_set():
            try:
                worker = self._launch()
                self._await_ready(worker)
            except Exception as exc:  # whatever stops a start, the thread must live to try again
                if self._closed.is_set():
                    return
                self.start_problem = exc.message if isinstance(exc, CariesMimError) else f"{type(exc).__name__}: {exc}"
                self._closed.wait(pause)
                pause = min(2 * pause, 30.0)
                continue
            self.start_problem = None
            self._idle.put(worker)
            return


#: The codes ``read_radiograph`` raises; a worker that answers another one is not a reader any more.
READER_ERROR_CODES = frozenset(
    {
        "not_an_image",
        "unreadable_file",
        "corrupt_header",
        "corrupt_pixel_data",
        "no_pixel_data",
        "unsupported_photometric",
        "multi_frame",
        "unsupported_modality",
        "missing_decoder",
        "image_too_large",
        "invalid_argument",
    }
)

#: Variables a worker inherits; everything else (API keys, cloud credentials, database URLs) stays behind.
_WORKER_ENVIRONMENT = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH", "SYSTEMROOT")


def worker_environment() -> dict[str, str]:
    """A decode worker's environment: locale, paths and temporary folder only, the caller's import path, and one
    thread for OpenMP and BLAS (decoders are single-threaded; thread pools would only add memory and contention).
    The workers read hostile files with native code; nothing they could leak should be in their reach."""
    kept = {key: value for key, value in os.environ.items() if key in _WORKER_ENVIRONMENT or key.startswith("LC_")}
    return {
        **kept,
        "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),  # read functions are imported by name
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


class _WorkerMisbehavedError(Exception):
    """A reply after which the worker must go: ``error`` is what the file gets, ``reason`` why it is replaced."""

    def __init__(self, reason: str, error: CariesMimError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _nonsense(detail: object) -> CorruptPixelDataError:
    return CorruptPixelDataError(f"the decoder answered nonsense for this file ({detail})")


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    connection: socket.socket

    def exit_status(self) -> str:
        """How the process ended, in words ("signal SIGSEGV", "exit status 3")."""
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return "connection lost"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-code).name}"
            return f"signal {-code}"
        return f"exit status {code}"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.close()
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5.0)


__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WAIT_S",
    "DEFAULT_WORKERS",
    "DecoderWarning",
    "IsolatedReader",
    "IsolationStats",
]
