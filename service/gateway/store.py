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

The database is SQLite by default (``gateway.sqlite3`` in the gateway's folder, no set-up; WAL journal, commits
synced to disk: ``synchronous=FULL``), or PostgreSQL when a ``postgresql://`` URL is given (psycopg 3, the
``postgres`` extra), for several gateway processes sharing one queue; the files stay in the gateway's folder (a
shared one, then). PostgreSQL with its default ``synchronous_commit=on`` is durable at COMMIT as well. Both run the
same schema and the same plain SQL (``?`` placeholders, translated for psycopg once per statement); what differs
is behind the small ``_Database`` seam: how a transaction begins, and how a claim locks the row it takes. SQLite's
``BEGIN IMMEDIATE`` holds the one write lock for the whole transaction; PostgreSQL (READ COMMITTED) locks the
claimed row (``FOR UPDATE SKIP LOCKED``), so two workers never take the same job or delivery and neither waits for
the other. Any failure of the database reaches callers as :class:`StoreError`. :class:`GatewayStore` talks to the
database through one connection guarded by a lock, because pynetdicom serves each association in its own thread; a
PostgreSQL connection that was lost is replaced at the next call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError, InvalidConfigError

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
        sop_instance_uid TEXT COLLATE "binary" PRIMARY KEY,
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
    # archive, and patient searches belong to the PACS. The columns a search orders, ranges or wildcards on compare
    # byte by byte ("binary": SQLite's own, made from "C" on PostgreSQL), whatever the server's locale, so that
    # both databases answer a search alike (a linguistic collation would skip the dots of UIDs).
    """CREATE TABLE IF NOT EXISTS catalog (
        sop_instance_uid TEXT COLLATE "binary" PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT COLLATE "binary" NOT NULL,
        series_instance_uid TEXT COLLATE "binary" NOT NULL,
        modality TEXT COLLATE "binary" NOT NULL,
        study_date TEXT COLLATE "binary" NOT NULL,
        study_time TEXT COLLATE "binary" NOT NULL,
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

_JOB_QUERY = (
    "SELECT sop_instance_uid, study_instance_uid, state, attempts, reason, not_before FROM jobs "
    "WHERE sop_instance_uid = ?"
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
class CatalogGroup:
    """A study or a series of the catalog, as a QIDO-RS search at that level answers it: its UID, its study's UID,
    date and time, its series number and modality (for a series), the modalities in it, and how many instances
    and series it holds."""

    uid: str
    study_instance_uid: str
    study_date: str
    study_time: str
    series_number: int | None
    modality: str
    modalities: list[str]
    instances: int
    series: int


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


class StoreError(OSError):
    """The store's database failed (a full disk, a lost connection, a server that is down or refuses): what was
    asked was not recorded (its transaction rolled back; a connection lost during COMMIT leaves it unknown), and the
    store stays usable for the next call. The database driver's own error is its ``__cause__``."""


class _Cursor(Protocol):
    rowcount: int

    def execute(self, sql: str, parameters: tuple | list = ()) -> _Cursor: ...

    def fetchone(self) -> tuple | None: ...

    def fetchall(self) -> list[tuple]: ...


class _Database(Protocol):
    """What :class:`GatewayStore` needs of a database (:class:`_SQLite`, :class:`_PostgreSQL`). Every call holds the
    database's one connection under a lock, and raises :class:`StoreError` for any failure of the driver."""

    #: Statements run, in the schema's transaction, before it.
    SETUP: tuple[str, ...]

    def transaction(self) -> contextlib.AbstractContextManager[_Cursor]:
        """A cursor in a transaction, committed when the block ends and rolled back when it raises."""

    def read(self, sql: str, parameters: tuple | list = ()) -> list[tuple]:
        """The rows of one query, outside any transaction."""

    def lock_rows(self, of: str = "", *, skip_locked: bool = True) -> str:
        """The clause a SELECT in a transaction ends with to hold the rows it returns (of table ``of``) until
        COMMIT; with ``skip_locked`` rows another transaction holds are passed over instead of waited for."""

    def close(self) -> None: ...


@contextlib.contextmanager
def _failures_as_store_errors(driver_error: type[Exception]) -> Iterator[None]:
    try:
        yield
    except driver_error as exc:
        # The type only: a driver's message may quote values (UIDs) that must stay out of the logs.
        raise StoreError(f"the gateway's database failed ({type(exc).__name__})") from exc


