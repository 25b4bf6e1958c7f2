"""What the gateway received and what is left to do, kept where a restart (or ``kill -9``) cannot lose it.

A received instance is written to disk (file and folder synced) before its row is committed, and the C-STORE or
STOW-RS answer is only given after both: "success" means the instance survives a crash. Each instance gets one
job, keyed by its SOP Instance UID, so an archive that sends it again (a retried association, a re-sent study)
does not get two analyses.

Jobs are claimed with a lease: a worker that dies (killed, a power cut) leaves a ``running`` job whose lease runs
out, and the next claim takes it again; a gateway that restarts takes back its own running jobs at once
(:meth:`GatewayStore.recover`). A job is ``queued``, ``running``, ``done`` or ``failed`` (with the reason);
``not_before`` holds a job back, for the study-stability wait of PACS routers (no new instance of the study for N
seconds, :meth:`GatewayStore.add_instance` with ``stable_after_s``).

The store is SQLite (a file in the gateway's folder, no set-up; WAL journal, synchronous commits). The statements
are plain SQL that PostgreSQL runs as well; :class:`GatewayStore` talks to the database through one connection
guarded by a lock, because pynetdicom serves each association in its own thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError

#: The states of a job, in the order a job goes through them.
JOB_STATES = ("queued", "running", "done", "failed")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        source TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
        sop_instance_uid TEXT PRIMARY KEY REFERENCES instances (sop_instance_uid),
        study_instance_uid TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        not_before DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS results (
        sop_instance_uid TEXT PRIMARY KEY,
        source_sop_instance_uid TEXT NOT NULL REFERENCES jobs (sop_instance_uid),
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS deliveries (
        result_sop_instance_uid TEXT NOT NULL REFERENCES results (sop_instance_uid),
        destination TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        sent_at DOUBLE PRECISION,
        PRIMARY KEY (result_sop_instance_uid, destination)
    )""",
    # What DICOMweb can find and retrieve (QIDO-RS, WADO-RS): every received instance and every result, with the
    # study, series and instance keys a search may name. No patient attribute is indexed: the gateway is not an
    # archive, and patient searches belong to the PACS.
    """CREATE TABLE IF NOT EXISTS catalog (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        study_date TEXT NOT NULL,
        study_time TEXT NOT NULL,
        series_number INTEGER,
        instance_number INTEGER,
        transfer_syntax_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        origin TEXT NOT NULL CHECK (origin IN ('received', 'result')),
        stored_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS catalog_by_study ON catalog (study_instance_uid, series_instance_uid)",
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before)",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS results_by_source ON results (source_sop_instance_uid)",
    "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_instance_uid, state)",
)


@dataclass(frozen=True)
class StoredInstance:
    """A received instance: its UIDs, where its Part 10 file is, and who sent it (an AE title or ``stow-rs``)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size_bytes: int
    source: str
    received_at: float


@dataclass(frozen=True)
class Job:
    """One instance's analysis: ``state`` one of :data:`JOB_STATES`, ``attempts`` the claims so far, ``reason`` why
    it failed (None otherwise)."""

    sop_instance_uid: str
    study_instance_uid: str
    state: str
    attempts: int
    reason: str | None
    not_before: float


@dataclass(frozen=True)
class CatalogKeys:
    """The keys DICOMweb searches an object by, besides its SOP Instance, SOP Class and Study UIDs (QIDO-RS): its
    series, modality, study date and time (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``, empty when absent), series and
    instance numbers (None when absent)."""

    series_instance_uid: str
    modality: str = ""
    study_date: str = ""
    study_time: str = ""
    series_number: int | None = None
    instance_number: int | None = None

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> CatalogKeys:
        """The keys of a parsed data set (a header is enough); values that are not what their VR says are left
        empty rather than refused: the instance was accepted, only the search by them is lost."""
        return cls(
            series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
            modality=_text(dataset, "Modality", 16),
            study_date=_text(dataset, "StudyDate", 8),
            study_time=_text(dataset, "StudyTime", 16),
            series_number=_integer(dataset, "SeriesNumber"),
            instance_number=_integer(dataset, "InstanceNumber"),
        )


