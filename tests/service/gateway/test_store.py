"""The gateway's durable store: instances on disk before their rows, one job per SOP Instance UID, leases, restarts.

The tests taking ``store`` or ``database`` run on both databases: SQLite (the embedded default) and PostgreSQL (a
throwaway server, or the one ``CARIES_MIM_TEST_POSTGRES`` names; see tests/service/gateway/postgres.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from service.gateway.store import (
    JOB_STATES,
    CatalogCondition,
    CatalogKeys,
    GatewayStore,
    ResultFile,
    StoreError,
    durable_folder,
    durable_write,
    store_exists,
)
from tests.service.gateway.postgres import (
    free_port,
    postgres_database,  # noqa: F401 - a fixture the database fixture uses
    postgres_server,  # noqa: F401 - a fixture postgres_database uses
)

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


def receive(store: GatewayStore, number: int, *, study: str = STUDY, stable_after_s: float = 0.0, data=None, keys=None):
    return store.add_instance(
        data if data is not None else f"instance {number}".encode(),
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.100.{number}",
        sop_class_uid=IO_PRESENTATION,
        study_instance_uid=study,
        series_instance_uid=keys.series_instance_uid if keys else SERIES,
        transfer_syntax_uid=EXPLICIT_LE,
        source="MODALITY",
        stable_after_s=stable_after_s,
        keys=keys,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str | None:
    """None (SQLite in the store's folder), or the URL of an empty PostgreSQL schema."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_database")


@pytest.fixture
def store(tmp_path, clock, database) -> GatewayStore:
    opened = GatewayStore(tmp_path / "gateway", database=database, clock=clock)
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


def test_restart_takes_back_running_jobs_and_reopens_the_same_database(tmp_path, clock, database):
    store = GatewayStore(tmp_path / "gateway", database=database, clock=clock)
    receive(store, 1)
    receive(store, 2)
    held = store.claim("gateway-1/worker-0", lease_s=3600)
    store.claim("other-host/worker-0", lease_s=3600)
    store.close()

    reopened = GatewayStore(tmp_path / "gateway", database=database, clock=clock)
    assert reopened.recover("gateway-1/") == 1
    assert reopened.job(held.sop_instance_uid).state == "queued"
    assert reopened.summary().counts["running"] == 1, "another gateway's lease is left to run out"
    reopened.close()


def _receive_then_die(root: str, database: str | None, ready) -> None:
    store = GatewayStore(Path(root), database=database)
    receive(store, 7, data=b"x" * 100_000)
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_instance_acknowledged_before_a_kill_is_there_after_it(tmp_path, database):
    """SIGKILL right after add_instance returned (when C-STORE success would be answered): file, row and job stay."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_receive_then_die, args=(str(tmp_path / "gateway"), database, ready))
    process.start()
    process.join(timeout=60)
    assert ready.is_set()
    assert process.exitcode == -signal.SIGKILL
    store = GatewayStore(tmp_path / "gateway", database=database)
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


def integrity_error(database: str | None) -> type[Exception]:
    """The driver's error for a broken constraint."""
    if database is None:
        return sqlite3.IntegrityError
    import psycopg

    return psycopg.IntegrityError


def test_the_schema_holds_every_state_and_no_other(store, database):
    receive(store, 1)
    assert set(store.summary().counts) == set(JOB_STATES)
    with pytest.raises(StoreError, match="database failed") as caught, store._db.transaction() as cursor:
        cursor.execute("UPDATE jobs SET state = 'lost'")
    assert isinstance(caught.value.__cause__, integrity_error(database))


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


def run_in_one_transaction(store: GatewayStore, *steps) -> None:
    """Each step a statement, or a callable (something happening to the database meanwhile)."""
    with store._db.transaction() as cursor:
        for step in steps:
            step() if callable(step) else cursor.execute(step)


def test_a_failed_transaction_leaves_the_store_usable(store):
    receive(store, 1)
    with pytest.raises(StoreError):
        run_in_one_transaction(store, "UPDATE jobs SET not_before = 0", "UPDATE jobs SET state = 'lost'")
    assert store.job("1.2.826.0.1.3680043.8.498.100.1").not_before == 1_000_000.0, "rolled back as a whole"
    assert store.claim("gw/worker", lease_s=60) is not None


def test_durable_folder_creates_every_missing_level(tmp_path):
    durable_folder(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    durable_folder(tmp_path / "a" / "b" / "c")  # already there: nothing to do


def test_the_catalog_matches_alike_on_both_databases(store):
    # Byte by byte "...498.2.10" sorts before "...498.21"; a collation skipping dots would put it after.
    series = "1.2.826.0.1.3680043.8.498.2.10"
    objects = [
        (1, CatalogKeys(series, "IO", "20240105", "101500", 1, 2)),
        (2, CatalogKeys(series, "I_", "20240106", "", 1, None)),  # "_" and "%" are LIKE's: matched literally
        (3, CatalogKeys(series, "I%", "", "090000.5", 1, 1)),
        (4, CatalogKeys(series, "I!", "", "", 1, 4)),  # and "!", the escape character
        (10, CatalogKeys("1.2.826.0.1.3680043.8.498.21", "PX", "20231231", "235959", 2, 3)),
    ]
    for number, keys in objects:
        receive(store, number, keys=keys)

    def found(*conditions) -> list[str]:
        return [entry.sop_instance_uid.rsplit(".", 1)[1] for entry in store.search_catalog(list(conditions))]

    # Series in UID order byte by byte, then no instance number first, then by number.
    assert found() == ["2", "3", "1", "4", "10"]
    assert found(CatalogCondition("Modality", "wildcard", ("I?",))) == ["2", "3", "1", "4"]
    assert found(CatalogCondition("Modality", "wildcard", ("I_",))) == ["2"]
    assert found(CatalogCondition("Modality", "wildcard", ("I%",))) == ["3"]
    assert found(CatalogCondition("Modality", "wildcard", ("I!",))) == ["4"]
    assert found(CatalogCondition("Modality", "wildcard", ("i*",))) == [], "case-sensitive (PS3.4 C.2.2.2.4)"
    assert found(CatalogCondition("StudyDate", "range", ("20240101", ""))) == ["2", "1"]
    assert found(CatalogCondition("StudyDate", "range", ("", "20240105"))) == ["1", "10"], "empty never matches"
    assert found(CatalogCondition("StudyTime", "range", ("090000", "101500"))) == ["3", "1"]
    uids = ("1.2.826.0.1.3680043.8.498.100.1", "1.2.826.0.1.3680043.8.498.100.10")
    assert found(CatalogCondition("SOPInstanceUID", "equal", uids)) == ["1", "10"]
    assert found(CatalogCondition("InstanceNumber", "equal", (3,))) == ["10"]


def test_studies_and_series_are_grouped_counted_and_paged_in_the_database(store):
    other_study = "1.2.826.0.1.3680043.8.498.9"
    receive(store, 1, keys=CatalogKeys(SERIES, "IO", "20240105", "101500", 1, 1))
    receive(store, 2, keys=CatalogKeys(SERIES, "IO", "20240105", "101500", 1, 2))
    receive(store, 3, keys=CatalogKeys("1.2.826.0.1.3680043.8.498.2.7", "SR", "20240105", "101500", 901, 1))
    receive(store, 4, study=other_study, keys=CatalogKeys("1.2.826.0.1.3680043.8.498.3", "PX", "20230101", "", 1, 1))

    (study,) = store.catalog_groups("study", [CatalogCondition("Modality", "equal", ("SR",))])
    # Counted over the whole study, not over the SR that matched.
    assert (study.uid, study.instances, study.series, study.modalities) == (STUDY, 3, 2, ["IO", "SR"])
    assert (study.study_date, study.study_time) == ("20240105", "101500")
    series = store.catalog_groups("series", [CatalogCondition("StudyInstanceUID", "equal", (STUDY,))])
    assert [(group.uid, group.modality, group.series_number, group.instances) for group in series] == [
        (SERIES, "IO", 1, 2),
        ("1.2.826.0.1.3680043.8.498.2.7", "SR", 901, 1),
    ]
    assert [group.uid for group in store.catalog_groups("study")] == [STUDY, other_study]
    assert [group.uid for group in store.catalog_groups("study", limit=1, offset=1)] == [other_study]
    assert store.catalog_groups("study", limit=0) == []
    assert len(store.search_catalog(limit=2, offset=1)) == 2


def test_results_and_deliveries_round_trip(store, clock):
    receive(store, 1)
    job = store.claim("gw/worker", lease_s=60)
    keys = CatalogKeys("1.2.826.0.1.3680043.8.498.4", "SR")
    result = ResultFile("1.2.826.0.1.3680043.8.498.200.1", "1.2.840.10008.5.1.4.1.1.88.33", b"SR", keys)
    assert store.complete(job.sop_instance_uid, "gw/worker", [result], ("pacs", "archive"))
    assert not store.complete(job.sop_instance_uid, "gw/worker", [result], ("pacs",)), "done: not the owner's"
    (kept,) = store.results_for(job.sop_instance_uid)
    assert kept.path.read_bytes() == b"SR"
    assert store.delivery_counts() == {"pending": 2, "sent": 0}
    first = store.claim_delivery("gw/sender", lease_s=60)
    second = store.claim_delivery("gw/sender", lease_s=60)
    assert {first.destination, second.destination} == {"pacs", "archive"}
    assert store.claim_delivery("gw/sender", lease_s=60) is None, "both leased"
    assert store.delivered(first, "gw/sender")
    assert store.retry_later(second, "gw/sender", "C-STORE status 0xA700", delay_s=10)
    clock.now += 11
    again = store.claim_delivery("gw/sender", lease_s=60)
    assert (again.destination, again.attempts, again.last_error) == (second.destination, 1, "C-STORE status 0xA700")
    assert store.delivery_counts() == {"pending": 1, "sent": 1}


def test_recover_makes_the_deliveries_a_dead_sender_held_due_at_once(store, clock):
    receive(store, 1)
    job = store.claim("gw-1/worker", lease_s=60)
    result = ResultFile("1.2.826.0.1.3680043.8.498.200.1", "1.2.840.10008.5.1.4.1.1.88.33", b"SR")
    assert store.complete(job.sop_instance_uid, "gw-1/worker", [result], ("pacs",))
    assert store.claim_delivery("gw-1/sender", lease_s=600) is not None
    assert store.claim_delivery("gw-2/sender", lease_s=600) is None, "leased"
    store.recover("gw-2/")
    assert store.claim_delivery("gw-2/sender", lease_s=600) is None, "another gateway's lease is kept"
    store.recover("gw-1/")
    again = store.claim_delivery("gw-1/sender", lease_s=600)
    assert again is not None
    assert again.result_sop_instance_uid == result.sop_instance_uid


def test_two_gateways_sharing_a_database_never_claim_the_same_job_or_delivery(tmp_path, database):
    """Two stores (as two gateway processes would hold) with two worker threads each, claiming concurrently: every
    job and every delivery is claimed exactly once."""
    root = tmp_path / "gateway"
    first = GatewayStore(root, database=database)
    second = GatewayStore(root, database=database)
    jobs = 50
    for number in range(jobs):
        receive(first, number)
    claimed_jobs, claimed_deliveries, lost, errors = [], [], [], []
    start = threading.Barrier(4, timeout=60)

    def claim_all(store: GatewayStore, owner: str) -> None:
        start.wait()
        while (job := store.claim(owner, lease_s=3600)) is not None or store.summary().counts["queued"]:
            if job is None:
                continue  # PostgreSQL's SKIP LOCKED may pass over a row another claim was just taking
            claimed_jobs.append(job.sop_instance_uid)
            result = ResultFile(job.sop_instance_uid.replace(".100.", ".200."), IO_PRESENTATION, b"SR")
            if not store.complete(job.sop_instance_uid, owner, [result], ("pacs",)):
                lost.append(job.sop_instance_uid)
        start.wait()
        while (delivery := store.claim_delivery(owner, lease_s=3600)) is not None or (
            store.delivery_counts()["pending"] > len(claimed_deliveries)
        ):
            if delivery is not None:
                claimed_deliveries.append(delivery.result_sop_instance_uid)

    def work(store: GatewayStore, owner: str) -> None:
        try:
            claim_all(store, owner)
        except Exception as exc:  # reported by the test, not lost in a thread
            errors.append(exc)
            start.abort()

    threads = [
        threading.Thread(target=work, args=(store, f"{name}/worker-{index}"), daemon=True)
        for name, store in (("gateway-1", first), ("gateway-2", second))
        for index in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    first.close()
    second.close()
    assert not errors
    assert Counter(claimed_jobs).most_common(1)[0][1] == 1, "a job was claimed twice"
    assert len(claimed_jobs) == jobs
    assert not lost, "a job was taken from its worker"
    assert Counter(claimed_deliveries).most_common(1)[0][1] == 1, "a delivery was claimed twice"
    assert len(claimed_deliveries) == jobs


def test_store_exists_only_once_created(tmp_path, database):
    root = tmp_path / "gateway"
    assert not store_exists(root, database)
    GatewayStore(root, database=database).close()
    assert store_exists(root, database)


def _terminate_connection(store: GatewayStore, url: str) -> None:
    """End the store's server process, as a server restart or a cut network would."""
    import psycopg

    pid = store._db._connection.info.backend_pid
    with psycopg.connect(url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_lost_postgresql_connection_is_replaced_and_a_failure_is_a_store_error(tmp_path, clock, database):
    import psycopg

    store = GatewayStore(tmp_path / "gateway", database=database, clock=clock)
    receive(store, 1)
    _terminate_connection(store, database)
    assert store.summary().counts["queued"] == 1, "a read reconnects"
    _terminate_connection(store, database)
    job = store.claim("gw/worker", lease_s=60)
    assert job is not None, "a transaction reconnects at BEGIN"
    # Lost in the middle of a transaction: it is gone, and the caller is told.
    with pytest.raises(StoreError) as caught:
        run_in_one_transaction(
            store, "UPDATE jobs SET state = 'done'", lambda: _terminate_connection(store, database), "SELECT 1"
        )
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert store.job(job.sop_instance_uid).state == "running", "nothing of it was committed"
    assert store.finish(job.sop_instance_uid, "gw/worker")
    store.close()


def test_an_unreachable_postgresql_server_is_a_store_error(tmp_path):
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    url = f"postgresql://caries@127.0.0.1:{free_port()}/postgres?connect_timeout=5"
    with pytest.raises(StoreError, match="database failed"):
        GatewayStore(tmp_path / "gateway", database=url)
    with pytest.raises(StoreError):
        store_exists(tmp_path / "gateway", url)


def test_a_database_that_is_not_postgresql_or_without_psycopg_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(InvalidConfigError, match="must be a postgresql:// URL"):
        GatewayStore(tmp_path / "gateway", database="mysql://user:secret@host/db")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(InvalidConfigError, match=r'pip install "psycopg\[binary\]"'):
        GatewayStore(tmp_path / "gateway", database="postgres://user@host/db")
