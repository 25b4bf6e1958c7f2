"""A throwaway PostgreSQL server for the gateway store's tests, and a fresh schema on it for each test.

The server is started once per test session from the Debian package ``postgresql`` (``initdb`` and ``pg_ctl``, on
PATH or under /usr/lib/postgresql/*/bin), in a temporary folder, listening on 127.0.0.1 at a free port with trust
authentication, and stopped at the end. PostgreSQL refuses to run as root (CI and this workplace run as root): then
it runs as the ``postgres`` system user the Debian package creates. ``CARIES_MIM_TEST_POSTGRES`` (a
``postgresql://`` URL) names a server to use instead; its user needs CREATE on the database. Where the programs
or psycopg are missing, the PostgreSQL cases skip and say what is missing.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

#: A URL of a server to test against instead of starting one.
ENVIRONMENT = "CARIES_MIM_TEST_POSTGRES"
_schemas = itertools.count(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_programs() -> tuple[Path, Path] | None:
    """``initdb`` and ``pg_ctl``: on PATH, else the newest under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return Path(found[0]), Path(found[1])
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda folder: int(Path(folder).parent.name))
    for folder in reversed(folders):
        initdb, pg_ctl = Path(folder) / "initdb", Path(folder) / "pg_ctl"
        if initdb.is_file() and pg_ctl.is_file():
            return initdb, pg_ctl
    return None


def _linguistic_locale() -> str:
    """en_US.UTF-8 where the system has it, else C. Servers are often created with a linguistic collation (which
    skips the dots of UIDs when it compares them): the store's searches must not depend on it."""
    try:
        listed = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "C"
    return "en_US.UTF-8" if {"en_US.utf8", "en_US.UTF-8"} & set(listed) else "C"


def _as_server_user() -> list[str]:
    """The command prefix that runs a program as a user PostgreSQL accepts (not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root and there is no 'postgres' user (Debian package postgresql)")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL refuses to run as root and runuser (util-linux) is not there to run it as 'postgres'")
    return [runuser, "-u", "postgres", "--"]


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a PostgreSQL server in a temporary folder; yield its URL (superuser ``caries``, database
    ``postgres``); stop it and delete the folder afterwards."""
    programs = server_programs()
    if programs is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl; Debian package postgresql) not found: "
                    "not on PATH nor under /usr/lib/postgresql/*/bin")  # fmt: skip
    initdb, pg_ctl = programs
    prefix = _as_server_user()
    # Not under pytest's tmp_path: its parent is private to root, and the server may run as 'postgres'.
    folder = Path(tempfile.mkdtemp(prefix="caries-mim-pg-"))
    try:
        if prefix:
            entry = pwd.getpwnam("postgres")
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        data = folder / "data"
        created = subprocess.run(
            [*prefix, str(initdb), "-D", str(data), "--auth=trust", "-U", "caries", "--no-sync", "--encoding=UTF8",
             f"--locale={_linguistic_locale()}"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"initdb failed: {created.stdout}{created.stderr}")
        port = free_port()
        # fsync off: nothing here crashes the server, and the tests run quicker without it.
        options = f"-k {folder} -h 127.0.0.1 -p {port} -c fsync=off -c full_page_writes=off"
        started = subprocess.run(
            [*prefix, str(pg_ctl), "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w", "-t", "60",
             "start"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if started.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").is_file() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}{log[-2000:]}")
        try:
            yield f"postgresql://caries@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*prefix, str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"],
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for this session (``CARIES_MIM_TEST_POSTGRES``, else a throwaway one)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    if os.environ.get(ENVIRONMENT):
        yield os.environ[ENVIRONMENT]
        return
    with throwaway_server() as url:
        yield url


@pytest.fixture
def postgres_database(postgres_server) -> Iterator[str]:
    """A URL whose connections work in a schema of their own, new for this test and dropped after it."""
    import psycopg

    schema = f"caries_mim_test_{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in postgres_server else "?"
    yield f"{postgres_server}{separator}options={quote(f'-c search_path={schema}')}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