@dataclass(frozen=True)
class ResultFile:
    """A DICOM object a job produced about its instance (a caries SR, an overlay): its UIDs and Part 10 bytes.
    ``keys`` (its series, modality...) put it in the catalog DICOMweb searches and retrieves; without them (test
    doubles) the result is only sent to the destinations."""

    sop_instance_uid: str
    sop_class_uid: str
    data: bytes
    keys: CatalogKeys | None = None
    transfer_syntax_uid: str = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class CatalogEntry:
    """An object the gateway holds, as DICOMweb finds it: ``origin`` is ``received`` or ``result``."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    keys: CatalogKeys
    transfer_syntax_uid: str
    path: Path
    origin: str
    stored_at: float


@dataclass(frozen=True)
class StoredResult:
    """A result kept by the store: its UIDs, the instance it is about, and where its file is."""

    sop_instance_uid: str
    source_sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    path: Path
    created_at: float


@dataclass(frozen=True)
class Delivery:
    """A result to send to a destination (a configured name): ``attempts`` so far and the last error."""

    result_sop_instance_uid: str
    destination: str
    path: Path
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class QueueSummary:
    """How many jobs are in each state, and how long the oldest queued one has waited (None without one)."""

    counts: dict[str, int]
    oldest_queued_s: float | None


def durable_folder(folder: Path) -> None:
    """Create ``folder`` (and missing parents) so that it survives a power cut: each new folder is synced into its
    parent, as :func:`durable_write` syncs a file into its folder."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _sync_folder(new.parent)


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def durable_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that, once this returns, a crash leaves either the whole file or none:
    a unique temporary sibling, flushed and synced, renamed over the target, then the folder synced (the rename
    itself must reach the disk too)."""
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _sync_folder(target.parent)


class GatewayStore:
    """Received instances (files under ``root / "instances"``) and their jobs (``root / "gateway.sqlite3"``).

    Args:
        root: the gateway's folder; created when missing.
        clock: seconds since the epoch (``time.time``); tests pass their own.
    """

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "gateway.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        # DICOM wildcard matching is case-sensitive (PS3.4 C.2.2.2.4), as LIKE is in PostgreSQL.
        self._db.execute("PRAGMA case_sensitive_like=ON")
        with self._transaction() as cursor:
            for statement in _SCHEMA:
                cursor.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a failed COMMIT on a full disk does): roll back only what is
                # still open, so the real error surfaces and the next transaction can begin.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def instance_path(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance's file lives: one folder per study, the file named by its SOP Instance UID (UIDs are
        digits and dots, so they are safe as names; they are checked by :meth:`add_instance`)."""
        return self.instances_dir / study_instance_uid / f"{sop_instance_uid}.dcm"

    def add_instance(
        self,
        data: bytes,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        transfer_syntax_uid: str,
        source: str,
        stable_after_s: float = 0.0,
        keys: CatalogKeys | None = None,
    ) -> tuple[StoredInstance, bool]:
        """Persist a received Part 10 file and queue its job; returns the instance and whether a job was queued
        (False: the instance was received before and already has one, which is kept as it is).

        With ``stable_after_s`` > 0 the study's queued jobs (this one included) wait until the study has received
        nothing for that long. ``keys`` (from the header) make the instance searchable by DICOMweb; without them it
        is found by its UIDs only.

        Raises:
            InvalidArgumentError: a UID that is not a DICOM UID (digits and dots, at most 64 characters).
        """
        for name, uid in (
            ("SOP Instance UID", sop_instance_uid),
            ("SOP Class UID", sop_class_uid),
            ("Study Instance UID", study_instance_uid),
            ("Series Instance UID", series_instance_uid),
            ("Transfer Syntax UID", transfer_syntax_uid),
        ):
            if not _is_uid(uid):
                raise InvalidArgumentError(f"the {name} is not a DICOM UID (digits and dots, at most 64 characters)")
        if stable_after_s < 0:
            raise InvalidArgumentError(f"stable_after_s must be >= 0, got {stable_after_s}")
        keys = keys or CatalogKeys(series_instance_uid)
        if keys.series_instance_uid != series_instance_uid:
            raise InvalidArgumentError("the catalog keys name another series than the instance")
        path = self.instance_path(study_instance_uid, sop_instance_uid)
        durable_folder(path.parent)
        durable_write(path, data)
        now = self._clock()
        instance = StoredInstance(
            sop_instance_uid,
            sop_class_uid,
            study_instance_uid,
            series_instance_uid,
            transfer_syntax_uid,
            path,
            len(data),
            source,
            now,
        )
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE "
                "SET sop_class_uid = excluded.sop_class_uid, study_instance_uid = excluded.study_instance_uid, "
                "series_instance_uid = excluded.series_instance_uid, "
                "transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path, "
                "size_bytes = excluded.size_bytes, source = excluded.source, "
                "received_at = excluded.received_at",
                (
                    sop_instance_uid,
                    sop_class_uid,
                    study_instance_uid,
                    series_instance_uid,
                    transfer_syntax_uid,
                    str(path),
                    len(data),
                    source,
                    now,
                ),
            )
            cursor.execute(
                "INSERT INTO jobs (sop_instance_uid, study_instance_uid, state, not_before, created_at, updated_at) "
                "VALUES (?, ?, 'queued', ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                (sop_instance_uid, study_instance_uid, now + stable_after_s, now, now),
            )
            queued = cursor.rowcount == 1
            self._catalog(
                cursor,
                sop_instance_uid,
                sop_class_uid,
                study_instance_uid,
                keys,
                transfer_syntax_uid,
                path,
                "received",
                now,
            )
            if stable_after_s > 0:
                cursor.execute(
                    "UPDATE jobs SET not_before = ?, updated_at = ? WHERE study_instance_uid = ? AND state = 'queued'",
                    (now + stable_after_s, now, study_instance_uid),
                )
        return instance, queued

    def instance(self, sop_instance_uid: str) -> StoredInstance | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
                "transfer_syntax_uid, path, size_bytes, source, received_at FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        if row is None:
            return None
        return StoredInstance(*row[:5], Path(row[5]), *row[6:])

    def claim(self, owner: str, lease_s: float, max_attempts: int = 3) -> Job | None:
        """The oldest job that may run now, marked ``running`` under ``owner``'s lease for ``lease_s`` seconds:
        a queued job whose ``not_before`` has passed, or a running one whose lease ran out (its worker died).
        A job already claimed ``max_attempts`` times is failed instead of run again (an image that kills its
        worker every time must not hold the queue for ever). None when there is none."""
        if lease_s <= 0 or max_attempts < 1:
            raise InvalidArgumentError(f"lease_s must be > 0 and max_attempts >= 1, got {lease_s}, {max_attempts}")
        now = self._clock()
        with self._transaction() as cursor:
            while True:
                row = cursor.execute(
                    "SELECT sop_instance_uid, attempts FROM jobs WHERE (state = 'queued' AND not_before <= ?) "
                    "OR (state = 'running' AND lease_until < ?) ORDER BY not_before, created_at LIMIT 1",
                    (now, now),
                ).fetchone()
                if row is None:
                    return None
                if row[1] < max_attempts:
                    break
                cursor.execute(
                    "UPDATE jobs SET state = 'failed', reason = ?, lease_owner = NULL, lease_until = NULL, "
                    "updated_at = ? WHERE sop_instance_uid = ?",
                    (f"not finished in {row[1]} attempts (its worker stopped each time)", now, row[0]),
                )
            cursor.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?, "
                "updated_at = ? WHERE sop_instance_uid = ?",
                (owner, now + lease_s, now, row[0]),
            )
            return self._job(cursor, row[0])

    def renew(self, sop_instance_uid: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a running job; False when the job is no longer ``owner``'s (its lease ran
        out and another worker took it): the caller must then drop its work."""
        now = self._clock()
        return self._update_owned_job(sop_instance_uid, owner, "lease_until = ?", (now + lease_s,), now)

    def finish(self, sop_instance_uid: str, owner: str) -> bool:
        """Mark ``owner``'s running job done; False when it is not ``owner``'s any more (see :meth:`renew`)."""
        return self._end(sop_instance_uid, owner, "done", None)

    def complete(
        self, sop_instance_uid: str, owner: str, results: list[ResultFile], destinations: tuple[str, ...] = ()
    ) -> bool:
        """Keep a job's results and mark it done, together: in one transaction the job is checked to be still
        ``owner``'s, the files are written (synced), and their rows, one delivery per destination and the job's
        state commit; a crash leaves either a done job with all its results or a job to run again. A worker that
        lost its lease never replaces the new owner's files (maybe already sent). Results keep their UIDs: a job
        run twice writes the same files again, a result already kept is not added twice, and a delivery already
        queued or sent is kept. False, and nothing recorded, when the job is not ``owner``'s any more.

        Raises:
            InvalidArgumentError: a result UID that is not a DICOM UID.
        """
        instance = self.instance(sop_instance_uid)
        if instance is None:
            return False
        for result in results:
            uids = [("SOP Instance UID", result.sop_instance_uid), ("SOP Class UID", result.sop_class_uid)]
            if result.keys is not None:
                uids.append(("Series Instance UID", result.keys.series_instance_uid))
            for name, uid in uids:
                if not _is_uid(uid):
                    raise InvalidArgumentError(f"the result's {name} is not a DICOM UID")
        paths = [self.result_path(instance.study_instance_uid, result.sop_instance_uid) for result in results]
        now = self._clock()
        with self._transaction() as cursor:
            owned = cursor.execute(
                "SELECT 1 FROM jobs WHERE sop_instance_uid = ? AND state = 'running' AND lease_owner = ?",
                (sop_instance_uid, owner),
            ).fetchone()
            if owned is None:
                # Another worker took the job: its result files, maybe already sent, must not be replaced.
                return False
            # Written while the transaction holds the write lock, so no other worker can complete this job meanwhile.
            for path, result in zip(paths, results, strict=True):
                durable_folder(path.parent)
                durable_write(path, result.data)
            cursor.execute(
                "UPDATE jobs SET state = 'done', reason = NULL, lease_owner = NULL, lease_until = NULL, "
                "updated_at = ? WHERE sop_instance_uid = ? AND state = 'running' AND lease_owner = ?",
                (now, sop_instance_uid, owner),
            )
            if cursor.rowcount != 1:
                return False
            for path, result in zip(paths, results, strict=True):
                cursor.execute(
                    "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                    (
                        result.sop_instance_uid,
                        sop_instance_uid,
                        result.sop_class_uid,
                        instance.study_instance_uid,
                        str(path),
                        now,
                    ),
                )
                if result.keys is not None:
                    self._catalog(
                        cursor,
                        result.sop_instance_uid,
                        result.sop_class_uid,
                        instance.study_instance_uid,
                        result.keys,
                        result.transfer_syntax_uid,
                        path,
                        "result",
                        now,
                    )
                for destination in destinations:
                    cursor.execute(
                        "INSERT INTO deliveries (result_sop_instance_uid, destination, state, next_attempt_at) "
                        "VALUES (?, ?, 'pending', ?) ON CONFLICT (result_sop_instance_uid, destination) DO NOTHING",
                        (result.sop_instance_uid, destination, now),
                    )
        return True

    def claim_delivery(self, owner: str, lease_s: float) -> Delivery | None:
        """The oldest due delivery (pending, its next attempt due, not leased by a live sender), leased to
        ``owner`` for ``lease_s`` seconds; None when none is due."""
        now = self._clock()
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT d.result_sop_instance_uid, d.destination, r.path, d.attempts, d.last_error "
                "FROM deliveries d JOIN results r ON r.sop_instance_uid = d.result_sop_instance_uid "
                "WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND (d.lease_until IS NULL OR d.lease_until < ?) "
                "ORDER BY d.next_attempt_at LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            cursor.execute(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ? "
                "WHERE result_sop_instance_uid = ? AND destination = ?",
                (owner, now + lease_s, row[0], row[1]),
            )
        return Delivery(row[0], row[1], Path(row[2]), row[3], row[4])

    def delivered(self, delivery: Delivery, owner: str) -> bool:
        """Mark ``owner``'s leased delivery sent (False when its lease was lost to another sender)."""
        now = self._clock()
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL, "
                "lease_owner = NULL, lease_until = NULL WHERE result_sop_instance_uid = ? AND destination = ? "
                "AND state = 'pending' AND lease_owner = ?",
                (now, delivery.result_sop_instance_uid, delivery.destination, owner),
            )
            return cursor.rowcount == 1

    def retry_later(self, delivery: Delivery, owner: str, error: str, delay_s: float) -> bool:
        """Record a failed attempt of ``owner``'s leased delivery and when to try again."""
        now = self._clock()
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE result_sop_instance_uid = ? AND destination = ? "
                "AND state = 'pending' AND lease_owner = ?",
                (error, now + delay_s, delivery.result_sop_instance_uid, delivery.destination, owner),
            )
            return cursor.rowcount == 1

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries per state (``pending``, ``sent``)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        return {"pending": 0, "sent": 0} | dict(rows)

    def result_path(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        """Where a result's file lives: ``root / "results"``, one folder per study of its source."""
        return self.root / "results" / study_instance_uid / f"{sop_instance_uid}.dcm"

    def results_for(self, source_sop_instance_uid: str) -> list[StoredResult]:
        """The results kept for an instance, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, source_sop_instance_uid, sop_class_uid, study_instance_uid, path, created_at "
                "FROM results WHERE source_sop_instance_uid = ? ORDER BY created_at, sop_instance_uid",
                (source_sop_instance_uid,),
            ).fetchall()
        return [StoredResult(*row[:4], Path(row[4]), row[5]) for row in rows]

    def release(self, sop_instance_uid: str, owner: str, delay_s: float) -> bool:
        """Put ``owner``'s running job back in the queue for another attempt in ``delay_s`` seconds (a temporary
        problem: the decoders busy, a decode timed out under load); it still counts towards the attempts."""
        now = self._clock()
        unleased = "state = 'queued', not_before = ?, lease_owner = NULL, lease_until = NULL"
        return self._update_owned_job(sop_instance_uid, owner, unleased, (now + delay_s,), now)

    def fail(self, sop_instance_uid: str, owner: str, reason: str) -> bool:
        """Mark ``owner``'s running job failed with ``reason`` (one sentence, no identifiers)."""
        return self._end(sop_instance_uid, owner, "failed", reason)

    def _end(self, sop_instance_uid: str, owner: str, state: str, reason: str | None) -> bool:
        ended = "state = ?, reason = ?, lease_owner = NULL, lease_until = NULL"
        return self._update_owned_job(sop_instance_uid, owner, ended, (state, reason), self._clock())

    def _update_owned_job(self, sop_instance_uid: str, owner: str, assignments: str, values: tuple, now: float) -> bool:
        """``UPDATE jobs SET <assignments>`` (with ``values``, and ``updated_at = now``) on ``owner``'s running job
        only; False when the job is not ``owner``'s running job any more (its lease ran out, another took it)."""
        with self._transaction() as cursor:
            cursor.execute(
                # The assignments are fixed strings of this class; every value is a bound parameter.
                f"UPDATE jobs SET {assignments}, updated_at = ? "
                "WHERE sop_instance_uid = ? AND state = 'running' AND lease_owner = ?",
                (*values, now, sop_instance_uid, owner),
            )
            return cursor.rowcount == 1

    @staticmethod
    def _catalog(
        cursor,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        keys: CatalogKeys,
        transfer_syntax_uid: str,
        path: Path,
        origin: str,
        now: float,
    ) -> None:
        """Add or refresh an object's catalog row (an instance sent again replaces its keys)."""
        cursor.execute(
            "INSERT INTO catalog VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO "
            "UPDATE SET sop_class_uid = excluded.sop_class_uid, study_instance_uid = excluded.study_instance_uid, "
            "series_instance_uid = excluded.series_instance_uid, modality = excluded.modality, "
            "study_date = excluded.study_date, study_time = excluded.study_time, "
            "series_number = excluded.series_number, instance_number = excluded.instance_number, "
            "transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path, origin = excluded.origin, "
            "stored_at = excluded.stored_at",
            (
                sop_instance_uid,
                sop_class_uid,
                study_instance_uid,
                keys.series_instance_uid,
                keys.modality,
                keys.study_date,
                keys.study_time,
                keys.series_number,
                keys.instance_number,
                transfer_syntax_uid,
                str(path),
                origin,
                now,
            ),
        )

    def search_catalog(self, conditions: list[CatalogCondition] = ()) -> list[CatalogEntry]:
        """The catalog's objects meeting every condition, ordered by study, series, instance number and UID."""
        clauses, values = [], []
        for condition in conditions:
            clause, parameters = condition.sql()
            clauses.append(clause)
            values.extend(parameters)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, modality, "
                "study_date, study_time, series_number, instance_number, transfer_syntax_uid, path, origin, stored_at "
                # The clauses are built by CatalogCondition from its fixed column names; every value is bound.
                f"FROM catalog{where} ORDER BY study_instance_uid, series_instance_uid, instance_number, "
                "sop_instance_uid",
                values,
            ).fetchall()
        return [
            CatalogEntry(row[0], row[1], row[2], CatalogKeys(*row[3:9]), row[9], Path(row[10]), row[11], row[12])
            for row in rows
        ]

    def recover(self, owner_prefix: str = "") -> int:
        """Put running jobs back in the queue at once (a gateway restarting after a crash takes back what its own
        workers held, whose leases would otherwise have to run out first); ``owner_prefix`` limits it to owners
        starting with it. Returns how many."""
        now = self._clock()
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL, updated_at = ? "
                "WHERE state = 'running' AND substr(lease_owner, 1, ?) = ?",
                (now, len(owner_prefix), owner_prefix),
            )
            return cursor.rowcount

    def job(self, sop_instance_uid: str) -> Job | None:
        with self._transaction() as cursor:
            return self._job(cursor, sop_instance_uid)

    def _job(self, cursor: sqlite3.Cursor, sop_instance_uid: str) -> Job | None:
        row = cursor.execute(
            "SELECT sop_instance_uid, study_instance_uid, state, attempts, reason, not_before FROM jobs "
            "WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return None if row is None else Job(*row)

    def summary(self) -> QueueSummary:
        """Jobs per state (every state listed, 0 included) and the oldest queued job's wait in seconds."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            oldest = self._db.execute("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'").fetchone()[0]
        counts = dict.fromkeys(JOB_STATES, 0) | dict(rows)
        return QueueSummary(counts, None if oldest is None else max(self._clock() - oldest, 0.0))


def _is_uid(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= 64
        # Digits and dots only (they name files); leading zeros, which PS3.5 forbids but some devices write, pass.
        and value.isascii()
        and all(part.isdigit() for part in value.split("."))
    )


#: The catalog's searchable columns, by the DICOM keyword a search names them with.
CATALOG_COLUMNS = {
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "Modality": "modality",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "SeriesNumber": "series_number",
    "InstanceNumber": "instance_number",
}


#: Which matching each searchable attribute allows (PS3.4 C.2.2.2: UIDs by value or list, dates and times by range,
#: text by wildcard).
_MATCHING = {
    "SOPInstanceUID": ("equal",),
    "SOPClassUID": ("equal",),
    "StudyInstanceUID": ("equal",),
    "SeriesInstanceUID": ("equal",),
    "Modality": ("equal", "wildcard"),
    "StudyDate": ("equal", "range"),
    "StudyTime": ("equal", "range"),
    "SeriesNumber": ("equal",),
    "InstanceNumber": ("equal",),
}


@dataclass(frozen=True)
class CatalogCondition:
    """One matching rule on a catalog column (PS3.4 C.2.2.2 matching, as QIDO-RS uses it):

    - ``equal``: ``values`` holds one value (single value matching) or several (UID list matching: any of them);
    - ``wildcard``: ``values[0]`` with ``*`` (any run) and ``?`` (one character);
    - ``range``: ``values`` is (low, high), either may be empty for an open end (dates and times as text compare
      in order, their formats being fixed-width).
    """

    keyword: str
    kind: str
    values: tuple

    def __post_init__(self) -> None:
        if self.keyword not in CATALOG_COLUMNS:
            raise InvalidArgumentError(f"{self.keyword} is not a searchable attribute")
        if self.kind not in _MATCHING[self.keyword] or not self.values:
            allowed = " or ".join(_MATCHING[self.keyword])
            raise InvalidArgumentError(f"{self.keyword} is matched by {allowed}, not {self.kind}")
        if self.kind == "range" and len(self.values) != 2:
            raise InvalidArgumentError(f"a range on {self.keyword} needs a low and a high end")

    def sql(self) -> tuple[str, list]:
        column = CATALOG_COLUMNS[self.keyword]
        if self.kind == "equal":
            marks = ", ".join("?" for _ in self.values)
            return f"{column} IN ({marks})", list(self.values)
        if self.kind == "wildcard":
            escaped = self.values[0].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return f"{column} LIKE ? ESCAPE '\\'", [escaped.replace("*", "%").replace("?", "_")]
        low, high = self.values
        clauses, values = [], []
        if low:
            clauses.append(f"{column} >= ?")
            values.append(low)
        if high:
            clauses.append(f"{column} <= ?")
            values.append(high)
        # An empty value never matches a range (PS3.4 C.2.2.2.5).
        clauses.append(f"{column} <> ''")
        return " AND ".join(clauses), values


def _text(dataset: Dataset, keyword: str, limit: int) -> str:
    value = dataset.get(keyword)
    text = "" if value is None else str(value).strip()
    return text if len(text) <= limit and text.isprintable() else ""


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
