"""What the HTTP service costs over the bare model forward, and what micro-batching buys, measured on the real server.

In one run, on one realistic 12-bit bitewing DICOM (the largest uncompressed "Bitewing" of a synthetic set):

  * forward  - ``detector.predict(prepare_image(pixels, config)[0])`` in this process: the model forward and box
               selection on the preprocessed tensor, the physical limit of a prediction;
  * predict  - ``Predictor.predict(radiograph)`` in this process (preprocessing + forward + mapping back), and
    read     - ``read_radiograph(bytes)`` (the DICOM decode), to split the service's overhead;
  * e2e      - ``POST /v1/predictions`` answered by ``caries-mim serve`` started as a subprocess on loopback, one
               request at a time over a kept-alive connection (p50/p95/p99), alternating with the in-process
               timings above (one of each in turn by default, ``--block``) while the server is idle, so the
               machine's drift hits both alike; overhead_ratio = e2e p50 / forward p50, and
               overhead_ratio_paired = the median of each request's e2e over the forward timed just before it
               (steadier on a shared machine, whose speed wanders by +-10% within seconds);
               overhead_ratio_unbatched_server: the same for the second server (same service, batch size 1),
               a second sample of a figure that also moves between processes on a shared machine;
               overhead_ratio_in_process_decode: the same for a third server, batched but decoding uploads in
               its own process (CARIES_MIM_DECODE_WORKERS=0): against overhead_ratio, what isolating the decode
               in worker processes costs one request;
  * rps      - requests/s with 1, 4 and 16 concurrent clients (threads, each its own connection, each sending the
               same DICOM back to back for ``--seconds``), against a server with micro-batching
               (CARIES_MIM_MAX_BATCH_SIZE=16, no batch wait: the service's default) and against a second server without
               (CARIES_MIM_MAX_BATCH_SIZE=1); the mean batch size comes from the server's /metrics.
               batching_speedup_c16 = rps_c16 / rps_c16_unbatched (the GPU target is >= 3x);
               isolated_decode_gain_c16 = rps_c16 / rps_c16 of the in-process-decode server;
  * memory   - the server's peak RSS (VmHWM from /proc/PID/status; null off Linux).

Without ``--model`` a quick package is trained first (synthetic set, shipped ``tiny`` config, 10 steps: about a
minute on 2 cores); its predictions are meaningless but its cost per image is the tiny model's. The server and
this process share the machine's cores: the clients are light (they wait on sockets), and the in-process timings
run while the server is idle. Prints a table, then a final JSON line. Timings are never asserted.

    python benchmarks/service_latency.py [--model PKG] [--device cpu] [--requests 50] [--seconds 12] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from machine import cpu_name  # benchmarks/machine.py (this folder is on sys.path when run as a script)
from quick_model import BenchmarkError, train_quick_package, write_synthetic_set

from caries_mim.detection.preprocessing import prepare_image
from caries_mim.errors import CariesMimError
from caries_mim.io import read_radiograph
from caries_mim.package import load_package
from pipelines.service_client import LocalService, ServiceStartError, multipart_body
from service.app import GPU_WINDOW_BATCH_SIZE

HOST = "127.0.0.1"
LEVELS = (1, 4, 16)
BATCHED = {"CARIES_MIM_MAX_BATCH_SIZE": "16", "CARIES_MIM_MAX_BATCH_WAIT_MS": "0"}
UNBATCHED = {"CARIES_MIM_MAX_BATCH_SIZE": "1", "CARIES_MIM_MAX_BATCH_WAIT_MS": "0"}
#: The batched server with uploads decoded in its own process instead of the isolated decode workers.
IN_PROCESS_DECODE = {**BATCHED, "CARIES_MIM_DECODE_WORKERS": "0"}
SERVERS = (("batched", BATCHED), ("unbatched", UNBATCHED), ("in_process_decode", IN_PROCESS_DECODE))
READY_TIMEOUT_S = 300.0
#: Client socket timeout: a CPU batch of 16 takes seconds, and a request may wait behind one.
CLIENT_TIMEOUT_S = 300.0
UNCOMPRESSED = {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}


# ------------------------------------------------------------------------------------------------------ the server


class Server(LocalService):
    """``caries-mim serve`` on a free loopback port (:class:`LocalService`: its log goes to a file, SIGTERM on
    exit), configured by ``settings`` alone, with what the benchmark reads from it."""

    def __init__(self, model: Path, device: str, settings: dict[str, str], log_path: Path, threads: int | None):
        environment = {"CARIES_MIM_DEVICE": device, **settings}
        if threads:
            environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(threads)
        super().__init__(
            model, log_path, environment=environment, ready_timeout_s=READY_TIMEOUT_S, inherit_settings=False
        )
        self.ready_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def failure(self, what: str) -> BenchmarkError:
        assert self.process is not None
        code = self.process.poll()
        state = "still running" if code is None else f"exited with status {code}"
        return BenchmarkError(f"{what} (server {state}); its log {self.log_path} ends with:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise self.failure("the server stopped during the run")

    def batch_counters(self) -> dict[str, float]:
        """The Prometheus sums and counts of batch sizes and batch inference seconds."""
        status, body = self.get("/metrics")
        if status != 200:
            raise self.failure(f"GET /metrics answered {status}")
        wanted = {
            "caries_mim_batch_size_sum",
            "caries_mim_batch_size_count",
            "caries_mim_inference_seconds_sum",
            "caries_mim_inference_seconds_count",
        }
        found = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                found[name] = float(value)
        return found

    def memory_mb(self, field: str = "VmHWM") -> float | None:
        """VmHWM (peak RSS) or VmRSS of the server process (uvicorn with one worker serves in that process); None
        off Linux."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return None


