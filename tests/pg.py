"""A throwaway PostgreSQL cluster for the tests, built from Debian's server binaries.

One cluster per test session in a temporary directory: trust authentication, TCP on
127.0.0.1 only (at a free port) plus a unix socket in that directory, fsync off (the
data is thrown away).  Each test gets a fresh schema in one database.  ``initdb`` refuses to run as
root, so as root the cluster runs as the ``postgres`` user that Debian's package
creates.  Missing binaries fail the tests that need them, loudly: CI must install the
``postgresql`` package rather than skip the PostgreSQL half of the contract suite.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

BINARIES = "/usr/lib/postgresql/*/bin"
DATABASE = "kubecertd"  # the tests' database; each test has a schema of its own
MISSING = (
    f"PostgreSQL server binaries not found ({BINARIES}/initdb, pg_ctl): install the Debian "
    "package 'postgresql' (make deps does); the store's contract tests need a real server"
)


class ClusterError(Exception):
    """The throwaway cluster cannot be set up; the message says what to install or fix."""


def find_bindir() -> Path:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``."""
    found = [
        Path(initdb).parent
        for initdb in glob.glob(f"{BINARIES}/initdb")
        if os.access(Path(initdb).parent / "pg_ctl", os.X_OK)
    ]
    if not found:
        raise ClusterError(MISSING)
    return max(found, key=lambda path: [int(n) for n in re.findall(r"\d+", path.parent.name)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    bindir: Path
    port: int
    as_user: list[str]  # the runuser prefix when we are root
    _names: itertools.count[int] = field(default_factory=itertools.count)
    _admin: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        """A URL of ``dbname``; with ``schema``, one that puts it first in the search_path."""
        options = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}{options}"

    def run(self, tool: str, *args: str) -> None:
        """Run one of the server binaries as the cluster's owner; ClusterError if it fails."""
        done = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={**os.environ, "LC_ALL": "C"},
            cwd=self.root,
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ClusterError(f"{tool} failed ({done.returncode}): {done.stderr.strip()} {tail}")

    def sql(self, statement: str) -> None:
        """Run ``statement`` in the tests' database, on one connection kept for the session."""
        for attempt in (1, 2):
            if self._admin is None or self._admin.closed:
                self._admin = psycopg.connect(self.url(DATABASE), autocommit=True)
            try:
                self._admin.execute(statement.encode())
            except psycopg.OperationalError:
                # A test may have terminated every backend of the database, ours too.
                self._admin.close()
                if attempt == 2:
                    raise
            else:
                return

    def create_schema(self) -> str:
        """A new, empty schema in the tests' database; its name.

        A schema per test, not a database: CREATE DATABASE copies a template and takes
        up to half a second on a busy machine, CREATE SCHEMA a millisecond.
        """
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.sql(f'CREATE SCHEMA "{name}"')
        return name

    def drop_schema(self, name: str) -> None:
        """Drop ``name``, cutting off whoever is still connected to the tests' database."""
        self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        self.sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def stop(self) -> None:
        """Stop the server at once (the data is worthless) and remove its directory."""
        if self._admin is not None:
            self._admin.close()
        try:
            if (self.data / "postmaster.pid").exists():
                self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start() -> Cluster:
    """initdb and start a cluster, or raise ``ClusterError`` saying why not."""
    bindir = find_bindir()
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise ClusterError(
                "running as root, but there is no 'postgres' user to run PostgreSQL as "
                "(the Debian package 'postgresql' creates it)"
            ) from None
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: its parents are 0700 root, closed to postgres.
    root = Path(tempfile.mkdtemp(prefix="kubecertd-pg-"))
    cluster = Cluster(root, bindir, _free_port(), as_user)
    try:
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        cluster.run(
            "initdb",
            *("-D", str(cluster.data), "-U", "postgres", "-A", "trust"),
            *("-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"),
        )
        cluster.run(
            "pg_ctl",
            *("-D", str(cluster.data), "-l", str(root / "server.log"), "-w", "-t", "30"),
            "-o",
            f"-c listen_addresses=127.0.0.1 -c port={cluster.port}"
            f" -c unix_socket_directories={root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            "start",
        )
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"'.encode())
    except BaseException:
        cluster.stop()
        raise
    return cluster
