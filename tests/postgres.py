"""A PostgreSQL server of the tests' own: Debian's postgresql-15 binaries run on a unix socket
in a private temporary directory, with a fresh database per test, stopped at the end of the
session. Missing binaries fail the tests that need them (never a silent skip):
`scripts/setup.sh --dev` installs them."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

BIN_DIR = Path(os.environ.get("POSTGRES_BIN_DIR", "/usr/lib/postgresql/15/bin"))
_SERVER_USER = "postgres"
"""Who runs the server when the tests run as root (PostgreSQL refuses to run as root)."""
_START_TIMEOUT_SECONDS = 60


class PostgresServer:
    """One running server; `new_database` gives each test an empty database of its own."""

    def __init__(self) -> None:
        initdb = BIN_DIR / "initdb"
        if not initdb.is_file():
            pytest.fail(
                f"PostgreSQL server binaries not found ({initdb}): the PostgreSQL backend's "
                "tests start their own server; run scripts/setup.sh --dev, which installs "
                "Debian's postgresql-15 (or set POSTGRES_BIN_DIR to their directory)",
                pytrace=False,
            )
        # Short and private: a unix socket path must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="voxauth-pg-"))
        self._as_root = os.geteuid() == 0
        if self._as_root:
            server_user = pwd.getpwnam(_SERVER_USER)
            os.chown(self.root, server_user.pw_uid, server_user.pw_gid)
        self.data = self.root / "data"
        self.socket_dir = str(self.root)
        self._names = itertools.count(1)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "voxauth",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            )
            self._start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _start(self) -> None:
        # No fsync: the tests need transactions and a survived server crash (a commit's WAL is
        # written before it returns), not a survived power cut.
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        # -l: the server's output goes to a file, never to the pipes _run reads to their end.
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-w", "-t", str(_START_TIMEOUT_SECONDS),
            "-l", str(self.root / "server.log"), "-o", options,
        )  # fmt: skip

    def conninfo(self, database: str) -> str:
        return f"postgresql:///{database}?host={self.socket_dir}&user=voxauth"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit superuser connection to the maintenance database."""
        return psycopg.connect(self.conninfo("postgres"), autocommit=True)

    def new_database(self) -> str:
        """The conninfo of a new, empty database."""
        name = f"test_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.conninfo(name)

    def restart(self) -> None:
        """Stops the server at once (every session cut, as in a crash) and starts it again."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        self._start()

    def halt(self) -> None:
        """Stops the server as an operator's restart does (fast: sessions are cut at once),
        keeping its data for `resume`."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def resume(self) -> None:
        """Starts the server again after `halt`, on the same socket and data."""
        self._start()

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(BIN_DIR / program), *args]
        if self._as_root:
            command = ["runuser", "-u", _SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.strip()}\n{tail}"
            )