@contextlib.contextmanager
def running_server(
    model: Path, device: str, settings: dict[str, str], log_path: Path, threads: int | None
) -> Iterator[Server]:
    """A started server, ready (``ready_s``: seconds from launch to /readyz 200); stopped on exit."""
    server = Server(model, device, settings, log_path, threads)
    started = time.perf_counter()
    try:
        with server:
            server.ready_s = time.perf_counter() - started
            yield server
    except ServiceStartError as exc:
        raise BenchmarkError(exc.message) from None


# ------------------------------------------------------------------------------------------------------ the client


class Client:
    """One kept-alive connection posting the same upload."""

    def __init__(self, port: int, body: bytes, content_type: str) -> None:
        self.port = port
        self.body = body
        self.headers = {"Content-Type": content_type, "Accept": "application/json"}
        self.connection = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT_S)

    def post(self) -> tuple[int, bytes, float]:
        """(status, body, seconds). Reconnects once if the kept-alive connection was closed."""
        for attempt in range(2):
            started = time.perf_counter()
            try:
                self.connection.request("POST", "/v1/predictions", body=self.body, headers=self.headers)
                response = self.connection.getresponse()
                payload = response.read()
                return response.status, payload, time.perf_counter() - started
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.connection.close()
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=CLIENT_TIMEOUT_S)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def checked_post(client: Client, server: Server) -> tuple[dict[str, Any], float]:
    try:
        status, payload, seconds = client.post()
    except OSError as exc:
        raise server.failure(f"POST /v1/predictions failed: {exc}") from None
    if status != 200:
        raise server.failure(f"POST /v1/predictions answered {status}: {payload[:300]!r}")
    return json.loads(payload), seconds