def _is_postgresql(database: str | None) -> bool:
    if database is None:
        return False
    if not database.startswith(("postgresql://", "postgres://")):
        # Not echoed: a URL may hold a password.
        raise InvalidConfigError("the gateway's database must be a postgresql:// URL (or none, for SQLite)")
    return True


class _SQLite:
    """The embedded database: one file, one connection, every transaction ``BEGIN IMMEDIATE`` (it holds the
    database's one write lock from the start, so a select-then-update is never raced)."""

    SETUP: tuple[str, ...] = ()

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        with _failures_as_store_errors(sqlite3.Error):
            self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                for pragma in (
                    "journal_mode=WAL",
                    "synchronous=FULL",
                    "foreign_keys=ON",
                    "busy_timeout=10000",
                    # DICOM wildcard matching is case-sensitive (PS3.4 C.2.2.2.4), as LIKE is in PostgreSQL.
                    "case_sensitive_like=ON",
                ):
                    self._connection.execute(f"PRAGMA {pragma}")
            except sqlite3.Error:
                self._connection.close()
                raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._lock, _failures_as_store_errors(sqlite3.Error):
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a failed COMMIT on a full disk does): roll back only what is
                # still open, so the real error surfaces and the next transaction can begin.
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

    def read(self, sql: str, parameters: tuple | list = ()) -> list[tuple]:
        with self._lock, _failures_as_store_errors(sqlite3.Error):
            return self._connection.execute(sql, parameters).fetchall()

    def lock_rows(self, of: str = "", *, skip_locked: bool = True) -> str:
        return ""  # BEGIN IMMEDIATE holds the whole database already

    def close(self) -> None:
        with self._lock:
            self._connection.close()


