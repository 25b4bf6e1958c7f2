"""A soak load: many clients posting a mix of valid and broken radiographs to a running service for a while, with
the server's memory sampled throughout.

Used by the soak test (``tests/service/test_soak.py``, which asserts the counts: no 5xx, no dropped connection) and
by ``benchmarks/soak.py`` (which prints the figures: throughput, latency, memory growth). Standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from pipelines.service_client import multipart_body
from tests.fuzz.corpus import every_family, hostile_files

#: Seconds at the start and at the end of a run whose memory is compared (a third of the run if it is shorter).
MEMORY_WINDOW_S = 30.0


@dataclass(frozen=True)
class Upload:
    """One file of the mix: ``kind`` is "valid" or "broken" (results are tallied by kind)."""

    kind: str
    name: str
    data: bytes


@dataclass
class SoakResult:
    clients: int
    seconds: float
    statuses: dict[str, Counter] = field(default_factory=lambda: {"valid": Counter(), "broken": Counter()})
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {"valid": [], "broken": []})
    dropped: list[str] = field(default_factory=list)
    memory: list[tuple[float, float, float]] = field(default_factory=list)  # (t, server MB, decode workers MB)

    @property
    def requests(self) -> int:
        return sum(sum(counts.values()) for counts in self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(count for counts in self.statuses.values() for status, count in counts.items() if status >= 500)

    def memory_growth(self) -> dict[str, float | None]:
        """Mean RSS (MB) of the server in the first and the last :data:`MEMORY_WINDOW_S` s, and the growth."""
        if len(self.memory) < 2:
            return {"server_first_mb": None, "server_last_mb": None, "server_growth": None, "workers_last_mb": None}
        end = self.memory[-1][0]
        window = min(MEMORY_WINDOW_S, end / 3)
        first = [server for t, server, _ in self.memory if t <= window]
        last = [server for t, server, _ in self.memory if t >= end - window]
        workers = [workers for t, _, workers in self.memory if t >= end - window]
        first_mb, last_mb = statistics.fmean(first), statistics.fmean(last)
        return {
            "server_first_mb": round(first_mb, 1),
            "server_last_mb": round(last_mb, 1),
            "server_growth": round(last_mb / first_mb - 1.0, 4),
            "workers_last_mb": round(statistics.fmean(workers), 1),
        }

    def summary(self) -> dict:
        def percentiles(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"p50": None, "p95": None, "p99": None}
            ordered = sorted(values)
            pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # noqa: E731
            return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}

        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else None,
            "server_errors": self.server_errors,
            "dropped_connections": len(self.dropped),
            "statuses": {kind: dict(sorted(counts.items())) for kind, counts in self.statuses.items()},
            "latency_ms": {kind: percentiles(values) for kind, values in self.latencies_ms.items()},
            "memory": self.memory_growth(),
        }


def mixed_uploads(folder: Path, *, seed: int = 3) -> list[Upload]:
    """Full-size synthetic bitewings and periapicals in every transfer syntax the generator writes (written to
    ``folder``), and as many hostile files of the fuzz corpus: drawn uniformly, half the uploads are valid."""
    valid = []
    for index in range(3):
        image = render_indexed(7, "labeled", index, SynthConfig())
        for syntax in ("explicit_vr_little_endian", "rle_lossless", "jpeg2000_lossless"):
            path = folder / f"{index}-{syntax}.dcm"
            write_dicom(image, path, index=index, seed=7, transfer_syntax=syntax, photometric="MONOCHROME2")
            valid.append(Upload("valid", path.name, path.read_bytes()))
    broken = [Upload("broken", f"{h.name}.dcm", h.data) for h in [*every_family(seed), *hostile_files(seed, 180)]]
    return valid * (len(broken) // len(valid)) + broken


def soak(
    port: int, server_pid: int, uploads: list[Upload], *, clients: int = 16, seconds: float = 120.0, seed: int = 0
) -> SoakResult:
    """``clients`` threads, each on its own kept-alive connection, post uploads drawn at random (seeded per
    client) back to back until ``seconds`` have passed; the server's RSS and its children's (the decode workers)
    are read every second. A connection that fails (reset, closed without an answer, timed out) counts as
    dropped and the client reconnects."""
    result = SoakResult(clients=clients, seconds=seconds)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    finished = threading.Event()

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.monotonic() < deadline:
            upload = rng.choice(uploads)
            body, content_type = multipart_body("file", upload.name, upload.data)
            sent = time.perf_counter()
            try:
                connection.request("POST", "/v1/predictions", body=body, headers={"content-type": content_type})
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    result.dropped.append(f"{upload.name}: {type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                continue
            with lock:
                result.statuses[upload.kind][answer.status] += 1
                result.latencies_ms[upload.kind].append(1000.0 * (time.perf_counter() - sent))
        connection.close()

    def sample_memory() -> None:
        while not finished.wait(1.0):
            server = rss_mb(server_pid)
            if server is not None:
                workers = sum(rss_mb(child) or 0.0 for child in children(server_pid))
                result.memory.append((time.monotonic() - started, server, workers))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished.set()
    sampler.join()
    result.seconds = time.monotonic() - started
    return result


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB, None when it is gone (or off Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found += [int(child) for child in (task / "children").read_text().split()]
    return found