def throughput(server: Server, body: bytes, content_type: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads posting back to back until ``seconds`` have passed; in-flight requests are finished."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def run() -> None:
        client = Client(server.port, body, content_type)
        try:
            start.wait()
            while time.perf_counter() < deadline[0]:
                try:
                    status, _, elapsed = client.post()
                except OSError as exc:
                    with lock:
                        statuses[type(exc).__name__] += 1
                    return
                with lock:
                    statuses[str(status)] += 1
                    if status == 200:
                        latencies.append(elapsed)
        finally:
            client.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    server.check_alive()
    if not latencies:
        raise server.failure(f"no request succeeded with {clients} clients (answers: {dict(statuses)})")
    return {
        "rps": len(latencies) / wall,
        "completed": len(latencies),
        "wall_s": wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "errors": {key: value for key, value in statuses.items() if key != "200"},
    }


# ------------------------------------------------------------------------------------------------------- helpers


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def timed(function: Callable[[], object], sync: Callable[[], None]) -> float:
    started = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - started


def pick_image(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The largest uncompressed bitewing, else the largest bitewing, else the largest image."""
    candidates = []
    for path in sorted(folder.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        bitewing = "bitewing" in str(header.get("SeriesDescription", "")).lower()
        syntax = header.file_meta.TransferSyntaxUID
        pixels = int(header.Rows) * int(header.Columns)
        info = {
            "file": path.name,
            "rows": int(header.Rows),
            "columns": int(header.Columns),
            "bits_stored": int(header.BitsStored),
            "view": str(header.get("SeriesDescription", "")),
            "transfer_syntax": syntax.name,
            "bytes": path.stat().st_size,
        }
        candidates.append(((bitewing and syntax in UNCOMPRESSED, bitewing, pixels), path, info))
    if not candidates:
        raise BenchmarkError(f"no .dcm files in {folder}")
    _, path, info = max(candidates, key=lambda item: item[0])
    return path, info


def image_info(path: Path) -> dict[str, Any]:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "file": path.name,
        "rows": int(header.Rows),
        "columns": int(header.Columns),
        "bits_stored": int(header.get("BitsStored", 0)),
        "view": str(header.get("SeriesDescription", "")),
        "transfer_syntax": header.file_meta.TransferSyntaxUID.name,
        "bytes": path.stat().st_size,
    }


def cpu_jiffies(pids: list[int]) -> tuple[int, int, int] | None:
    """(machine busy, machine total, busy of ``pids``) in clock ticks since boot; None off Linux."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        ours = 0
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text()
            after = stat[stat.rindex(")") + 2 :].split()
            ours += int(after[11]) + int(after[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total, ours


def foreign_share(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> float | None:
    """Share of the machine's CPU time taken by processes other than this one and the server between two
    readings: above ~0.1 another job competed and the figures are low and noisy."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, ours = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, (busy - ours) / total)


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def r1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, metavar="PKG", help="model package (default: train a quick one)")
    parser.add_argument("--image", type=Path, metavar="DCM", help="DICOM to send (default: a synthetic bitewing)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for the server and in-process")
    parser.add_argument("--requests", type=int, help="sequential requests and forwards timed (default 50)")
    parser.add_argument("--seconds", type=float, help="seconds per concurrency level and server (default 12)")
    parser.add_argument("--warmup", type=int, help="untimed requests and forwards first (default 3)")
    parser.add_argument("--block", type=int, default=1, help="requests per alternating e2e / in-process block")
    parser.add_argument("--threads", type=int, help="torch threads here and in the server (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 requests, 4 s per level, 1 warm-up")
    args = parser.parse_args()
    args.requests = args.requests or (10 if args.quick else 50)
    args.seconds = args.seconds or (4.0 if args.quick else 12.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.requests < 2 or args.seconds <= 0 or args.block < 1 or args.warmup < 0:
        parser.error("--requests must be >= 2, --seconds > 0, --block >= 1, --warmup >= 0")
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped by its context manager.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="service_latency_") as tmp:
            return run(args, Path(tmp))
    except BenchmarkError as exc:
        print(f"service_latency: {exc}", file=sys.stderr)
        return 1
    except CariesMimError as exc:  # the package or the image, loaded in this process
        print(f"service_latency: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("service_latency: interrupted (servers stopped)", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, tmp: Path) -> int:
    load_before = load_average()
    started = time.perf_counter()
    on_gpu = torch.device(args.device).type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    # ---- the image and the model
    synth = tmp / "synth"
    model_built = args.model is None
    if args.image is None or model_built:
        print(f"writing a synthetic set to {synth} ...", flush=True)
        write_synthetic_set(synth)
    if args.image is not None:
        if not args.image.is_file():
            raise BenchmarkError(f"image {args.image} does not exist")
        image_path, image = args.image, image_info(args.image)
    else:
        image_path, image = pick_image(synth / "labeled" / "images")
    if model_built:
        print("no --model: training a quick package (tiny config, 10 steps; ~1 min on 2 cores) ...", flush=True)
        model = train_quick_package(synth, tmp / "run")
    else:
        model = args.model
        if not model.is_file():
            raise BenchmarkError(f"model package {model} does not exist")
    print(
        f"model: {model}{' (quick package built by this run)' if model_built else ''}\n"
        f"image: {image['file']} {image['view'] or '?'} {image['rows']} x {image['columns']}, "
        f"{image['bits_stored']} bits, {image['transfer_syntax']}, {image['bytes'] / 1e6:.2f} MB",
        flush=True,
    )

    data = image_path.read_bytes()
    body, content_type = multipart_body("file", image_path.name, data)
    predictor = load_package(model, args.device)
    if predictor.device.type == "cuda":
        # The service runs a GPU model with this many windows per pass (service.app); the limit must match.
        predictor.detector.set_window_batch_size(GPU_WINDOW_BATCH_SIZE)
    radiograph = read_radiograph(data)
    tensor = prepare_image(radiograph.pixels, predictor.package.config)[0].to(predictor.device)
    threads = torch.get_num_threads()

    def forward() -> object:
        with torch.inference_mode():
            return predictor.detector.predict(tensor)

    in_process: dict[str, Callable[[], object]] = {
        "forward": forward,
        "predict": lambda: predictor.predict(radiograph),
        "read": lambda: read_radiograph(data),
    }
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[float]] = {name: [] for name in in_process}
    server_timings: list[dict[str, float]] = []
    e2e: list[float] = []
    # The other servers' own sequential samples: each gives one more overhead ratio.
    e2e_other: dict[str, list[float]] = {label: [] for label, _ in SERVERS[1:]}
    forward_other: dict[str, list[float]] = {label: [] for label, _ in SERVERS[1:]}
    foreign: list[float] = []

    for label, settings in SERVERS:
        log_path = tmp / f"server_{label}.log"
        with running_server(model, args.device, settings, log_path, args.threads) as server:
            ready_rss = server.memory_mb("VmRSS")
            counters_before = cpu_jiffies([os.getpid(), server.pid])
            print(
                f"server ({label}: {settings}) ready in {server.ready_s:.1f} s on port {server.port}, pid {server.pid}",
                flush=True,
            )
            client = Client(server.port, body, content_type)
            try:
                for _ in range(args.warmup):
                    checked_post(client, server)
                if label == "batched":
                    for function in in_process.values():
                        for _ in range(args.warmup):
                            timed(function, sync)
                # Alternating blocks: in-process (the server idle), then the same number of requests.
                done = 0
                while done < args.requests:
                    block = min(args.block, args.requests - done)
                    for _ in range(block):  # round-robin, so a noisy moment hits each alike
                        if label == "batched":
                            for name, function in in_process.items():
                                samples[name].append(timed(function, sync))
                        else:  # this server's own ratio (and one more sample of the machine's variance)
                            forward_other[label].append(timed(forward, sync))
                    for _ in range(block):
                        answer, seconds = checked_post(client, server)
                        (e2e if label == "batched" else e2e_other[label]).append(seconds)
                        if label == "batched":
                            server_timings.append(answer["timings_ms"])
                    done += block
            finally:
                client.close()
            sequential_peak = server.memory_mb()
            levels = {}
            for clients in LEVELS:
                before = server.batch_counters()
                level = throughput(server, body, content_type, clients, args.seconds)
                after = server.batch_counters()
                delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
                batches = delta.get("caries_mim_batch_size_count", 0.0)
                if batches > 0:  # absent if the metric names ever change: the figures stay null
                    level["mean_batch_size"] = delta.get("caries_mim_batch_size_sum", 0.0) / batches
                    level["mean_batch_ms"] = 1000 * delta.get("caries_mim_inference_seconds_sum", 0.0) / batches
                level["peak_rss_mb"] = server.memory_mb()
                levels[clients] = level
                print(
                    f"  {clients:>2} clients: {level['rps']:.2f} req/s, p50 {level['p50_ms']:.0f} ms, "
                    f"mean batch {level.get('mean_batch_size', 0):.1f}, errors {level['errors'] or 'none'}",
                    flush=True,
                )
            share = foreign_share(counters_before, cpu_jiffies([os.getpid(), server.pid]))
            if share is not None:
                foreign.append(share)
            results[label] = {
                "levels": levels,
                "peak_rss_mb": server.memory_mb(),
                "ready_rss_mb": ready_rss,
                "sequential_peak_rss_mb": sequential_peak,
                "ready_s": server.ready_s,
            }

    # ---- summary
    forward_p50 = statistics.median(samples["forward"]) * 1000
    e2e_ms = [value * 1000 for value in e2e]
    e2e_p50 = percentile(e2e_ms, 50)
    handler = {key: statistics.median(t[key] for t in server_timings) for key in server_timings[0]}
    batched, unbatched = results["batched"]["levels"], results["unbatched"]["levels"]
    load_after = load_average()
    summary: dict[str, Any] = {
        "benchmark": "service_latency",
        "machine": cpu_name(),
        "device": str(predictor.device),
        "torch_threads": threads,
        "model": str(model),
        "model_built": model_built,
        "model_input": list(tensor.shape[-2:]),
        "image": f"{image['rows']}x{image['columns']}",
        "image_file": image,
        "e2e_p50_ms": r1(e2e_p50),
        "e2e_p95_ms": r1(percentile(e2e_ms, 95)),
        "e2e_p99_ms": r1(percentile(e2e_ms, 99)),
        "e2e_p50_ms_unbatched": r1(percentile([value * 1000 for value in e2e_other["unbatched"]], 50)),
        "e2e_p50_ms_in_process_decode": r1(percentile([value * 1000 for value in e2e_other["in_process_decode"]], 50)),
        "forward_p50_ms": r1(forward_p50),
        "predict_p50_ms": r1(statistics.median(samples["predict"]) * 1000),
        "read_p50_ms": r1(statistics.median(samples["read"]) * 1000),
        "server_timings_p50_ms": {key: r1(value) for key, value in handler.items()},
        "outside_handler_p50_ms": r1(e2e_p50 - handler["total"]),
        "overhead_ratio": round(e2e_p50 / forward_p50, 2),
        # The i-th request and the i-th in-process forward were timed in the same block.
        "overhead_ratio_paired": round(
            statistics.median(a / b for a, b in zip(e2e, samples["forward"], strict=True)), 2
        ),
        "overhead_ratio_unbatched_server": round(
            percentile(e2e_other["unbatched"], 50) / statistics.median(forward_other["unbatched"]), 2
        ),
        # What isolating the decode costs one request: this ratio against overhead_ratio, same machine and run.
        "overhead_ratio_in_process_decode": round(
            percentile(e2e_other["in_process_decode"], 50) / statistics.median(forward_other["in_process_decode"]), 2
        ),
    }
    in_process_decode = results["in_process_decode"]["levels"]
    by_suffix = (("", batched), ("_unbatched", unbatched), ("_in_process_decode", in_process_decode))
    for suffix, levels in by_suffix:
        for clients, level in levels.items():
            summary[f"rps_c{clients}{suffix}"] = round(level["rps"], 2)
    for suffix, levels in by_suffix:
        for clients, level in levels.items():
            summary[f"p50_ms_c{clients}{suffix}"] = r1(level["p50_ms"])
            summary[f"mean_batch_size_c{clients}{suffix}"] = (
                round(level["mean_batch_size"], 2) if "mean_batch_size" in level else None
            )
            summary[f"mean_batch_ms_c{clients}{suffix}"] = r1(level.get("mean_batch_ms"))
    summary.update(
        {
            "batching_speedup_c16": round(batched[16]["rps"] / unbatched[16]["rps"], 2),
            "batching_speedup_definition": "rps_c16 / rps_c16_unbatched (GPU target >= 3)",
            "isolated_decode_gain_c16": round(batched[16]["rps"] / in_process_decode[16]["rps"], 2),
            "isolated_decode_gain_definition": "rps_c16 / rps_c16_in_process_decode (both batched)",
            "errors": {
                f"{label}_c{clients}": level["errors"]
                for label, result in results.items()
                for clients, level in result["levels"].items()
                if level["errors"]
            },
            "peak_rss_mb": results["batched"]["peak_rss_mb"],
            "peak_rss_mb_unbatched": results["unbatched"]["peak_rss_mb"],
            "peak_rss_mb_in_process_decode": results["in_process_decode"]["peak_rss_mb"],
            "ready_rss_mb": results["batched"]["ready_rss_mb"],
            "peak_rss_mb_sequential": results["batched"]["sequential_peak_rss_mb"],
            "peak_rss_mb_by_clients": {
                label: {clients: level["peak_rss_mb"] for clients, level in result["levels"].items()}
                for label, result in results.items()
            },
            "server_ready_s": r1(results["batched"]["ready_s"]),
            "foreign_cpu_share_max": round(max(foreign), 3) if foreign else None,
            "load_average": [load_before, load_after],
            "options": {
                "requests": args.requests,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "block": args.block,
                "threads": args.threads,
                "quick": args.quick,
                "device": args.device,
                "batched_env": BATCHED,
                "unbatched_env": UNBATCHED,
                "in_process_decode_env": IN_PROCESS_DECODE,
            },
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
    )
    print_table(summary, batched, unbatched, in_process_decode)
    print(json.dumps(summary))
    return 0


def print_table(
    summary: dict[str, Any], batched: dict[int, dict], unbatched: dict[int, dict], in_process: dict[int, dict]
) -> None:
    handler = summary["server_timings_p50_ms"]
    print()
    print(
        f"{summary['machine']}; device {summary['device']}, {summary['torch_threads']} torch threads; "
        f"image {summary['image']} -> model input {summary['model_input'][0]} x {summary['model_input'][1]}"
    )
    print(f"{'latency (one request at a time)':<44}{'p50 ms':>10}")
    rows = [
        ("forward, in-process (the limit)", summary["forward_p50_ms"]),
        ("Predictor.predict, in-process", summary["predict_p50_ms"]),
        ("read_radiograph(bytes), in-process", summary["read_p50_ms"]),
        ("server: read", handler.get("read")),
        ("server: queue", handler.get("queue")),
        ("server: inference (predict_batch)", handler.get("inference")),
        ("server: handler total", handler.get("total")),
        ("outside the handler (HTTP, multipart, JSON)", summary["outside_handler_p50_ms"]),
        ("end to end, batched server", summary["e2e_p50_ms"]),
        ("end to end, unbatched server", summary["e2e_p50_ms_unbatched"]),
        ("end to end, batched, decode in-process", summary["e2e_p50_ms_in_process_decode"]),
    ]
    for name, value in rows:
        print(f"  {name:<42}{value if value is not None else float('nan'):>10.1f}")
    print(
        f"  e2e p95 {summary['e2e_p95_ms']:.1f} ms, p99 {summary['e2e_p99_ms']:.1f} ms; "
        f"overhead ratio e2e p50 / forward p50 = {summary['overhead_ratio']:.2f}x "
        f"(median of paired ratios {summary['overhead_ratio_paired']:.2f}x; "
        f"unbatched server {summary['overhead_ratio_unbatched_server']:.2f}x; "
        f"decode in-process {summary['overhead_ratio_in_process_decode']:.2f}x)"
    )
    header = ("concurrency", "batched req/s", "mean batch", "p50 ms", "unbatched req/s", "p50 ms", "in-proc req/s")
    widths = (15, 12, 10, 18, 10, 16)
    print(header[0].ljust(12) + "".join(f"{text:>{width}}" for text, width in zip(header[1:], widths, strict=True)))
    for clients in LEVELS:
        b, u, i = batched[clients], unbatched[clients], in_process[clients]
        print(
            f"  {clients:>2} clients{b['rps']:>15.2f}{b.get('mean_batch_size', float('nan')):>12.2f}"
            f"{b['p50_ms']:>10.0f}{u['rps']:>18.2f}{u['p50_ms']:>10.0f}{i['rps']:>16.2f}"
        )
    print(
        f"batching speedup at 16 clients: {summary['batching_speedup_c16']:.2f}x; isolated decode at 16 clients: "
        f"{summary['isolated_decode_gain_c16']:.2f}x the in-process decode; peak RSS "
        f"{summary['peak_rss_mb']} MB batched, {summary['peak_rss_mb_unbatched']} MB unbatched "
        f"({summary['ready_rss_mb']} MB once ready); "
        f"other processes' CPU share {summary['foreign_cpu_share_max']}, load average {summary['load_average']}"
    )
    if (summary["foreign_cpu_share_max"] or 0.0) > 0.1:
        print("NOISY: other processes took over 10% of the CPU during the run; these figures are low and unsteady")


if __name__ == "__main__":
    sys.exit(main())