@functools.lru_cache(maxsize=256)
def _psycopg_statement(sql: str) -> str:
    """The store's SQL with psycopg's placeholders: ``?`` becomes ``%s``, and a literal ``%`` is doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PsycopgCursor:
    """A psycopg cursor taking the store's ``?`` statements."""

    def __init__(self, cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def execute(self, sql: str, parameters: tuple | list = ()) -> _PsycopgCursor:
        self._cursor.execute(_psycopg_statement(sql), parameters)
        return self

    def fetchone(self) -> tuple | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cursor.fetchall()


def _import_psycopg():
    try:
        import psycopg
    except ImportError as exc:
        raise InvalidConfigError(
            'a PostgreSQL database needs psycopg: pip install "psycopg[binary]" (or caries-mim[postgres])'
        ) from exc
    return psycopg


def _begin(connection):
    connection.execute("BEGIN")
    return connection


class _PostgreSQL:
    """A PostgreSQL database, maybe shared by several gateways: one connection (autocommit between explicit
    transactions, READ COMMITTED), replaced when it was lost; claims lock the rows they take."""

    SETUP = (
        # Gateways starting together would race on CREATE ... IF NOT EXISTS (a unique violation in the catalogs).
        "SELECT pg_advisory_xact_lock(7308604897068083309)",
        'CREATE COLLATION IF NOT EXISTS "binary" FROM "C"',
    )

    def __init__(self, url: str) -> None:
        self._psycopg = _import_psycopg()
        given = self._psycopg.conninfo.conninfo_to_dict(url)
        defaults = {"connect_timeout": 10, "application_name": "caries-mim gateway"}
        self._connect_arguments = {name: value for name, value in defaults.items() if name not in given}
        self._url = url
        self._lock = threading.Lock()
        self._connection = None

    def _connected(self, *, fresh: bool = False):
        if fresh or self._connection is None or self._connection.closed:
            if self._connection is not None:
                self._connection.close()
            self._connection = self._psycopg.connect(self._url, autocommit=True, **self._connect_arguments)
        return self._connection

    def _retried_once(self, step: Callable):
        """``step(connection)``, again on a new connection when the first one turns out to be lost (the server
        restarted, an idle connection was cut). Only for steps that are safe to repeat: a read, a BEGIN."""
        connection = self._connected()
        try:
            return step(connection)
        except self._psycopg.OperationalError:
            if not connection.closed:
                raise
        return step(self._connected(fresh=True))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._lock, _failures_as_store_errors(self._psycopg.Error):
            connection = self._retried_once(_begin)
            try:
                yield _PsycopgCursor(connection.cursor())
                connection.execute("COMMIT")
            except BaseException:
                idle = self._psycopg.pq.TransactionStatus.IDLE
                if not connection.closed and connection.info.transaction_status != idle:
                    connection.execute("ROLLBACK")
                raise

    def read(self, sql: str, parameters: tuple | list = ()) -> list[tuple]:
        statement = _psycopg_statement(sql)
        with self._lock, _failures_as_store_errors(self._psycopg.Error):
            return self._retried_once(lambda connection: connection.execute(statement, parameters).fetchall())

    def lock_rows(self, of: str = "", *, skip_locked: bool = True) -> str:
        return " FOR UPDATE" + (f" OF {of}" if of else "") + (" SKIP LOCKED" if skip_locked else "")

    def exists(self) -> bool:
        with self._lock, _failures_as_store_errors(self._psycopg.Error):
            return self._retried_once(
                lambda connection: connection.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()[0]
            )

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()


def store_exists(root: Path, database: str | None = None) -> bool:
    """Whether a gateway store is there to read (``gateway status``) without creating one: ``root``'s SQLite file,
    or the store's tables in the PostgreSQL ``database``.

    Raises:
        InvalidConfigError: ``database`` is not a PostgreSQL URL, or psycopg is not installed.
        StoreError: the PostgreSQL server cannot be reached.
    """
    if not _is_postgresql(database):
        return (Path(root) / "gateway.sqlite3").is_file()
    probe = _PostgreSQL(database)
    try:
        return probe.exists()
    finally:
        probe.close()


class GatewayStore:
    """Received instances (files under ``root / "instances"``) and their jobs (in ``root / "gateway.sqlite3"``, or
    in the PostgreSQL ``database``).

    Args:
        root: the gateway's folder; created when missing.
        database: None for SQLite in ``root``, or a ``postgresql://`` (``postgres://``) URL.
        clock: seconds since the epoch (``time.time``); tests pass their own.

    Raises:
        InvalidConfigError: ``database`` is not a PostgreSQL URL, or psycopg is not installed.
        StoreError: the database cannot be opened or reached.
    """

    def __init__(self, root: Path, *, database: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._db: _Database = (
            _PostgreSQL(database) if _is_postgresql(database) else _SQLite(self.root / "gateway.sqlite3")
        )
        try:
            with self._db.transaction() as cursor:
                for statement in (*self._db.SETUP, *_SCHEMA):
                    cursor.execute(statement)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

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
            if not is_uid(uid):
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
        with self._db.transaction() as cursor:
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
        rows = self._db.read(
            "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
            "transfer_syntax_uid, path, size_bytes, source, received_at FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if not rows:
            return None
        row = rows[0]
        return StoredInstance(*row[:5], Path(row[5]), *row[6:])

    def claim(self, owner: str, lease_s: float, max_attempts: int = 3) -> Job | None:
        """The oldest job that may run now, marked ``running`` under ``owner``'s lease for ``lease_s`` seconds:
        a queued job whose ``not_before`` has passed, or a running one whose lease ran out (its worker died).
        A job already claimed ``max_attempts`` times is failed instead of run again (an image that kills its
        worker every time must not hold the queue for ever). None when there is none."""
        if lease_s <= 0 or max_attempts < 1:
            raise InvalidArgumentError(f"lease_s must be > 0 and max_attempts >= 1, got {lease_s}, {max_attempts}")
        now = self._clock()
        with self._db.transaction() as cursor:
            while True:
                row = cursor.execute(
                    "SELECT sop_instance_uid, attempts FROM jobs WHERE (state = 'queued' AND not_before <= ?) "
                    "OR (state = 'running' AND lease_until < ?) ORDER BY not_before, created_at LIMIT 1"
                    + self._db.lock_rows(),
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
                if not is_uid(uid):
                    raise InvalidArgumentError(f"the result's {name} is not a DICOM UID")
        paths = [self.result_path(instance.study_instance_uid, result.sop_instance_uid) for result in results]
        now = self._clock()
        with self._db.transaction() as cursor:
            owned = cursor.execute(
                "SELECT 1 FROM jobs WHERE sop_instance_uid = ? AND state = 'running' AND lease_owner = ?"
                + self._db.lock_rows(skip_locked=False),
                (sop_instance_uid, owner),
            ).fetchone()
            if owned is None:
                # Another worker took the job: its result files, maybe already sent, must not be replaced.
                return False
            # Written while the transaction holds the job (SQLite's write lock, PostgreSQL's row lock), so no other
            # worker can claim or complete it meanwhile.
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
        with self._db.transaction() as cursor:
            row = cursor.execute(
                "SELECT d.result_sop_instance_uid, d.destination, r.path, d.attempts, d.last_error "
                "FROM deliveries d JOIN results r ON r.sop_instance_uid = d.result_sop_instance_uid "
                "WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND (d.lease_until IS NULL OR d.lease_until < ?) "
                "ORDER BY d.next_attempt_at LIMIT 1" + self._db.lock_rows("d"),
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
        sent = "state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL"
        return self._update_owned_delivery(delivery, owner, sent, (self._clock(),))

    def retry_later(self, delivery: Delivery, owner: str, error: str, delay_s: float) -> bool:
        """Record a failed attempt of ``owner``'s leased delivery and when to try again."""
        failed = "attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
        return self._update_owned_delivery(delivery, owner, failed, (error, self._clock() + delay_s))

    def _update_owned_delivery(self, delivery: Delivery, owner: str, assignments: str, values: tuple) -> bool:
        """``UPDATE deliveries SET <assignments>`` (with ``values``) on ``owner``'s leased pending delivery, releasing
        the lease; False when the lease went to another sender (as :meth:`_update_owned_job` for jobs)."""
        with self._db.transaction() as cursor:
            cursor.execute(
                # The assignments are fixed strings of this class; every value is a bound parameter.
                f"UPDATE deliveries SET {assignments}, lease_owner = NULL, lease_until = NULL "
                "WHERE result_sop_instance_uid = ? AND destination = ? AND state = 'pending' AND lease_owner = ?",
                (*values, delivery.result_sop_instance_uid, delivery.destination, owner),
            )
            return cursor.rowcount == 1

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries per state (``pending``, ``sent``)."""
        rows = self._db.read("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        return {"pending": 0, "sent": 0} | dict(rows)

    def result_path(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        """Where a result's file lives: ``root / "results"``, one folder per study of its source."""
        return self.root / "results" / study_instance_uid / f"{sop_instance_uid}.dcm"

    def results_for(self, source_sop_instance_uid: str) -> list[StoredResult]:
        """The results kept for an instance, oldest first."""
        rows = self._db.read(
            "SELECT sop_instance_uid, source_sop_instance_uid, sop_class_uid, study_instance_uid, path, created_at "
            "FROM results WHERE source_sop_instance_uid = ? ORDER BY created_at, sop_instance_uid",
            (source_sop_instance_uid,),
        )
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
        with self._db.transaction() as cursor:
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

    def search_catalog(
        self, conditions: list[CatalogCondition] = (), *, limit: int | None = None, offset: int = 0
    ) -> list[CatalogEntry]:
        """The catalog's objects meeting every condition, ordered by study, series, instance number and UID; the
        page ``offset`` .. ``offset + limit`` of them (all when ``limit`` is None)."""
        where, values = _where(conditions)
        page, page_values = _page(limit, offset)
        rows = self._db.read(
            "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, modality, "
            "study_date, study_time, series_number, instance_number, transfer_syntax_uid, path, origin, stored_at "
            # The clauses are built by CatalogCondition from its fixed column names; every value is bound. An object
            # without an instance number comes first (SQLite's order for NULL; PostgreSQL's is the opposite).
            f"FROM catalog{where} ORDER BY study_instance_uid, series_instance_uid, instance_number NULLS FIRST, "
            f"sop_instance_uid{page}",
            [*values, *page_values],
        )
        return [
            CatalogEntry(row[0], row[1], row[2], CatalogKeys(*row[3:9]), row[9], Path(row[10]), row[11], row[12])
            for row in rows
        ]

    def catalog_groups(
        self, level: str, conditions: list[CatalogCondition] = (), *, limit: int | None = None, offset: int = 0
    ) -> list[CatalogGroup]:
        """The studies (``level`` "study") or series ("series") with an object meeting every condition, ordered by
        UID, the page ``offset`` .. ``offset + limit``; each with counts over all its objects, not only the matching
        ones (a search for SR studies still counts their radiographs). Three queries whatever the number found."""
        if level not in ("study", "series"):
            raise InvalidArgumentError(f"catalog groups are studies or series, not {level!r}")
        key = "study_instance_uid" if level == "study" else "series_instance_uid"
        where, values = _where(conditions)
        page, page_values = _page(limit, offset)
        query = f"SELECT DISTINCT {key} FROM catalog{where} ORDER BY {key}{page}"
        found = [row[0] for row in self._db.read(query, [*values, *page_values])]
        if not found:
            return []
        marks = ", ".join("?" for _ in found)
        totals = self._db.read(
            f"SELECT {key}, MIN(study_instance_uid), MIN(study_date), MIN(study_time), MIN(series_number), "
            f"MIN(modality), COUNT(*), COUNT(DISTINCT series_instance_uid) FROM catalog WHERE {key} IN ({marks}) "
            f"GROUP BY {key}",
            found,
        )
        modalities: dict[str, set[str]] = {uid: set() for uid in found}
        for uid, modality in self._db.read(
            f"SELECT DISTINCT {key}, modality FROM catalog WHERE {key} IN ({marks}) AND modality <> ''", found
        ):
            modalities[uid].add(modality)
        by_uid = {row[0]: CatalogGroup(*row[:6], sorted(modalities[row[0]]), *row[6:]) for row in totals}
        return [by_uid[uid] for uid in found]

    def recover(self, owner_prefix: str = "") -> int:
        """Put running jobs back in the queue, and make the pending deliveries leased then due, at once (a gateway
        restarting after a crash takes back what its own workers and sender held, whose leases would otherwise have
        to run out first); ``owner_prefix`` limits it to owners starting with it. Returns how many jobs."""
        now = self._clock()
        with self._db.transaction() as cursor:
            cursor.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL, updated_at = ? "
                "WHERE state = 'running' AND substr(lease_owner, 1, ?) = ?",
                (now, len(owner_prefix), owner_prefix),
            )
            recovered = cursor.rowcount
            # A delivery its sender held when the process died (maybe sent, maybe not): due again now. Sending it
            # twice is harmless, the result's UID being the same.
            cursor.execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL "
                "WHERE state = 'pending' AND substr(lease_owner, 1, ?) = ?",
                (len(owner_prefix), owner_prefix),
            )
            return recovered

    def job(self, sop_instance_uid: str) -> Job | None:
        rows = self._db.read(_JOB_QUERY, (sop_instance_uid,))
        return Job(*rows[0]) if rows else None

    def _job(self, cursor: _Cursor, sop_instance_uid: str) -> Job | None:
        row = cursor.execute(_JOB_QUERY, (sop_instance_uid,)).fetchone()
        return None if row is None else Job(*row)

    def summary(self) -> QueueSummary:
        """Jobs per state (every state listed, 0 included) and the oldest queued job's wait in seconds."""
        rows = self._db.read("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        oldest = self._db.read("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'")[0][0]
        counts = dict.fromkeys(JOB_STATES, 0) | dict(rows)
        return QueueSummary(counts, None if oldest is None else max(self._clock() - oldest, 0.0))


def is_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID as the store keeps them: digits and dots, at most 64 characters."""
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
            # "!" rather than a backslash: a backslash in a literal depends on PostgreSQL's standard_conforming_strings.
            escaped = self.values[0].replace("!", "!!").replace("%", "!%").replace("_", "!_")
            return f"{column} LIKE ? ESCAPE '!'", [escaped.replace("*", "%").replace("?", "_")]
        low, high = self.values
        clauses, values = [], []
        if low:
            clauses.append(f"{column} >= ?")
            values.append(low)
        if high:
            # Inclusive at the precision given (PS3.4 C.2.2.2.5): StudyTime up to "1655" includes 165500.
            clauses.append(f"substr({column}, 1, ?) <= ?")
            values.extend((len(high), high))
        # An empty value never matches a range (PS3.4 C.2.2.2.5).
        clauses.append(f"{column} <> ''")
        return " AND ".join(clauses), values


def _where(conditions: list[CatalogCondition]) -> tuple[str, list]:
    clauses, values = [], []
    for condition in conditions:
        clause, parameters = condition.sql()
        clauses.append(clause)
        values.extend(parameters)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


def _page(limit: int | None, offset: int) -> tuple[str, list]:
    if limit is None and not offset:
        return "", []
    if (limit is not None and limit < 0) or offset < 0:
        raise InvalidArgumentError(f"limit and offset must be >= 0, got {limit}, {offset}")
    # LIMIT -1 is SQLite's "no limit"; PostgreSQL's is LIMIT ALL, which takes no parameter: a large number serves both.
    return " LIMIT ? OFFSET ?", [2**62 if limit is None else limit, offset]


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
