"""kvmem_pg: kvmem's Store on PostgreSQL, so kvmem servers on several hosts share one memory.

Theory of operation
-------------------
* The model is kvmem's.  Arguments are checked by ``kvmem``'s ops (``SetOp.parse`` ...),
  each write is ``op.plan(current, now)``, rows become ``Memory`` objects and back through
  ``kvmem``'s own row functions, and "live" is ``kvmem.LIVE``.  Only storage lives here:
  the pool, the schema and its migrations, the transaction rule and the error mapping.
  ``kvmem`` never imports this module.
* Connections.  A small ``psycopg_pool.ConnectionPool`` in autocommit mode; each
  connection gets ``synchronous_commit=on`` and ``lock_timeout`` (``busy_timeout_ms``)
  when the pool makes it.  Transactions are explicit (``conn.transaction()``).
* Transactions.  A write is one READ COMMITTED transaction on one connection: an
  advisory transaction lock on (namespace, key), which also serialises keys not created
  yet, so two servers creating one key never meet a unique violation; the row read
  ``FOR UPDATE``; the op's plan; the INSERT, UPDATE or DELETE; COMMIT.  Compare-and-set is
  therefore exact across connections, pools and hosts.  Nothing is acknowledged before
  its COMMIT returned, with ``synchronous_commit=on``.
* Errors.  Every ``psycopg.Error`` becomes a kvmem error in ``_pg_error()``, by SQLSTATE,
  never by message text.  A lost connection before COMMIT was sent is ``BusyError`` (503
  at the HTTP edge): nothing was written.  A lost connection during COMMIT is a
  ``StorageError`` saying the outcome is unknown; it is never retried (a retried
  compare-and-set could apply twice).
* Time.  ``now`` is the Store's ``clock()``, passed as a parameter, never PostgreSQL's
  ``now()``: the core stays pure and tests move time by hand.  TTL and decay across hosts
  therefore need synchronised clocks (NTP); compare-and-set does not.

First slice of issue #19: open, migrate, set, get, delete, reinforce, apply.  The other
methods of ``kvmem.Store`` (batch, list, search, prune, forget, export, import, stats,
health) are still to come; see docs/postgres-design.md.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import psycopg
import psycopg.conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

import kvmem
from kvmem import (
    DEFAULT_HALF_LIFE,
    BusyError,
    Config,
    ConfigError,
    DeleteOp,
    KvmemError,
    Memory,
    Op,
    ReadOnlyError,
    ReinforceOp,
    SchemaTooNewError,
    SetOp,
    StorageError,
    StorageFullError,
)

__all__ = ["MIGRATIONS_PG", "PgStore"]

# ============================================================================ errors ====

# Retried inside the Store until busy_timeout_ms: serialization failure, deadlock detected
# (https://www.postgresql.org/docs/current/errcodes-appendix.html).
RETRY_STATES = frozenset({"40001", "40P01"})
# The server went away (admin shutdown, crash shutdown, cannot connect now): class 08 too.
GONE_STATES = frozenset({"57P01", "57P02", "57P03"})
_ERROR_BY_STATE: dict[str, type[KvmemError]] = {
    "55P03": BusyError,  # lock_not_available: lock_timeout passed
    "53100": StorageFullError,  # disk_full
    "25006": ReadOnlyError,  # read_only_sql_transaction: a standby
}


def _connection_lost(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:  # psycopg's own: the connection is closed or broken
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in GONE_STATES


def _pg_error(exc: psycopg.Error, where: str, *, committing: bool = False) -> KvmemError:
    """The one place that turns a ``psycopg.Error`` into a kvmem error, by SQLSTATE.
    ``committing``: COMMIT may have been sent, so a lost connection leaves the outcome
    unknown (not busy: the write may have happened)."""
    name = exc.sqlstate or type(exc).__name__
    if isinstance(exc, PoolTimeout):
        return BusyError(f"{where}: no database connection within the deadline: {exc}")
    if _connection_lost(exc):
        if committing:
            return StorageError(f"{where}: connection lost during COMMIT, outcome unknown: "
                                f"read it back ({name}: {exc})")
        return BusyError(f"{where}: database unavailable ({name}: {exc})")
    if exc.sqlstate in RETRY_STATES:
        return BusyError(f"{where}: {name}: {exc}")
    cls = _ERROR_BY_STATE.get(exc.sqlstate or "", StorageError)
    return cls(f"{where}: {name}: {exc}")


# ============================================================================ schema ====

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS kvmem_version (version integer NOT NULL)"
# Two servers starting together: the first migrates, the second waits and then sees it
# done.  The key of pg_advisory_xact_lock (a bigint) is kvmem's own.
MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"kvmem migrations").digest()[:8], "big",
                                signed=True)
# Each entry brings kvmem_version from its index to index + 1, in one transaction (DDL is
# transactional in PostgreSQL).  A statement may use %(secret)s, 32 random bytes.
# Columns follow kvmem.MEMORY_COLUMNS, so kvmem's row functions read and write them:
# value and tags are JSON text as in SQLite (jsonb would reorder keys, drop duplicates and
# refuse \u0000, breaking the exact export round trip); times are float8 as SQLite's REAL;
# archived is a smallint because Memory dumps it as an int; keys sort bytewise (C).
MIGRATIONS_PG: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE memories (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            namespace text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            value text NOT NULL,
            tags text NOT NULL DEFAULT '[]',
            version bigint NOT NULL,
            created_at float8 NOT NULL,
            updated_at float8 NOT NULL,
            expires_at float8,
            strength float8 NOT NULL,
            half_life_seconds float8,
            last_reinforced_at float8 NOT NULL,
            archived smallint NOT NULL DEFAULT 0,
            UNIQUE (namespace, key)
        )""",
        "CREATE INDEX memories_expires ON memories (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE TABLE kvmem_meta (name text PRIMARY KEY, value bytea NOT NULL)",
        "INSERT INTO kvmem_meta (name, value) VALUES ('cursor_secret', %(secret)s)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS_PG)


