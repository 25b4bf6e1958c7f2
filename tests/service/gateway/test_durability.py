"""Nothing is lost: the gateway killed with SIGKILL mid-burst resumes at restart and sends every result exactly once
(by SOP Instance UID), a destination that is down gets its results when it comes back, and a burst of 200 instances
from parallel associations is processed whole with bounded memory.

The gateway runs as ``caries-mim gateway run`` in its own process (except where a shorter retry backoff is needed),
with the tiny test model; the destination is an in-test pynetdicom Storage SCP that records every SR it receives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from caries_mim.package import save_package
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from pipelines.cli import main
from service.gateway.gateway import Gateway, GatewayConfig
from service.gateway.scp import ScpConfig
from service.gateway.sender import Destination
from service.gateway.store import GatewayStore
from tests.polling import eventually
from tests.service.gateway.launch import launch_gateway, stop_gateway
from tests.service.gateway.test_sender import Pacs, free_port

#: Small radiographs (320 px long side, 0.1 mm/px: a whole tooth row) keep the tiny model's jobs short.
SMALL = SynthConfig(width_px_range=(320.0, 320.0), sensor_long_side_mm=(32.0, 32.0), spacing_mm_range=(0.02, 0.1))
#: Generous: the bound is about a leak or an unbounded queue in memory, not about this machine's speed.
PEAK_MEMORY_BOUND_BYTES = 2 * 1024**3


@pytest.fixture(scope="module")
def burst_package_path(package, tmp_path_factory) -> Path:
    """The tiny test detector with its operating threshold at the top: its SRs report no caries. The tests here are
    about what is received, kept and sent, and an SR of dozens of findings from an untrained model would make each
    job several times slower without testing anything more (the SR's content is tested elsewhere)."""
    quiet = dataclasses.replace(package, threshold=1.0)
    return save_package(quiet, tmp_path_factory.mktemp("burst-package") / "model.cmpkg")


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list[Path]:
    """200 small synthetic intra-oral radiographs as DICOM files, each its own SOP Instance UID."""
    folder = tmp_path_factory.mktemp("burst")
    paths = []
    for index in range(200):
        path = folder / f"{index:03d}.dcm"
        write_dicom(render_indexed(0, "labeled", index, SMALL), path, index=index, seed=41,
                    transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME2")  # fmt: skip
        paths.append(path)
    return paths


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def start_gateway(root: Path, package_path: Path, pacs_port: int, log: Path) -> tuple[subprocess.Popen, int]:
    """``caries-mim gateway run`` on ``root`` (one worker), sending to ``PACS@127.0.0.1:pacs_port``; the process and
    its DICOM port."""
    process, started = launch_gateway(
        root, package_path, "--workers", "1", "--calling-ae", "MODALITY",
        "--destination", f"pacs=PACS@127.0.0.1:{pacs_port}", log=log,
    )  # fmt: skip
    return process, started["port"]


def gateway_status(root: Path) -> dict:
    """What ``caries-mim gateway status --root ROOT`` prints."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(["gateway", "status", "--root", str(root)]) == 0
    return json.loads(output.getvalue())


def settled(root: Path, expected_jobs: int) -> dict | None:
    """The status once every one of ``expected_jobs`` jobs has ended and no delivery is pending, else None."""
    status = gateway_status(root)
    jobs = status["jobs"]
    ended = jobs["done"] + jobs["failed"] == expected_jobs and jobs["queued"] == jobs["running"] == 0
    return status if ended and status["deliveries"]["pending"] == 0 else None


def send(
    port: int,
    paths: Iterable[Path],
    statuses: dict[str, int | None],
    before: Callable[[int], None] = lambda index: None,
) -> None:
    """C-STORE ``paths`` over one association, as a modality sends a study, recording each instance's status
    (None: no answer). ``before(index)`` runs before each send. Stops at the first send the gateway does not
    answer (it was killed): the rest stay unacknowledged, as they would be on the modality."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.3", ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="CARIESMIM")
    if not association.is_established:
        return
    try:
        for index, path in enumerate(paths):
            before(index)
            dataset = pydicom.dcmread(path)
            if not association.is_established:
                return
            try:
                answer = association.send_c_store(dataset)
            except RuntimeError:  # the association went down between the check and the send
                return
            statuses[str(dataset.SOPInstanceUID)] = int(answer.Status) if "Status" in answer else None
            if "Status" not in answer:
                return
    finally:
        if association.is_established:
            association.release()


def send_in_parallel(port: int, paths: list[Path], associations: int, **kwargs) -> dict[str, int | None]:
    """``paths`` split over ``associations`` threads, one association each; every instance's status."""
    statuses: dict[str, int | None] = {}
    threads = [
        threading.Thread(target=send, args=(port, paths[index::associations], statuses), kwargs=kwargs)
        for index in range(associations)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return statuses


def acknowledged(statuses: dict[str, int | None]) -> set[str]:
    # A copy: the sending threads may add to the dict meanwhile.
    return {uid for uid, status in statuses.copy().items() if status == 0x0000}


def cited_source(report: pydicom.Dataset) -> str:
    """The SOP Instance UID of the radiograph a caries SR is about."""
    series = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return str(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the gateway's decode workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The command name (field 2) is in parentheses and may hold spaces: the parent pid follows it.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += parents.get(current, [])
    return tree


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (the peak resident set) of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.slow
def test_a_gateway_killed_mid_burst_resumes_and_sends_every_result_exactly_once(
    burst_package_path, radiographs, tmp_path
):
    paths = radiographs[:40]
    sources = {sop_instance_uid(path): path for path in paths}
    root, log = tmp_path / "gateway", tmp_path / "gateway.log"
    pacs = Pacs(free_port())
    process, port = start_gateway(root, burst_package_path, pacs.server.server_address[1], log)
    resume = threading.Event()

    def pause_after_six(index: int) -> None:
        # Each modality sends 6 of its 10 instances, waits until results are going out, then sends the other 4 back
        # to back: the gateway is killed while they arrive (those cut short are sent again after the restart, as a
        # real modality would).
        if index == 6:
            resume.wait(120)

    sent: dict[str, int | None] = {}
    threads = [threading.Thread(target=send, args=(port, paths[index::4], sent, pause_after_six)) for index in range(4)]
    try:
        for thread in threads:
            thread.start()
        assert eventually(lambda: len(acknowledged(sent)) == 24 and len(pacs.received) >= 2, timeout_s=120), (
            f"{len(acknowledged(sent))} acknowledged, {len(pacs.received)} SRs received: {log.read_text()[-2000:]}"
        )
        resume.set()
        assert eventually(lambda: len(acknowledged(sent)) >= 26, timeout_s=60, interval_s=0.002)
        process.kill()
        process.wait(60)
    finally:
        resume.set()
        for thread in threads:
            thread.join(120)
        if process.poll() is None:
            process.kill()
            process.wait(60)
    before_kill = acknowledged(sent)
    at_kill = gateway_status(root)
    received_at_kill = len(set(pacs.received))
    assert len(before_kill) < len(paths), "sends were still under way at the kill"
    assert at_kill["jobs"]["queued"] + at_kill["jobs"]["running"] > 0, f"jobs were under way at the kill: {at_kill}"

    store = GatewayStore(root)
    try:
        for uid in before_kill:  # "success" was answered only once the instance was on disk with its job
            assert store.job(uid) is not None
            assert store.instance(uid).path.is_file()
    finally:
        store.close()

    process, port = start_gateway(root, burst_package_path, pacs.server.server_address[1], log)
    try:
        resent = send_in_parallel(port, [sources[uid] for uid in set(sources) - before_kill], associations=2)
        assert acknowledged(resent) == set(sources) - before_kill
        # A delivery the killed gateway's sender held is due again as soon as the restarted gateway takes it back.
        status = eventually(lambda: settled(root, len(paths)), timeout_s=120, interval_s=0.5)
        assert status, f"{gateway_status(root)}: {log.read_text()[-2000:]}"
    finally:
        stop_gateway(process)
        pacs.stop()

    assert status["jobs"] == {"queued": 0, "running": 0, "done": len(paths), "failed": 0}
    assert status["deliveries"] == {"pending": 0, "sent": len(paths)}
    store = GatewayStore(root)
    try:
        results = {uid: store.results_for(uid) for uid in sources}
    finally:
        store.close()
    assert all(len(kept) == 1 for kept in results.values()), "one SR per radiograph"
    expected_reports = {kept[0].sop_instance_uid for kept in results.values()}
    counts = Counter(pacs.received)
    assert set(counts) == expected_reports, "every SR reached the destination, and no other"
    assert {cited_source(report) for report in pacs.datasets} == set(sources)
    duplicates = {uid: count for uid, count in counts.items() if count > 1}
    # A result sent again after the kill (a send cut short, or sent but not yet recorded) is the same SR instance,
    # so the receiver holds one report per radiograph: duplicates repeat a UID, never add one.
    print(
        f"killed with {len(before_kill)}/{len(paths)} acknowledged, jobs {at_kill['jobs']}, {received_at_kill} SRs "
        f"received; after the restart {len(counts)} distinct SRs, {sum(counts.values())} received, "
        f"{len(duplicates)} sent twice (same UID)"
    )


@pytest.mark.slow
def test_a_destination_that_is_down_gets_the_results_when_it_comes_back(
    burst_package_path, radiographs, tmp_path, monkeypatch
):
    # The gateway quiets pydicom's validation for its process; keep this test process's setting.
    monkeypatch.setattr(
        pydicom.config.settings, "reading_validation_mode", pydicom.config.settings.reading_validation_mode
    )
    pacs_port = free_port()  # nobody listens there yet
    destination = Destination("pacs", "PACS", "127.0.0.1", pacs_port)
    root = tmp_path / "gateway"
    # The default backoff starts at 5 s and doubles; a shorter one lets a few retries pass in seconds.
    config = GatewayConfig(
        root=root, model=burst_package_path, scp=ScpConfig(port=0), destinations=(destination,), device="cpu",
        retry_backoff_s=(0.2, 1.0),
    )  # fmt: skip
    gateway = Gateway(config)
    paths = radiographs[:3]
    pacs = None
    gateway.start()
    try:
        statuses = send_in_parallel(gateway.scp.port, paths, associations=1)
        assert acknowledged(statuses) == {sop_instance_uid(path) for path in paths}

        def retried() -> bool:
            rows = gateway.store._db.read("SELECT state, attempts FROM deliveries")
            return len(rows) == 3 and all(state == "pending" and attempts >= 2 for state, attempts in rows)

        assert eventually(retried, timeout_s=120), gateway_status(root)
        status = gateway_status(root)
        assert status["jobs"]["done"] == 3
        assert status["deliveries"] == {"pending": 3, "sent": 0}

        pacs = Pacs(pacs_port)
        assert eventually(lambda: settled(root, 3), timeout_s=60, interval_s=0.2), gateway_status(root)
    finally:
        gateway.stop()
        if pacs is not None:
            pacs.stop()
    assert sorted(cited_source(report) for report in pacs.datasets) == sorted(statuses)
    assert len(set(pacs.received)) == 3


@pytest.mark.slow
def test_a_burst_of_200_from_parallel_associations_is_processed_whole_in_bounded_memory(
    burst_package_path, radiographs, tmp_path
):
    root, log = tmp_path / "gateway", tmp_path / "gateway.log"
    pacs = Pacs(free_port())
    process, port = start_gateway(root, burst_package_path, pacs.server.server_address[1], log)
    try:
        started = time.monotonic()
        statuses = send_in_parallel(port, radiographs, associations=8)
        received_s = time.monotonic() - started
        assert len(statuses) == len(radiographs)
        assert set(statuses.values()) == {0x0000}
        status = eventually(lambda: settled(root, len(radiographs)), timeout_s=600, interval_s=0.5)
        delivered_s = time.monotonic() - started
        assert status, f"{gateway_status(root)}: {log.read_text()[-2000:]}"
        tree = process_tree(process.pid)
        peaks = {pid: peak_rss_bytes(pid) for pid in tree}
    finally:
        stop_gateway(process)
        pacs.stop()
    assert status["jobs"] == {"queued": 0, "running": 0, "done": len(radiographs), "failed": 0}
    assert status["deliveries"] == {"pending": 0, "sent": len(radiographs)}
    assert {cited_source(report) for report in pacs.datasets} == set(statuses)
    peak = sum(peaks.values())
    print(
        f"burst of {len(radiographs)}: received in {received_s:.1f} s, all SRs delivered in {delivered_s:.1f} s; "
        f"peak RSS {peak / 2**20:.0f} MiB over {len(tree)} processes "
        f"({', '.join(f'{value / 2**20:.0f}' for value in peaks.values())} MiB)"
    )
    assert len(tree) >= 2, "the gateway and its decode worker"
    assert peak < PEAK_MEMORY_BOUND_BYTES
