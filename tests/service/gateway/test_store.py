"""The gateway's durable store: instances on disk before their rows, one job per SOP Instance UID, leases, restarts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from caries_mim.errors import InvalidArgumentError
from service.gateway.store import JOB_STATES, GatewayStore, durable_folder, durable_write

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
IO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.3"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def receive(store: GatewayStore, number: int, *, study: str = STUDY, stable_after_s: float = 0.0, data=None):
    return store.add_instance(
        data if data is not None else f"instance {number}".encode(),
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.100.{number}",
        sop_class_uid=IO_PRESENTATION,
        study_instance_uid=study,
        series_instance_uid=SERIES,
        transfer_syntax_uid=EXPLICIT_LE,
        source="MODALITY",
        stable_after_s=stable_after_s,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> GatewayStore:
    opened = GatewayStore(tmp_path / "gateway", clock=clock)
    yield opened
    opened.close()


def test_a_received_instance_is_on_disk_with_its_row_and_one_queued_job(store):
    instance, queued = receive(store, 1, data=b"DICM bytes")
    assert queued
    assert instance.path.read_bytes() == b"DICM bytes"
    assert instance.path == store.instances_dir / STUDY / "1.2.826.0.1.3680043.8.498.100.1.dcm"
    assert store.instance(instance.sop_instance_uid) == instance
    job = store.job(instance.sop_instance_uid)
    assert (job.state, job.attempts, job.reason) == ("queued", 0, None)
    assert store.summary().counts == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    assert [path.name for path in instance.path.parent.iterdir()] == [instance.path.name], "no temporary left"


def test_an_instance_sent_again_keeps_its_one_job(store):
    first, _ = receive(store, 1, data=b"first")
    job = store.claim("worker-a", lease_s=60)
    assert store.finish(job.sop_instance_uid, "worker-a")
    again, queued = receive(store, 1, data=b"second")
    assert not queued
    assert again.path.read_bytes() == b"second"
    assert store.job(first.sop_instance_uid).state == "done", "a re-sent instance is not analysed twice"
    assert sum(store.summary().counts.values()) == 1


def test_claims_take_the_oldest_runnable_job_and_only_once(store, clock):
    for number in (1, 2):
        receive(store, number)
        clock.now += 1
    first = store.claim("worker-a", lease_s=60)
    second = store.claim("worker-b", lease_s=60)
    assert first.sop_instance_uid.endswith(".1")
    assert second.sop_instance_uid.endswith(".2")
    assert (first.state, first.attempts) == ("running", 1)
    assert store.claim("worker-c", lease_s=60) is None
    assert store.fail(second.sop_instance_uid, "worker-b", "the file is not a radiograph")
    assert store.job(second.sop_instance_uid).reason == "the file is not a radiograph"
    assert store.summary().counts == {"queued": 0, "running": 1, "done": 0, "failed": 1}


def test_a_dead_workers_job_is_taken_again_when_its_lease_runs_out(store, clock):
    receive(store, 1)
    job = store.claim("worker-a", lease_s=30)
    clock.now += 20
    assert store.renew(job.sop_instance_uid, "worker-a", lease_s=30)  # alive: the lease moves to now + 30
    clock.now += 29
    assert store.claim("worker-b", lease_s=30) is None
    clock.now += 2  # worker-a has gone silent past its lease
    taken = store.claim("worker-b", lease_s=30)
    assert (taken.sop_instance_uid, taken.attempts) == (job.sop_instance_uid, 2)
    # The first worker comes back: its job is no longer its own, and it cannot finish it.
    assert not store.renew(job.sop_instance_uid, "worker-a", lease_s=30)
    assert not store.finish(job.sop_instance_uid, "worker-a")
    assert store.finish(job.sop_instance_uid, "worker-b")


def test_a_study_waits_until_it_is_stable(store, clock):
    receive(store, 1, stable_after_s=10)
    clock.now += 6
    receive(store, 2, stable_after_s=10)  # the study is still arriving: both wait for 10 s of quiet
    receive(store, 3, study="1.2.826.0.1.3680043.8.498.9", stable_after_s=10)
    clock.now += 9
    assert store.claim("worker", lease_s=60) is None
    clock.now += 1.5
    claimed = {store.claim("worker", lease_s=60).sop_instance_uid for _ in range(3)}
    assert {uid.rsplit(".", 1)[1] for uid in claimed} == {"1", "2", "3"}


def test_restart_takes_back_running_jobs_and_reopens_the_same_database(tmp_path, clock):
    store = GatewayStore(tmp_path / "gateway", clock=clock)
    receive(store, 1)
    receive(store, 2)
    held = store.claim("gateway-1/worker-0", lease_s=3600)
    store.claim("other-host/worker-0", lease_s=3600)
    store.close()

    reopened = GatewayStore(tmp_path / "gateway", clock=clock)
    assert reopened.recover("gateway-1/") == 1
    assert reopened.job(held.sop_instance_uid).state == "queued"
    assert reopened.summary().counts["running"] == 1, "another gateway's lease is left to run out"
    reopened.close()


def _receive_then_die(root: str, ready) -> None:
    store = GatewayStore(Path(root))
    receive(store, 7, data=b"x" * 100_000)
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_instance_acknowledged_before_a_kill_is_there_after_it(tmp_path):
    """SIGKILL right after add_instance returned (when C-STORE success would be answered): file, row and job stay."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_receive_then_die, args=(str(tmp_path / "gateway"), ready))
    process.start()
    process.join(timeout=60)
    assert ready.is_set()
    assert process.exitcode == -signal.SIGKILL
    store = GatewayStore(tmp_path / "gateway")
    instance = store.instance("1.2.826.0.1.3680043.8.498.100.7")
    assert instance.path.read_bytes() == b"x" * 100_000
    assert store.job(instance.sop_instance_uid).state == "queued"
    store.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("study", "1.2.3/../../etc"), ("study", ""), ("study", "1" * 65), ("study", "1..2")],
)
def test_a_uid_that_could_escape_the_folder_is_refused(store, field, value):
    with pytest.raises(InvalidArgumentError, match="Study Instance UID is not a DICOM UID"):
        receive(store, 1, study=value)
    assert not any(store.instances_dir.iterdir())


