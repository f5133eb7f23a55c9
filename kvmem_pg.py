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

* Search.  The words are SQLite's own (an in-memory FTS5 table with kvmem's tokenizer,
  see ``search_vector``), stored as a tsvector with a GIN index and written in the same
  statement as the text; the ranking is FTS5's bm25 with kvmem's column weights
  (``kvmem_bm25`` in SQL) times the current strength, as ``kvmem.search_score``.

* Prune and forget.  prune takes its rows ``FOR UPDATE SKIP LOCKED`` (servers prune at
  once without waiting); forget walks key windows of ``prune_batch`` rows, each under its
  keys' advisory locks taken in the same order as batches take theirs (no deadlock).

The API is ``kvmem.BaseStore``'s, shared with ``kvmem.Store``: set, get, delete, reinforce,
apply, batch, list, namespaces, search, export, import_, prune, forget, interrupt, stats,
health, close; ``kvmem_cli.open_store`` opens one for a ``--db postgresql://...``.  See
docs/postgres-design.md and the README's "More than one machine".
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import math
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, TypeVar, cast

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

import kvmem
from kvmem import (
    BusyError,
    Config,
    ConfigError,
    DeleteOp,
    Filters,
    Hit,
    InvalidInputError,
    KvmemError,
    Memory,
    Op,
    PruneResult,
    ReadOnlyError,
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
    # out_of_memory, which includes the shared lock table being full (every key of a batch
    # holds an advisory lock until COMMIT; see max_locks_per_transaction in the README):
    # it passes once other transactions end.
    "53200": BusyError,
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


# ============================================================================ search ====
# The words are SQLite's own: each thread keeps an in-memory FTS5 table with kvmem's
# INDEX_TOKENIZER, and a memory's key, value and tags (kvmem's index_text, value_text and
# tags_text, exactly what the SQLite backend indexes) go through it; fts5vocab gives each
# token's stem, column and offset.  Those become a tsvector literal: the key's words
# weighted A, the value's B, the tags' C (BM25_WEIGHTS in that order), each column's
# positions after the previous one's with a gap of one, so a phrase never spans two
# columns.  A query term of kvmem.fts_terms goes through the same table: its tokens make a
# phrase ('foo' <-> 'bar'), a starred term's last token a prefix (:*), as FTS5 reads it.

SEARCH_COLUMNS = ("key", "body", "tags")
SEARCH_WEIGHT_LABELS = ("A", "B", "C")
MAX_LEXEME_BYTES = 2046  # PostgreSQL refuses a longer lexeme in a literal (54000)
MAX_LEXEME_POSITIONS = 255  # PostgreSQL keeps at most this many positions a lexeme
MAX_POSITION = 16383  # and no position past this one
# A tsvector holds at most 1 MiB; distinct lexemes stop being added well before (about
# the first 60,000 distinct words of a huge value are searchable on PostgreSQL).
MAX_SEARCH_VECTOR_BYTES = 900_000
BM25_K1, BM25_B = 1.2, 0.75
IDF_FLOOR = 1e-6  # FTS5's clamp of a non-positive IDF
EXACT_COUNT_BELOW = 10_000  # memories: under this N is counted, above it pg_class estimates

_tokenizers = threading.local()
TOKENIZER_RENEW_TOKENS = 10_000


def _tokenizer() -> sqlite3.Connection:
    conn: sqlite3.Connection | None = getattr(_tokenizers, "conn", None)
    if conn is None:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(key, body, tags, content='',"
                     f" tokenize='{kvmem.INDEX_TOKENIZER}')")
        conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        _tokenizers.conn = conn
    return conn


def sqlite_tokens(key: str, body: str, tags: str) -> builtins.list[tuple[str, int, int]]:
    """(stem, column index, offset) of every token FTS5 makes of the three columns, with
    kvmem's tokenizer, in column and offset order."""
    conn = _tokenizer()
    try:
        conn.execute("INSERT INTO t (rowid, key, body, tags) VALUES (1, ?, ?, ?)",
                     (key, body, tags))
        rows = conn.execute("SELECT term, col, \"offset\" FROM v").fetchall()
    finally:
        conn.execute("INSERT INTO t (t) VALUES ('delete-all')")
    if len(rows) > TOKENIZER_RENEW_TOKENS:
        # FTS5's in-memory hash table keeps the size a huge document grew it to, and every
        # later document walks all of it (measured: 45 us a small memory before one of
        # 140,000 words, 1.6 ms after): start again with a new table.
        conn.close()
        _tokenizers.conn = None
    order = {name: i for i, name in enumerate(SEARCH_COLUMNS)}
    return sorted(((term, order[col], offset) for term, col, offset in rows),
                  key=lambda token: (token[1], token[2]))


def _lexeme_literal(lexeme: str) -> str:
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def search_vector(key: str, value_json: str, tags_json: str) -> tuple[str, int]:
    """The tsvector literal of a memory (its stored key, value JSON and tags JSON), and
    its length in tokens (BM25's |D|, as FTS5 counts it: every token of every column)."""
    tokens = sqlite_tokens(kvmem.index_text(key), kvmem.value_text(value_json),
                           kvmem.tags_text(tags_json))
    sizes = [0, 0, 0]
    for _, col, offset in tokens:
        sizes[col] = max(sizes[col], offset + 1)
    bases = [0, sizes[0] + 1, sizes[0] + sizes[1] + 2]
    positions: dict[str, builtins.list[str]] = {}
    for term, col, offset in tokens:
        if len(term.encode("utf-8")) > MAX_LEXEME_BYTES:
            continue
        kept = positions.get(term)
        if kept is None:
            kept = positions[term] = []
        if len(kept) < MAX_LEXEME_POSITIONS:
            kept.append(f"{min(MAX_POSITION, bases[col] + offset + 1)}"
                        f"{SEARCH_WEIGHT_LABELS[col]}")
    parts, size = [], 0
    for term, kept in positions.items():
        size += len(term.encode("utf-8")) + 8 + 2 * len(kept)
        if size > MAX_SEARCH_VECTOR_BYTES:
            break
        parts.append(f"{_lexeme_literal(term)}:{','.join(kept)}")
    return " ".join(parts), len(tokens)


def query_phrase(term: str) -> tuple[builtins.list[str], bool]:
    """A term of ``kvmem.fts_terms`` (``"text"`` or ``"text"*``) as FTS5 reads it: the
    stems of its tokens, in order, and whether the last is a prefix."""
    prefix = term.endswith("*")
    text = term[1:-2] if prefix else term[1:-1]
    tokens = sqlite_tokens("", text.replace('""', '"'), "")
    return [stem for stem, _, _ in tokens], prefix


def tsquery_phrase(stems: Sequence[str], prefix: bool) -> str:
    words = [_lexeme_literal(stem) for stem in stems]
    if prefix:
        words[-1] += ":*"
    return " <-> ".join(words)


_WEIGHT_CASE = "CASE w " + " ".join(
    f"WHEN '{label}' THEN {weight}"
    for label, weight in zip(SEARCH_WEIGHT_LABELS, kvmem.BM25_WEIGHTS, strict=True)) + " END"
# FTS5's bm25() with BM25_WEIGHTS, as a positive number (kvmem's -bm25): for each term,
# f = the weighted count of its instances (a phrase: the least of its tokens', when all of
# them occur), times its IDF (computed by the caller).  Arguments: the vector and its
# length, then one entry a token: the term it belongs to (1-based), its stem, whether it is
# a prefix; then one entry a term: its token count and IDF; then avgdl.
BM25_FUNCTION = f"""
CREATE FUNCTION kvmem_bm25(tsv tsvector, doc_len integer, term_of integer[], stems text[],
                           prefixes boolean[], term_sizes integer[], idfs float8[],
                           avgdl float8) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(sum(idfs[t] * f * {BM25_K1 + 1} /
                      (f + {BM25_K1} * ({1 - BM25_B} + {BM25_B} * doc_len / avgdl))), 0)
  FROM (SELECT t, min(f) AS f FROM (
          SELECT term_of[q.i] AS t, sum({_WEIGHT_CASE}) AS f
          FROM generate_subscripts(stems, 1) AS q(i)
          JOIN unnest(tsv) AS u ON u.lexeme = stems[q.i]
                                OR (prefixes[q.i] AND starts_with(u.lexeme, stems[q.i]))
          CROSS JOIN unnest(u.weights) AS w
          GROUP BY q.i) AS per_token
        GROUP BY t HAVING count(*) = term_sizes[t]) AS per_term
$$"""
# kvmem.strength_at in SQL (parameter: now); 2^-x underflows to 0 past x = 1075, which
# PostgreSQL would report as an error instead.
# kvmem.strength_at in SQL.  PostgreSQL's float8 raises on overflow and underflow where
# Python gives inf or 0: a strength below 1e-100, or more than 300 half-lives old, is 0
# (elapsed / half_life is only computed below that, so a half-life of 1e-310 never
# overflows, and a score times a strength never underflows).
STRENGTH_PG = ("CASE WHEN half_life_seconds IS NULL AND strength >= 1e-100 THEN strength"
               " WHEN strength < 1e-100"
               " OR greatest(0.0, %s - last_reinforced_at) / 300.0 > half_life_seconds"
               " THEN 0.0 ELSE strength * power(2.0::float8,"
               " -greatest(0.0, %s - last_reinforced_at) / half_life_seconds) END")
SEARCH_RANKED = ("SELECT id, kvmem_bm25(search, search_len, %s, %s, %s, %s, %s, %s)"
                 f" * {STRENGTH_PG} AS score FROM memories WHERE search @@ %s::tsquery")
COUNT_MATCHES = ("SELECT count(*) FROM (SELECT 1 FROM memories WHERE search @@ %s::tsquery"
                 " LIMIT %s) AS m")
SEARCH_TOTALS = "SELECT count(*), coalesce(avg(search_len), 0) FROM memories"


def idf(total: int, matching: int) -> float:
    """FTS5's IDF: log((N - n + 0.5) / (n + 0.5)), at least IDF_FLOOR."""
    value = math.log((total - matching + 0.5) / (matching + 0.5))
    return value if value > 0 else IDF_FLOOR


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
    (  # search: a tsvector of SQLite's own tokens (search_vector), filled by every write
        "ALTER TABLE memories ADD COLUMN search tsvector NOT NULL DEFAULT ''::tsvector,"
        " ADD COLUMN search_len integer NOT NULL DEFAULT 0",
        "CREATE INDEX memories_search ON memories USING gin (search)",
        "%(fill_search)s",  # the memories already there, indexed in Python
        BM25_FUNCTION,
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
LOCK_KEYS = ("SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
             " FROM unnest(%s::text[]) AS k) AS locks ORDER BY h")
# list: the page's rows are chosen from their sizes first (octet_length does not detoast a
# value), then only those are read, both in one snapshot: a page never reads more than
# max_page_bytes of values (plus one memory), as kvmem's _page_rows does.
STORED_BYTES = "octet_length(value) + octet_length(key) + octet_length(tags)"
EXPIRED_PG = _pg_sql(kvmem.EXPIRED)
LIVE_PG = _pg_sql(kvmem.LIVE)
NAMESPACE_COUNTS = (f"SELECT namespace, count(*) FILTER (WHERE {LIVE_PG}),"
                    f" count(*) FILTER (WHERE archived = 1 AND NOT {EXPIRED_PG})"
                    " FROM memories GROUP BY namespace ORDER BY namespace")
SELECT_MEMORY = _pg_sql(kvmem.SELECT_MEMORY)
EXPORT_FETCH = 500  # rows a round trip of export's server-side cursor
# Server settings read back at open; a server that could lose acknowledged commits on a
# crash of PostgreSQL itself (fsync or full_page_writes off) is refused.
CONNECT_TIMEOUT_S = 5  # libpq's connect_timeout: a host that does not answer

REPLAY_AGE = ("SELECT pg_is_in_recovery(),"
              " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8")
STANDBYS = ("SELECT application_name, state, sync_state, EXTRACT(EPOCH FROM replay_lag)::float8"
            " FROM pg_stat_replication ORDER BY application_name")
READ_SETTINGS = ("SELECT current_setting('server_version'), current_setting('fsync'),"
                 " current_setting('full_page_writes'), current_setting('synchronous_commit')")
CONFIGURE = ("SELECT set_config('synchronous_commit', 'on', false),"
             " set_config('lock_timeout', %s, false)")
# kvmem's synchronous levels on PostgreSQL: full and extra are synchronous_commit=on; no
# PostgreSQL level means what normal means in SQLite (synchronous_commit=off loses recent
# commits on a crash of the server, not only on power loss), so normal and off are refused.
SYNCHRONOUS_REFUSED = ("normal", "off")


# prune: each batch locks only rows no one else holds (SKIP LOCKED), so the decay passes
# of several servers run at once without waiting on each other or on writers; a row a
# writer holds is left for the next pass.
PRUNE_EXPIRED = (f"DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE {EXPIRED_PG}"
                 " LIMIT %s FOR UPDATE SKIP LOCKED)")
PRUNE_FADED = ("UPDATE memories SET archived = 1 WHERE id IN (SELECT id FROM memories"
               f" WHERE archived = 0 AND half_life_seconds IS NOT NULL AND {STRENGTH_PG} < %s"
               " LIMIT %s FOR UPDATE SKIP LOCKED)")
# forget: a window of the namespace in key order (scanned, matched or not).
FORGET_WINDOW = ("SELECT id, key FROM memories WHERE namespace = %s AND key >= %s"
                 " AND (key > %s OR %s) ORDER BY key LIMIT %s")


INSERT_WITH_SEARCH = _pg_sql(
    kvmem.INSERT_MEMORY.replace(") VALUES (", ", search, search_len) VALUES (")[:-1]
    + ", ?::tsvector, ?)")
UPDATE_PREFIX = "UPDATE memories SET "
UPDATE_WHERE = " WHERE id = ?"
FILL_SEARCH = "%(fill_search)s"
FILL_BATCH = 500


class _QmarkConnection:
    """kvmem's ``_write`` on a psycopg connection: it only calls ``execute(sql, params)``
    with ``?`` parameters.  (The shared ``Tx`` protocol of the design replaces this.)
    ``search``: the new (tsvector literal, length) when the write changes the key, value
    or tags; kvmem's INSERT and UPDATE then set the search columns in the same statement."""

    def __init__(self, conn: psycopg.Connection[Any],
                 search: tuple[str, int] | None = None) -> None:
        self._conn = conn
        self._search = search

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        if self._search is not None:
            if sql == kvmem.INSERT_MEMORY:
                return self._conn.execute(INSERT_WITH_SEARCH, [*parameters, *self._search])
            if sql.startswith(UPDATE_PREFIX) and sql.endswith(UPDATE_WHERE):
                sql = sql[:-len(UPDATE_WHERE)] + ", search = ?::tsvector, search_len = ?" + \
                    UPDATE_WHERE
                parameters = [*parameters[:-1], *self._search, parameters[-1]]
        return self._conn.execute(_pg_sql(sql), parameters)


_TEXT_COLUMNS = (kvmem._KEY, kvmem._VALUE, kvmem._TAGS)
_DUMP_OF = dict(kvmem._DUMPS)


def _new_search(row: Sequence[Any] | None, memory: Memory | None, value_json: str | None,
                current: Memory | None) -> tuple[str, int] | None:
    """The search columns of what kvmem's ``_write(row, memory, value_json, current)``
    stores, or None when it stores no new key, value or tags text (a delete, a reinforce):
    the same choice of text as ``_write`` makes."""
    if memory is None:
        return None
    texts = []
    for i in _TEXT_COLUMNS:
        new = getattr(memory, kvmem.MEMORY_COLUMNS[i])
        if i == kvmem._VALUE and value_json is not None:
            text = value_json
        elif row is not None and current is not None and \
                new is getattr(current, kvmem.MEMORY_COLUMNS[i]):
            text = row[i + 1]
        else:
            dump = _DUMP_OF.get(i)
            text = dump(new) if dump is not None else new
        texts.append(text)
    if row is not None and texts == [row[i + 1] for i in _TEXT_COLUMNS]:
        return None
    return search_vector(*texts)


def _write(conn: psycopg.Connection[Any], row: Sequence[Any] | None, memory: Memory | None,
           value_json: str | None = None, current: Memory | None = None) -> None:
    """kvmem's ``_write``, keeping the search columns in step with the text."""
    search = _new_search(row, memory, value_json, current)
    kvmem._write(cast(Any, _QmarkConnection(conn, search)), row, memory, value_json, current)


def _fill_search(conn: psycopg.Connection[Any]) -> None:
    """Migration 2: the search columns of the memories already stored, in batches."""
    last = 0
    while True:
        rows = conn.execute("SELECT id, key, value, tags FROM memories WHERE id > %s"
                            " ORDER BY id LIMIT %s", (last, FILL_BATCH)).fetchall()
        if not rows:
            return
        with conn.cursor() as cur:
            cur.executemany("UPDATE memories SET search = %s::tsvector, search_len = %s"
                            " WHERE id = %s",
                            [(*search_vector(key, value, tags), row_id)
                             for row_id, key, value, tags in rows])
        last = rows[-1][0]


def _lock_keys(conn: psycopg.Connection[Any], keys: Iterable[tuple[str, str]]) -> None:
    """Take the advisory lock of every (namespace, key), once each, in ascending order of
    the lock's own id (the hash), so that two transactions locking overlapping sets never
    deadlock.  pg_advisory_xact_lock is volatile: PostgreSQL evaluates it after the sort."""
    names = sorted({namespace + KEY_SEPARATOR + key for namespace, key in keys})
    if len(names) == 1:
        conn.execute(LOCK_KEY, (names[0],))
    elif names:
        conn.execute(LOCK_KEYS, (names,))


def _apply(conn: psycopg.Connection[Any], op: Op, now: float, *, locked: bool = False) -> Any:
    """Run one op in the caller's transaction: lock its key (unless ``locked``: the caller
    did), load its row FOR UPDATE, plan, write what the plan says (kvmem's ``_write``); the
    op's outcome."""
    if not locked:
        _lock_keys(conn, [(op.namespace, op.key)])
    row = conn.execute(GET_ROW_FOR_UPDATE, (op.namespace, op.key)).fetchone()
    current = None if row is None else kvmem._row_memory(row, value=op.reads_value)
    after, outcome = op.plan(current, now)
    _write(conn, row, after, getattr(op, "value_json", None), current)
    return outcome


def _put_exact(conn: psycopg.Connection[Any], memories: Sequence[Memory]) -> int:
    """Store memories exactly as given (the import op), replacing any with the same key;
    every key locked first, in sorted order."""
    _lock_keys(conn, [(m.namespace, m.key) for m in memories])
    for m in memories:
        row = conn.execute(GET_ROW_FOR_UPDATE, (m.namespace, m.key)).fetchone()
        _write(conn, row, m)
    return len(memories)


def _filters_sql(filters: Filters) -> tuple[str, builtins.list[Any]]:
    """kvmem's ``Filters.sql`` for PostgreSQL: `` AND ...`` conditions on memories."""
    sql, params = "", builtins.list[Any]()
    if filters.prefix:  # C collation: the key index serves the range
        sql += " AND key >= %s AND starts_with(key, %s)"
        params += [filters.prefix, filters.prefix]
    if filters.tags:  # all of them: containment of the JSON array
        sql += " AND tags::jsonb @> %s::jsonb"
        params.append(json.dumps(builtins.list(filters.tags), ensure_ascii=False))
    if filters.updated_after is not None:
        sql += " AND updated_at > %s"
        params.append(filters.updated_after)
    if filters.updated_before is not None:
        sql += " AND updated_at < %s"
        params.append(filters.updated_before)
    return sql, params


def _page_ids(sizes: Sequence[tuple[int, int]], limit: int,
              max_bytes: int) -> tuple[builtins.list[int], bool]:
    """kvmem's ``_page_rows`` rule on (id, stored bytes) in key order: at most ``limit``,
    fewer once past ``max_bytes`` (at least one); the ids, and whether more follow."""
    ids: builtins.list[int] = []
    size = 0
    for row_id, row_bytes in sizes:
        size += row_bytes
        if len(ids) == limit or (ids and size > max_bytes):
            return ids, True
        ids.append(row_id)
    return ids, False


_R = TypeVar("_R")


class _Counter:
    """A count that threads add to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def increment(self) -> None:
        with self._lock:
            self.value += 1


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql (unparsable DSN)"
    host, port, dbname = (parts.get(k, "") for k in ("host", "port", "dbname"))
    return f"postgresql://{host or 'localhost'}{':' + str(port) if port else ''}/{dbname or ''}"


# ============================================================================= store ====


class PgStore(kvmem.BaseStore):
    """kvmem's Store on PostgreSQL: ``kvmem.BaseStore``'s methods, arguments, results and
    errors (its checks and the model's rules are written there once), on the storage here.

    Thread-safe: each call takes a connection from the pool.  Writes return after their
    COMMIT (``synchronous_commit=on``).  Times come from ``clock`` (Unix seconds).  Open
    with ``PgStore.open(dsn)``; ``close()`` (or ``with``) closes the pool."""

    def __init__(self, dsn: str, config: Config, *, clock: Callable[[], float] = time.time,
                 role: str = "library", pool_size: int = 10, decay: bool = False,
                 create: bool = True) -> None:
        if config.synchronous in SYNCHRONOUS_REFUSED:
            raise ConfigError(
                f"synchronous={config.synchronous!r} has no honest PostgreSQL mapping "
                "(synchronous_commit=off loses acknowledged writes when PostgreSQL crashes); "
                "use full or extra, which are synchronous_commit=on")
        self.dsn, self.config, self.clock, self.role = dsn, config, clock, role
        self.where = describe_dsn(dsn)
        self.path = self.where  # as kvmem.Store.path: what logs and stats show
        self._decay: kvmem.DecayScheduler | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._interrupted = threading.Event()  # interrupt(): forget ends at its next batch
        self._last_prune: PruneResult | None = None
        self._commits = _Counter()  # transactions committed by this store (stats)
        timeout = config.busy_timeout_ms / 1000
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, timeout=max(timeout, 0.001), open=False,
            configure=self._configure, check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            name=f"kvmem {self.where}")
        try:  # one connection first: its error says why (the pool's only says it timed out)
            psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as exc:
            # libpq's message spans lines, and may quote the DSN (with its password)
            reason = " ".join(str(exc).split()).replace(dsn, self.where)
            if isinstance(exc, psycopg.ProgrammingError):  # an invalid connection string
                raise ConfigError(f"{self.where}: {reason}") from None
            raise StorageError(f"{self.where}: cannot connect: {reason}") from None
        try:
            self._pool.open(wait=True, timeout=max(timeout, 5.0))
        except PoolTimeout as exc:
            self._pool.close()
            raise StorageError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            self.server_settings = self._check_settings()
            self._migrate(create)
            self._cursor_secret = self._read_cursor_secret()
            if decay:
                self._decay = kvmem.DecayScheduler(self, role=role).start()
        except BaseException:
            self._pool.close()
            raise

    @classmethod
    def open(cls, dsn: str, *, config: Config | None = None,
             clock: Callable[[], float] = time.time, role: str = "library",
             pool_size: int = 10, decay: bool = False, create: bool = True) -> PgStore:
        """Connect to ``dsn`` (a ``postgresql://`` URL or a libpq key=value string),
        migrate the schema, and return the store (with a ``kvmem.DecayScheduler`` running
        ``prune`` when ``decay``; every server may run one).  ``create=False``: refuse a
        database without kvmem's tables (NotFoundError) instead of creating them.  Raises
        ConfigError (a refused
        synchronous level or server setting), SchemaTooNewError, StorageError (no
        connection), BusyError."""
        return cls(dsn, config or Config.build(), clock=clock, role=role, pool_size=pool_size,
                   decay=decay, create=create)

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
        if self._decay is not None:
            self._decay.stop()
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
                    self._commits.increment()
                    return result
            except psycopg.Error as exc:
                remaining = deadline - time.monotonic()
                if exc.sqlstate in RETRY_STATES and remaining > 0 and not committing:
                    attempt += 1
                    # Jittered backoff, as kvmem.transaction() does on SQLITE_BUSY.
                    time.sleep(min(remaining, random.uniform(0, min(0.1, 0.002 * 2 ** attempt))))
                    continue
                raise _pg_error(exc, self.where, committing=committing) from exc

    def _snapshot(self, fn: Callable[[psycopg.Connection[Any]], _R]) -> _R:
        """Run ``fn`` in one REPEATABLE READ READ ONLY transaction: every statement sees the
        same snapshot (kvmem's export, and a list page's two statements)."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return fn(conn)
        except psycopg.Error as exc:
            raise _pg_error(exc, self.where) from exc

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

    def _migrate(self, create: bool) -> None:
        """Bring the schema to SCHEMA_VERSION, one step a transaction, under the migration
        lock; SchemaTooNewError (nothing touched) when a newer kvmem wrote it.  A schema
        already current is only read (so a read-only standby opens too).  Without
        ``create``, a database without kvmem's tables is a NotFoundError, left as it is."""
        try:
            with self._pool.connection() as conn:
                row = conn.execute("SELECT version FROM kvmem_version").fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        except psycopg.Error as exc:
            raise _pg_error(exc, self.where) from exc
        if row is not None and int(row[0]) == SCHEMA_VERSION:
            return
        if row is None and not create:
            raise kvmem.NotFoundError(f"no kvmem database at {self.where} (no kvmem tables "
                                      "there; kvmem set or import creates them)")
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
            if statement == FILL_SEARCH:
                _fill_search(conn)
            elif "%(secret)s" in statement:
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

    def apply(self, op: Op) -> Any:
        """Run one op in its own transaction; its outcome once COMMIT returned."""
        op = op.checked_for(self.config)
        return self._transact(lambda conn: _apply(conn, op, self.clock()))

    def _batch(self, ops: builtins.list[SetOp | DeleteOp]) -> builtins.list[dict[str, Any]]:
        """Every key's advisory lock first, in one sorted order (no deadlock between
        batches), then the ops in order, in one transaction."""

        def run(conn: psycopg.Connection[Any]) -> builtins.list[dict[str, Any]]:
            _lock_keys(conn, [(op.namespace, op.key) for op in ops])
            now = self.clock()
            return kvmem.batch_results(ops, lambda op: _apply(conn, op, now, locked=True))

        return self._transact(run)

    def _import_chunk(self, memories: builtins.list[Memory]) -> int:
        return self._transact(functools.partial(_put_exact, memories=memories))

    # -- decay and bulk deletes ----------------------------------------------------------

    def prune(self, now: float | None = None) -> PruneResult:
        """As ``kvmem.Store.prune``: delete expired memories, archive live ones whose
        current strength is below ``archive_threshold``, in transactions of at most
        ``prune_batch`` rows of each.  Rows are taken ``FOR UPDATE SKIP LOCKED``: servers
        pruning at once never wait on each other (nor on a writer: a row being written is
        left for the next pass)."""
        now = self.clock() if now is None else now
        threshold = self.config.archive_threshold
        limit = self.config.prune_batch

        def step(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            deleted = conn.execute(PRUNE_EXPIRED, (now, limit)).rowcount
            archived = conn.execute(PRUNE_FADED, (now, now, threshold, limit)).rowcount
            return max(deleted, 0), max(archived, 0)

        archived_total = deleted_total = batches = 0
        while True:
            deleted, archived = self._transact(step)
            archived_total += archived
            deleted_total += deleted
            batches += 1
            if deleted < limit and archived < limit:
                break
        result = PruneResult(archived_total, deleted_total, batches, now)
        self._last_prune = result
        return result

    def _forget_count(self, namespace: str, filters: Filters) -> tuple[int, builtins.list[str]]:
        where, params = _filters_sql(filters)

        def count(conn: psycopg.Connection[Any]) -> tuple[int, builtins.list[str]]:
            row = conn.execute(f"SELECT count(*) FROM memories WHERE namespace = %s{where}",
                               (namespace, *params)).fetchone()
            sample = conn.execute(f"SELECT key FROM memories WHERE namespace = %s{where}"
                                  " ORDER BY key LIMIT %s",
                                  (namespace, *params, kvmem.FORGET_SAMPLE)).fetchall()
            return (int(row[0]) if row else 0), [r[0] for r in sample]

        return self._snapshot(count)

    def _forget_window(self, namespace: str, filters: Filters,
                       last: str | None) -> tuple[builtins.list[str], str | None]:
        """The window's keys' advisory locks are taken in the same sorted order as writes
        and batches take theirs (so it never deadlocks with them)."""
        where, params = _filters_sql(filters)

        def step(conn: psycopg.Connection[Any]) -> tuple[builtins.list[str], str | None]:
            window = conn.execute(FORGET_WINDOW, (namespace, filters.prefix or "", last or "",
                                                  last is None,
                                                  self.config.prune_batch)).fetchall()
            if not window:
                return [], None
            _lock_keys(conn, [(namespace, key) for _, key in window])
            rows = conn.execute(f"DELETE FROM memories WHERE id = ANY(%s){where} RETURNING key",
                                ([row_id for row_id, _ in window], *params)).fetchall()
            # C collation: PostgreSQL's key order is code point order, as Python's.
            return sorted(r[0] for r in rows), window[-1][1]

        return self._transact(step)

    # -- state -------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The server's settings that kvmem checked at open (for start-up logs)."""
        return dict(self.server_settings)

    def stats(self) -> dict[str, Any]:
        """As ``kvmem.Store.stats``, what PostgreSQL has of it: the backend, the database
        (URL without password), the server (version, whether it is a standby, the settings
        checked at open), the pool's figures, replication (``replication()``), the counts
        (live, archived, expired not yet pruned), decay, the last prune, health, the
        configuration (token and password hidden) and the process id.  SQLite's file,
        checkpoint and group-commit figures have no counterpart here."""
        now = self.clock()

        def read(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
            row = conn.execute(
                f"SELECT count(*) FILTER (WHERE {LIVE_PG}),"
                f" count(*) FILTER (WHERE archived = 1 AND NOT {EXPIRED_PG}),"
                f" count(*) FILTER (WHERE {EXPIRED_PG}), current_setting('server_version'),"
                " pg_is_in_recovery() FROM memories", (now, now, now)).fetchone()
            assert row is not None
            return tuple(row)

        live, archived, expired, version, recovery = self._snapshot(read)
        return {
            "backend": "postgresql",
            "path": self.path,
            "server": {"version": version, "in_recovery": bool(recovery),
                       "settings": self.settings()},
            "pool": self._pool.get_stats(),
            "replication": self.replication(),
            "transactions": {"commits": self._commits.value},
            "counts": {"live": int(live), "archived": int(archived),
                       "expired_pending": int(expired)},
            "decay": self._decay.state() if self._decay else None,
            "last_prune": kvmem.prune_record(self._last_prune) if self._last_prune else None,
            "health": self.health(),
            "config": self.config.public(),
            "pid": os.getpid(),
        }

    def replication(self) -> dict[str, Any]:
        """On a primary, each streaming standby with its replay lag in seconds
        (``pg_stat_replication``; null when idle); on a standby, how old the last replayed
        transaction is (``pg_last_xact_replay_timestamp``)."""

        def read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            row = conn.execute(REPLAY_AGE).fetchone()
            if row is not None and row[0]:  # this server is a standby
                return {"role": "standby", "replay_age_s": row[1]}
            standbys = [{"name": name, "state": state, "sync_state": sync,
                         "replay_lag_s": lag}
                        for name, state, sync, lag in conn.execute(STANDBYS).fetchall()]
            return {"role": "primary", "standbys": standbys}

        return self._snapshot(read)

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "problems": [...], "past": {}}``, as ``kvmem.Store.health``.
        Problems now: the database does not answer a read (no connection within
        busy_timeout_ms, the server gone), the server is a standby (writes would fail),
        the decay thread failed."""
        problems = []
        failed = self._decay.state()["failed"] if self._decay is not None else None
        if failed:
            problems.append(f"decay failed: {failed}")
        try:
            self.get("healthz-probe", namespace="kvmem-health")  # the database answers
            row = self._read("SELECT pg_is_in_recovery()", ())
            if row is not None and row[0]:
                problems.append(f"{self.where} is a standby (in recovery): writes fail with "
                                "read_only until it is promoted")
        except KvmemError as exc:
            problems.append(f"{exc.code}: {exc}")
        return {"ok": not problems, "problems": problems, "past": {}}

    # -- reads -------------------------------------------------------------------------

    def get(self, key: str, *, namespace: str = "default") -> Memory | None:
        """The live memory, or None (absent, expired or archived).  Never writes."""
        namespace = kvmem.validate_namespace(namespace, self.config)
        key = kvmem.validate_key(key, self.config)
        row = self._read(GET_LIVE, (namespace, key, self.clock()))
        return None if row is None else kvmem._row_memory(row)

    def _list_rows(self, namespace: str, filters: Filters, archived: bool, limit: int,
                   after: str | None) -> tuple[builtins.list[Any], bool]:
        """Page chosen by octet_length in one REPEATABLE READ snapshot."""
        where = f" WHERE namespace = %s AND archived = %s AND NOT {EXPIRED_PG}"
        params: builtins.list[Any] = [namespace, int(archived), self.clock()]
        if after is not None:
            where += " AND key > %s"
            params.append(after)
        more_where, more_params = _filters_sql(filters)
        where += more_where + " ORDER BY key LIMIT %s"
        params += [*more_params, limit + 1]

        def page(conn: psycopg.Connection[Any]) -> tuple[builtins.list[Any], bool]:
            sizes = conn.execute(f"SELECT id, {STORED_BYTES} FROM memories" + where,
                                 params).fetchall()
            ids, more = _page_ids(sizes, limit, self.config.max_page_bytes)
            rows = conn.execute(SELECT_MEMORY + " WHERE id = ANY(%s) ORDER BY key",
                                (ids,)).fetchall()
            return rows, more

        return self._snapshot(page)

    def namespaces(self) -> builtins.list[dict[str, Any]]:
        """As ``kvmem.Store.namespaces``: every namespace holding a live or archived memory,
        in name order, with both counts (expired ones not yet pruned are not counted)."""
        now = self.clock()
        rows = self._snapshot(lambda conn: conn.execute(NAMESPACE_COUNTS, (now, now)).fetchall())
        return [{"namespace": name, "live": live, "archived": archived}
                for name, live, archived in rows if live or archived]

    def _search(self, terms: builtins.list[str], namespaces: tuple[str, ...] | None,
                filters: Filters, limit: int) -> builtins.list[Hit]:
        """``kvmem.BaseStore.search`` on PostgreSQL: the same words (SQLite's tokenizer, see
        ``search_vector``), filters, namespaces and limits; best first by BM25 (FTS5's, with
        BM25_WEIGHTS, in ``kvmem_bm25``) × current strength, so the order matches SQLite's
        (the scores are close, not identical: a phrase's frequency is its rarest token's).
        A word in at least half of all memories weighs nothing when the query has other
        words; memories holding only such words come after the others, score 0.  One
        REPEATABLE READ snapshot; InvalidInputError past ``search_timeout_ms``
        (statement_timeout)."""
        now = self.clock()
        phrases = {term: phrase for term in terms if (phrase := query_phrase(term))[0]}
        if not phrases:  # no word FTS5 would index: SQLite matches nothing either
            return []
        scope, scope_params = _filters_sql(filters)
        scope = f" AND {LIVE_PG}" + scope
        scope_params = [now, *scope_params]
        if namespaces is not None:
            scope += " AND namespace = ANY(%s)"
            scope_params.append(builtins.list(namespaces))
        timeout_ms = self.config.search_timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000

        def ranked(conn: psycopg.Connection[Any], chosen: Sequence[str], idfs: Sequence[float],
                   avgdl: float, limit: int) -> builtins.list[tuple[int, float]]:
            if time.monotonic() > deadline:
                raise psycopg.errors.QueryCanceled("search_timeout_ms passed")
            term_of, stems, prefixes, sizes = [], [], [], []
            for n, term in enumerate(chosen, 1):
                words, star = phrases[term]
                for i, stem in enumerate(words):
                    term_of.append(n)
                    stems.append(stem)
                    prefixes.append(star and i == len(words) - 1)
                sizes.append(len(words))
            tsquery = " | ".join(f"({tsquery_phrase(*phrases[term])})" for term in chosen)
            rows = conn.execute(
                SEARCH_RANKED + scope + " ORDER BY score DESC, id LIMIT %s",
                [term_of, stems, prefixes, sizes, builtins.list(idfs), avgdl, now, now,
                 tsquery, *scope_params, limit]).fetchall()
            return [(int(row_id), float(score)) for row_id, score in rows]

        def run(conn: psycopg.Connection[Any]) -> builtins.list[Any]:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",))
            count_row = conn.execute(SEARCH_TOTALS).fetchone()
            assert count_row is not None
            total, avgdl = int(count_row[0]), max(float(count_row[1]), 1.0)
            half = total // 2 + total % 2
            cap = max(half, kvmem.BOUND_CANDIDATES)
            counts = {}
            for term in phrases:
                counted = conn.execute(COUNT_MATCHES, (tsquery_phrase(*phrases[term]),
                                                       cap)).fetchone()
                counts[term] = int(counted[0]) if counted else 0
            kept = [term for term in phrases if counts[term] < half] or builtins.list(phrases)
            best = ranked(conn, kept, [idf(total, counts[t]) for t in kept], avgdl, limit)
            if len(best) < limit and len(kept) < len(phrases):
                found = {row_id for row_id, _ in best}
                everything = builtins.list(phrases)
                rest = ranked(conn, everything, [idf(total, counts[t]) for t in everything],
                              avgdl, limit + len(best))
                best += [(row_id, 0.0) for row_id, _ in rest
                         if row_id not in found][:limit - len(best)]
            ids = [row_id for row_id, _ in best]
            sizes = dict(conn.execute(f"SELECT id, {STORED_BYTES} FROM memories"
                                      " WHERE id = ANY(%s)", (ids,)).fetchall())
            page, _ = _page_ids([(i, sizes[i]) for i in ids if i in sizes], limit,
                                self.config.max_page_bytes)
            rows = {row[0]: row for row in conn.execute(SELECT_MEMORY + " WHERE id = ANY(%s)",
                                                        (page,)).fetchall()}
            scores = dict(best)
            return [Hit(kvmem._row_memory(rows[i]), scores[i]) for i in page if i in rows]

        try:
            return self._snapshot(run)
        except StorageError as exc:
            if isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
                raise InvalidInputError(
                    f"search stopped after {timeout_ms} ms "
                    "(search_timeout_ms): use fewer or rarer words, or narrow it with "
                    "namespace, tags, prefix or time filters") from exc
            raise

    def export(self, fp: IO[str], *, namespace: str | None = None) -> int:
        """As ``kvmem.Store.export``: every memory (archived and expired too) as JSON Lines
        of ``Memory.to_record()``, from one snapshot, streamed by a server-side cursor; the
        lines written."""
        if namespace is not None:
            namespace = kvmem.validate_namespace(namespace, self.config)
        sql = SELECT_MEMORY + (" WHERE namespace = %s" if namespace else "") + \
            " ORDER BY namespace, key"

        def run(conn: psycopg.Connection[Any]) -> int:
            count = 0
            with conn.cursor(name="kvmem_export") as rows:
                rows.itersize = EXPORT_FETCH
                rows.execute(sql, (namespace,) if namespace else ())
                for row in rows:
                    fp.write(json.dumps(kvmem._row_memory(row).to_record(), ensure_ascii=False,
                                        allow_nan=False) + "\n")
                    count += 1
            return count

        return self._snapshot(run)
