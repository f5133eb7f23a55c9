"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary directory,
``pg_ctl start`` on a free loopback port, a DSN, and ``pg_ctl stop`` plus removal at the end.

``initdb`` refuses to run as root, and CI runs as root: then every server command runs as
the ``postgres`` account that Debian's ``postgresql`` package creates (``runuser -u
postgres --``), and the directory belongs to it.  Binaries are looked up in Debian's
``/usr/lib/postgresql/<version>/bin`` (newest first), then on ``PATH``.

``postgres_problem()`` says why no server can be started here (``None``: one can);
``require_postgres()`` skips a test for that reason, or fails it when
``KVMEM_TEST_REQUIRE_POSTGRES=1`` (as CI sets it), as the power-loss tests do with strace.

Waits are on conditions (``pg_ctl -w``, then a successful connection), never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

REQUIRE_VARIABLE = "KVMEM_TEST_REQUIRE_POSTGRES"
RUN_AS = "postgres"  # the account the server runs as when the tests run as root
START_TIMEOUT_S = 60.0
PORT_ATTEMPTS = 5  # a port found free can be taken before the server binds it
# Settings of every test server: loopback TCP only, its socket in its own directory (the
# Debian default /var/run/postgresql may be missing or not ours), the durability kvmem
# promises on (they are PostgreSQL's defaults; named so that a test can rely on them).
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


class PostgresError(RuntimeError):
    """The test server could not be set up, started or stopped (the log's tail included)."""


def _versions_bindirs() -> list[str]:
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = os.path.basename(os.path.dirname(path))
        if os.path.isfile(os.path.join(path, "initdb")) and version.isdigit():
            found.append((int(version), path))
    return [path for _, path in sorted(found, reverse=True)]


def find_bindir() -> str | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    for path in _versions_bindirs():
        if all(os.access(os.path.join(path, n), os.X_OK) for n in ("initdb", "pg_ctl",
                                                                   "postgres")):
            return path
    initdb = shutil.which("initdb")
    if initdb:
        path = os.path.dirname(os.path.realpath(initdb))
        if all(os.access(os.path.join(path, n), os.X_OK) for n in ("pg_ctl", "postgres")):
            return path
    return None