def _pg_sql(sql: str) -> str:
    """kvmem's SQL (``?`` parameters, single-quoted literals without ``?``) for psycopg."""
    if "%" in sql:
        raise ValueError(f"a % in SQL meant for psycopg: {sql[:80]!r}")
    return sql.replace("?", "%s")


GET_ROW_FOR_UPDATE = _pg_sql(kvmem.GET_ROW + " FOR UPDATE")
GET_LIVE = _pg_sql(kvmem.GET_LIVE)
# One lock per (namespace, key); the separator cannot occur in either (no control chars).
LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
KEY_SEPARATOR = "\x1f"
# Server settings read back at open; a server that could lose acknowledged commits on a
# crash of PostgreSQL itself (fsync or full_page_writes off) is refused.
READ_SETTINGS = ("SELECT current_setting('server_version'), current_setting('fsync'),"
                 " current_setting('full_page_writes'), current_setting('synchronous_commit')")
CONFIGURE = ("SELECT set_config('synchronous_commit', 'on', false),"
             " set_config('lock_timeout', %s, false)")
# kvmem's synchronous levels on PostgreSQL: full and extra are synchronous_commit=on; no
# PostgreSQL level means what normal means in SQLite (synchronous_commit=off loses recent
# commits on a crash of the server, not only on power loss), so normal and off are refused.
SYNCHRONOUS_REFUSED = ("normal", "off")


class _QmarkConnection:
    """kvmem's ``_write`` on a psycopg connection: it only calls ``execute(sql, params)``
    with ``?`` parameters.  (The shared ``Tx`` protocol of the design replaces this.)"""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(_pg_sql(sql), parameters)


def _apply(conn: psycopg.Connection[Any], op: Op, now: float) -> Any:
    """Run one op in the caller's transaction: lock its key, load its row FOR UPDATE, plan,
    write what the plan says (kvmem's ``_write``); the op's outcome."""
    conn.execute(LOCK_KEY, (op.namespace + KEY_SEPARATOR + op.key,))
    row = conn.execute(GET_ROW_FOR_UPDATE, (op.namespace, op.key)).fetchone()
    current = None if row is None else kvmem._row_memory(row, value=op.reads_value)
    after, outcome = op.plan(current, now)
    kvmem._write(cast(Any, _QmarkConnection(conn)), row, after, getattr(op, "value_json", None),
                 current)
    return outcome


