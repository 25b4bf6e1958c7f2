"""Soak: 16 clients for 2 minutes against the real server, a mix of valid radiographs and hostile files, measured
with the uploads decoded in isolated worker processes (the service's default) and, as the peer, in the server
process (``CARIES_MIM_DECODE_WORKERS=0``), one after the other on the same machine and files.

For each server: requests/s, statuses by kind (valid, broken), 5xx, dropped connections, latency p50/p95/p99 of
valid and of broken uploads, the server's RSS averaged over the first and the last 30 s and its growth (the goal
is under 10%), the decode workers' RSS at the end, and decode workers replaced (from ``/metrics``). Half the
uploads are full-size synthetic bitewings and periapicals (Explicit VR Little Endian, RLE Lossless, JPEG 2000
Lossless), half files of the seeded fuzz corpus (``tests/fuzz/corpus.py``). Prints a table, then a final JSON
line. Timings are never asserted (the soak test, ``tests/service/test_soak.py``, asserts only the counts).

    python benchmarks/soak.py [--model PKG] [--clients 16] [--seconds 120] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import cpu_name  # benchmarks/ is on sys.path when this runs as a script
from quick_model import BenchmarkError, train_quick_package, write_synthetic_set

from pipelines.service_client import LocalService, ServiceStartError

# tests/ (the soak load and the fuzz corpus it draws from) is not an installed package: import it from the clone.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.load import mixed_uploads, soak
from tests.polling import sample

SERVERS = {
    "isolated": {"CARIES_MIM_DECODE_WORKERS": "2"},
    "in_process": {"CARIES_MIM_DECODE_WORKERS": "0"},
}


#: Why the service replaces a decode worker (the reason label of caries_mim_decoder_restarts_total).
RESTART_REASONS = ("crash", "timeout", "memory", "dead", "invalid_reply", "interrupted")


def decoder_restarts(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = {
        reason: sample(text, "caries_mim_decoder_restarts_total", f'reason="{reason}"') for reason in RESTART_REASONS
    }
    return {reason: count for reason, count in counts.items() if count}


def run_one(name: str, model: Path, uploads, args: argparse.Namespace, tmp: Path) -> dict:
    environment = {"OMP_NUM_THREADS": str(args.threads), **SERVERS[name]}
    print(f"{name}: {args.clients} clients for {args.seconds:g} s ...", flush=True)
    try:
        with LocalService(model, tmp / f"{name}.log", environment=environment, inherit_settings=False) as server:
            result = soak(server.port, server.process.pid, uploads, clients=args.clients, seconds=args.seconds)
            summary = result.summary()
            summary["decoder_restarts"] = decoder_restarts(server.base_url)
            summary["dropped_examples"] = result.dropped[:3]
    except ServiceStartError as exc:
        raise BenchmarkError(exc.message) from None
    return summary


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    rows = [
        ("requests/s", lambda r: r["requests_per_s"]),
        ("requests", lambda r: r["requests"]),
        ("5xx", lambda r: r["server_errors"]),
        ("dropped connections", lambda r: r["dropped_connections"]),
        ("valid: statuses", lambda r: r["statuses"]["valid"]),
        ("broken: statuses", lambda r: r["statuses"]["broken"]),
        ("valid: p50 / p95 / p99 ms", lambda r: "/".join(str(v) for v in r["latency_ms"]["valid"].values())),
        ("broken: p50 / p95 / p99 ms", lambda r: "/".join(str(v) for v in r["latency_ms"]["broken"].values())),
        ("server RSS first 30 s MB", lambda r: r["memory"]["server_first_mb"]),
        ("server RSS last 30 s MB", lambda r: r["memory"]["server_last_mb"]),
        ("server RSS growth", lambda r: r["memory"]["server_growth"]),
        ("decode workers RSS MB", lambda r: r["memory"]["workers_last_mb"]),
        ("decode workers replaced", lambda r: r["decoder_restarts"]),
    ]
    print(f"| | {' | '.join(names)} |")
    print(f"| --- |{' ---: |' * len(names)}")
    for label, value in rows:
        print(f"| {label} | {' | '.join(str(value(results[name])) for name in names)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, metavar="PKG", help="model package (default: train a quick one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    parser.add_argument("--no-peer", action="store_true", help="only the isolated server")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="soak_") as folder:
            tmp = Path(folder)
            model = args.model
            if model is None:
                print("no --model: training a quick package (tiny config, 10 steps; ~1 min on 2 cores) ...", flush=True)
                model = train_quick_package(write_synthetic_set(tmp / "synth"), tmp / "run")
            elif not model.is_file():
                raise BenchmarkError(f"model package {model} does not exist")
            uploads = mixed_uploads(tmp)
            names = ["isolated"] if args.no_peer else list(SERVERS)
            results = {name: run_one(name, model, uploads, args, tmp) for name in names}
    except BenchmarkError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak: interrupted (servers stopped)", file=sys.stderr)
        return 130
    print_table(results)
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "machine": cpu_name(),
                "model": str(args.model) if args.model else "quick package (tiny config, 10 steps)",
                "uploads": {
                    "valid": sum(u.kind == "valid" for u in uploads),
                    "broken": sum(u.kind == "broken" for u in uploads),
                },
                "results": results,
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
