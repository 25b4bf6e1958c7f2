"""A burst of C-STOREs into the DICOM gateway: how fast it takes them, how fast the SRs come back, and its peak memory,
against dcmtk's storescp receiving the same burst.

In one run, on ``--count`` synthetic intra-oral radiographs (the generator's sizes, 12 bits, Explicit VR Little
Endian), sent from ``--associations`` parallel associations, each sending its share of the files back to back over
one association as a modality sends a study (``--client``: dcmtk's storescu, one process per association, where
installed; else pynetdicom, one thread per association in this process):

  * storescp - dcmtk's ``storescp --fork`` (one process per association, each file written to disk, not synced)
               receiving the burst: what a C++ Storage SCP takes from the same client on the same machine, the
               ceiling of the DIMSE part. Skipped, with a message, when storescp is not installed;
  * gateway  - ``caries-mim gateway run`` (a subprocess, ``--workers`` job runners) receiving the same burst: each
               instance synced to disk and its job committed before "success", then analysed with the model and
               its caries SR sent by C-STORE to a Storage SCP in this process.
               receive_per_s: instances / (first send to last success; with storescu, to the last one's exit);
               analysed_s: until the last job was done (the store's timestamps);
               end_to_end_per_s: instances / (first send to the last SR received);
               peak_rss_mb: VmHWM of the gateway plus its decode workers, read once every SR was delivered.

receive_ratio = the gateway's receive_per_s / storescp's. Prints a line per phase, a table, then a final JSON line.
Timings are never asserted (the burst test, ``tests/service/gateway/test_durability.py``, asserts the counts).

    python benchmarks/gateway_burst.py [--model PKG] [--count 200] [--associations 8] [--workers 1] [--device cpu]
        [--client storescu|pynetdicom] [--no-peer]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/ is on sys.path when this runs as a script
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from quick_model import BenchmarkError

from caries_mim.package import shipped_reference_detector
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from caries_mim.synth.dicom import INTRAORAL_PRESENTATION_SOP_CLASS

HOST = "127.0.0.1"
REPOSITORY = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def write_radiographs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.dcm"
        write_dicom(render_indexed(0, "labeled", index, SynthConfig()), path, index=index, seed=97,
                    transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME2")  # fmt: skip
        paths.append(path)
    return paths


def send_burst(client: str, port: int, called_ae_title: str, paths: list[Path], associations: int) -> dict:
    """``paths`` over ``associations`` parallel associations, each sending its share back to back (as a modality
    sends a study) with ``client``: "storescu" (dcmtk, one process per association) or "pynetdicom" (one thread
    per association in this process). The counts and the receive rate (first send to last success)."""
    send = _send_with_storescu if client == "storescu" else _send_with_pynetdicom
    started = time.time()
    successes, ended = send(port, called_ae_title, [paths[i::associations] for i in range(associations)])
    received_s = ended - started if successes else None
    return {
        "started": started,
        "received": successes,
        "not_received": len(paths) - successes,
        "received_s": None if received_s is None else round(received_s, 2),
        "receive_per_s": None if not received_s else round(successes / received_s, 1),
    }


def _send_with_storescu(port: int, called_ae_title: str, shares: list[list[Path]]) -> tuple[int, float]:
    """(successes, when the last association ended)."""
    command = [shutil.which("storescu"), "-v", "-aet", "MODALITY", "-aec", called_ae_title, HOST, str(port)]
    processes = [
        subprocess.Popen([*command, *map(str, share)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for share in shares
    ]
    outputs = [process.communicate()[0] for process in processes]
    ended = time.time()
    return sum(output.count("Received Store Response (Success)") for output in outputs), ended


def _send_with_pynetdicom(port: int, called_ae_title: str, shares: list[list[Path]]) -> tuple[int, float]:
    """(successes, when the last success came)."""
    successes: list[float] = []
    lock = threading.Lock()

    def one_association(share: list[Path]) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(INTRAORAL_PRESENTATION_SOP_CLASS, ExplicitVRLittleEndian)
        association = ae.associate(HOST, port, ae_title=called_ae_title)
        if not association.is_established:
            return
        try:
            for path in share:
                # A path is sent as the file's encoded data set, without decoding it.
                answer = association.send_c_store(path)
                if "Status" in answer and int(answer.Status) == 0x0000:
                    with lock:
                        successes.append(time.time())
        finally:
            if association.is_established:
                association.release()

    threads = [threading.Thread(target=one_association, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(successes), max(successes, default=0.0)


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"the receiver exited with {process.returncode} before listening")
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise BenchmarkError(f"nothing listens on port {port} after {timeout_s:.0f} s")


# ---------------------------------------------------------------------------------------------------- the peer


def run_storescp(paths: list[Path], args: argparse.Namespace, tmp: Path) -> dict | None:
    storescp = shutil.which("storescp")
    if storescp is None:
        print("storescp: not found, peer skipped (install the Debian package dcmtk)", flush=True)
        return None
    received = tmp / "storescp"
    received.mkdir()
    port = free_port()
    print(f"storescp: receiving {len(paths)} instances from {args.associations} associations ...", flush=True)
    process = subprocess.Popen(
        [storescp, "--fork", "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, 30)
        result = send_burst(args.client, port, "PACS", paths, args.associations)
    finally:
        process.terminate()
        process.wait(30)
    result["files"] = sum(1 for _ in received.iterdir())
    result.pop("started")
    shutil.rmtree(received)
    return result


# ------------------------------------------------------------------------------------------------- the gateway


class Destination:
    """A Storage SCP for the SRs that notes when each distinct one first arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.stores = 0
        ae = AE(ae_title="BENCH")
        ae.add_supported_context(Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.maximum_associations = 16
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:
        self.stores += 1
        self.arrivals.setdefault(str(event.request.AffectedSOPInstanceUID), time.time())
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += parents.get(current, [])
    return tree


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def store_figures(database: Path) -> dict:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        jobs = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        deliveries = dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
        last_done = db.execute("SELECT MAX(updated_at) FROM jobs WHERE state = 'done'").fetchone()[0]
        retried = db.execute("SELECT COUNT(*) FROM deliveries WHERE attempts > 1").fetchone()[0]
    return {"jobs": jobs, "deliveries": deliveries, "last_done": last_done, "deliveries_retried": retried}


def settled(database: Path, count: int) -> bool:
    """Every job ended and no delivery pending."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        ended = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('done', 'failed')").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]
    return ended == count and pending == 0


def run_gateway(paths: list[Path], model: Path, args: argparse.Namespace, tmp: Path) -> dict:
    destination = Destination()
    root, log = tmp / "gateway", tmp / "gateway.log"
    command = [
        sys.executable, "-m", "pipelines.cli", "gateway", "run", "--root", str(root), "--model", str(model),
        "--port", "0", "--workers", str(args.workers), "--destination", f"bench=BENCH@{HOST}:{destination.port}",
    ]  # fmt: skip
    if args.device:
        command += ["--device", args.device]
    environment = dict(os.environ)
    if args.threads:
        environment["OMP_NUM_THREADS"] = str(args.threads)
    print(f"gateway: starting ({args.workers} worker(s), model {model.name}) ...", flush=True)
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment
        )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not lines or not lines[0].strip():
            raise BenchmarkError(f"the gateway did not start: {log.read_text()[-2000:]}")
        port = json.loads(lines[0])["port"]
        print(f"gateway: receiving {len(paths)} instances from {args.associations} associations ...", flush=True)
        result = send_burst(args.client, port, "CARIESMIM", paths, args.associations)
        print(
            f"gateway: received {result['received']} in {result['received_s']} s; waiting for the SRs ...",
            flush=True,
        )
        database = root / "gateway.sqlite3"
        deadline = time.monotonic() + args.timeout
        while not settled(database, result["received"]):
            if process.poll() is not None:
                raise BenchmarkError(f"the gateway exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"not settled after {args.timeout:.0f} s: {store_figures(database)}")
            time.sleep(0.25)
        peaks = {pid: peak_rss_mb(pid) for pid in process_tree(process.pid)}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
        destination.stop()
    figures = store_figures(database)
    started = result.pop("started")
    arrivals = sorted(destination.arrivals.values())
    delivered_s = (arrivals[-1] - started) if arrivals else None
    analysed_s = None if figures["last_done"] is None else figures["last_done"] - started
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    measured = [peak for peak in peaks.values() if peak is not None]
    return {
        **result,
        "analysed_s": None if analysed_s is None else round(analysed_s, 1),
        "delivered_s": None if delivered_s is None else round(delivered_s, 1),
        "end_to_end_per_s": None if not delivered_s else round(len(arrivals) / delivered_s, 2),
        "srs_received": len(arrivals),
        "sr_stores": destination.stores,
        "sr_interval_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "jobs": figures["jobs"],
        "deliveries": figures["deliveries"],
        "deliveries_retried": figures["deliveries_retried"],
        "peak_rss_mb": round(sum(measured), 1),
        "peak_rss_mb_by_process": [round(peak, 1) for peak in measured],
        "exit_code": process.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, metavar="PKG", help="model package (default: the shipped reference)")
    parser.add_argument("--count", type=int, default=200, help="instances in the burst (default 200)")
    parser.add_argument("--associations", type=int, default=8, help="parallel associations (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="the gateway's job runners (default 1)")
    parser.add_argument("--device", help="the gateway's device (default: CUDA when available)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the gateway (default: torch's own)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="longest wait for the SRs, s (default 3600)")
    parser.add_argument(
        "--client",
        choices=("storescu", "pynetdicom"),
        default="storescu" if shutil.which("storescu") else "pynetdicom",
        help="who sends the burst: dcmtk's storescu, one process per association (the default where installed), "
        "or pynetdicom, one thread per association in this process",
    )
    parser.add_argument("--no-peer", action="store_true", help="only the gateway")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        model = args.model or shipped_reference_detector()
        if not model.is_file():
            raise BenchmarkError(f"model package {model} does not exist")
        with tempfile.TemporaryDirectory(prefix="gateway_burst_") as folder:
            tmp = Path(folder)
            print(f"writing {args.count} synthetic radiographs ...", flush=True)
            paths = write_radiographs(tmp / "radiographs", args.count)
            sizes = [path.stat().st_size for path in paths]
            peer = None if args.no_peer else run_storescp(paths, args, tmp)
            gateway = run_gateway(paths, model, args, tmp)
    except BenchmarkError as exc:
        print(f"gateway_burst: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gateway_burst: interrupted", file=sys.stderr)
        return 130
    ratio = None
    if peer and peer["receive_per_s"] and gateway["receive_per_s"]:
        ratio = round(gateway["receive_per_s"] / peer["receive_per_s"], 2)
    print("| | gateway | storescp |")
    print("| --- | ---: | ---: |")
    print(f"| received / not | {gateway['received']} / {gateway['not_received']} | "
          f"{peer['received'] if peer else '-'} / {peer['not_received'] if peer else '-'} |")  # fmt: skip
    print(f"| receive (instances/s) | {gateway['receive_per_s']} | {peer['receive_per_s'] if peer else '-'} |")
    print(f"| all analysed / all SRs delivered (s) | {gateway['analysed_s']} / {gateway['delivered_s']} | - |")
    print(f"| end to end (instances/s) | {gateway['end_to_end_per_s']} | - |")
    print(f"| peak RSS, all processes (MB) | {gateway['peak_rss_mb']} | - |")
    print(
        json.dumps(
            {
                "benchmark": "gateway_burst",
                "machine": cpu_name(),
                "model": str(model),
                "device": args.device,
                "count": args.count,
                "associations": args.associations,
                "client": args.client,
                "workers": args.workers,
                "instance_mb_mean": round(statistics.mean(sizes) / 2**20, 2),
                "gateway": gateway,
                "storescp": peer,
                "receive_ratio": ratio,
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