def postgres_problem() -> str | None:
    """Why a test PostgreSQL cannot be started here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if find_bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
                "/usr/lib/postgresql/*/bin or on PATH (Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return (f"running as root, and initdb refuses root: no {RUN_AS!r} account to run "
                    "the server as (apt-get install postgresql creates it)")
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (util-linux)"
    return None


def require_postgres() -> None:
    """Skip the calling test when no server can be started, or fail it under
    KVMEM_TEST_REQUIRE_POSTGRES=1."""
    import pytest

    problem = postgres_problem()
    if problem:
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{problem}; {REQUIRE_VARIABLE}=1 requires PostgreSQL")
        pytest.skip(problem)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1:``port``.

    ``start()`` runs initdb (once) and starts it; ``stop()`` is ``pg_ctl stop -m fast``;
    ``kill_immediately()`` is ``pg_ctl stop -m immediate`` (no shutdown checkpoint: the
    next start runs crash recovery from the WAL, as after a crash of the server);
    ``restart()`` starts it again on the same port, so the DSN stays valid; ``remove()``
    stops it if running and deletes the directory."""

    def __init__(self, bindir: str | None = None, *,
                 standby_of: PostgresServer | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PostgresError(postgres_problem() or "no PostgreSQL binaries")
        self.bindir = bindir
        self.extra_settings = dict(settings or {})  # over SERVER_SETTINGS, on the command line
        self.as_root = os.geteuid() == 0
        self.base = tempfile.mkdtemp(prefix="kvmem-pg-")  # in /tmp: reachable by RUN_AS
        self.data = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "server.log")
        self.port = 0
        if self.as_root:
            account = pwd.getpwnam(RUN_AS)
            os.chown(self.base, account.pw_uid, account.pw_gid)
        try:
            if standby_of is None:
                self._initdb()
            else:  # a copy of the running primary that streams its WAL (standby.signal)
                self._run("pg_basebackup", "-D", self.data, "-h", "127.0.0.1",
                          "-p", str(standby_of.port), "-U", "postgres", "-X", "stream", "-R",
                          "-c", "fast")
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, program: str, *args: str) -> list[str]:
        command = [os.path.join(self.bindir, program), *args]
        return ["runuser", "-u", RUN_AS, "--", *command] if self.as_root else command

    def _run(self, program: str, *args: str, check: bool = True,
             timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        # cwd: the server's own directory (RUN_AS may not enter the caller's).
        result = subprocess.run(self._command(program, *args), cwd=self.base, text=True,
                                capture_output=True, timeout=timeout,
                                env={**os.environ, "LC_ALL": "C.UTF-8"})
        if check and result.returncode != 0:
            raise PostgresError(f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                                f"{result.stdout}{result.stderr}{self.log_tail()}")
        return result

    def _initdb(self) -> None:
        # Byte order for keys (C collation, as SQLite's BINARY), Unicode-aware ctype (case
        # folding of non-ASCII words in full-text search), UTF-8, no password on loopback.
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--lc-collate=C", "--lc-ctype=C.UTF-8", "--lc-messages=C",
                  "--no-instructions")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return "--- server log ---\n" + "".join(tail)

    def _options(self) -> str:
        settings = {**SERVER_SETTINGS, **self.extra_settings, "port": str(self.port),
                    "unix_socket_directories": self.base}
        return " ".join(f"-c {name}={value}" for name, value in settings.items())

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", self.data, check=False).returncode == 0

    def start(self) -> None:
        """Start the server and return once it accepts a connection.  The first start picks
        a free port (another, if that one is taken meanwhile); later starts keep it."""
        fixed = self.port != 0
        for _ in range(1 if fixed else PORT_ATTEMPTS):
            if not fixed:
                self.port = free_port()
            result = self._run("pg_ctl", "start", "-w", "-t", str(int(START_TIMEOUT_S)),
                               "-D", self.data, "-l", self.logfile, "-o", self._options(),
                               check=False, timeout=START_TIMEOUT_S + 10)
            if result.returncode == 0:
                self.wait_ready()
                return
            if fixed or "could not bind" not in self.log_tail(10):
                break
        raise PostgresError(f"pg_ctl start failed ({result.returncode}):\n"
                            f"{result.stdout}{result.stderr}{self.log_tail()}")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until a connection succeeds and answers a query (pg_ctl -w already waited for
        the postmaster; this proves the DSN works from this process)."""
        import psycopg

        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(f"no connection to {self.dsn} after {timeout} s: "
                                        f"{exc}\n{self.log_tail()}") from exc
                time.sleep(delay)  # polling a condition, with backoff
                delay = min(delay * 2, 0.2)

    def _stop(self, mode: str) -> None:
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-D", self.data, "-m", mode)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: clients disconnected, a shutdown checkpoint."""
        self._stop("fast")

    def kill_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: every server process quits at once, without a
        checkpoint; the next start recovers from the WAL as after a crash."""
        self._stop("immediate")

    def restart(self) -> None:
        """Start again (after ``kill_immediately`` or ``stop``) on the same port."""
        self.start()

    def promote(self) -> None:
        """``pg_ctl promote``: a standby becomes a primary (after its primary failed)."""
        self._run("pg_ctl", "promote", "-w", "-D", self.data)

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        """One statement in autocommit (ALTER SYSTEM cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []

    def settings(self, *names: str) -> dict[str, Any]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            out = {}
            for name in names:
                row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
                assert row is not None
                out[name] = row[0]
            return out

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(bindir: str | None = None, *,
                    standby_of: PostgresServer | None = None,
                    settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started test server (a streaming standby of ``standby_of`` if given; ``settings``
    over SERVER_SETTINGS); stopped (``pg_ctl stop -m fast``) and deleted at the end."""
    server = PostgresServer(bindir, standby_of=standby_of, settings=settings)
    try:
        server.start()
        yield server
    finally:
        server.remove()