def test_bad_arguments_are_refused(store):
    with pytest.raises(InvalidArgumentError, match="stable_after_s must be >= 0"):
        receive(store, 1, stable_after_s=-1)
    with pytest.raises(InvalidArgumentError, match="lease_s must be > 0"):
        store.claim("worker", lease_s=0)


def test_durable_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "a.dcm"
    durable_write(target, b"old")
    durable_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [path.name for path in tmp_path.iterdir()] == ["a.dcm"]


def test_the_schema_holds_every_state_and_no_other(store):
    receive(store, 1)
    assert set(store.summary().counts) == set(JOB_STATES)
    with pytest.raises(sqlite3.IntegrityError):
        store._db.execute("UPDATE jobs SET state = 'lost'")


def test_a_job_whose_worker_stops_every_time_is_failed_after_its_attempts(store, clock):
    receive(store, 1)
    for _ in range(3):  # three workers die holding it
        assert store.claim("gw/worker", lease_s=10) is not None
        clock.now += 11
    assert store.claim("gw/worker", lease_s=10) is None
    job = store.job("1.2.826.0.1.3680043.8.498.100.1")
    assert (job.state, job.reason) == ("failed", "not finished in 3 attempts (its worker stopped each time)")


def test_a_released_job_waits_then_runs_again(store, clock):
    receive(store, 1)
    job = store.claim("gw/worker", lease_s=60)
    assert store.release(job.sop_instance_uid, "gw/worker", delay_s=30)
    assert store.job(job.sop_instance_uid).state == "queued"
    assert store.claim("gw/worker", lease_s=60) is None
    clock.now += 31
    assert store.claim("gw/worker", lease_s=60).attempts == 2


def test_a_failed_commit_leaves_the_store_usable(store, monkeypatch):
    receive(store, 1)
    with pytest.raises(sqlite3.IntegrityError), store._transaction() as cursor:
        cursor.execute("UPDATE jobs SET state = 'lost'")
    assert not store._db.in_transaction
    assert store.claim("gw/worker", lease_s=60) is not None


def test_durable_folder_creates_every_missing_level(tmp_path):
    durable_folder(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    durable_folder(tmp_path / "a" / "b" / "c")  # already there: nothing to do
