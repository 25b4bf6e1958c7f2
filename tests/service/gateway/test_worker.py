"""The job runner: results kept with their job, failures with reasons, leases held while analysing, no duplicates."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from caries_mim.errors import DecoderUnavailableError, InvalidArgumentError, UnsupportedModalityError
from service.gateway.store import GatewayStore, ResultFile
from service.gateway.worker import JobRunner
from tests.polling import eventually
from tests.service.gateway.test_store import Clock, receive

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def report_of(instance) -> list[ResultFile]:
    """A stand-in analysis: one 'report' whose UID derives from the source's, as the gateway's SR does."""
    return [ResultFile(f"{instance.sop_instance_uid}.1", SR_CLASS, b"report on " + instance.path.read_bytes())]


@pytest.fixture
def store(tmp_path):
    opened = GatewayStore(tmp_path / "gateway")
    yield opened
    opened.close()


def test_a_job_runs_once_and_keeps_its_results(store):
    instance, _ = receive(store, 1, data=b"radiograph")
    runner = JobRunner(store, report_of, owner="gw/worker-0")
    assert runner.run_once().sop_instance_uid == instance.sop_instance_uid
    assert runner.run_once() is None
    assert store.job(instance.sop_instance_uid).state == "done"
    (result,) = store.results_for(instance.sop_instance_uid)
    assert result.sop_instance_uid == f"{instance.sop_instance_uid}.1"
    assert result.path.read_bytes() == b"report on radiograph"
    assert result.path.parent.name == instance.study_instance_uid


def test_a_refused_image_fails_its_job_with_the_reason_and_the_queue_goes_on(store):
    def picky(instance):
        if instance.sop_instance_uid.endswith(".1"):
            raise UnsupportedModalityError("modality CT is not accepted (allowed: DX, IO, PX)")
        if instance.sop_instance_uid.endswith(".2"):
            raise KeyError("a bug")
        return report_of(instance)

    for number in (1, 2, 3):
        receive(store, number)
    runner = JobRunner(store, picky, owner="gw/worker-0")
    while runner.run_once() is not None:
        pass
    jobs = {uid: store.job(f"1.2.826.0.1.3680043.8.498.100.{uid}") for uid in (1, 2, 3)}
    assert (jobs[1].state, jobs[1].reason) == ("failed", "modality CT is not accepted (allowed: DX, IO, PX)")
    assert (jobs[2].state, jobs[2].reason) == ("failed", "internal error (KeyError)")
    assert jobs[3].state == "done"


def test_the_lease_is_renewed_while_a_slow_analysis_runs(tmp_path):
    store = GatewayStore(tmp_path / "gateway")
    receive(store, 1)
    started = threading.Event()
    release = threading.Event()

    def slow(instance):
        started.set()
        release.wait(5)
        return report_of(instance)

    runner = JobRunner(store, slow, owner="gw/worker-0", lease_s=0.3)
    thread = threading.Thread(target=runner.run_once)
    thread.start()
    started.wait(5)
    time.sleep(0.8)  # more than two leases: without the heartbeat another worker could take the job now
    assert store.claim("gw/worker-1", lease_s=0.3) is None
    release.set()
    thread.join(5)
    assert store.job("1.2.826.0.1.3680043.8.498.100.1").state == "done"
    store.close()


def test_a_job_taken_over_after_its_worker_went_silent_keeps_one_set_of_results(tmp_path):
    clock = Clock()
    store = GatewayStore(tmp_path / "gateway", clock=clock)
    instance, _ = receive(store, 1, data=b"radiograph")
    first = store.claim("gw-a/worker-0", lease_s=10)
    clock.now += 11  # gw-a went silent; gw-b takes the job, analyses it and keeps the results
    taken = JobRunner(store, report_of, owner="gw-b/worker-0", lease_s=10).run_once()
    assert (taken.sop_instance_uid, taken.attempts) == (instance.sop_instance_uid, 2)
    assert store.job(instance.sop_instance_uid).state == "done"
    (kept,) = store.results_for(instance.sop_instance_uid)
    written = kept.path.read_bytes()
    # gw-a comes back with a report of other bytes and tries to complete: refused, the kept file untouched.
    late = [ResultFile(f"{instance.sop_instance_uid}.1", SR_CLASS, b"a late, different report")]
    assert not store.complete(first.sop_instance_uid, "gw-a/worker-0", late)
    assert len(store.results_for(instance.sop_instance_uid)) == 1
    assert kept.path.read_bytes() == written
    store.close()


def test_results_with_bad_uids_are_refused(store):
    receive(store, 1)
    job = store.claim("gw/worker-0", lease_s=60)
    with pytest.raises(InvalidArgumentError, match="result's SOP Instance UID is not a DICOM UID"):
        store.complete(job.sop_instance_uid, "gw/worker-0", [ResultFile("../../x", SR_CLASS, b"")])
    assert store.job(job.sop_instance_uid).state == "running"


def test_run_stops_when_told(store):
    receive(store, 1)
    stop = threading.Event()
    runner = JobRunner(store, report_of, owner="gw/worker-0")
    thread = threading.Thread(target=runner.run, args=(stop,), kwargs={"idle_s": 0.05})
    thread.start()
    eventually(lambda: store.summary().counts["done"] == 1, timeout_s=5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert store.summary().counts["done"] == 1


def test_a_busy_decoder_puts_the_job_back_instead_of_failing_it(store):
    receive(store, 1)

    def busy(instance):
        raise DecoderUnavailableError("no decode worker came free in time")

    JobRunner(store, busy, owner="gw/worker-0").run_once()
    job = store.job("1.2.826.0.1.3680043.8.498.100.1")
    assert (job.state, job.attempts, job.reason) == ("queued", 1, None)


def test_the_runner_outlives_an_error_of_the_store(store, monkeypatch):
    receive(store, 1)
    real_claim = store.claim
    failures = []

    def flaky_claim(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim", flaky_claim)
    stop = threading.Event()
    runner = JobRunner(store, report_of, owner="gw/worker-0")
    thread = threading.Thread(target=runner.run, args=(stop,), kwargs={"idle_s": 0.02, "error_pause_s": 0.02})
    thread.start()
    eventually(lambda: store.summary().counts["done"] == 1, timeout_s=5)
    stop.set()
    thread.join(5)
    assert failures == [1]
    assert store.summary().counts["done"] == 1