_R = TypeVar("_R")


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql (unparsable DSN)"
    host, port, dbname = (parts.get(k, "") for k in ("host", "port", "dbname"))
    return f"postgresql://{host or 'localhost'}{':' + str(port) if port else ''}/{dbname or ''}"


# ============================================================================= store ====


class PgStore:
    """kvmem's Store on PostgreSQL: the same methods, arguments, results and errors as
    ``kvmem.Store`` (so far: set, get, delete, reinforce, apply).

    Thread-safe: each call takes a connection from the pool.  Writes return after their
    COMMIT (``synchronous_commit=on``).  Times come from ``clock`` (Unix seconds).  Open
    with ``PgStore.open(dsn)``; ``close()`` (or ``with``) closes the pool."""

    def __init__(self, dsn: str, config: Config, *, clock: Callable[[], float] = time.time,
                 role: str = "library", pool_size: int = 10) -> None:
        if config.synchronous in SYNCHRONOUS_REFUSED:
            raise ConfigError(
                f"synchronous={config.synchronous!r} has no honest PostgreSQL mapping "
                "(synchronous_commit=off loses acknowledged writes when PostgreSQL crashes); "
                "use full or extra, which are synchronous_commit=on")
        self.dsn, self.config, self.clock, self.role = dsn, config, clock, role
        self.where = describe_dsn(dsn)
        self._closed = False
        self._lock = threading.Lock()
        timeout = config.busy_timeout_ms / 1000
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, timeout=max(timeout, 0.001), open=False,
            configure=self._configure, check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": 5}, name=f"kvmem {self.where}")
        try:
            self._pool.open(wait=True, timeout=max(timeout, 5.0))
        except PoolTimeout as exc:
            self._pool.close()
            raise StorageError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            self.server_settings = self._check_settings()
            self._migrate()
            self._cursor_secret = self._read_cursor_secret()
        except BaseException:
            self._pool.close()
            raise

    @classmethod
    def open(cls, dsn: str, *, config: Config | None = None,
             clock: Callable[[], float] = time.time, role: str = "library",
             pool_size: int = 10) -> PgStore:
        """Connect to ``dsn`` (a ``postgresql://`` URL or a libpq key=value string),
        migrate the schema, and return the store.  Raises ConfigError (a refused
        synchronous level or server setting), SchemaTooNewError, StorageError (no
        connection), BusyError."""
        return cls(dsn, config or Config.build(), clock=clock, role=role, pool_size=pool_size)

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection of the pool (after the calls in flight returned them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    # -- connections and transactions --------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # lock_timeout=0 would wait forever; busy_timeout_ms=0 means do not wait.
        conn.execute(CONFIGURE, (f"{max(1, self.config.busy_timeout_ms)}ms",))

    def _read(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        """One statement in autocommit (its own snapshot); the first row or None."""
        try:
            with self._pool.connection() as conn:
                row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
                return row
        except psycopg.Error as exc:
            raise _pg_error(exc, self.where) from exc

    def _transact(self, fn: Callable[[psycopg.Connection[Any]], _R], *,
                  lock: int | None = None) -> _R:
        """Run ``fn`` in one transaction (after ``pg_advisory_xact_lock(lock)`` if given)
        and commit; its result once COMMIT returned.  Serialization failures and deadlocks
        are retried until busy_timeout_ms, then BusyError."""
        deadline = time.monotonic() + self.config.busy_timeout_ms / 1000
        attempt = 0
        while True:
            committing = False
            try:
                with self._pool.connection() as conn:
                    with conn.transaction():
                        if lock is not None:
                            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                        result = fn(conn)
                        committing = True  # leaving the block sends COMMIT
                    return result
            except psycopg.Error as exc:
                remaining = deadline - time.monotonic()
                if exc.sqlstate in RETRY_STATES and remaining > 0 and not committing:
                    attempt += 1
                    # Jittered backoff, as kvmem.transaction() does on SQLITE_BUSY.
                    time.sleep(min(remaining, random.uniform(0, min(0.1, 0.002 * 2 ** attempt))))
                    continue
                raise _pg_error(exc, self.where, committing=committing) from exc

    def _check_settings(self) -> dict[str, str]:
        row = self._read(READ_SETTINGS, ())
        assert row is not None
        settings = dict(zip(("server_version", "fsync", "full_page_writes",
                             "synchronous_commit"), row, strict=True))
        for name in ("fsync", "full_page_writes"):
            if settings[name] != "on":
                raise ConfigError(f"{self.where}: the server runs with {name}={settings[name]}: "
                                  "a crash of PostgreSQL could lose acknowledged writes")
        if settings["synchronous_commit"] != "on":  # set by _configure on every connection
            raise ConfigError(f"{self.where}: synchronous_commit is "
                              f"{settings['synchronous_commit']}, not on")
        return settings

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one step a transaction, under the migration
        lock; SchemaTooNewError (nothing touched) when a newer kvmem wrote it."""
        while True:
            done = self._transact(self._migrate_step, lock=MIGRATION_LOCK)
            if done:
                return

    def _migrate_step(self, conn: psycopg.Connection[Any]) -> bool:
        conn.execute(VERSION_TABLE)
        row = conn.execute("SELECT version FROM kvmem_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO kvmem_version (version) VALUES (0)")
            version = 0
        else:
            version = int(row[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(f"{self.where}: schema version {version} was written by a "
                                    f"newer kvmem (this one knows {SCHEMA_VERSION}); untouched")
        if version == SCHEMA_VERSION:
            return True
        for statement in MIGRATIONS_PG[version]:
            if "%(secret)s" in statement:
                conn.execute(statement, {"secret": secrets.token_bytes(32)})
            else:
                conn.execute(statement)
        conn.execute("UPDATE kvmem_version SET version = %s", (version + 1,))
        return version + 1 == SCHEMA_VERSION

    def _read_cursor_secret(self) -> bytes:
        row = self._read(_pg_sql(kvmem.GET_CURSOR_SECRET), ())
        if row is None:
            raise StorageError(f"{self.where}: kvmem_meta has no cursor_secret")
        return bytes(row[0])

    # -- writes ------------------------------------------------------------------------
    # The same signatures and checks as kvmem.Store's (test_pg_store compares them); the
    # shared BaseStore of the design will hold these once.

    def set(self, key: str, value: Any, *, namespace: str = "default",
            tags: Sequence[str] | None = None, ttl_seconds: float | None = None,
            half_life_seconds: float | str | None = DEFAULT_HALF_LIFE,
            if_version: int | None = None) -> Memory:
        """As ``kvmem.Store.set``: durable (COMMIT with synchronous_commit=on) when it
        returns; compare-and-set by ``if_version`` is exact across servers."""
        spec = {"value": value, "tags": tags, "ttl_seconds": ttl_seconds,
                "half_life_seconds": half_life_seconds, "if_version": if_version}
        result: Memory = self.apply(SetOp.parse(spec, self.config, key=key, namespace=namespace))
        return result

    def delete(self, key: str, *, namespace: str = "default",
               if_version: int | None = None) -> bool:
        """As ``kvmem.Store.delete``."""
        op = DeleteOp.parse({"if_version": if_version}, self.config, key=key, namespace=namespace)
        result: bool = self.apply(op)
        return result

    def reinforce(self, key: str, *, namespace: str = "default") -> Memory:
        """As ``kvmem.Store.reinforce``."""
        result: Memory = self.apply(ReinforceOp.parse({}, self.config, key=key,
                                                      namespace=namespace))
        return result

    def apply(self, op: Op) -> Any:
        """Run one op in its own transaction; its outcome once COMMIT returned."""
        op = op.checked_for(self.config)
        return self._transact(lambda conn: _apply(conn, op, self.clock()))

    # -- reads -------------------------------------------------------------------------

    def get(self, key: str, *, namespace: str = "default") -> Memory | None:
        """The live memory, or None (absent, expired or archived).  Never writes."""
        namespace = kvmem.validate_namespace(namespace, self.config)
        key = kvmem.validate_key(key, self.config)
        row = self._read(GET_LIVE, (namespace, key, self.clock()))
        return None if row is None else kvmem._row_memory(row)
