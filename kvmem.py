"""kvmem: a durable key-value memory store for AI agents, in one SQLite file.

Theory of operation
-------------------
* One file, many processes.  The HTTP server, every MCP server and any library user may
  have the same database open at once.  Nothing here assumes exactly one or two of them.
* Rules in one place.  The memory model is pure code with ``now`` as a parameter: a
  ``Memory``'s fields drive its columns, its rendering and its schema, and each write is
  an op (``SetOp``, ``DeleteOp``, ``ReinforceOp``) whose ``plan`` takes the stored memory
  to the next one.  Storage loads a row, calls the plan and writes through ``_write``.
* Connections.  Every connection in every process comes from ``open_db()``; it checks the
  file's header before the process's first connection to it, applies ``PRAGMAS``, reads
  every setting back, switches to WAL (retrying the switch, which can fail at once when
  several processes race on a fresh file), migrates the schema by ``PRAGMA user_version``
  and, on the first open in a process, logs the recovery record.  A connection belongs
  to one thread (``check_same_thread`` stays on).
* Errors.  A ``KvmemConnection`` and its cursors raise kvmem's errors: ``sqlite3.Error``
  becomes a ``KvmemError`` subclass in ``_db_error()``, by ``sqlite_errorcode``, never by
  message text.
* Transactions.  Every write runs inside ``transaction()``: ``BEGIN IMMEDIATE`` (a
  deferred read-then-write gets SQLITE_BUSY at once, without the busy handler, because
  SQLite cannot upgrade a read snapshot another writer made stale), short jittered
  retries until a deadline, then ``BusyError``.  Nothing is acknowledged before its
  COMMIT returned.
* Checkpoints.  SQLite < 3.51.3 can corrupt a WAL database when a checkpoint and a WAL
  reset by another connection meet (the WAL-reset bug).  Two rules keep them apart.  One
  connection in the whole system checkpoints: the ``Checkpointer`` threads of all
  processes elect a holder through an ``flock`` on ``<db>.checkpoint.lock``, and the
  holder's process checkpoints on its group-commit writer connection, between groups (so
  that its next write restarts the WAL, as SQLite's own autocheckpoint does).  And every
  checkpoint runs while a second connection of that process holds the write lock
  (``checkpoint_wal``), so no connection can write, and so reset the WAL, meanwhile.
  Writers never sleep to make room; work after a COMMIT is logged and counted, never
  raised.  Past the hard cap with the holder stuck, writers checkpoint themselves (under
  the same write-lock rule) and health says so.
* Files.  This module never ``open()``s the database, ``-wal`` or ``-shm`` while it has a
  connection to it: closing any descriptor of a file drops every POSIX lock the process
  holds on it, which lets a second writer in.  Sizes come from ``os.stat()``.

The file reads top to bottom: errors, configuration, the pure core (validation, the
model, ops, checkpoint decisions), storage (schema, connections, transactions,
checkpoints), group commit, the Store, background threads.  The CLI is ``kvmem_cli.py``.
"""

from __future__ import annotations

import base64
import builtins
import collections
import contextlib
import dataclasses
import datetime
import difflib
import fcntl
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, ClassVar, ParamSpec, Protocol, Self, TypeVar

__all__ = [  # noqa: RUF022 (grouped: errors, the model, storage, the store)
    "KvmemError", "InvalidInputError", "PayloadTooLargeError", "ConfigError", "NotFoundError",
    "VersionConflictError", "BusyError", "StorageFullError", "ReadOnlyError", "StorageError",
    "NotADatabaseError", "CorruptDatabaseError", "SchemaTooNewError",
    "Config", "Memory", "Op", "SetOp", "DeleteOp", "ReinforceOp", "Page", "Hit", "PruneResult",
    "open_db", "transaction", "KvmemConnection", "GroupCommitter", "Checkpointer",
    "DecayScheduler", "Store",
]

log = logging.getLogger("kvmem")
recovery_log = logging.getLogger("kvmem.recovery")
checkpoint_log = logging.getLogger("kvmem.checkpoint")
decay_log = logging.getLogger("kvmem.decay")


# ============================================================================ errors ====


class KvmemError(Exception):
    """Root of every error kvmem raises on purpose.  ``code`` is stable; edges map it."""
    code = "internal"


class InvalidInputError(KvmemError):
    """The caller passed something kvmem does not accept.  Nothing was changed."""
    code = "invalid_request"


class PayloadTooLargeError(InvalidInputError):
    """A value (or request) is larger than the configured limit."""
    code = "payload_too_large"


class ConfigError(InvalidInputError):
    """A setting has a bad value; the message names the variable or flag."""
    code = "invalid_config"


class NotFoundError(KvmemError):
    """The memory (or file) asked for does not exist."""
    code = "not_found"


class VersionConflictError(KvmemError):
    """A compare-and-set failed: ``current_version`` is what the store holds (0 = absent);
    in a batch, ``op_index`` is the op that failed (and nothing of the batch was applied)."""
    code = "version_conflict"

    def __init__(self, message: str, *, current_version: int, op_index: int | None = None,
                 key: str | None = None) -> None:
        super().__init__(message)
        self.current_version, self.op_index, self.key = current_version, op_index, key


class BusyError(KvmemError):
    """The database stayed locked by another writer past the deadline.  Retry later."""
    code = "busy"


class IndexRebuildingError(BusyError):
    """Search is not available yet: the search index is being rebuilt after an upgrade
    (``IndexBuilder``).  Retry in a moment; every other operation works meanwhile."""


class StorageFullError(KvmemError):
    """SQLITE_FULL: the disk (or max_page_count) is full.  Reads keep working."""
    code = "storage_full"


class ReadOnlyError(KvmemError):
    """SQLITE_READONLY: the file or its directory cannot be written."""
    code = "read_only"


class StorageError(KvmemError):
    """Any other failure of the database file or the disk under it (I/O, can't open)."""
    code = "storage_error"


class NotADatabaseError(KvmemError):
    """The file exists but is not an SQLite database; kvmem never writes to it."""
    code = "not_a_database"


class CorruptDatabaseError(KvmemError):
    """SQLite found the database malformed; kvmem never repairs or rewrites it itself."""
    code = "corrupt_database"


class SchemaTooNewError(KvmemError):
    """The file was written by a newer kvmem; it is left untouched."""
    code = "schema_too_new"


# Primary result codes (the low byte of sqlite_errorcode) -> the error raised for them.
_ERROR_BY_CODE: dict[int, type[KvmemError]] = {
    sqlite3.SQLITE_BUSY: BusyError, sqlite3.SQLITE_LOCKED: BusyError,
    sqlite3.SQLITE_FULL: StorageFullError, sqlite3.SQLITE_READONLY: ReadOnlyError,
    sqlite3.SQLITE_PERM: ReadOnlyError, sqlite3.SQLITE_NOTADB: NotADatabaseError,
    sqlite3.SQLITE_CORRUPT: CorruptDatabaseError, sqlite3.SQLITE_IOERR: StorageError,
    sqlite3.SQLITE_CANTOPEN: StorageError,
}


def _db_error(exc: sqlite3.Error, path: str) -> KvmemError:
    """The one place that turns an ``sqlite3.Error`` into a kvmem error, by error code."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    cls = StorageError if code is None else _ERROR_BY_CODE.get(code & 0xFF, StorageError)
    return cls(f"{path}: {name}: {exc}")


# ===================================================================== configuration ====

SYNCHRONOUS_LEVELS = {"off": 0, "normal": 1, "full": 2, "extra": 3}
JOURNAL_MODES = ("wal", "delete")
MIN_SQLITE_WITHOUT_WAL_RESET_BUG = (3, 51, 3)


def default_db_path(environ: Mapping[str, str]) -> str:
    """``$KVMEM_DB``, else ``$XDG_DATA_HOME/kvmem/memory.db``, else ``~/.local/share/...``.
    Never relative to the working directory: an MCP client starts the server from a
    directory nobody chose, and every process must land on the same file."""
    if environ.get("KVMEM_DB"):
        if is_postgres(environ["KVMEM_DB"].strip()):
            return environ["KVMEM_DB"].strip()
        return os.path.abspath(os.path.expanduser(environ["KVMEM_DB"]))
    xdg = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        xdg = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "kvmem", "memory.db")


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.strip().lower()
    return parse


def _parse_number(kind: type[int] | type[float], *, minimum: float,
                  maximum: float = math.inf) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"must be a finite number >= {minimum:g}")
        if value > maximum:
            raise ValueError(f"must be at most {maximum:g}")
        return value
    return parse


# The words a boolean setting or parameter takes, in any case (settings, HTTP queries).
BOOLEAN_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True,
                 "no": False, "on": True, "off": False}


def _parse_bool(text: str) -> bool:
    value = BOOLEAN_WORDS.get(text.strip().lower())
    if value is None:
        raise ValueError(f"must be one of {', '.join(BOOLEAN_WORDS)}")
    return value


_ORIGIN = re.compile(r"https?://[^\s/?#@,]+")


def _parse_origins(text: str) -> str:
    """Browser origins (scheme://host[:port]), comma-separated, each as a browser sends it
    in ``Origin``: scheme and host in lower case, no default port."""
    origins = []
    for part in filter(None, (p.strip().rstrip("/") for p in text.split(","))):
        bad = ValueError(f"{part[:100]!r} is not an origin like https://app.example.com")
        if not _ORIGIN.fullmatch(part.lower()):
            raise bad
        try:
            split = urllib.parse.urlsplit(part)
            port = split.port
        except ValueError:  # a port that is no number, or past 65535
            raise bad from None
        host = split.hostname or ""
        if not host or port == 0:
            raise bad
        scheme = split.scheme.lower()
        shown = f"[{host}]" if ":" in host else host
        if port is not None and port != {"http": 80, "https": 443}[scheme]:
            shown += f":{port}"
        origins.append(f"{scheme}://{shown}")
    return ",".join(origins)


def _parse_optional_seconds(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "never"):
        return None
    return float(_parse_number(float, minimum=0.001)(text))


_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# A --db with one of these schemes is a PostgreSQL database, served by kvmem_pg (which this
# module never imports): a libpq URL, https://www.postgresql.org/docs/current/libpq-connect.html
POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres(db: str) -> bool:
    """Whether ``db`` (``Config.db``) is a PostgreSQL URL rather than a file's path."""
    url = _URL.match(db)
    return url is not None and url[1].lower() in POSTGRES_SCHEMES


def redact_db(db: str) -> str:
    """``db`` fit for logs and stats: a URL's password, in its user part or as a
    ``password=`` parameter, replaced by ``***``."""
    if not is_postgres(db):
        return db
    try:
        split = urllib.parse.urlsplit(db)
    except ValueError:
        return db.partition("://")[0] + "://(not a valid URL)"
    userinfo, at, hosts = split.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    parts = [f"{part.partition('=')[0]}=***"
             if urllib.parse.unquote(part.partition("=")[0]).strip().lower() == "password"
             else part for part in split.query.split("&")]
    shown = split._replace(netloc=userinfo + at + hosts, query="&".join(parts))
    return db if shown == split else urllib.parse.urlunsplit(shown)


def _parse_path(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    url = _URL.match(text.strip())
    if url and url[1].lower() in POSTGRES_SCHEMES:
        try:  # (a bracket left open; libpq's several host:port pairs are fine)
            urllib.parse.urlsplit(text.strip())
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        return url[1].lower() + text.strip()[len(url[1]):]  # libpq takes lowercase only
    if url:  # it would be a file under a directory named "sqlite:" in the working dir
        raise ValueError(f"{url[1]}:// is not a database kvmem can open: give the path of "
                         "an SQLite file or a postgresql:// URL")
    return os.path.abspath(os.path.expanduser(text))


def _setting(default: Any, parse: Callable[[str], Any], help: str, *, env: str = "",
             flag: str = "", repeat: bool = False) -> Any:
    """A Config field; ``repeat``: a comma-separated list whose flag may also be repeated."""
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help,
                                                        "env": env, "flag": flag,
                                                        "repeat": repeat})


_INT, _FLOAT = functools.partial(_parse_number, int), functools.partial(_parse_number, float)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of kvmem, for the library, both servers and the CLI, built by
    ``Config.build()``.  A field's environment variable is ``KVMEM_<FIELD>`` and its flag
    ``--<field-with-dashes>`` unless named otherwise below."""

    db: str = _setting("", _parse_path, "database file, or a postgresql:// URL (needs "
                       "kvmem[postgres])", env="KVMEM_DB", flag="--db")
    journal_mode: str = _setting("wal", _parse_choice(*JOURNAL_MODES), "wal or delete")
    synchronous: str = _setting("extra", _parse_choice(*SYNCHRONOUS_LEVELS), "off, normal, full "
                                "or extra (only full and extra keep acknowledged writes through "
                                "power loss)")
    busy_timeout_ms: int = _setting(5000, _INT(minimum=0), "SQLite's wait for locks; also "
                                    "the default deadline of transaction()")
    cache_size_kib: int = _setting(64000, _INT(minimum=1), "page cache of the writer "
                                   "connection")
    read_connections: int = _setting(8, _INT(minimum=1), "most read connections a process "
                                     "has open at once; more readers wait for one (up to "
                                     "busy_timeout_ms, then busy)")
    read_cache_kib: int = _setting(4000, _INT(minimum=1), "page cache of each read connection")
    quick_check: bool = _setting(True, _parse_bool, "PRAGMA quick_check on a process's first open")
    checkpoint_interval_s: float = _setting(
        30.0, _FLOAT(minimum=0.01), "how long health keeps reporting a failed checkpoint or "
        "writers' fallback checkpoints after the last one")
    checkpoint_poll_s: float = _setting(1.0, _FLOAT(minimum=0.005), "how often the "
                                        "checkpointer looks at the WAL")
    checkpoint_pages: int = _setting(1000, _INT(minimum=1), "the elected writer checkpoints "
                                     "about every this many WAL frames")
    wal_cap_bytes: int = _setting(
        64 * 1024 * 1024, _INT(minimum=4096), "past half of this the checkpointer empties the "
        "WAL file (and half of it bounds the frames between two checkpoints); past 4x "
        "writers of other processes checkpoint themselves")
    reader_warn_s: float = _setting(30.0, _FLOAT(minimum=0.01), "log a read that holds its "
                                    "snapshot (so the WAL cannot restart) longer than this")
    decay_interval_s: float = _setting(300.0, _FLOAT(minimum=0.01), "seconds between prune passes")
    default_half_life_s: float | None = _setting(None, _parse_optional_seconds, "half-life of "
                                                 "new memories in seconds ('none' = they never "
                                                 "decay)")
    archive_threshold: float = _setting(0.05, _FLOAT(minimum=0.0), "prune archives memories "
                                        "whose current strength is below this")
    prune_batch: int = _setting(500, _INT(minimum=1), "rows per prune transaction")
    max_key_chars: int = _setting(512, _INT(minimum=1), "longest key")
    max_namespace_chars: int = _setting(64, _INT(minimum=1), "longest namespace")
    max_tags: int = _setting(32, _INT(minimum=0), "most tags on one memory")
    max_tag_chars: int = _setting(64, _INT(minimum=1), "longest tag")
    max_value_bytes: int = _setting(1024 * 1024, _INT(minimum=16), "largest value, as UTF-8 JSON")
    max_batch_ops: int = _setting(1000, _INT(minimum=1), "most ops in one batch")
    max_page_bytes: int = _setting(1024 * 1024, _INT(minimum=1), "a list page or a search "
                                   "answer stops once its memories (values, keys and tags "
                                   "as stored) pass this many bytes; it holds at least one")
    search_timeout_ms: int = _setting(2000, _INT(minimum=1), "a search still running after "
                                      "this long is stopped (invalid_request) and its read "
                                      "ended")
    group_commit_max: int = _setting(256, _INT(minimum=1), "most writes the group committer "
                                     "puts in one transaction")
    token: str = _setting("", str, "bearer token that kvmem-http and kvmem-mcp's "
                          "streamable HTTP require ('' = no auth; only on loopback)")
    host: str = _setting("127.0.0.1", str, "bind address of kvmem-http and of kvmem-mcp's "
                         "streamable HTTP")
    port: int = _setting(8765, _INT(minimum=0, maximum=65535), "kvmem-http's port (0 = any "
                         "free port)")
    mcp_port: int = _setting(8766, _INT(minimum=0, maximum=65535), "port of kvmem-mcp's "
                             "streamable HTTP (0 = any free port)")
    allowed_hosts: str = _setting("", str, "Host names, comma-separated, that the HTTP "
                                  "servers answer to besides loopback ones and the bound "
                                  "address (a reverse proxy's, say)", flag="--allowed-host",
                                  repeat=True)
    http_max_connections: int = _setting(1000, _INT(minimum=1), "most client connections "
                                         "an HTTP server keeps open (also bounded by the "
                                         "process's file limit); past it the longest-idle "
                                         "one is closed, or new ones wait in the listen "
                                         "backlog")
    http_workers: int = _setting(32, _INT(minimum=1), "threads of kvmem-http that run requests")
    http_idle_timeout_s: float = _setting(30.0, _FLOAT(minimum=0.01), "an HTTP connection "
                                          "with no request for this long is closed")
    http_header_timeout_s: float = _setting(10.0, _FLOAT(minimum=0.01), "a request's line "
                                            "and headers must arrive within this")
    http_body_timeout_s: float = _setting(30.0, _FLOAT(minimum=0.01), "a request's body must "
                                          "arrive, and its response be taken, within this")
    http_buffer_bytes: int = _setting(8 * 1024 * 1024, _INT(minimum=1), "request bodies "
                                      "kvmem-http holds in memory at once; past it, requests "
                                      "wait their turn")
    cors_origins: str = _setting("", _parse_origins, "origins, comma-separated "
                                 "(https://app.example.com), whose pages may call kvmem-http "
                                 "from a browser (CORS); none by default", flag="--cors-origin",
                                 repeat=True)
    access_log: bool = _setting(True, _parse_bool, "kvmem-http logs one line per request "
                                "(logger kvmem.http.access, at INFO)")
    shutdown_grace_s: float = _setting(10.0, _FLOAT(minimum=0.0), "on SIGINT/SIGTERM, how "
                                       "long the HTTP servers let requests in flight finish")

    @property
    def wal_soft_cap_bytes(self) -> int:
        return self.wal_cap_bytes // 2

    @property
    def wal_hard_cap_bytes(self) -> int:
        return 4 * self.wal_cap_bytes

    @property
    def wal_pages(self) -> int:
        """WAL frames between the elected writer's checkpoints: checkpoint_pages, or
        fewer when the soft cap holds fewer (4 KiB pages, SQLite's default)."""
        return max(1, min(self.checkpoint_pages, (self.wal_soft_cap_bytes - 32) // 4120))

    @property
    def wal_keep_bytes(self) -> int:
        """What a restarting WAL file is cut back to (``journal_size_limit``): the frames
        of one checkpoint interval, so growth past it shows the WAL did not restart."""
        return 32 + self.wal_pages * 4120

    @property
    def synchronous_level(self) -> int:
        return SYNCHRONOUS_LEVELS[self.synchronous]

    @classmethod
    def build(cls, *, environ: Mapping[str, str] | None = None,
              flags: Mapping[str, str | None] | None = None) -> Config:
        """Defaults, then ``environ`` (default ``os.environ``), then ``flags`` (field names to
        raw command-line strings, ``None`` = not given, as ``kvmem_cli.add_config_arguments()``
        collects them).  A ConfigError names a bad value's source."""
        environ = os.environ if environ is None else environ
        flags = flags or {}
        for warning in unknown_variables(environ):
            if warning not in _WARNED:  # once a process: Config.build runs more than once
                _WARNED.add(warning)
                log.warning("%s", warning)
        values: dict[str, Any] = {"db": default_db_path(environ)}
        for field in dataclasses.fields(cls):
            for source, raw in ((env_name(field), environ.get(env_name(field))),
                                (flag_name(field), flags.get(field.name))):
                if raw is None or (field.name == "db" and source == "KVMEM_DB"
                                   and not raw.strip()):
                    continue  # an empty KVMEM_DB is not set (default_db_path())
                try:
                    values[field.name] = field.metadata["parse"](raw)
                except ValueError as exc:  # (a URL's password is not repeated)
                    shown = redact_db(raw.strip()) if field.name == "db" else raw
                    raise ConfigError(f"{source}={shown!r}: {exc}") from exc
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The settings as a dict, with the token hidden."""
        return {**dataclasses.asdict(self), "token": "set" if self.token else "",
                "db": redact_db(self.db)}


# KVMEM_* variables that no setting reads but the test suite does.
TEST_VARIABLES = ("KVMEM_TEST_REQUIRE_STRACE", "KVMEM_TEST_REQUIRE_POSTGRES", "KVMEM_TEST_SOAK")
_WARNED: set[str] = set()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``KVMEM_*`` variable that nothing reads (a misspelled
    ``KVMEM_SYNCRONOUS`` would otherwise leave the setting at its default, silently), naming
    the closest known one."""
    known = [env_name(field) for field in dataclasses.fields(Config)] + list(TEST_VARIABLES)
    warnings = []
    for name in sorted(environ):
        if name.startswith("KVMEM_") and name not in known:
            close = difflib.get_close_matches(name[6:], [k[6:] for k in known], n=1)
            warnings.append(f"{name} is not a kvmem setting and is ignored"
                            + (f" (did you mean KVMEM_{close[0]}?)" if close else ""))
    return warnings


def env_name(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata["env"] or "KVMEM_" + field.name.upper())


def flag_name(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata["flag"] or "--" + field.name.replace("_", "-"))


# ========================================================================= pure core ====
# No clock, no file, no socket below this line until "storage": ``now`` is a parameter.

NAMESPACE_RE = re.compile("[A-Za-z0-9._-]+")
INITIAL_STRENGTH = 1.0
MAX_STRENGTH = 1.0
REINFORCE_BOOST = 0.5
MAX_TTL_SECONDS = 100 * 365 * 86400.0
MAX_LIST_LIMIT = 1000
FORGET_SAMPLE = 100  # keys that forget() reports
MAX_SEARCH_LIMIT = 100
MAX_QUERY_CHARS = 1000
# bm25() column weights for (key, body, tags): a word in the key or a tag says more about
# a memory than the same word somewhere in its value.
BM25_WEIGHTS = (2.0, 1.0, 1.5)
CURSOR_VERSION = 2  # 2: signed with the database's cursor_secret (an HMAC)


# Unicode category Cc (C0 and C1 controls: NUL, newline, DEL, ...) is exactly these
# ranges; lone surrogates (Cs) cannot be stored as UTF-8 at all.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _has_control_chars(text: str) -> bool:
    return CONTROL_CHARS.search(text) is not None


def validate_key(key: object, config: Config) -> str:
    """A key: a string of 1..max_key_chars characters with no control characters."""
    if not isinstance(key, str):
        raise InvalidInputError(f"key must be a string, not {type(key).__name__}")
    if not 1 <= len(key) <= config.max_key_chars:
        raise InvalidInputError(f"key must be 1 to {config.max_key_chars} characters long "
                                f"(got {len(key)})")
    if _has_control_chars(key):
        raise InvalidInputError("key must not contain control characters")
    return key


def validate_namespace(namespace: object, config: Config) -> str:
    """A namespace: 1..max_namespace_chars of ``[A-Za-z0-9._-]``."""
    if not isinstance(namespace, str):
        raise InvalidInputError(f"namespace must be a string, not {type(namespace).__name__}")
    too_long = not 1 <= len(namespace) <= config.max_namespace_chars
    if too_long or not NAMESPACE_RE.fullmatch(namespace):
        raise InvalidInputError(f"namespace must be 1 to {config.max_namespace_chars} of "
                                f"A-Z a-z 0-9 . _ - (got {namespace[:80]!r})")
    return namespace


def validate_tags(tags: object, config: Config) -> list[str]:
    """Tags: a list of at most max_tags strings of 1..max_tag_chars characters with no
    control characters; duplicates are dropped, order kept.  ``None`` = no tags."""
    if tags is None:
        return []
    if not isinstance(tags, list | tuple):
        raise InvalidInputError(f"tags must be a list of strings, not {type(tags).__name__}")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not 1 <= len(tag) <= config.max_tag_chars:
            raise InvalidInputError(f"each tag must be a string of 1 to {config.max_tag_chars} "
                                    f"characters (got {repr(tag)[:80]})")
        if _has_control_chars(tag):
            raise InvalidInputError("tags must not contain control characters")
        if tag not in out:
            out.append(tag)
    if len(out) > config.max_tags:
        raise InvalidInputError(f"at most {config.max_tags} tags (got {len(out)})")
    return out


# Arrays and objects inside each other in one value: deeper ones are refused everywhere,
# so that what one interface stores every other can read back (the MCP SDK's JSON parser
# stops at 200 levels of a whole request, its serializer at about 250).
MAX_NESTING = 100


def _too_deep(value: object) -> bool:
    """Whether ``value`` nests lists/objects more than MAX_NESTING deep (level by level,
    so no recursion however deep it is)."""
    level = [value] if isinstance(value, dict | list | tuple) else []
    for _ in range(MAX_NESTING):
        level = [child for container in level
                 for child in (container.values() if isinstance(container, dict) else container)
                 if isinstance(child, dict | list | tuple)]
        if not level:
            return False
    return True


def encode_value(value: object, config: Config) -> str:
    """Any JSON value as compact JSON text, at most max_value_bytes of UTF-8 and
    MAX_NESTING levels deep; NaN and infinities are not JSON and are refused."""
    if _too_deep(value):
        raise InvalidInputError(f"value nests arrays/objects more than {MAX_NESTING} levels "
                                "deep")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"value is not representable as JSON: {exc}") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > config.max_value_bytes:
        raise PayloadTooLargeError(f"value is {size} bytes as JSON; the limit is "
                                   f"{config.max_value_bytes}")
    if _has_surrogates(text):
        raise InvalidInputError("value contains lone surrogates, which are not valid UTF-8")
    return text


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _number(name: str, *, integer: bool = False, low: float = -math.inf,
            high: float = math.inf, above: bool = False, optional: bool = False,
            hint: str = "") -> Callable[..., Any]:
    """A check for a finite number (an int if ``integer``: a float with no fraction, such
    as 2.0, is one in JSON) from ``low`` (exclusive if ``above``) to ``high``, as a float
    or int; ``None`` passes if ``optional``."""
    def check(value: object, config: Config | None = None) -> Any:
        if value is None and optional:
            return None
        given = value
        if integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        if (isinstance(value, bool) or not isinstance(value, int if integer else int | float)
                or not (isinstance(value, int) or math.isfinite(value))
                or not (low < value if above else low <= value) or value > high):
            bounds = "".join(f" {op} {bound:g}" for op, bound in (
                (">" if above else ">=", low), ("<=", high)) if math.isfinite(bound))
            shown = "a huge integer" if isinstance(given, int) and given.bit_length() > 128 \
                else repr(given)[:40] if isinstance(given, str) else str(given)[:40]
            raise InvalidInputError(f"{name} must be {'an integer' if integer else 'a number'}"
                                    f"{bounds}{' or null' if optional else ''}{hint}"
                                    f" (got {shown})")
        return value if integer else float(value)
    return check


# Versions fit SQLite's 64-bit INTEGER with room to count up; times are what RFC 3339 can
# show (up to the end of year 9999).
MAX_VERSION = 2 ** 62
MAX_TIME = 253402300799.0
validate_version = _number("if_version", integer=True, low=0, high=MAX_VERSION, optional=True,
                           hint="; 0 = only if absent")


def _time(name: str, *, optional: bool = False) -> Callable[..., Any]:
    """A check for a time in Unix seconds that RFC 3339 can show."""
    return _number(name, low=0, high=MAX_TIME, optional=optional)


def _seconds(name: str, hint: str = "") -> Callable[..., Any]:
    """A check for a positive number of seconds, at most MAX_TTL_SECONDS, or ``None``."""
    return _number(name, low=0, above=True, high=MAX_TTL_SECONDS, optional=True, hint=hint)


# half_life_seconds="default": the configured default_half_life_s (null: never decays).
DEFAULT_HALF_LIFE = "default"
_half_life_number = _seconds("half_life_seconds", hint=f' or "{DEFAULT_HALF_LIFE}"')


def validate_half_life(value: object, config: Config) -> float | None:
    if isinstance(value, str) and value == DEFAULT_HALF_LIFE:
        return config.default_half_life_s
    result: float | None = _half_life_number(value)
    return result


def validate_limit(value: object, maximum: int) -> int:
    limit: int = _number("limit", integer=True, low=1, high=maximum)(value)
    return limit


ALL_NAMESPACES = "*"
MAX_SEARCH_NAMESPACES = 100


RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def validate_time_bound(name: str, value: object) -> float | None:
    """A time filter: Unix seconds, or an RFC 3339 time with a zone (a leap second, :60,
    is the second after :59); ``None`` = none."""
    if isinstance(value, str):
        match = RFC3339.fullmatch(value)
        moment = None
        if match:
            minute, second, fraction, zone = match.groups()
            leap = second == "60"
            try:
                moment = datetime.datetime.fromisoformat(
                    f"{minute}:{'59' if leap else second}{fraction or ''}"
                    f"{'+00:00' if zone in 'Zz' else zone}")
            except ValueError:
                moment = None
        if moment is None:
            raise InvalidInputError(f"{name} must be Unix seconds or an RFC 3339 time with a "
                                    f"zone, such as 2026-01-31T12:00:00Z (got {value[:40]!r})")
        value = moment.timestamp() + (1 if leap else 0)
    result: float | None = _number(name, low=0, high=MAX_TIME, optional=True,
                                   hint=" (1970 to 9999)")(value)
    return result


def validate_prefix(prefix: object, config: Config) -> str | None:
    if prefix is None or prefix == "":
        return None
    if (not isinstance(prefix, str) or _has_control_chars(prefix)
            or len(prefix) > config.max_key_chars):
        raise InvalidInputError(f"prefix must be a string of at most {config.max_key_chars} "
                                "characters with no control characters")
    return prefix


@dataclasses.dataclass(frozen=True)
class Filters:
    """What ``list`` and ``search`` narrow to within their namespaces: memories holding
    every one of ``tags``, whose key starts with ``prefix``, updated after
    ``updated_after`` and before ``updated_before`` (Unix seconds, both exclusive)."""

    tags: tuple[str, ...] = ()
    prefix: str | None = None
    updated_after: float | None = None
    updated_before: float | None = None

    @classmethod
    def parse(cls, config: Config, *, tags: object = (), prefix: object = None,
              updated_after: object = None, updated_before: object = None) -> Filters:
        return cls(tuple(validate_tags(tags, config)),
                   validate_prefix(prefix, config),
                   validate_time_bound("updated_after", updated_after),
                   validate_time_bound("updated_before", updated_before))

    def sql(self, table: str) -> tuple[str, list[Any]]:
        """`` AND ...`` conditions on ``table`` (a memories alias), with their parameters."""
        sql, params = "", []
        if self.prefix:  # the key index serves the range; substr() makes it exact
            sql += f" AND {table}.key >= ? AND substr({table}.key, 1, ?) = ?"
            params += [self.prefix, len(self.prefix), self.prefix]
        for tag in self.tags:
            sql += f" AND EXISTS (SELECT 1 FROM json_each({table}.tags) WHERE value = ?)"
            params.append(tag)
        if self.updated_after is not None:
            sql += f" AND {table}.updated_at > ?"
            params.append(self.updated_after)
        if self.updated_before is not None:
            sql += f" AND {table}.updated_at < ?"
            params.append(self.updated_before)
        return sql, params

    def key(self) -> list[Any]:
        """The filters as JSON, for a list cursor (which is only good for the same ones)."""
        return [list(self.tags), self.prefix, self.updated_after, self.updated_before]


def filter_schemas(config: Config) -> dict[str, dict[str, Any]]:
    """The filters' JSON schemas (the HTTP query parameters and MCP arguments)."""
    when = ("Unix seconds, or an RFC 3339 time with a zone (2026-01-31T12:00:00Z); "
            "exclusive")
    time_bound = {"anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_TIME},
                            {"type": "string", "format": "date-time"}]}
    return {
        "tags": {"type": "array", "items": tag_schema(config), "maxItems": config.max_tags,
                 "description": "only memories holding every one of these tags"},
        "prefix": {"type": "string", "maxLength": config.max_key_chars, **TEXT,
                   "description": "only keys that start with this"},
        "updated_after": {**time_bound, "description": f"only memories updated after this: {when}"},
        "updated_before": {**time_bound,
                           "description": f"only memories updated before this: {when}"},
    }


def search_namespaces_schema(config: Config) -> dict[str, Any]:
    one = namespace_schema(config)
    return {"anyOf": [{**one, "description": "one namespace"},
                      {"const": ALL_NAMESPACES, "description": "every namespace"},
                      {"type": "array", "items": one, "minItems": 1,
                       "maxItems": MAX_SEARCH_NAMESPACES, "description": "these namespaces"}],
            "default": "default",
            "description": 'where to search: a namespace, a list of them, or "*" for all'}


def validate_search_namespaces(value: object, config: Config) -> tuple[str, ...] | None:
    """A search's namespaces: one, a list, or ALL_NAMESPACES (``None``: no restriction)."""
    if isinstance(value, str):
        return None if value == ALL_NAMESPACES else (validate_namespace(value, config),)
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_SEARCH_NAMESPACES:
        raise InvalidInputError(f'namespace must be a namespace, "{ALL_NAMESPACES}" (all), or a '
                                f"list of 1 to {MAX_SEARCH_NAMESPACES} namespaces")
    return tuple(dict.fromkeys(validate_namespace(n, config) for n in value))


def strength_at(strength: float, last_reinforced_at: float, half_life_seconds: float | None,
                now: float) -> float:
    """Current strength, ``strength × 2^(−(now − last_reinforced_at) / half_life)`` (none:
    no decay); time before the last reinforcement (a clock gone backwards) counts as 0."""
    if half_life_seconds is None:
        return strength
    elapsed = max(0.0, now - last_reinforced_at)
    return float(strength * 2.0 ** (-elapsed / half_life_seconds))


def reinforced_strength(strength: float, last_reinforced_at: float,
                        half_life_seconds: float | None, now: float) -> float:
    """The reinforce rule: the current strength plus REINFORCE_BOOST, at most MAX_STRENGTH;
    the caller also resets ``last_reinforced_at`` to ``now``."""
    current = strength_at(strength, last_reinforced_at, half_life_seconds, now)
    return min(MAX_STRENGTH, current + REINFORCE_BOOST)


def expires_at(ttl_seconds: float | None, now: float) -> float | None:
    return None if ttl_seconds is None else now + ttl_seconds


def search_score(bm25: float, current_strength: float) -> float:
    """Ranking score, higher is better: ``−bm25 × current strength``.  SQLite's bm25() (with
    BM25_WEIGHTS) is more negative for a better match; the strength (0..1) lets a
    well-reinforced memory outrank a fading one with the same text."""
    return -bm25 * current_strength


# -- search text: what is indexed and what is asked -----------------------------------------
#
# FTS5 (tokenizer INDEX_TOKENIZER) splits text into words at anything that is not a letter
# or digit, and stems English words (porter).  Chinese, Japanese and Korean are written
# without spaces, so a run of those characters would be one "word": before indexing, such a
# run becomes its overlapping pairs of characters plus its last character alone
# ("喜欢喝绿茶" -> "喜欢 欢喝 喝绿 绿茶 茶"), as Lucene's CJK analyzer does, and a query's
# CJK run becomes the same pairs.  Full-width forms (Ａ１！) count as their ASCII letters.
#
# index_text() must give the same text for the same input forever: the index is
# contentless, so a memory is removed from it by repeating what was indexed.  A change
# here is a new migration that rebuilds the index.
INDEX_TOKENIZER = "porter unicode61 remove_diacritics 2"
CJK_RUN = re.compile("[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
                     "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff"
                     "\uff66-\uff9f\U00020000-\U0003134f]+")
_FULL_WIDTH = {**{code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}, 0x3000: 0x20}


def _cjk_grams(run: str) -> str:
    if len(run) == 1:
        return f" {run} "
    return " " + " ".join(run[i:i + 2] for i in range(len(run) - 1)) + f" {run[-1]} "


def index_text(text: str) -> str:
    """``text`` as the index takes it: full-width forms as ASCII, CJK runs as pairs."""
    if text.isascii():  # neither full-width forms nor CJK: unchanged (the common case)
        return text
    return CJK_RUN.sub(lambda m: _cjk_grams(m.group()), text.translate(_FULL_WIDTH))


def value_text(value_json: str) -> str:
    """What of a stored JSON value is searchable: its strings, object keys and numbers, in
    document order, as ``index_text``."""
    try:  # numbers as their JSON text: the same in any process (int digit limits apart)
        stack: list[Any] = [json.loads(value_json, parse_int=str, parse_float=str,
                                       parse_constant=str)]
    except ValueError:  # never stored (values are checked), but a trigger must not fail
        return index_text(value_json)
    words: list[str] = []
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            words.append(item)
        elif isinstance(item, dict):
            for name, inner in reversed(item.items()):
                stack.append(inner)
                stack.append(name)
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return index_text(" ".join(words))


def tags_text(tags_json: str) -> str:
    if tags_json == "[]":
        return ""
    try:
        tags = json.loads(tags_json)
    except ValueError:
        return index_text(tags_json)
    return index_text(" ".join(t for t in tags if isinstance(t, str)))


# Words that say nothing about a memory: a query leaves them out unless it has no other.
# NLTK's English list without its contraction fragments and lone letters (s t d m o y ll re
# ve ma: "vitamin D", "T cells"), 169 words; measured in bench.py's retrieval section
# against Lucene's 33 plus question words: LoCoMo recall@5 0.455 -> 0.468, SciFact nDCG@10
# 0.686 -> 0.687.
_STOPWORDS = """i me my myself we our ours ourselves you you're you've you'll you'd your yours
    yourself yourselves he him his himself she she's her hers herself it it's its itself they them
    their theirs themselves what which who whom this that that'll these those am is are was
    were be been being have has had having do does did doing a an the and but if or because
    as until while of at by for with about against between into through during before after
    above below to from up down in out on off over under again further then once here there
    when where why how all any both each few more most other some such no nor not only own
    same so than too very can will just don don't should should've now ain aren aren't
    couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn
    isn't mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn
    wasn't weren weren't won won't wouldn wouldn't"""
STOPWORDS = frozenset(_STOPWORDS.split())
MAX_QUERY_TERMS = 32
MIN_PREFIX_CHARS = 3  # a shorter last word would match too many words as a prefix
_WORD = re.compile(r"[^\W_]+")
_EDGES = re.compile(r"^\W+|\W+$")  # punctuation around a word ("what?")


def fts_terms(text: object) -> list[str]:
    """A user's search text as FTS5 terms, each a quoted string, so FTS syntax in the text
    is only text and FTS5 splits each term into words exactly as it split the memories:
    the text's whitespace-separated chunks without stopwords, their CJK runs as pairs of
    characters (a lone CJK character as a prefix), and the last chunk (if it holds at least
    MIN_PREFIX_CHARS letters or digits) as a prefix.  Control characters separate chunks
    (FTS5 reads a query as a C string: a NUL would end it).  Deduplicated, at most
    MAX_QUERY_TERMS, in the order given."""
    if not isinstance(text, str):
        raise InvalidInputError("query must be a string")
    if len(text) > MAX_QUERY_CHARS or _has_surrogates(text):
        raise InvalidInputError(f"query must be valid text of at most {MAX_QUERY_CHARS} "
                                "characters")
    # Case is left to FTS5, which folds the query as it folded the memories: Python's
    # lower() knows newer Unicode (Cherokee, Georgian Mtavruli) than unicode61 does.
    chunks = CONTROL_CHARS.sub(" ", text.translate(_FULL_WIDTH)).split()
    words = list({c.lower(): c for c in reversed(chunks)
                  if any(ch.isalnum() for ch in c)}.values())[::-1]
    if not words:
        raise InvalidInputError("query must contain at least one word")
    kept = [w for w in words if _EDGES.sub("", w.lower()) not in STOPWORDS] or words
    terms: list[str] = []
    for n, chunk in enumerate(kept):
        pieces, runs = CJK_RUN.split(chunk), CJK_RUN.findall(chunk)
        for i, piece in enumerate(pieces):
            letters = sum(ch.isalnum() for ch in piece)
            if letters:
                last = n == len(kept) - 1 and i == len(pieces) - 1
                star = "*" if last and letters >= MIN_PREFIX_CHARS else ""
                terms.append('"' + piece.replace('"', '""') + '"' + star)
            if i < len(runs):
                run = runs[i]
                terms.extend([f'"{run}"*'] if len(run) == 1 else
                             [f'"{run[j:j + 2]}"' for j in range(len(run) - 1)])
    return list({term.lower(): term for term in reversed(terms)}.values())[::-1][
        :MAX_QUERY_TERMS]


def fts_query(text: object) -> str:
    """``fts_terms`` joined with OR: memories that hold more of the words rank higher,
    without all of them being required."""
    return " OR ".join(fts_terms(text))


def _cursor_filter(namespace: str, prefix: str | None, tag: object, archived: bool) -> str:
    blob = json.dumps([namespace, prefix, tag, archived], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _cursor_mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:16]


def encode_cursor(last_key: str, namespace: str, prefix: str | None, tag: object,
                  archived: bool, *, secret: bytes) -> str:
    """An opaque cursor: the last key returned, bound to the query it came from, signed
    with the database's ``secret`` (an HMAC): a client can neither edit nor forge one."""
    body = json.dumps({"v": CURSOR_VERSION, "k": last_key,
                       "f": _cursor_filter(namespace, prefix, tag, archived)},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(_cursor_mac(secret, body) + body).decode("ascii").rstrip("=")


def decode_cursor(cursor: object, namespace: str, prefix: str | None, tag: object,
                  archived: bool, *, secret: bytes) -> str:
    """The last key of a cursor made by ``encode_cursor`` with the same ``secret`` for the
    same query; InvalidInputError for anything else."""
    bad = InvalidInputError("cursor is not valid (garbled, forged, or from another query "
                            "or database)")
    if not isinstance(cursor, str) or not cursor or len(cursor) > 4096 or not cursor.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        mac, body = raw[:16], raw[16:]
        if not hmac.compare_digest(_cursor_mac(secret, body), mac):
            raise bad
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if (not isinstance(data, dict) or data.get("v") != CURSOR_VERSION
            or not isinstance(data.get("k"), str) or _has_control_chars(data["k"])
            or data.get("f") != _cursor_filter(namespace, prefix, tag, archived)):
        raise bad
    return str(data["k"])


def _boolean(name: str) -> Callable[[object, Config], bool]:
    def check(value: object, config: Config) -> bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"{name} must be true or false")
        return value
    return check


_REQUIRED = object()  # an export record must hold the field (see _memory_field's absent)


def _memory_field(schema: dict[str, Any], check: Callable[[Any, Config], Any], *,
                  time: bool = False, dump: Callable[[Any], Any] | None = None,
                  load: Callable[[Any], Any] | None = None, absent: Any = _REQUIRED) -> Any:
    """A Memory field: its JSON schema as the interfaces show it (``time``: Unix seconds
    shown as RFC 3339), the check of an imported value, how its column is written and read
    when that is not as is, and (``absent``) its value in an export record written before
    the field existed: a field added later needs one, so that old exports still import."""
    return dataclasses.field(metadata={"schema": schema, "check": check, "time": time,
                                       "dump": dump, "load": load, "absent": absent})


def _dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _dump_tags(tags: list[str]) -> str:
    return json.dumps(tags, ensure_ascii=False)  # the format rows have always had


def _load_tags(text: str) -> list[str]:
    return [] if text == "[]" else list(json.loads(text))  # most memories have no tags


TIME_SCHEMA = {"type": "string", "format": "date-time"}


@dataclasses.dataclass(frozen=True)
class Memory:
    """One memory, as stored.  ``strength`` is the strength at ``last_reinforced_at``;
    ``current_strength(now)`` applies the decay.  Times are Unix seconds (UTC).  Each
    field is also a column of ``memories`` and a property of the interfaces' Memory."""

    namespace: str = _memory_field({"type": "string"}, validate_namespace)
    key: str = _memory_field({"type": "string"}, validate_key)
    value: Any = _memory_field({}, lambda v, c: (encode_value(v, c), v)[1], dump=_dump_json,
                               load=json.loads)
    tags: list[str] = _memory_field({"type": "array", "items": {"type": "string"}},
                                    validate_tags, dump=_dump_tags, load=_load_tags)
    version: int = _memory_field({"type": "integer", "minimum": 1},
                                  _number("version", integer=True, low=1, high=MAX_VERSION))
    created_at: float = _memory_field(TIME_SCHEMA, _time("created_at"), time=True)
    updated_at: float = _memory_field(TIME_SCHEMA, _time("updated_at"), time=True)
    expires_at: float | None = _memory_field(
        {**TIME_SCHEMA, "type": ["string", "null"]}, _time("expires_at", optional=True),
        time=True)
    strength: float = _memory_field({"type": "number", "minimum": 0, "maximum": MAX_STRENGTH},
                                    _number("strength", low=0, high=MAX_STRENGTH))
    half_life_seconds: float | None = _memory_field(
        {"type": ["number", "null"]}, _seconds("half_life_seconds"))
    last_reinforced_at: float = _memory_field(TIME_SCHEMA, _time("last_reinforced_at"), time=True)
    archived: bool = _memory_field({"type": "boolean"}, _boolean("archived"), dump=int, load=bool)

    def is_expired(self, now: float) -> bool:
        """Past its TTL: invisible at once, as if absent (prune deletes it later)."""
        return self.expires_at is not None and self.expires_at <= now

    def is_live(self, now: float) -> bool:
        """What ``get``, ``list`` and ``search`` show: not expired, not archived."""
        return not self.archived and not self.is_expired(now)

    def current_strength(self, now: float) -> float:
        return strength_at(self.strength, self.last_reinforced_at, self.half_life_seconds, now)

    def to_record(self) -> dict[str, Any]:
        """Every field, exactly (the export format)."""
        return dataclasses.asdict(self)

    def render(self, now: float) -> dict[str, Any]:
        """The memory as the HTTP and MCP interfaces show it (``MEMORY_SCHEMA``): times as
        RFC 3339 UTC strings, plus ``current_strength`` at ``now``."""
        out = {name: getattr(self, name) for name in MEMORY_COLUMNS}
        for name in _TIME_FIELDS:
            if out[name] is not None:
                out[name] = rfc3339(out[name])
        out["tags"] = list(self.tags)
        out["current_strength"] = self.current_strength(now)
        return out


MEMORY_FIELDS = dataclasses.fields(Memory)
MEMORY_COLUMNS = tuple(f.name for f in MEMORY_FIELDS)
_TIME_FIELDS = tuple(f.name for f in MEMORY_FIELDS if f.metadata["time"])
MEMORY_SCHEMA: dict[str, Any] = {
    "type": "object", "required": [*MEMORY_COLUMNS, "current_strength"],
    "properties": {**{f.name: f.metadata["schema"] for f in MEMORY_FIELDS},
                   "current_strength": {"type": "number"}},
}


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp with microseconds."""
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_import(fp: IO[str], config: Config) -> int:
    """Check every line of an export in ``fp`` as ``Store.import_`` will take it, then
    rewind ``fp``; the number of memories.  InvalidInputError lists the bad lines (the
    first 20): then nothing may be imported."""
    bad: list[str] = []
    count = 0
    for number, line in enumerate(fp, 1):
        if not line.strip():
            continue
        try:
            memory_from_record(json.loads(line), config)
            count += 1
        except (ValueError, InvalidInputError) as exc:
            bad.append(f"line {number}: {exc}")
    if bad:
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        raise InvalidInputError(f"{len(bad)} bad line(s), nothing imported: "
                                + "; ".join(bad[:20]) + more)
    fp.seek(0)
    return count


def memory_from_record(record: object, config: Config) -> Memory:
    """Validate one export record (a dict with every Memory field) and build the Memory."""
    if not isinstance(record, dict):
        raise InvalidInputError("each line must be a JSON object")
    missing = {f.name for f in MEMORY_FIELDS if f.metadata["absent"] is _REQUIRED} - record.keys()
    extra = record.keys() - set(MEMORY_COLUMNS)
    if missing or extra:
        raise InvalidInputError(f"fields missing: {sorted(missing)}, unknown: {sorted(extra)}")
    return Memory(**{f.name: f.metadata["check"](record.get(f.name, f.metadata["absent"]), config)
                     for f in MEMORY_FIELDS})


@dataclasses.dataclass(frozen=True)
class Page:
    items: list[Memory]
    next_cursor: str | None


@dataclasses.dataclass(frozen=True)
class Hit:
    memory: Memory
    score: float


@dataclasses.dataclass(frozen=True)
class PruneResult:
    archived: int
    deleted: int
    batches: int
    at: float


def prune_record(result: PruneResult) -> dict[str, Any]:
    """A prune's result as ``stats`` shows it: its time in RFC 3339, like every time there."""
    return {**dataclasses.asdict(result), "at": rfc3339(result.at)}


# -- operations: parsed once, then planned against the current memory ---------------------


def _arg(schema: Callable[[Config], dict[str, Any]], check: Callable[[Any, Config], Any], *,
         required: bool = False, default: Callable[[Config], Any] = lambda config: None) -> Any:
    """An op's argument: its JSON schema (from a Config's limits), check, and default."""
    return dataclasses.field(metadata={"schema": schema, "check": check, "required": required,
                                       "default": default})


def namespace_schema(config: Config) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{NAMESPACE_RE.pattern}$", "minLength": 1,
            "maxLength": config.max_namespace_chars, "default": "default",
            "description": "keeps agents, users or projects apart"}


# "A string with none of CONTROL_CHARS" as a JSON schema.  ("^[^...]*$" would let a final
# newline through in Python's re, where "$" also matches before one.)
TEXT = {"not": {"type": "string", "pattern": "[\\u0000-\\u001f\\u007f-\\u009f]"}}


def key_schema(config: Config) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": config.max_key_chars, **TEXT,
            "description": "the memory's name, e.g. \"user/tea\"; no control characters"}


def tag_schema(config: Config) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": config.max_tag_chars, **TEXT}


def half_life_schema(config: Config) -> dict[str, Any]:
    default = config.default_half_life_s
    return {"anyOf": [{**SECONDS_SCHEMA, "type": "number"}, {"type": "null"},
                      {"const": DEFAULT_HALF_LIFE}],
            "default": DEFAULT_HALF_LIFE,
            "description": "strength halves every this many seconds unless reinforced; "
                           f"null = never fades; \"{DEFAULT_HALF_LIFE}\" = the configured "
                           f"default ({'never fades' if default is None else f'{default:g} s'})"}


NAMESPACE_ARG = _arg(namespace_schema, validate_namespace, default=lambda config: "default")
KEY_ARG = _arg(key_schema, validate_key, required=True)
IF_VERSION_ARG = _arg(lambda c: {
    "type": ["integer", "null"], "minimum": 0, "maximum": MAX_VERSION,
    "description": "write only if the stored version is this (0 = only if absent)"},
    validate_version)
SECONDS_SCHEMA = {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_TTL_SECONDS}


_ARGUMENTS: dict[type, tuple[tuple[dataclasses.Field[Any], ...], frozenset[str]]] = {}


def _arguments(cls: type[Op]) -> tuple[tuple[dataclasses.Field[Any], ...], frozenset[str]]:
    """The fields of an op class that are arguments, and their names (computed once)."""
    if cls not in _ARGUMENTS:
        fields = tuple(f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                       if "check" in f.metadata)
        _ARGUMENTS[cls] = fields, frozenset(f.name for f in fields)
    return _ARGUMENTS[cls]


class Op:
    """An operation on one memory: the arguments, checked by ``parse``, and ``plan``, the
    pure rule that takes the memory as stored now (``None`` = no row, expired or not) to
    what the store keeps (``None`` = no row) and what the caller gets."""

    kind: ClassVar[str]  # its name in a batch ("op")
    result: ClassVar[str]  # the name of its outcome in a batch result
    reads_value: ClassVar[bool] = False  # whether plan() needs the stored value decoded
    namespace: str
    key: str

    @classmethod
    def arguments(cls) -> tuple[dataclasses.Field[Any], ...]:
        return _arguments(cls)[0]

    @classmethod
    def checked(cls, spec: object, config: Config, given: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments in ``spec`` (a mapping from a client) and ``given`` (from the
        interface: a key in the path, the namespace of a batch), each checked once."""
        if not isinstance(spec, dict | Mapping):  # a dict first: the ABC check is slow
            raise InvalidInputError(f"a {cls.kind} op must be an object")
        fields, names = _arguments(cls)
        unknown = [name for name in spec if name not in names or name in given]
        if unknown:
            first = sorted(str(name) for name in unknown)[0]
            raise InvalidInputError(f"unknown field {first[:100]!r} for a {cls.kind} op")
        out: dict[str, Any] = {}
        for field in fields:
            name, meta = field.name, field.metadata
            source = given if name in given else spec
            if name in source:
                out[name] = meta["check"](source[name], config)
            elif meta["required"]:
                raise InvalidInputError(f"field {name!r} is required for a {cls.kind} op")
            else:
                out[name] = meta["check"](meta["default"](config), config)
        return out

    @classmethod
    def parse(cls, spec: object, config: Config, **given: Any) -> Self:
        return cls(**cls.checked(spec, config, given))._checked_by(config)

    def _checked_by(self, config: Config) -> Self:
        object.__setattr__(self, "_config", config)  # frozen: set once, by parse
        return self

    def checked_for(self, config: Config) -> Self:
        """This op if ``parse`` made it under ``config``, else the op its arguments parse
        to (an op built by its constructor is checked like any client's input)."""
        if getattr(self, "_config", None) is config:
            return self
        return self.parse({f.name: getattr(self, f.name) for f in self.arguments()}, config)

    @classmethod
    def schema(cls, config: Config, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The JSON schema of ``spec`` for ``parse`` (without the ``exclude``d arguments,
        which the interface gives)."""
        fields = [f for f in cls.arguments() if f.name not in exclude]
        return {"type": "object", "additionalProperties": False,
                "required": [f.name for f in fields if f.metadata["required"]],
                "properties": {f.name: f.metadata["schema"](config) for f in fields}}

    def plan(self, current: Memory | None, now: float) -> tuple[Memory | None, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SetOp(Op):
    """Create or replace a memory."""

    kind: ClassVar[str] = "set"
    result: ClassVar[str] = "memory"
    namespace: str = NAMESPACE_ARG
    key: str = KEY_ARG
    value: Any = _arg(lambda c: {"description": f"any JSON value, at most {c.max_value_bytes} "
                                 f"bytes as JSON and {MAX_NESTING} levels deep"},
                      encode_value, required=True)
    tags: list[str] = _arg(lambda c: {"type": ["array", "null"], "maxItems": c.max_tags,
                                      "items": tag_schema(c), "description": "labels that "
                                      "group related memories; null = none"}, validate_tags)
    ttl_seconds: float | None = _arg(lambda c: {
        **SECONDS_SCHEMA, "description": "expire after this many seconds; null = never"},
        _seconds("ttl_seconds"))
    half_life_seconds: float | None = _arg(half_life_schema, validate_half_life,
                                           default=lambda config: DEFAULT_HALF_LIFE)
    if_version: int | None = IF_VERSION_ARG
    value_json: str = ""  # the value as stored: compact JSON (``value`` is parsed back from it)

    @classmethod
    def parse(cls, spec: object, config: Config, **given: Any) -> Self:
        args = cls.checked(spec, config, given)
        text = args["value"]  # the check (encode_value) returned the JSON text
        return cls(**{**args, "value": json.loads(text), "value_json": text})._checked_by(config)

    def plan(self, current: Memory | None, now: float) -> tuple[Memory, Memory]:
        """The new content at full strength, un-archived, with a fresh TTL; the version
        one past the stored one and ``created_at`` kept.  Compare-and-set by
        ``if_version``: an expired memory counts as absent (0), an archived one as present."""
        present = current if current is not None and not current.is_expired(now) else None
        _check_version(self.if_version, present.version if present else 0, self.key)
        memory = Memory(
            namespace=self.namespace, key=self.key, value=self.value, tags=self.tags,
            version=present.version + 1 if present else 1,
            created_at=present.created_at if present else now, updated_at=now,
            expires_at=expires_at(self.ttl_seconds, now), strength=INITIAL_STRENGTH,
            half_life_seconds=self.half_life_seconds, last_reinforced_at=now, archived=False,
        )
        return memory, memory


@dataclasses.dataclass(frozen=True)
class DeleteOp(Op):
    """Delete a memory, live or archived; reports whether there was one."""

    kind: ClassVar[str] = "delete"
    result: ClassVar[str] = "deleted"
    namespace: str = NAMESPACE_ARG
    key: str = KEY_ARG
    if_version: int | None = IF_VERSION_ARG

    def plan(self, current: Memory | None, now: float) -> tuple[None, bool]:
        """No row afterwards; found if there was one that had not expired (archived counts:
        ``if_version`` compares with its version)."""
        present = current is not None and not current.is_expired(now)
        _check_version(self.if_version, current.version if current and present else 0, self.key)
        return None, present


@dataclasses.dataclass(frozen=True)
class ReinforceOp(Op):
    """Strengthen a memory and restart its decay clock."""

    kind: ClassVar[str] = "reinforce"
    result: ClassVar[str] = "memory"
    reads_value: ClassVar[bool] = True  # the reinforced memory is returned whole
    namespace: str = NAMESPACE_ARG
    key: str = KEY_ARG

    def plan(self, current: Memory | None, now: float) -> tuple[Memory, Memory]:
        """``reinforced_strength`` from ``now`` on, un-archived; the version is kept (it
        counts changes of content).  NotFoundError when absent or expired."""
        if current is None or current.is_expired(now):
            raise NotFoundError(f"no memory {self.key!r} in namespace {self.namespace!r}")
        strength = reinforced_strength(current.strength, current.last_reinforced_at,
                                       current.half_life_seconds, now)
        memory = dataclasses.replace(current, strength=strength, last_reinforced_at=now,
                                     archived=False)
        return memory, memory


# The ops a batch may hold, by their "op" name.
BATCH_OPS: dict[str, type[SetOp] | type[DeleteOp]] = {"set": SetOp, "delete": DeleteOp}


def parse_batch_op(spec: object, config: Config, *, namespace: str) -> SetOp | DeleteOp:
    """One op of a batch: ``{"op": "set", ...}`` or ``{"op": "delete", ...}``."""
    if not isinstance(spec, Mapping):
        raise InvalidInputError("each op must be an object")
    cls = BATCH_OPS.get(str(spec.get("op")))
    if cls is None:
        raise InvalidInputError(f"op must be one of {', '.join(map(repr, BATCH_OPS))}")
    return cls.parse({k: v for k, v in spec.items() if k != "op"}, config, namespace=namespace)


def batch_op_schema(config: Config) -> dict[str, Any]:
    """The JSON schema of one batch op: ``op`` and the arguments of its kind, no other."""
    kinds = []
    for kind, cls in BATCH_OPS.items():
        schema = cls.schema(config, exclude=("namespace",))
        kinds.append({**schema, "required": ["op", *schema["required"]],
                      "properties": {"op": {"const": kind}, **schema["properties"]}})
    return {"oneOf": kinds}


def _check_version(expected: int | None, current: int, key: str) -> None:
    if expected is not None and expected != current:
        what = "absent" if current == 0 else f"at version {current}"
        raise VersionConflictError(f"{key!r} is {what}, not at version {expected}",
                                   current_version=current, key=key)


# =========================================================================== storage ====

# Contentless full-text index: the text lives once, in memories.  A contentless row is
# deleted by repeating the exact values it was indexed with, which the triggers recompute
# from the old row.  Migration 1's index (memories_fts: unicode61, the value's strings) was
# replaced by migration 3's (memory_index: INDEX_TOKENIZER, and index_text() in Python).
_FTS_ROW = ("{0}.id, {0}.key,"
            " (SELECT group_concat(value, ' ') FROM json_tree({0}.value) WHERE type = 'text'),"
            " (SELECT group_concat(value, ' ') FROM json_each({0}.tags))")
_FTS_ADD = f"INSERT INTO memories_fts (rowid, key, body, tags) VALUES ({_FTS_ROW.format('new')});"
_FTS_REMOVE = ("INSERT INTO memories_fts (memories_fts, rowid, key, body, tags)"
               f" VALUES ('delete', {_FTS_ROW.format('old')});")
# Migration 3 indexes the memories that exist then in the background, highest id first
# (IndexBuilder, in batches of about INDEX_BATCH_S): those with an id up to
# 'index_pending_through' are not indexed yet, and the triggers leave them to it.
INDEX_FUNCTIONS = {"kvmem_index_text": index_text, "kvmem_value_text": value_text,
                   "kvmem_tags_text": tags_text}
_INDEX_ROW = ("{0}.id, kvmem_index_text({0}.key), kvmem_value_text({0}.value),"
              " kvmem_tags_text({0}.tags)")
_INDEX_ADD = ("INSERT INTO memory_index (rowid, key, body, tags)"
              f" VALUES ({_INDEX_ROW.format('new')});")
_INDEX_REMOVE = ("INSERT INTO memory_index (memory_index, rowid, key, body, tags)"
                 f" VALUES ('delete', {_INDEX_ROW.format('old')});")
PENDING_THROUGH = "(SELECT value FROM kvmem_meta WHERE name = 'index_pending_through')"

# Each entry brings user_version from its index to index + 1, in one transaction; a new
# column of memories (a new Memory field) is a new entry: ALTER TABLE memories ADD COLUMN.
# A statement may use :secret, 32 random bytes from the operating system.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE memories (
            id INTEGER PRIMARY KEY,
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '[]',
            version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL,
            strength REAL NOT NULL,
            half_life_seconds REAL,
            last_reinforced_at REAL NOT NULL,
            archived INTEGER NOT NULL DEFAULT 0,
            UNIQUE (namespace, key)
        )""",
        "CREATE INDEX memories_expires ON memories (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE VIRTUAL TABLE memories_fts USING fts5(key, body, tags, content='')",
        f"CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN {_FTS_ADD} END",
        f"CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN {_FTS_REMOVE} END",
        "CREATE TRIGGER memories_fts_update AFTER UPDATE OF key, value, tags ON memories"
        f" BEGIN {_FTS_REMOVE} {_FTS_ADD} END",
    ),
    (  # the key that signs list cursors, one per database, shared by its processes
        "CREATE TABLE kvmem_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
        "INSERT INTO kvmem_meta (name, value) VALUES ('cursor_secret', :secret)",
    ),
    (  # #16: stemming, CJK pairs, object keys and numbers; filled by IndexBuilder
        "DROP TRIGGER memories_fts_insert",
        "DROP TRIGGER memories_fts_delete",
        "DROP TRIGGER memories_fts_update",
        "DROP TABLE memories_fts",
        "CREATE VIRTUAL TABLE memory_index USING fts5(key, body, tags, content='',"
        f" tokenize='{INDEX_TOKENIZER}')",
        "INSERT INTO kvmem_meta (name, value)"
        " VALUES ('index_pending_through', (SELECT coalesce(max(id), 0) FROM memories))",
        f"CREATE TRIGGER memory_index_insert AFTER INSERT ON memories"
        f" WHEN new.id > {PENDING_THROUGH} BEGIN {_INDEX_ADD} END",
        f"CREATE TRIGGER memory_index_delete AFTER DELETE ON memories"
        f" WHEN old.id > {PENDING_THROUGH} BEGIN {_INDEX_REMOVE} END",
        "CREATE TRIGGER memory_index_update AFTER UPDATE OF key, value, tags ON memories"
        f" WHEN old.id > {PENDING_THROUGH} BEGIN {_INDEX_REMOVE} {_INDEX_ADD} END",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)  # what user_version says once every step ran

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_MAGICS = (b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")
HEADER_BYTES = 100
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")  # first bytes of a rollback journal

# The rules of the model in SQL, once each: an expired memory (one parameter, now) is
# invisible at once, as if absent; a live one is neither expired nor archived.
EXPIRED = "(expires_at IS NOT NULL AND expires_at <= ?)"
LIVE = f"archived = 0 AND NOT {EXPIRED}"
SELECT_MEMORY = f"SELECT id, {', '.join(MEMORY_COLUMNS)} FROM memories"
GET_ROW = SELECT_MEMORY + " WHERE namespace = ? AND key = ?"
GET_LIVE = GET_ROW + " AND " + LIVE
GET_CURSOR_SECRET = "SELECT value FROM kvmem_meta WHERE name = 'cursor_secret'"
INSERT_MEMORY = (f"INSERT INTO memories ({', '.join(MEMORY_COLUMNS)})"
                 f" VALUES ({', '.join('?' * len(MEMORY_COLUMNS))})")
# search_score() in SQL, so that the sorter keeps only the LIMIT best: -bm25() with
# BM25_WEIGHTS × strength_at().  Only ids and scores are sorted; Store.search then reads
# the rows of the hits.  Parameters: now, query, now, then the scope's, then the limit.
# (_bounded_best answers most searches without it.)
STRENGTH_SQL = ("CASE WHEN m.half_life_seconds IS NULL THEN m.strength"
                " ELSE m.strength * pow(2.0, -max(0.0, ? - m.last_reinforced_at)"
                " / m.half_life_seconds) END")  # strength_at(); parameter: now
BM25_ARGS = ", ".join(str(w) for w in BM25_WEIGHTS)
SEARCH_SCORE = f"-bm25(memory_index, {BM25_ARGS}) * {STRENGTH_SQL}"
# CROSS JOIN keeps the index the outer loop: a plan that walks memories and asks the
# index about each row took 3 s at 100,000 memories instead of 30 ms.
SEARCH_SCAN = (f"SELECT m.id, {SEARCH_SCORE} AS score"
               " FROM memory_index CROSS JOIN memories AS m"
               " ON m.id = memory_index.rowid"
               " WHERE memory_index MATCH ? AND m.archived = 0"
               " AND NOT (m.expires_at IS NOT NULL AND m.expires_at <= ?)")
GET_PENDING_THROUGH = f"SELECT {PENDING_THROUGH}"
_LOADS = [(i, f.metadata["load"]) for i, f in enumerate(MEMORY_FIELDS) if f.metadata["load"]]
_DUMPS = [(i, f.metadata["dump"]) for i, f in enumerate(MEMORY_FIELDS) if f.metadata["dump"]]
_VALUE, _KEY, _TAGS = (MEMORY_COLUMNS.index(name) for name in ("value", "key", "tags"))


def _stored_bytes(row: Sequence[Any]) -> int:
    """The UTF-8 size of a row's value, key and tags as stored (a row of SELECT_MEMORY)."""
    return sum(len(row[1 + i].encode("utf-8")) for i in (_VALUE, _KEY, _TAGS))


def _row_memory(row: Sequence[Any], *, value: bool = True) -> Memory:
    """A row of ``SELECT_MEMORY`` (id first) as a Memory; with ``value=False`` the value
    stays its stored JSON text (for a plan that never looks at it: a set, a delete)."""
    values = list(row[1:len(MEMORY_COLUMNS) + 1])
    for i, load in _LOADS:
        if value or i != _VALUE:
            values[i] = load(values[i])
    return Memory(*values)


def _apply(conn: KvmemConnection, op: Op, now: float) -> Any:
    """Run one op: load its memory, plan, write what the plan says; the op's outcome."""
    row = conn.execute(GET_ROW, (op.namespace, op.key)).fetchone()
    current = None if row is None else _row_memory(row, value=op.reads_value)
    after, outcome = op.plan(current, now)
    _write(conn, row, after, getattr(op, "value_json", None), current)
    return outcome


def _write(conn: KvmemConnection, row: Sequence[Any] | None, memory: Memory | None,
           value_json: str | None = None, current: Memory | None = None) -> None:
    """Make the stored row (``row``, from ``SELECT_MEMORY``; ``None`` = none) hold ``memory``
    (``None`` = delete it); ``value_json`` is the value already encoded, ``current`` the
    Memory read from ``row`` (a field it shares with ``memory`` keeps its stored text).  An
    UPDATE sets only the changed columns: the full-text trigger runs on UPDATE OF key,
    value or tags, so a reinforce, which changes none of them, does not re-index."""
    if memory is None:
        if row is not None:
            conn.execute("DELETE FROM memories WHERE id = ?", (row[0],))
        return
    values = [getattr(memory, name) for name in MEMORY_COLUMNS]
    for i, dump in _DUMPS:
        if i == _VALUE and value_json is not None:
            values[i] = value_json
        elif row is not None and current is not None and \
                values[i] is getattr(current, MEMORY_COLUMNS[i]):
            values[i] = row[i + 1]  # the very object read from the row: not dumped again
        else:
            values[i] = dump(values[i])
    if row is None:
        conn.execute(INSERT_MEMORY, values)
        return
    changed = [(name, new) for name, new, old in zip(MEMORY_COLUMNS, values, row[1:], strict=True)
               if new != old]
    if changed:
        conn.execute(f"UPDATE memories SET {', '.join(n + ' = ?' for n, _ in changed)}"
                     " WHERE id = ?", [*(v for _, v in changed), row[0]])


# Per-connection settings, applied in this order to every connection and read back;
# journal_mode is applied apart (it is a setting of the file, and can fail with busy).
PRAGMAS: dict[str, Callable[[Config], int]] = {
    "busy_timeout": lambda c: c.busy_timeout_ms,
    "synchronous": lambda c: c.synchronous_level,  # read back as its name
    "cache_size": lambda c: -c.cache_size_kib,
    "temp_store": lambda c: 2,  # memory
    "foreign_keys": lambda c: 1,
    "wal_autocheckpoint": lambda c: 0,  # checkpoints are explicit, by the elected writer only
    # When a writer restarts the WAL after a complete checkpoint, SQLite truncates the
    # file to this size: the WAL file shrinks back without a TRUNCATE checkpoint.
    "journal_size_limit": lambda c: c.wal_keep_bytes,
}
CHECKPOINT_BUSY_TIMEOUT_MS = 200  # the longest a checkpoint off the write path waits for the lock
GATE_WAIT_MS = 10  # between groups: how long the writer waits for the write lock to checkpoint


_R = TypeVar("_R")
_P = ParamSpec("_P")


def _mapped(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """``method`` of a connection or cursor, with ``sqlite3.Error`` raised as kvmem's error
    for it (the cause kept): the one way kvmem code reaches SQLite after the connect."""
    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            owner = args[0]
            conn = getattr(owner, "connection", owner)
            raise _db_error(exc, getattr(conn, "kv_path", "?")) from exc
    return call


class KvmemCursor(sqlite3.Cursor):
    """A cursor whose statements and fetches raise kvmem's errors (a fetch steps the
    statement again, and can fail as an execute can)."""

    execute = _mapped(sqlite3.Cursor.execute)
    executemany = _mapped(sqlite3.Cursor.executemany)
    fetchone = _mapped(sqlite3.Cursor.fetchone)
    fetchmany = _mapped(sqlite3.Cursor.fetchmany)
    fetchall = _mapped(sqlite3.Cursor.fetchall)
    __next__ = _mapped(sqlite3.Cursor.__next__)  # type: ignore[arg-type]


class KvmemConnection(sqlite3.Connection):
    """An ``sqlite3.Connection`` made by ``open_db()``; knows its path and config, and
    raises kvmem's errors (``KvmemError`` subclasses), never ``sqlite3.Error``."""

    kv_path: str
    kv_config: Config
    # A connection that only runs transactions and checkpoints (the group-commit writer)
    # keeps SQLite's busy handler off for good, so transaction() need not switch it.
    kv_busy_off: bool = False
    _kv_closed: bool = False

    def cursor(self, factory: Any = KvmemCursor) -> KvmemCursor:  # type: ignore[override]
        try:  # fails on a closed connection, or in another thread
            cursor: KvmemCursor = super().cursor(factory)
        except sqlite3.Error as exc:
            raise _db_error(exc, self.kv_path) from exc
        return cursor

    @property
    def in_transaction(self) -> bool:
        try:
            return super().in_transaction
        except sqlite3.Error as exc:
            raise _db_error(exc, self.kv_path) from exc

    def execute(self, sql: str, parameters: Any = (), /) -> KvmemCursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, rows: Any, /) -> KvmemCursor:
        return self.cursor().executemany(sql, rows)

    backup = _mapped(sqlite3.Connection.backup)

    def close(self) -> None:
        if not self._kv_closed:
            self._kv_closed = True
            _release_registration(self.kv_path)
        _mapped(sqlite3.Connection.close)(self)


@dataclasses.dataclass(frozen=True)
class RecoveryRecord:
    """What the first open of a file in this process found: the WAL size, quick_check,
    and the start-up checkpoint (SQLite itself replays a hot WAL on that open)."""

    path: str
    wal_bytes_found: int
    quick_check: str  # "ok", the first problem found, or "skipped"
    checkpoint: str  # "done", "busy", "skipped: ..." or "failed: ..." (the file still opens)
    wal_frames: int | None
    frames_checkpointed: int | None
    took_ms: float


# Process-wide registry, guarded by _REGISTRY_LOCK: live open_db() connections per file
# (the header check may only read the file while there are none), recovery records.
_REGISTRY_LOCK = threading.Lock()
_LIVE_CONNECTIONS: dict[str, int] = {}
_RECOVERY: dict[str, RecoveryRecord] = {}


def _release_registration(path: str) -> None:
    with _REGISTRY_LOCK:
        _LIVE_CONNECTIONS[path] -= 1
        if not _LIVE_CONNECTIONS[path]:
            del _LIVE_CONNECTIONS[path]


def recovery_record(path: str) -> RecoveryRecord | None:
    """The recovery record of ``path``'s first open in this process, if any."""
    with _REGISTRY_LOCK:
        return _RECOVERY.get(os.path.realpath(path))


def describe_header(head: bytes, size: int) -> str | None:
    """``None`` if ``head`` (the first bytes of a file of ``size`` bytes) can be an SQLite
    database, else what was found instead.  Pure; an empty file is a valid database."""
    if size == 0:
        return None
    if head.startswith(SQLITE_MAGIC):
        if size < HEADER_BYTES:
            return f"a truncated SQLite file ({size} bytes, shorter than its 100-byte header)"
        return None
    if head[:4] in WAL_MAGICS:
        return "an SQLite WAL file (was the -wal file opened as the database?)"
    if not head.strip(b"\x00"):
        return f"{size} bytes of zeros"
    sample = head[:32]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return f"text starting {sample.decode('ascii')!r}"
    return f"unknown bytes starting {sample[:16].hex(' ')}"


def _check_header(path: str) -> None:
    """Refuse a non-empty file that is not an SQLite database, without writing to it.  Only
    called while this process has no connection to ``path`` (closing the descriptor used
    here would drop that connection's locks)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # open_db says what is in the way
        return
    except OSError as exc:
        raise StorageError(f"{path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise NotADatabaseError(f"{path}: not a regular file")
    if st.st_size == 0:
        return
    try:
        head = _read_start(path, HEADER_BYTES)
    except OSError as exc:
        raise StorageError(f"{path}: cannot read the header: {exc}") from exc
    problem = describe_header(head, st.st_size)
    if problem and not head.strip(b"\x00") and _journal_magic(path + "-journal"):
        # A power cut during the first transaction of a new database: its sectors were
        # not all written, but the rollback journal that undoes them was synced first.
        # SQLite's hot-journal rollback restores the file (found by crashsim.py).
        return
    if problem:
        raise NotADatabaseError(f"{path}: not an SQLite database: found {problem}")


def _journal_magic(journal: str) -> bool:
    """Whether ``journal`` starts like a rollback journal (SQLite's hot-journal check does
    the rest)."""
    try:
        return _read_start(journal, len(JOURNAL_MAGIC)) == JOURNAL_MAGIC
    except OSError:
        return False


def _read_start(path: str, size: int) -> bytes:
    """The first ``size`` bytes of ``path``; raises OSError.  Only while this process has
    no connection to the database (see ``_check_header``)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _backoff(attempt: int, remaining: float, *, first: float, cap: float) -> None:
    """Sleep an exponential, jittered (x0.5-1.5) delay from ``first`` to ``cap``, never
    past the deadline (``remaining`` seconds)."""
    delay = min(first * 2 ** min(attempt, 16), cap) * random.uniform(0.5, 1.5)
    time.sleep(max(0.0, min(delay, remaining)))


def make_dirs_durable(directory: str) -> None:
    """Create ``directory`` and its missing parents, as ``os.makedirs(exist_ok=True)``
    does, so that a power cut cannot lose them.

    A new directory entry is durable only once the directory holding it is fsynced
    (fsync(2): "an explicit fsync() on a file descriptor for the directory is also
    needed"), and SQLite syncs only the database's own directory.  So each directory made
    here is fsynced, and so is its parent.  One ``stat`` when ``directory`` exists.
    Another process may be making the same directories: one it made first is synced here
    too (it may not have got there yet).

    Raises:
        OSError: as ``os.makedirs`` does (e.g. PermissionError; NotADirectoryError or
            FileExistsError for a file in the way), or from opening a new directory or
            its parent to sync it.
    """
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent != directory and not os.path.exists(parent):
        make_dirs_durable(parent)
    try:
        os.mkdir(directory)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise
    for synced in (directory, parent):
        fd = os.open(synced, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # never a file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_db(path: str | os.PathLike[str] | None = None, *, config: Config | None = None,
            readonly: bool = False, create: bool = True,
            check_same_thread: bool = True) -> KvmemConnection:
    """Open a connection to the kvmem database at ``path`` (default ``config.db``).

    The only way kvmem code gets a connection; it belongs to the calling thread (close it
    with ``close()``).  ``check_same_thread=False`` is for pools that hand a connection to
    one thread at a time.  ``readonly`` opens with ``mode=ro``: no journal-mode switch, no
    migration, no checkpoint (used by ``check``).  With ``create=False`` a missing file is
    an error, not a new empty database: kvmem's own later connections (pools, background
    threads) use it, so a database moved away while a process runs is never replaced.

    Raises:
        NotADatabaseError: the file is not an SQLite database (it is left unchanged).
        CorruptDatabaseError: SQLite or ``quick_check`` found it malformed (unchanged).
        SchemaTooNewError: a newer kvmem wrote it (unchanged).
        BusyError: another process kept it locked past ``busy_timeout_ms``.
        ReadOnlyError, StorageFullError, StorageError: the file or disk failed.
    """
    config = config or Config.build()
    path = os.path.realpath(os.fspath(path) if path is not None else config.db)
    with _REGISTRY_LOCK:
        if not _LIVE_CONNECTIONS.get(path):
            _check_header(path)
        _LIVE_CONNECTIONS[path] = _LIVE_CONNECTIONS.get(path, 0) + 1
        first_open = path not in _RECOVERY and not readonly
    conn: KvmemConnection | None = None
    try:
        if not readonly and create:
            try:
                make_dirs_durable(os.path.dirname(path))
            except OSError as exc:
                raise StorageError(f"{path}: cannot create its directory: "
                                   f"{_blocked_directory(path, exc)}") from exc
        mode = "ro" if readonly else "rwc" if create else "rw"
        conn = _connect(path, config, mode=mode, check_same_thread=check_same_thread)
        wal_bytes_found = wal_size(path)
        started = time.monotonic()
        _apply_settings(conn, path, config, readonly=readonly, first_open=first_open)
        if first_open:
            _record_recovery(conn, path, wal_bytes_found, started)
        return conn
    except BaseException:
        if conn is not None:
            conn.close()
        else:
            _release_registration(path)
        raise


def _connect(path: str, config: Config, *, mode: str, check_same_thread: bool) -> KvmemConnection:
    target = f"file:{urllib.parse.quote(path)}?mode={mode}"
    try:
        raw = sqlite3.connect(
            target, uri=True, isolation_level=None, timeout=config.busy_timeout_ms / 1000,
            factory=KvmemConnection, check_same_thread=check_same_thread,
        )
        # Decay maths in SQL (prune, search ranking) calls the pure strength_at().
        raw.create_function("kvmem_strength", 4, strength_at, deterministic=True)
        try:  # SEARCH_SCORE's pow(): built in when SQLite has its math functions
            raw.execute("SELECT pow(2.0, 1.0)")
        except sqlite3.OperationalError:
            raw.create_function("pow", 2, math.pow, deterministic=True)
        for name, function in INDEX_FUNCTIONS.items():  # the index triggers call them
            raw.create_function(name, 1, function, deterministic=True)
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CANTOPEN:
            raise StorageError(f"{path}: SQLITE_CANTOPEN: {_cantopen_reason(path, mode)}") from exc
        raise _db_error(exc, path) from exc
    assert isinstance(raw, KvmemConnection)
    raw.kv_path, raw.kv_config = path, config
    return raw


def _blocked_directory(path: str, exc: OSError) -> str:
    """What stopped ``make_dirs_durable`` for ``path``: the nearest existing ancestor that
    is not a directory, or the error with the directory it names."""
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is not a directory"
    return f"{exc.strerror or exc} ({exc.filename or ancestor})"


def _cantopen_reason(path: str, mode: str) -> str:
    """Why SQLite could not open ``path`` (it says only "unable to open database file"),
    from stat() and access(); never by opening the file."""
    directory = os.path.dirname(path)
    if not os.path.exists(path) and mode != "rwc":
        return "no database file there"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.access(directory, os.W_OK | os.X_OK) and mode != "ro":
        return (f"permission denied: cannot create files in {directory} (the database needs "
                "its -wal and -shm files beside it)")
    if os.path.exists(path) and not os.access(path, os.R_OK | (os.W_OK if mode != "ro" else 0)):
        return f"permission denied on {path}"
    return (f"unable to open database file (check that {directory} is a writable directory "
            "on a local file system)")


def _apply_settings(conn: KvmemConnection, path: str, config: Config, *, readonly: bool,
                    first_open: bool) -> None:
    for name, value in PRAGMAS.items():  # ints from Config, never user text
        conn.execute(f"PRAGMA {name} = {int(value(config))}")
    # The first read of the schema validates the header and runs WAL recovery.
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(f"{path}: schema version {version} was written by a newer "
                                f"kvmem (this one knows up to {SCHEMA_VERSION}); the file was "
                                "left untouched")
    if first_open and config.quick_check:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptDatabaseError(f"{path}: quick_check failed: {problems[:5]}")
    if not readonly:
        _set_journal_mode(conn, path, config)
        if version < SCHEMA_VERSION:
            _migrate(conn)
    expected: dict[str, Any] = {name: value(config) for name, value in PRAGMAS.items()}
    expected["synchronous"] = config.synchronous
    if not readonly:  # a read-only open reports what the file has
        expected["journal_mode"] = config.journal_mode
    got = read_settings(conn)
    wrong = {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: wanted {w!r}, got {g!r}" for k, (w, g) in wrong.items())
        raise StorageError(f"{path}: SQLite did not take the settings: {detail}")


def _set_journal_mode(conn: KvmemConnection, path: str, config: Config) -> None:
    """Switch to the configured journal mode, retrying while other processes race:
    entering WAL takes an exclusive lock, and with several processes opening a fresh file
    at once some get SQLITE_BUSY at once, without the busy handler (13 of 120 did here)."""
    deadline = time.monotonic() + config.busy_timeout_ms / 1000
    attempt = 0
    last_error: BusyError | None = None
    while True:
        current = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if current == config.journal_mode:
            return
        try:  # the mode is one of JOURNAL_MODES, checked by Config
            conn.execute(f"PRAGMA journal_mode = {config.journal_mode}").fetchone()
        except BusyError as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BusyError(
                f"{path}: could not switch journal_mode to {config.journal_mode} "
                f"(still {current}) before the deadline; another process holds the file"
            ) from last_error
        _backoff(attempt, remaining, first=0.001, cap=0.1)
        attempt += 1


def _migrate(conn: KvmemConnection) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction; a no-op if another
    process got there first (the version is read again under the write lock)."""
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(f"{conn.kv_path}: schema version {version} is newer")
        params = {"secret": secrets.token_bytes(32)}
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement, params)
        conn.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")


def read_settings(conn: KvmemConnection) -> dict[str, Any]:
    """The connection's settings as SQLite reports them (not as configured)."""
    got = {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
           for name in ("journal_mode", *PRAGMAS)}
    level = {v: k for k, v in SYNCHRONOUS_LEVELS.items()}
    got["synchronous"] = level.get(got["synchronous"], got["synchronous"])
    return got


def database_stats(conn: KvmemConnection) -> dict[str, Any]:
    """Settings read back from ``conn`` and the file's figures (for ``stats``)."""
    path = conn.kv_path
    version = sqlite3.sqlite_version_info
    warnings = []
    if version < MIN_SQLITE_WITHOUT_WAL_RESET_BUG:
        warnings.append(f"SQLite {sqlite3.sqlite_version} has the WAL-reset bug (fixed in "
                        "3.51.3); kvmem checkpoints on one connection only, under the write "
                        "lock, to avoid it")
    with _REGISTRY_LOCK:
        record = _RECOVERY.get(path)
    return {
        "backend": "sqlite",
        "path": path,
        "sqlite_version": sqlite3.sqlite_version,
        "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
        "settings": read_settings(conn),
        "page_size": conn.execute("PRAGMA page_size").fetchone()[0],
        "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
        "freelist_count": conn.execute("PRAGMA freelist_count").fetchone()[0],
        "db_bytes": _file_size(path),
        "wal_bytes": wal_size(path),
        "wal_cap_bytes": conn.kv_config.wal_cap_bytes,
        "recovery": dataclasses.asdict(record) if record else None,
        "warnings": warnings,
    }


def _file_size(path: str) -> int | None:
    """The size of ``path``, or None once it is gone (moved or deleted under a store)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def wal_size(path: str) -> int:
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


def _record_recovery(conn: KvmemConnection, path: str, wal_bytes: int, started: float) -> None:
    """Log what the first open found and run one checkpoint, if this process may.  Never
    fails the open: a checkpoint that cannot run (a full disk, no lock file) is recorded."""
    quick = "ok" if conn.kv_config.quick_check else "skipped"
    frames: int | None = None
    done: int | None = None
    if conn.kv_config.journal_mode != "wal":
        outcome = "skipped: not in WAL mode"
    else:
        try:
            result = checkpoint_elected(conn, wait_ms=CHECKPOINT_BUSY_TIMEOUT_MS)
            if isinstance(result, str):
                outcome = f"skipped: {result}"
            else:
                _, frames, done = result
                outcome = "done" if frames == done else "busy: a reader is behind"
        except (KvmemError, OSError) as exc:
            outcome = f"failed: {type(exc).__name__}: {exc}"
            recovery_log.warning("%s: start-up checkpoint failed; opening anyway: %s", path, exc)
    record = RecoveryRecord(path, wal_bytes, quick, outcome, frames, done,
                            round((time.monotonic() - started) * 1000, 3))
    with _REGISTRY_LOCK:
        _RECOVERY[path] = record
    recovery_log.info("recovery record: path=%s wal_bytes_found=%d quick_check=%s checkpoint=%s "
                      "wal_frames=%s frames_checkpointed=%s took_ms=%.1f",
                      *dataclasses.astuple(record))


@contextlib.contextmanager
def transaction(conn: KvmemConnection, *,
                timeout_s: float | None = None) -> Iterator[KvmemConnection]:
    """Run the block in ``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back on any exception.

    The write lock is taken up front, so reads-then-writes inside never meet SQLITE_BUSY.
    While another writer holds it, retry every 0.05-0.75 ms (SQLite's busy handler is off
    for the BEGIN: its sleeps grow to 100 ms and let a writer that commits back to back
    starve this one) until ``timeout_s`` (default ``busy_timeout_ms``).  When the block
    returns, the COMMIT has: the write survives a killed process at any level, and power
    loss at ``full`` or ``extra``.

    Raises:
        BusyError: the lock was not free before the deadline.
        StorageFullError, ReadOnlyError, StorageError, ...: the BEGIN or COMMIT failed;
        an exception from the block is re-raised unchanged.
    """
    default_ms = conn.kv_config.busy_timeout_ms
    budget = default_ms / 1000 if timeout_s is None else timeout_s
    deadline = time.monotonic() + budget
    attempt = 0
    if not conn.kv_busy_off:
        conn.execute("PRAGMA busy_timeout = 0")  # the wait is ours, below
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except BusyError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusyError(f"{conn.kv_path}: database stayed locked by another "
                                    f"writer for {budget:.3g} s") from exc
                _backoff(attempt, remaining, first=0.0001, cap=0.0005)
                attempt += 1
    finally:
        if not conn.kv_busy_off:
            conn.execute(f"PRAGMA busy_timeout = {int(default_ms)}")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: KvmemConnection) -> None:
    # SQLite may already have rolled back by itself (e.g. after SQLITE_FULL); then
    # ROLLBACK fails with "no transaction is active", which is not news.
    if conn.in_transaction:
        with contextlib.suppress(KvmemError):
            conn.execute("ROLLBACK")


def _gate_connection(path: str, config: Config) -> KvmemConnection:
    """A connection that only ever holds the write lock while another one checkpoints
    (see ``checkpoint_wal``).  Opened raw: it reads and writes nothing, and it may be
    opened inside ``open_db`` (the start-up checkpoint)."""
    with _REGISTRY_LOCK:
        _LIVE_CONNECTIONS[path] = _LIVE_CONNECTIONS.get(path, 0) + 1
    try:
        return _connect(path, config, mode="rw", check_same_thread=False)
    except BaseException:
        _release_registration(path)
        raise


def checkpoint_wal(conn: KvmemConnection, gate: KvmemConnection, *, wait_ms: int,
                   shrink: bool = False) -> tuple[int, int, int] | None:
    """One PASSIVE checkpoint on ``conn`` while ``gate`` holds the write lock; SQLite's
    ``(busy, wal_frames, frames_checkpointed)``, or ``None`` if the lock stayed taken for
    ``wait_ms`` (it waits for nothing else, never sleeps).  Raises StorageFullError,
    StorageError, ... when the checkpoint itself failed.

    Holding the write lock means no connection anywhere can commit, and so reset the WAL,
    while the checkpoint runs: the WAL-reset bug needs exactly that meeting.  (A TRUNCATE
    or RESTART checkpoint would take the lock itself, but quietly degrades to PASSIVE
    without it when a writer is active.)  With ``shrink`` a complete checkpoint is
    followed by ``_restart_wal``, giving the disk space back."""
    gate.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        gate.execute("BEGIN IMMEDIATE")
    except BusyError:
        return None
    try:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        _rollback(gate)
    result = int(row[0]), int(row[1]), int(row[2])
    if shrink and result[1] == result[2] and result[1] > 0:
        _restart_wal(conn, wait_ms)
    return result


def checkpoint_elected(conn: KvmemConnection, *, wait_ms: int,
                       shrink: bool = False) -> tuple[int, int, int] | str:
    """One ``checkpoint_wal`` on ``conn`` by a process that is not running a Checkpointer:
    only while it holds the checkpoint lock, so that it is the one checkpointing
    connection; SQLite's figures, or why no checkpoint ran."""
    with CheckpointLock(conn.kv_path) as lock:
        if not lock.held:
            return "another process is the checkpointer"
        gate = _gate_connection(conn.kv_path, conn.kv_config)
        try:
            result = checkpoint_wal(conn, gate, wait_ms=wait_ms, shrink=shrink)
        finally:
            gate.close()
    return f"writers kept the write lock for {wait_ms} ms" if result is None else result


def _restart_wal(conn: KvmemConnection, wait_ms: int) -> None:
    """A write that changes nothing (``user_version`` set to itself dirties one page) with
    ``journal_size_limit = 0``: after a complete checkpoint SQLite restarts the WAL for it
    and truncates the file at its commit.  No restart if a reader still holds a snapshot;
    then the file stays, and the next shrink tries again."""
    limit = conn.kv_config.wal_keep_bytes
    conn.execute("PRAGMA journal_size_limit = 0")
    try:
        with transaction(conn, timeout_s=wait_ms / 1000):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.execute(f"PRAGMA journal_size_limit = {int(limit)}")


class CheckpointLock:
    """The single-checkpointer election: a non-blocking exclusive ``flock`` on
    ``<db>.checkpoint.lock`` (a sidecar, never the database itself).  ``held`` says
    whether this object got it; the lock dies with its descriptor, so a killed holder
    frees it at once."""

    def __init__(self, path: str) -> None:
        self.lock_path = path + ".checkpoint.lock"
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self.held:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd, self.held = fd, True
        return True

    def still_ours(self) -> bool:
        """Whether the held lock is on the file now at ``lock_path`` (not one deleted or
        replaced since: a lock on a vanished file elects nobody)."""
        if self._fd is None:
            return False
        try:
            st = os.stat(self.lock_path)
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def write_record(self, record: Mapping[str, Any]) -> None:
        """Leave ``record`` (JSON) in the lock file for other processes to read
        (``read_lock_record``); an empty mapping clears it.  Only the holder writes."""
        if self._fd is not None:
            data = json.dumps(record).encode("ascii") if record else b""
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.write_record({})  # a record is only good while its writer holds the lock
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd, self.held = None, False

    def __enter__(self) -> CheckpointLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_record(path: str) -> dict[str, Any] | None:
    """What the checkpointer of the database at ``path`` wrote in its lock file, if it
    can be read (the lock file is a sidecar: opening and closing it drops no SQLite lock)."""
    try:
        fd = os.open(path + ".checkpoint.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        record = json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):
        return None  # absent, or read while its writer was rewriting it
    finally:
        os.close(fd)
    return record if isinstance(record, dict) else None


def checkpoint_lock_free(path: str) -> bool:
    """True when no checkpointer in any process holds the lock of ``path`` (a probe)."""
    with CheckpointLock(os.path.realpath(path)) as lock:
        return lock.held


SIDECARS = ("-wal", "-shm")
RESTART_ADVICE = ("writes are refused: stop every kvmem process that uses this database, "
                  "then start them again")


class FileWatch:
    """The database file and, in WAL mode, its ``-wal`` and ``-shm`` as this process opened
    them (device and inode), and whether they still are those.

    Deleting or replacing any of them under a running process splits the processes: this
    one keeps writing into the unlinked file while a new one opens a fresh file (a fresh
    ``-shm`` even lets two writers in at once), and the writes of one side are lost.  So
    ``problem()`` is checked before every COMMIT and by health: a file gone or replaced
    since it was opened.  A process that opens after the deletion sees consistent files
    of its own; it finds the split by comparing them with those of the other processes
    (``check_others``): with what the checkpointer wrote in its lock file, and, where
    ``/proc`` shows it (Linux), with what each process holding a lock on the database has
    open.  A split found that way is kept (``split``) until the process ends: its view of
    the WAL may be one no writer can use.
    """

    def __init__(self, path: str, journal_mode: str) -> None:
        self.path = path
        self.names = ("", *SIDECARS) if journal_mode == "wal" else ("",)
        self.identities: dict[str, tuple[int, int]] = {}
        for suffix in self.names:
            st = os.stat(path + suffix)  # every one exists once a connection has read
            self.identities[suffix] = (st.st_dev, st.st_ino)
        self.split: str | None = None

    def problem(self, *, names: Sequence[str] | None = None) -> str | None:
        """Why this process must not write, if it must not (one stat a file); with
        ``names`` (suffixes), whether those files are still the ones it opened."""
        if self.split and names is None:
            return self.split
        for suffix in self.names if names is None else names:
            identity = self.identities[suffix]
            name = self.path + suffix
            try:
                st = os.stat(name)
            except FileNotFoundError:
                return (f"{name} was deleted (or its directory moved) since this process "
                        f"opened it; {RESTART_ADVICE}")
            except OSError as exc:
                return f"{name} cannot be checked ({exc}); {RESTART_ADVICE}"
            if (st.st_dev, st.st_ino) != identity:
                return f"{name} was replaced by another file since this process opened it; " \
                    f"{RESTART_ADVICE}"
        return None

    def record(self) -> dict[str, Any]:
        """What the checkpointer leaves in its lock file for the others to compare."""
        return {"pid": os.getpid(), "files": {s: list(i) for s, i in self.identities.items()}}

    def mismatch(self, record: Mapping[str, Any] | None) -> str | None:
        """How the files this process opened differ from those of the checkpointer that
        wrote ``record``, if it is another process on the same database file."""
        if not record or record.get("pid") == os.getpid():
            return None
        files = record.get("files")
        if not isinstance(files, dict) or files.get("") != list(self.identities[""]):
            return None  # the holder is on another database file: its own check says so
        for suffix in self.names[1:]:
            if files.get(suffix) != list(self.identities[suffix]):
                return (f"{self.path}{suffix} is not the file the checkpointer (pid "
                        f"{record.get('pid')}) has open: it was deleted or replaced while that "
                        f"process ran; {RESTART_ADVICE}")
        return None

    def others_mismatch(self, *, holder: bool) -> str | None:
        """How the files this process opened differ from another process's: the
        checkpointer's record (if ``holder``: the lock is held by someone else, so its
        record is not a dead process's), or what a process holding a lock on the database
        file has open (Linux; a process of another user, or one in another PID namespace,
        which ``/proc`` does not show, is not compared)."""
        if holder and (found := self.mismatch(read_lock_record(self.path))):
            return found
        if len(self.names) == 1:
            return None
        for pid in _lock_holders(self.identities[""]):
            files = _open_files(pid)
            missing = [s for s in self.names[1:] if files is not None
                       and self.identities[s] not in files]
            if missing:
                return (f"process {pid} has {self.path} open but not the {missing[0]} this "
                        f"process has: one of them was deleted or replaced while the other ran;"
                        f" {RESTART_ADVICE}")
        return None

    def check_others(self, *, holder: bool, confirm_s: float = 0.2) -> None:
        """``others_mismatch``, kept as ``split`` once it has lasted ``confirm_s`` (a
        process opening or closing holds the database a moment before or after its
        sidecars; a checkpointer elected a moment ago may not have written its record)."""
        deadline = time.monotonic() + confirm_s
        while (found := self.others_mismatch(holder=holder)) is not None:
            if time.monotonic() >= deadline:
                if self.split is None:
                    log.error("%s", found)
                self.split = found
                return
            time.sleep(0.02)


def _lock_holders(identity: tuple[int, int]) -> set[int]:
    """Other processes holding a POSIX lock on the file ``identity`` (device, inode), from
    ``/proc/locks`` (Linux; none elsewhere).  In WAL mode every open SQLite connection
    holds a read lock on its database file."""
    dev, ino = identity
    key = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fp:
            lines = fp.read().splitlines()
    except OSError:
        return set()
    # "1: POSIX  ADVISORY  READ 1234 fe:00:2162785 1073741826 1073742335"; a waiter's line
    # has "->" after the number, so its fields do not match.
    pids = {int(f[4]) for f in (line.split() for line in lines)
            if len(f) >= 6 and f[1] == "POSIX" and f[5] == key and f[4].isdigit()}
    pids.discard(os.getpid())
    pids.discard(0)  # a process /proc does not show
    return pids


def _open_files(pid: int) -> set[tuple[int, int]] | None:
    """(device, inode) of every file process ``pid`` has open, or None if it cannot be
    seen (gone, another user's, no ``/proc``).  Only ``stat``: nothing is opened."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    found = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{name}")
            found.add((st.st_dev, st.st_ino))
    return found


# ---------------------------------------------------------------------- group commit ----

GROUP_QUEUE_MAX = 10000  # pending writes before submitters block (backpressure)

def _damage(errors: Iterable[BaseException | None]) -> str | None:
    """The last of ``errors`` that says the file is damaged, as health shows it."""
    found = [e for e in errors if isinstance(e, NotADatabaseError | CorruptDatabaseError)]
    return f"{found[-1].code}: {found[-1]}" if found else None


class _Pending:
    """One write waiting for its group: the op, then its result or error.  ``wake`` is
    held until the write is finished or its caller is to lead the next group; a waiting
    caller blocks on it alone, so a finished group wakes its own members and nobody else."""

    __slots__ = ("error", "finished", "op", "result", "wake")

    def __init__(self, op: Callable[[KvmemConnection], Any]) -> None:
        self.op = op
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class Conditions:
    """What health reports, by name: conditions that hold now (problems) and, once they
    have passed, when each was last seen and how often.  A condition holds until it is
    cleared, or for ``hold_s`` after it was last set.  Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, float]] = {}  # name -> (message, until)
        self._seen: dict[str, dict[str, Any]] = {}

    def set(self, name: str, message: str, *, hold_s: float = math.inf) -> None:
        with self._lock:
            self._active[name] = message, time.monotonic() + hold_s
            seen = self._seen.setdefault(name, {"count": 0})
            seen.update(count=seen["count"] + 1, last_seen=rfc3339(time.time()), message=message)

    def clear(self, name: str) -> None:
        if name in self._active:  # a dict lookup: cheap enough for every group
            with self._lock:
                if self._active.pop(name, None) is not None:
                    self._seen[name]["last_seen"] = rfc3339(time.time())

    def active(self, name: str) -> bool:
        with self._lock:
            return name in self._holding()

    def problems(self) -> list[str]:
        with self._lock:
            return [message for message, _ in self._holding().values()]

    def past(self) -> dict[str, dict[str, Any]]:
        """Conditions that held once and hold no more, with when they were last seen."""
        with self._lock:
            holding = self._holding()
            return {name: dict(seen) for name, seen in self._seen.items() if name not in holding}

    def _holding(self) -> dict[str, tuple[str, float]]:
        """The conditions that hold now, once those past their ``hold_s`` are dropped."""
        now = time.monotonic()
        for name in [n for n, (_, until) in self._active.items() if until <= now]:
            del self._active[name]
        return self._active


class GroupCommitter:
    """Group commit: every write of the process goes through here, and concurrent writes
    share one transaction and one fsync.

    The shape is LevelDB's write group (``DBImpl::Write``): a caller appends its op to a
    queue; the caller at the front, when no group is running, leads: it takes every op
    queued (up to ``group_commit_max``), runs them in one ``BEGIN IMMEDIATE … COMMIT``, each
    in its own SAVEPOINT (a failing op is rolled back and fails alone), then wakes the
    group.  Each caller returns only after the COMMIT that holds its op returned: nothing
    is acknowledged before it is durable.  If the BEGIN or COMMIT fails, every op of the
    group fails with that error and none was applied.  A lone writer is its own leader.

    Between groups, still leading, the leader does the write path's maintenance
    (``_between_groups``): in the elected checkpointer's process (``elected``, set by its
    ``Checkpointer``) it checkpoints on this connection about every ``checkpoint_pages``
    WAL frames and when asked (idle, a WAL to shrink, a full disk); elsewhere it checks
    that some checkpointer keeps the WAL bounded.  That work never fails a committed
    group: its errors are logged, counted and shown by health.

    One leader at a time uses the connection (``check_same_thread=False`` only lets the
    lead move between threads).  Past GROUP_QUEUE_MAX waiting writes, callers block.
    """

    def __init__(self, path: str, config: Config, *,
                 precommit: Callable[[], str | None] = lambda: None,
                 conditions: Conditions | None = None) -> None:
        self.path, self.config = path, config
        self.precommit = precommit  # returns a reason not to commit (the file was replaced)
        self.conditions = conditions or Conditions()
        self.failure: str | None = None  # the last corruption seen, for health
        self._conn = open_db(path, config=config, create=False, check_same_thread=False)
        if config.journal_mode == "wal":  # a rollback-journal COMMIT waits for readers
            self._conn.execute("PRAGMA busy_timeout = 0")
            self._conn.kv_busy_off = True
        self._gate: KvmemConnection | None = None
        self.page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self._cond = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._leading = False
        self._epoch = 0  # counts leaderships, for set_elected
        self._closed = False
        self.elected = False  # this connection is the one that checkpoints (Checkpointer)
        self._wanted: str | None = None  # a checkpoint asked for: "idle" or "shrink"
        self._groups_since = 0  # committed groups since the last checkpoint
        self._frames_per_group = 8.0  # learnt from each checkpoint's frame count
        self.pages_limit = config.wal_pages  # lowered by the Checkpointer: wal_pages_limit()
        self._last_frames = 0
        self.last_complete = True  # the last checkpoint took every frame
        self._wal_high = config.wal_keep_bytes
        self._pinned_since: float | None = None  # checkpoints incomplete since then
        self._next_fallback = 0.0
        self.last_checkpoint = time.monotonic()
        self._stats: dict[str, Any] = {
            "commits": 0, "ops": 0, "failed_ops": 0, "largest_group": 0, "checkpoints": 0,
            "checkpoints_busy": 0, "fallback_checkpoints": 0, "after_commit_errors": 0,
            "last_checkpoint": None, "last_after_commit_error": None,
        }

    def submit(self, op: Callable[[KvmemConnection], Any]) -> Any:
        """Run ``op`` in a group; return its result once that group committed."""
        pending = _Pending(op)
        with self._cond:
            while len(self._queue) >= GROUP_QUEUE_MAX and not self._closed:
                self._cond.wait()
            if self._closed:
                raise StorageError(f"{self.path}: the store is closed")
            self._queue.append(pending)
            lead = not self._leading  # then the queue was empty: this write is its front
            self._leading = True
        if not lead:
            pending.wake.acquire()  # finished, or handed the lead at the front of the queue
        if not pending.finished:
            self._lead()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _lead(self) -> None:
        """Commit the group at the front of the queue, wake its members, do the work
        between groups, then hand the lead to the next front (or give it up)."""
        with self._cond:
            count = min(len(self._queue), self.config.group_commit_max)
            group = [self._queue.popleft() for _ in range(count)]
            if len(self._queue) < GROUP_QUEUE_MAX:
                self._cond.notify_all()  # room again for blocked submitters (rare)
        committed = False
        try:
            committed = self._commit(self._conn, group)
        finally:
            for member in group:  # their writes are done: wake them now
                member.finished = True
                member.wake.release()  # held by each member until now (a leader re-took its own)
            try:
                full = any(isinstance(m.error, StorageFullError) for m in group)
                self._between_groups(committed=committed, full=full)
            finally:
                self._hand_over()

    def _hand_over(self) -> None:
        with self._cond:
            self._epoch += 1
            if self._queue:
                self._queue[0].wake.release()  # the next front leads; _leading stays True
            else:
                self._leading = False
            self._cond.notify_all()  # set_elected(), close() and request_checkpoint() wait

    def request_checkpoint(self, reason: str) -> None:
        """Ask for a checkpoint on the writer connection ("idle" or "shrink"); run it now
        if no group is running or waiting, else the next leader runs it."""
        with self._cond:
            if self._closed:
                return
            self._wanted = "shrink" if "shrink" in (reason, self._wanted) else reason
            if self._leading:
                return
            self._leading = True
        try:
            self._between_groups(committed=False, full=False)
        finally:
            self._hand_over()

    def set_elected(self, elected: bool) -> None:
        """Make this connection the process's checkpointing one, or stop that; stopping
        returns once no checkpoint of it can be running (the leader of the moment, who may
        have read ``elected`` before, has finished), before the lock is let go."""
        with self._cond:
            self.elected = elected
            epoch = self._epoch
            while not elected and self._leading and self._epoch == epoch:
                self._cond.wait()

    def pending(self) -> int:
        """Writes waiting for a group (not counting the one being committed)."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._stats, frames_per_group=round(self._frames_per_group, 1))

    def close(self) -> None:
        """Refuse new writes, let queued ones commit; if this connection is the elected
        one, empty the WAL into the database (a clean stop); close the connections."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            while self._leading or self._queue:
                self._cond.wait()
        try:
            if self.elected and self.config.journal_mode == "wal" and not self.precommit():
                self._checkpoint("close", shrink=True, wait_ms=CHECKPOINT_BUSY_TIMEOUT_MS)
        except (KvmemError, OSError) as exc:
            checkpoint_log.warning("%s: final checkpoint failed: %s", self.path, exc)
        finally:
            self.elected = False
            if self._gate is not None:
                self._gate.close()
            self._conn.close()

    def _commit(self, conn: KvmemConnection, group: list[_Pending]) -> bool:
        committed = False
        alone = len(group) == 1  # then a failing op fails the transaction: no SAVEPOINT
        try:
            with transaction(conn):
                for pending in group:
                    if alone:
                        pending.result = pending.op(conn)
                        continue
                    conn.execute("SAVEPOINT kvmem_op")
                    try:
                        pending.result = pending.op(conn)
                    except BaseException as exc:
                        pending.error = exc
                        if not conn.in_transaction:
                            # SQLite rolled the whole transaction back by itself (it may
                            # after SQLITE_FULL or an I/O error): the group is lost.
                            raise
                        conn.execute("ROLLBACK TO kvmem_op")
                    conn.execute("RELEASE kvmem_op")
                problem = self.precommit()
                if problem:  # never acknowledge writes that went into an unlinked file
                    raise StorageError(f"{problem}; write refused")
            committed = True
        except BaseException as exc:
            for pending in group:
                pending.result, pending.error = None, pending.error or exc
        self.failure = _damage([p.error for p in group]) or self.failure
        with self._cond:
            self._stats["commits"] += committed
            self._stats["ops"] += len(group)
            self._stats["failed_ops"] += sum(p.error is not None for p in group)
            self._stats["largest_group"] = max(self._stats["largest_group"], len(group))
        return committed

    def _count(self, name: str, **values: Any) -> None:
        """One more ``name`` in the stats, and ``values`` set there."""
        with self._cond:
            self._stats[name] += 1
            self._stats.update(values)

    # -- between groups ------------------------------------------------------------------

    def _between_groups(self, *, committed: bool, full: bool) -> None:
        """The write path's maintenance, run by the leader after its group.  Never raises:
        the group's writes are already answered."""
        if self.config.journal_mode != "wal":
            return
        try:
            if committed:
                self._groups_since += 1
            if self.elected:
                wanted, self._wanted = self._wanted, None
                if full or wanted == "shrink":
                    self._checkpoint("storage full" if full else "shrink", shrink=True)
                elif wanted or self._groups_since * self._frames_per_group >= self.pages_limit:
                    self._checkpoint(wanted or "pages")
                elif wal_size(self.path) > self._wal_high:  # the estimate was low
                    self._checkpoint("growth")
            elif committed or full:
                self._fall_back_if_stuck()
        except Exception as exc:  # reported, never raised into the group
            with contextlib.suppress(Exception):  # nor may the report itself raise
                text = f"{type(exc).__name__}: {exc}"
                checkpoint_log.warning("%s: after a commit: %s", self.path, text)
                self._count("after_commit_errors", last_after_commit_error=text)
                self.conditions.set("after_commit", "the last checkpoint after a commit "
                                    f"failed: {text}", hold_s=self.config.checkpoint_interval_s)

    def _checkpoint(self, why: str, *, shrink: bool = False, wait_ms: int = GATE_WAIT_MS) -> None:
        if self.precommit():  # a file was deleted or replaced: a checkpoint (a TRUNCATE most
            return  # of all) could wipe frames that another process wrote and acknowledged
        if self._gate is None:
            self._gate = _gate_connection(self.path, self.config)
        result = checkpoint_wal(self._conn, self._gate, wait_ms=wait_ms, shrink=shrink)
        now = time.monotonic()
        if result is None:  # another process is writing: try again after the next group
            self._count("checkpoints_busy")
            return
        _, frames, done = result
        if self._groups_since:  # frames written since the last checkpoint, per group
            new = frames if self.last_complete or frames < self._last_frames \
                else frames - self._last_frames
            self._frames_per_group = max(1.0, (self._frames_per_group
                                               + new / self._groups_since) / 2)
        self._groups_since, self._last_frames = 0, frames
        self.last_complete = frames == done
        # A restarted WAL is overwritten from its start and its file does not grow; if
        # it grows past this, the WAL got more frames than the estimate said.
        self._wal_high = max(wal_size(self.path), self.pages_limit * (self.page_size + 24))
        self.conditions.clear("after_commit")
        self.last_checkpoint = now
        self._count("checkpoints", last_checkpoint={
            "why": why, "wal_frames": frames, "checkpointed": done, "at": rfc3339(time.time())})
        if self.last_complete:
            self._pinned_since = None
            self.conditions.clear("wal_pinned")
        elif self._pinned_since is None:
            self._pinned_since = now
        elif now - self._pinned_since > self.config.reader_warn_s:
            message = (f"checkpoints have not completed for {now - self._pinned_since:.1f} s:"
                       f" a reader holds an old snapshot ({frames - done} of {frames} WAL"
                       " frames wait for it)")
            if not self.conditions.active("wal_pinned"):
                checkpoint_log.warning("%s: %s", self.path, message)
            self.conditions.set("wal_pinned", message)

    def _fall_back_if_stuck(self) -> None:
        """Not the elected process: checkpoint once if ``fallback_reason`` says so (under
        the checkpoint lock when it is free).  After an attempt that failed or could not
        finish (a reader holds an old snapshot) the next waits a poll."""
        size = wal_size(self.path)
        now = time.monotonic()
        if size <= self.config.wal_soft_cap_bytes:
            self.conditions.clear("after_commit")  # nothing to do: nothing failing
            return
        if now < self._next_fallback:
            return
        self._next_fallback = now + self.config.checkpoint_poll_s  # unless it finishes
        lock = CheckpointLock(self.path)
        try:
            try:
                free = lock.acquire()
            except OSError:
                if size <= self.config.wal_hard_cap_bytes:
                    raise
                free = False  # past the hard cap a checkpoint is due even so
            why = fallback_reason(size, lock_free=free, config=self.config)
            if why is None:  # a checkpointer exists and keeps the WAL under the hard cap
                self._next_fallback = now
                self.conditions.clear("after_commit")
                return
            if why == "fallback":
                message = (f"WAL is {size} bytes, past the hard cap "
                           f"{self.config.wal_hard_cap_bytes}: the checkpointer does not keep "
                           "up (or is stuck), so writers checkpoint themselves")
                checkpoint_log.warning("%s: %s", self.path, message)
                self.conditions.set("wal_hard_cap", message,
                                    hold_s=self.config.checkpoint_interval_s)
                self._count("fallback_checkpoints")
            self._checkpoint(why, shrink=True)
        finally:
            lock.release()
        if self.last_complete:
            self._next_fallback = now


# ----------------------------------------------------------------------------- Store ----

class _ReadPool:
    """Read connections to borrow, one thread at a time (a server thread per request;
    opening a database per request would be slow).  At most ``read_connections`` are open
    at once, each with the smaller ``read_cache_kib`` page cache, so memory stays bounded
    however many threads read; a reader that finds them all borrowed waits for one up to
    ``busy_timeout_ms``, then gets BusyError.  Knows what each borrowed connection is doing
    and since when, to name long readers."""

    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = dataclasses.replace(config, cache_size_kib=config.read_cache_kib)
        self._idle: list[KvmemConnection] = []
        # One token a connection that may be open (a C queue: cheap when one is free).  A
        # reader that finds none waits in line (``_waiters``), and a slot given back goes
        # to the first in line: first come, first served, so no reader starves.
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(config.read_connections):
            self._slots.put(None)
        self._line = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._busy: dict[int, tuple[float, str]] = {}  # id(conn) -> (since, what)
        self.failure: str | None = None  # the last corruption seen, for health
        self.files: FileWatch | None = None  # the Store's, once it has one

    def borrow(self, what: str) -> _Borrowed:
        """``with pool.borrow("get k") as conn:`` (a class, not a generator: reads are hot)."""
        return _Borrowed(self, what)

    def take(self, what: str = "read") -> KvmemConnection:
        self._wait_for_slot()
        try:
            conn = self._idle.pop()  # atomic under the GIL
        except IndexError:
            try:
                # A connection opened after a -wal was deleted would read another WAL
                # through this process's -shm: never open one then.
                if self.files is not None and (problem := self.files.problem()):
                    raise StorageError(problem)
                conn = open_db(self.path, config=self.config, create=False,
                               check_same_thread=False)
            except BaseException:
                self._give_slot()
                raise
        self._busy[id(conn)] = (time.monotonic(), what)  # one thread per conn: no lock
        return conn

    def give(self, conn: KvmemConnection, exc: BaseException | None, *,
             borrowed: bool = True) -> None:
        """Return a borrowed connection (or, ``borrowed=False``, add one opened elsewhere
        with this pool's config)."""
        self._busy.pop(id(conn), None)
        if exc is not None:
            self.failure = _damage([exc]) or self.failure
            _rollback(conn)
        self._idle.append(conn)
        if borrowed:
            self._give_slot()

    def _wait_for_slot(self) -> None:
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            pass
        with self._line:
            try:
                return self._slots.get_nowait()
            except queue.Empty:
                turn = threading.Lock()
                turn.acquire()
                self._waiters.append(turn)
        if turn.acquire(timeout=self.config.busy_timeout_ms / 1000):
            return None  # a slot was handed over
        with self._line:
            if turn in self._waiters:
                self._waiters.remove(turn)
                raise BusyError(f"{self.path}: all {self.config.read_connections} read "
                                f"connections stayed in use for {self.config.busy_timeout_ms} "
                                "ms; retry later")
        return None  # handed over just as the wait ran out

    def _give_slot(self) -> None:
        with self._line:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._slots.put(None)

    def long_readers(self, limit_s: float) -> list[tuple[float, str]]:
        """``(seconds, what)`` of the reads that have run longer than ``limit_s``."""
        now = time.monotonic()
        return sorted(((now - since, what) for since, what in list(self._busy.values())
                       if now - since > limit_s), reverse=True)

    def close(self) -> None:
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return


class _Borrowed:
    __slots__ = ("conn", "pool", "what")

    def __init__(self, pool: _ReadPool, what: str) -> None:
        self.pool, self.what = pool, what

    def __enter__(self) -> KvmemConnection:
        self.conn = self.pool.take(self.what)
        return self.conn

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.pool.give(self.conn, exc)


def parse_batch(ops: Sequence[Mapping[str, Any] | SetOp | DeleteOp], config: Config, *,
                namespace: str = "default") -> list[SetOp | DeleteOp]:
    """A batch's ops checked (``Store.batch``): InvalidInputError naming the bad op's index."""
    if not isinstance(ops, list | tuple) or not ops:
        raise InvalidInputError("ops must be a non-empty list")
    if len(ops) > config.max_batch_ops:
        raise InvalidInputError(f"at most {config.max_batch_ops} ops in a batch")
    parsed: list[SetOp | DeleteOp] = []
    for index, spec in enumerate(ops):
        try:
            if isinstance(spec, Op) and not isinstance(spec, SetOp | DeleteOp):
                raise InvalidInputError(f"a {spec.kind} op cannot be in a batch")
            parsed.append(spec.checked_for(config) if isinstance(spec, SetOp | DeleteOp)
                          else parse_batch_op(spec, config, namespace=namespace))
        except InvalidInputError as exc:
            raise type(exc)(f"ops[{index}]: {exc}") from None
    return parsed


def batch_results(ops: Sequence[SetOp | DeleteOp],
                  apply: Callable[[SetOp | DeleteOp], Any]) -> list[dict[str, Any]]:
    """Apply a batch's ops in order inside the caller's transaction; a version conflict
    names its op (``op_index``) and the whole batch fails."""
    results = []
    for index, op in enumerate(ops):
        try:
            results.append({"op": op.kind, op.result: apply(op)})
        except VersionConflictError as exc:
            raise VersionConflictError(
                f"ops[{index}]: {exc}; no op of the batch was applied",
                current_version=exc.current_version, op_index=index, key=exc.key,
            ) from None
    return results


class BaseStore:
    """The Store's API, written once for both backends: ``Store`` (SQLite, below) and
    ``kvmem_pg.PgStore`` (PostgreSQL).  Here are the arguments' checks and the model's
    rules; a backend provides the storage: ``apply`` (one op, one transaction),
    ``_batch`` (checked ops, one transaction, through ``batch_results``),
    ``_import_chunk``, ``_list_rows``, ``_forget_count``, ``_forget_window`` and
    ``_search``."""

    config: Config
    clock: Callable[[], float]
    _cursor_secret: bytes
    _interrupted: threading.Event

    # -- what a backend provides -------------------------------------------------------

    def apply(self, op: Op) -> Any:
        raise NotImplementedError

    def _batch(self, ops: builtins.list[SetOp | DeleteOp]) -> builtins.list[dict[str, Any]]:
        raise NotImplementedError

    def _import_chunk(self, memories: builtins.list[Memory]) -> int:
        """Store ``memories`` exactly as given in one transaction; how many."""
        raise NotImplementedError

    def _list_rows(self, namespace: str, filters: Filters, archived: bool, limit: int,
                   after: str | None) -> tuple[builtins.list[Any], bool]:
        """A list page's rows (SELECT_MEMORY's columns) after the key ``after``, and
        whether there are more (``limit`` and ``max_page_bytes`` as ``list`` says)."""
        raise NotImplementedError

    def _forget_count(self, namespace: str, filters: Filters) -> tuple[int, builtins.list[str]]:
        """From one snapshot: how many memories the filters select, and the first
        FORGET_SAMPLE of their keys."""
        raise NotImplementedError

    def _forget_window(self, namespace: str, filters: Filters,
                       last: str | None) -> tuple[builtins.list[str], str | None]:
        """One transaction of forget: the next ``prune_batch`` keys after ``last`` (from
        the prefix on), deleting those the filters select; their keys in key order, and
        the window's last key (None past the namespace's end)."""
        raise NotImplementedError

    def _search(self, terms: builtins.list[str], namespaces: tuple[str, ...] | None,
                filters: Filters, limit: int) -> builtins.list[Hit]:
        """``search`` on checked arguments: ``terms`` from ``fts_terms``, ``namespaces``
        from ``validate_search_namespaces`` (None: all)."""
        raise NotImplementedError

    # -- writes ------------------------------------------------------------------------

    def set(self, key: str, value: Any, *, namespace: str = "default",
            tags: Sequence[str] | None = None, ttl_seconds: float | None = None,
            half_life_seconds: float | str | None = DEFAULT_HALF_LIFE,
            if_version: int | None = None) -> Memory:
        """Create or replace a memory; return it as stored (``version == 1``: created).

        A set replaces value, tags, TTL and half-life (``"default"`` = the configured
        default_half_life_s, ``None`` = never fades), restores full strength and
        un-archives.  ``if_version=N`` writes only if the current version is N, ``0`` only
        if the key is absent (an expired memory counts as absent, an archived one as
        present).  Durable when it returns.

        Raises:
            InvalidInputError, PayloadTooLargeError: bad arguments; nothing written.
            VersionConflictError: ``if_version`` did not match (``current_version`` set).
            BusyError, StorageFullError, ...: the database failed; nothing written.
        """
        spec = {"value": value, "tags": tags, "ttl_seconds": ttl_seconds,
                "half_life_seconds": half_life_seconds, "if_version": if_version}
        result: Memory = self.apply(SetOp.parse(spec, self.config, key=key, namespace=namespace))
        return result

    def delete(self, key: str, *, namespace: str = "default",
               if_version: int | None = None) -> bool:
        """Delete a memory (live or archived); False if there was none.  With
        ``if_version`` it deletes only that version (VersionConflictError otherwise)."""
        op = DeleteOp.parse({"if_version": if_version}, self.config, key=key, namespace=namespace)
        result: bool = self.apply(op)
        return result

    def reinforce(self, key: str, *, namespace: str = "default") -> Memory:
        """Strengthen a memory by the reinforce rule (``reinforced_strength``) and restart
        its decay clock; restores an archived memory.  The version is unchanged: it counts
        changes of content.  Raises NotFoundError when absent or expired."""
        result: Memory = self.apply(ReinforceOp.parse({}, self.config, key=key,
                                                      namespace=namespace))
        return result

    def batch(self, ops: Sequence[Mapping[str, Any] | SetOp | DeleteOp], *,
              namespace: str = "default") -> builtins.list[dict[str, Any]]:
        """Apply set/delete ops atomically, in order: all or none.

        Each op is a ``SetOp`` or ``DeleteOp`` (checked as ``apply`` checks it; it keeps its
        own namespace) or a mapping ``parse_batch_op`` reads (``"op"``, ``"set"`` or
        ``"delete"``, and that op's arguments but the namespace, which is ``namespace``).
        Returns one result per op: ``{"op": "set", "memory": Memory}`` or ``{"op": "delete",
        "deleted": bool}``.

        Raises:
            InvalidInputError: an op is malformed (the message names its index).
            VersionConflictError: op ``op_index`` failed its ``if_version``; none was applied.
        """
        return self._batch(parse_batch(ops, self.config, namespace=namespace))

    def import_(self, fp: IO[str]) -> dict[str, int]:
        """Import JSON Lines written by ``export`` (one memory per line, every field) from
        ``fp``, which must be seekable (a file); memory use does not grow with its size.

        Every line is checked first: if any is bad, ``InvalidInputError`` lists the line
        numbers (the first 20) and nothing is written.  Then each memory is stored exactly
        as exported (version and times kept), replacing one with the same namespace and
        key, in transactions of ``prune_batch`` lines: **resumable**, not one transaction
        (idempotent, so an import cut short by a crash or a full disk is finished by
        running it again; other writers are never locked out for long)."""
        count = check_import(fp, self.config)
        memories = (memory_from_record(json.loads(line), self.config)
                    for line in fp if line.strip())
        imported = 0
        while chunk := builtins.list(itertools.islice(memories, self.config.prune_batch)):
            imported += self._import_chunk(chunk)
        return {"imported": imported, "lines": count}

    def forget(self, *, namespace: str = "default", prefix: str | None = None,
               tags: Sequence[str] = (), updated_after: float | str | None = None,
               updated_before: float | str | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Delete every memory of ``namespace`` (live, archived or expired) that the
        ``Filters`` select; a (non-empty) ``prefix`` or ``tags`` must be given.

        It walks the namespace in key order, ``prune_batch`` memories a transaction
        (scanned, not matched: a rare tag costs no longer lock), so other writers wait for
        one batch at most; a memory is deleted if the filters select it when its batch
        runs (one written meanwhile behind the walk stays).  ``interrupt()`` (a server
        stopping) ends it between batches with BusyError.  With ``dry_run`` nothing is
        deleted, and the count and keys come from one snapshot.

        Returns ``{"dry_run", "matched", "deleted", "keys", "more"}``: how many memories
        matched, how many were deleted, the first FORGET_SAMPLE of their keys in key order
        and whether there were more."""
        namespace = validate_namespace(namespace, self.config)
        filters = Filters.parse(self.config, tags=tags, prefix=prefix,
                                updated_after=updated_after, updated_before=updated_before)
        if filters.prefix is None and not filters.tags:
            raise InvalidInputError("forget needs a prefix or tags (it never empties a "
                                    "namespace by default)")
        if not isinstance(dry_run, bool):
            raise InvalidInputError("dry_run must be true or false")
        if dry_run:
            matched, sample = self._forget_count(namespace, filters)
            return {"dry_run": True, "matched": matched, "deleted": 0, "keys": sample,
                    "more": matched > len(sample)}
        keys: builtins.list[str] = []
        deleted = 0
        last: str | None = None
        while True:
            if self._interrupted.is_set():
                raise BusyError(f"stopping: forget ended after deleting {deleted} memories; "
                                "run it again to finish")
            batch, last = self._forget_window(namespace, filters, last)
            deleted += len(batch)
            keys.extend(batch[:FORGET_SAMPLE - len(keys)])
            if last is None or (filters.prefix is not None
                                and not last.startswith(filters.prefix)):
                break  # the walk passed the namespace's last key, or the prefix's keys
        return {"dry_run": False, "matched": deleted, "deleted": deleted, "keys": keys,
                "more": deleted > len(keys)}

    def interrupt(self) -> None:
        """Make long work (``forget``) end at its next batch: for a server that stops."""
        self._interrupted.set()

    # -- reads -------------------------------------------------------------------------

    def list(self, *, namespace: str = "default", prefix: str | None = None,
             tag: str | None = None, tags: Sequence[str] = (),
             updated_after: float | str | None = None,
             updated_before: float | str | None = None, archived: bool = False,
             limit: int = 100, cursor: str | None = None) -> Page:
        """Memories in key order, live ones (or, with ``archived=True``, archived ones),
        narrowed by ``Filters`` (``tag`` is one more of ``tags``).

        Pagination is by key: ``next_cursor`` resumes after the last key returned, so a
        scan never repeats a key and never skips one that existed when it started and
        still exists, whatever others write meanwhile.  ``None`` = no more pages.  A page
        holds at most ``limit`` memories, fewer once they pass ``max_page_bytes`` (values,
        keys and tags as stored; at least one memory a page).
        """
        namespace = validate_namespace(namespace, self.config)
        if tag is not None:
            tags = [*validate_tags([tag], self.config), *validate_tags(tags, self.config)]
        filters = Filters.parse(self.config, tags=tags, prefix=prefix,
                                updated_after=updated_after, updated_before=updated_before)
        if not isinstance(archived, bool):
            raise InvalidInputError("archived must be true or false")
        limit = validate_limit(limit, MAX_LIST_LIMIT)
        scope = filters.key()
        after = None if cursor is None else decode_cursor(cursor, namespace, None, scope,
                                                          archived, secret=self._cursor_secret)
        rows, more = self._list_rows(namespace, filters, archived, limit, after)
        items = [_row_memory(r) for r in rows]
        return Page(items, encode_cursor(items[-1].key, namespace, None, scope, archived,
                                         secret=self._cursor_secret) if more else None)

    def search(self, query: str, *, namespace: str | Sequence[str] = "default",
               tags: Sequence[str] = (), prefix: str | None = None,
               updated_after: float | str | None = None,
               updated_before: float | str | None = None,
               limit: int = 20) -> builtins.list[Hit]:
        """Full-text search over the key, the value's strings, object keys and numbers, and
        the tags of live memories in ``namespace`` (a name, a list of names, or
        ALL_NAMESPACES), narrowed by ``Filters``; best first by ``search_score``: BM25 ×
        current strength.  The query is plain words (``fts_terms``: FTS syntax in it is only
        text).  At most ``limit`` hits, fewer once their memories pass ``max_page_bytes`` (at
        least one).

        A word in at least half of all memories weighs nothing when the query has other
        words (``_informative_terms``: BM25's IDF of such a word is not positive); memories
        that hold only such words come after the others, if there is room.  Everything is
        read in one snapshot.

        Raises InvalidInputError for bad arguments and for a search still running after
        ``search_timeout_ms``; IndexRebuildingError while an upgrade's rebuild runs.
        """
        namespaces = validate_search_namespaces(namespace, self.config)
        filters = Filters.parse(self.config, tags=tags, prefix=prefix,
                                updated_after=updated_after, updated_before=updated_before)
        terms = fts_terms(query)
        limit = validate_limit(limit, MAX_SEARCH_LIMIT)
        return self._search(terms, namespaces, filters, limit)


class Store(BaseStore):
    """The memory store: namespaced JSON memories with tags, TTL, decay, CAS and search.

    Thread-safe.  Reads borrow a connection from a small pool; every write goes through the
    process's ``GroupCommitter`` and returns only after its COMMIT.  ``get``, ``list`` and
    ``search`` never write.  Times come from ``clock`` (Unix seconds; injectable for tests).
    Open with ``Store.open()``; ``close()`` (or ``with``) stops everything."""

    def __init__(self, path: str, config: Config, *, clock: Callable[[], float] = time.time,
                 role: str = "library", checkpointer: bool = True, decay: bool = False) -> None:
        self.path, self.config, self.clock, self.role = path, config, clock, role
        self._closed = False
        self._interrupted = threading.Event()  # interrupt(): long work ends
        self._last_prune: PruneResult | None = None
        self._reads = _ReadPool(path, config)
        conn = open_db(path, config=self._reads.config, check_same_thread=False)
        self.conditions = Conditions()
        self._checkpointer: Checkpointer | None = None
        self._decay: DecayScheduler | None = None
        self._indexer: IndexBuilder | None = None
        try:
            self.files = self._reads.files = FileWatch(path, config.journal_mode)
            # Before this process writes anything.
            self.files.check_others(holder=not checkpoint_lock_free(path))
            self._cursor_secret = bytes(conn.execute(GET_CURSOR_SECRET).fetchone()[0])
            self._writer = GroupCommitter(path, config, precommit=self.files.problem,
                                          conditions=self.conditions)
            if checkpointer:
                self._checkpointer = Checkpointer(
                    path, config=config, role=role, writer=self._writer, reads=self._reads,
                    conditions=self.conditions, files=self.files).start()
            if decay:
                self._decay = DecayScheduler(self, role=role).start()
            if conn.execute(GET_PENDING_THROUGH).fetchone()[0]:
                self._indexer = IndexBuilder(self, role=role).start()
        except BaseException:
            self._stop_background()
            if hasattr(self, "_writer"):
                self._writer.close()
            conn.close()
            raise
        self._reads.give(conn, None, borrowed=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, *, config: Config | None = None,
             clock: Callable[[], float] = time.time, role: str = "library",
             checkpointer: bool = True, decay: bool = False) -> Store:
        """Open (creating if needed) the store at ``path`` (default ``config.db``), with a
        ``Checkpointer`` (unless ``checkpointer=False``) and, with ``decay=True``, a
        ``DecayScheduler``.  Raises what ``open_db()`` raises."""
        config = config or Config.build()
        real = os.path.realpath(os.fspath(path) if path is not None else config.db)
        return cls(real, config, clock=clock, role=role, checkpointer=checkpointer, decay=decay)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish queued writes, fold the WAL into the database if this process is the
        checkpointer, stop the background threads, close every connection."""
        if self._closed:
            return
        self._closed = True
        for background in (self._decay, self._indexer):
            if background is not None:
                background.stop()
        self._writer.close()  # the elected writer's final checkpoint happens here
        self._stop_background()  # then the checkpoint lock is let go
        self._reads.close()

    def _stop_background(self) -> None:
        for background in (self._decay, self._indexer):
            if background is not None:
                background.stop()
        if self._checkpointer is not None:
            self._checkpointer.stop()

    # -- writes ------------------------------------------------------------------------

    def _batch(self, ops: builtins.list[SetOp | DeleteOp]) -> builtins.list[dict[str, Any]]:
        def run(conn: KvmemConnection) -> builtins.list[dict[str, Any]]:
            now = self.clock()
            return batch_results(ops, lambda op: _apply(conn, op, now))

        result: builtins.list[dict[str, Any]] = self._writer.submit(run)
        return result

    def _import_chunk(self, memories: builtins.list[Memory]) -> int:
        result: int = self._writer.submit(functools.partial(_put_exact, memories))
        return result

    def _forget_count(self, namespace: str, filters: Filters) -> tuple[int, builtins.list[str]]:
        where, params = filters.sql("m")
        select = f"SELECT key FROM memories AS m WHERE namespace = ?{where} ORDER BY key"
        with self._reads.borrow(f"forget {namespace}") as conn:
            conn.execute("BEGIN")  # one snapshot: the count is of the keys listed
            try:
                matched = conn.execute(f"SELECT count(*) FROM memories AS m WHERE "
                                       f"namespace = ?{where}",
                                       (namespace, *params)).fetchone()[0]
                sample = [r[0] for r in conn.execute(select + " LIMIT ?",
                                                     (namespace, *params, FORGET_SAMPLE))]
            finally:
                conn.execute("COMMIT")
        return int(matched), sample

    def _forget_window(self, namespace: str, filters: Filters,
                       last: str | None) -> tuple[builtins.list[str], str | None]:
        where, params = filters.sql("m")
        window = ("SELECT id, key, tags, updated_at FROM memories WHERE namespace = ? AND "
                  "key >= ? AND (key > ? OR ?) ORDER BY key LIMIT ?")

        def step(conn: KvmemConnection) -> tuple[builtins.list[str], str | None]:
            # One read of the window: each row, and whether the filters select it.
            rows = conn.execute(f"SELECT id, key, 1{where} FROM ({window}) AS m",
                                (*params, namespace, filters.prefix or "", last or "",
                                 last is None, self.config.prune_batch)).fetchall()
            hits = [(row_id, key) for row_id, key, hit in rows if hit]
            conn.executemany("DELETE FROM memories WHERE id = ?", [(h[0],) for h in hits])
            return [h[1] for h in hits], rows[-1][1] if rows else None

        result: tuple[builtins.list[str], str | None] = self._writer.submit(step)
        return result

    def apply(self, op: Op) -> Any:
        """Run one op in a group commit; its outcome once it is durable.  An op not made
        by ``parse`` under this store's config is checked first (``Op.checked_for``)."""
        op = op.checked_for(self.config)
        return self._writer.submit(lambda conn: _apply(conn, op, self.clock()))

    def prune(self, now: float | None = None) -> PruneResult:
        """One decay pass: delete expired memories, archive live ones whose current
        strength is below ``archive_threshold``.  Works in transactions of at most
        ``prune_batch`` rows; idempotent, so several processes may run it at once."""
        now = self.clock() if now is None else now
        threshold = self.config.archive_threshold
        limit = self.config.prune_batch
        totals = {"archived": 0, "deleted": 0, "batches": 0}

        def step(conn: KvmemConnection) -> tuple[int, int]:
            ids = [r[0] for r in conn.execute(f"SELECT id FROM memories WHERE {EXPIRED} LIMIT ?",
                                              (now, limit))]
            conn.executemany("DELETE FROM memories WHERE id = ?", [(i,) for i in ids])
            fading = [r[0] for r in conn.execute(
                "SELECT id FROM memories WHERE archived = 0 AND half_life_seconds IS NOT NULL"
                " AND kvmem_strength(strength, last_reinforced_at, half_life_seconds, ?) < ?"
                " LIMIT ?", (now, threshold, limit))]
            conn.executemany("UPDATE memories SET archived = 1 WHERE id = ?",
                             [(i,) for i in fading])
            return len(ids), len(fading)

        while True:
            deleted, archived = self._writer.submit(step)
            totals["batches"] += 1
            totals["deleted"] += deleted
            totals["archived"] += archived
            if deleted < limit and archived < limit:
                break
        result = PruneResult(totals["archived"], totals["deleted"], totals["batches"], now)
        self._last_prune = result
        return result

    # -- reads -------------------------------------------------------------------------

    def get(self, key: str, *, namespace: str = "default") -> Memory | None:
        """The live memory, or None (absent, expired or archived).  Never writes."""
        namespace = validate_namespace(namespace, self.config)
        key = validate_key(key, self.config)
        with self._reads.borrow(f"get {namespace}/{key}") as conn:
            row = conn.execute(GET_LIVE, (namespace, key, self.clock())).fetchone()
        return None if row is None else _row_memory(row)

    def _list_rows(self, namespace: str, filters: Filters, archived: bool, limit: int,
                   after: str | None) -> tuple[builtins.list[Any], bool]:
        sql = SELECT_MEMORY + f" WHERE namespace = ? AND archived = ? AND NOT {EXPIRED}"
        params: list[Any] = [namespace, int(archived), self.clock()]
        if after is not None:
            sql += " AND key > ?"
            params.append(after)
        where, more_params = filters.sql("memories")
        sql += where + " ORDER BY key LIMIT ?"
        params += [*more_params, limit + 1]
        with self._reads.borrow(f"list {namespace}") as conn:
            return self._page_rows(conn, sql, params, limit)

    def namespaces(self) -> builtins.list[dict[str, Any]]:
        """Every namespace that holds a memory, in name order, with how many of its
        memories are live and archived (expired ones not yet pruned are not counted)."""
        now = self.clock()
        with self._reads.borrow("namespaces") as conn:
            rows = conn.execute(
                f"SELECT namespace, sum({LIVE}), sum(archived = 1 AND NOT {EXPIRED})"
                " FROM memories GROUP BY namespace ORDER BY namespace", (now, now)).fetchall()
        return [{"namespace": name, "live": live, "archived": archived}
                for name, live, archived in rows if live or archived]

    def _page_rows(self, conn: KvmemConnection, sql: str, params: Sequence[Any],
                   limit: int) -> tuple[builtins.list[Any], bool]:
        """At most ``limit`` rows of ``sql``, fewer once they pass ``max_page_bytes`` (at
        least one), and whether more rows follow."""
        rows: builtins.list[Any] = []
        size = 0
        cursor = conn.execute(sql, params)
        try:
            for row in cursor:
                size += _stored_bytes(row)
                if len(rows) == limit or (rows and size > self.config.max_page_bytes):
                    return rows, True
                rows.append(row)
            return rows, False
        finally:
            cursor.close()  # ends the read (an unfinished statement keeps its snapshot)

    def _search(self, terms: builtins.list[str], namespaces: tuple[str, ...] | None,
                filters: Filters, limit: int) -> builtins.list[Hit]:
        now = self.clock()
        scope, scope_params = filters.sql("m")
        if namespaces is not None:
            scope += f" AND m.namespace IN ({', '.join('?' * len(namespaces))})"
            scope_params += list(namespaces)
        sql = SEARCH_SCAN + scope + " ORDER BY score DESC, m.id LIMIT ?"
        params = [now, *scope_params, limit]
        deadline = time.monotonic() + self.config.search_timeout_ms / 1000
        with self._reads.borrow(f"search {' '.join(terms)[:100]!r}") as conn:
            conn.set_progress_handler(lambda: time.monotonic() > deadline, 2000)
            conn.execute("BEGIN")  # one snapshot: the ids found are the rows read
            try:
                pending = conn.execute(GET_PENDING_THROUGH).fetchone()[0]
                if pending:
                    raise IndexRebuildingError(
                        "the search index is being rebuilt after an upgrade "
                        f"(memories up to id {pending} still to index); search works again "
                        "when it is done, retry in a moment")
                informative, few = _informative_terms(conn, terms)
                best = None
                if not few and (namespaces is None or _holds_half(conn, namespaces)):
                    best = _bounded_best(conn, " OR ".join(informative), now, scope,
                                         scope_params, limit)
                if best is None:
                    best = conn.execute(sql, [now, " OR ".join(informative), *params]).fetchall()
                if len(best) < limit and len(informative) < len(terms):
                    # Then memories that hold only common words, after the others.
                    found = {row_id for row_id, _ in best}
                    rest = conn.execute(sql, [now, " OR ".join(terms), *params[:-1],
                                              limit + len(best)]).fetchall()
                    best += [(row_id, 0.0) for row_id, _ in rest
                             if row_id not in found][:limit - len(best)]
                rows = self._hit_rows(conn, [row_id for row_id, _ in best])
            except KvmemError as exc:
                if time.monotonic() > deadline and not isinstance(exc, IndexRebuildingError):
                    raise InvalidInputError(
                        f"search stopped after {self.config.search_timeout_ms} ms "
                        "(search_timeout_ms): use fewer or rarer words, or narrow it with "
                        "namespace, tags, prefix or time filters") from exc
                raise
            finally:
                conn.set_progress_handler(None, 0)
                if conn.in_transaction:
                    conn.execute("COMMIT")
        scores = dict(best)
        return [Hit(_row_memory(row), scores[row[0]]) for row in rows]

    def _hit_rows(self, conn: KvmemConnection,
                  ids: builtins.list[int]) -> builtins.list[Any]:
        """The rows of ``ids``, in that order, stopping once they pass ``max_page_bytes``
        (at least one)."""
        rows: builtins.list[Any] = []
        size = 0
        for row_id in ids:
            row = conn.execute(SELECT_MEMORY + " WHERE id = ?", (row_id,)).fetchone()
            if row is None:
                continue
            size += _stored_bytes(row)
            if rows and size > self.config.max_page_bytes:
                break
            rows.append(row)
        return rows

    def export(self, fp: IO[str], *, namespace: str | None = None) -> int:
        """Stream every memory (all namespaces, or one; archived and expired included) as JSON
        Lines of ``Memory.to_record()`` from one consistent snapshot; the lines written."""
        if namespace is not None:
            namespace = validate_namespace(namespace, self.config)
        count = 0
        with self._reads.borrow(f"export {namespace or 'all namespaces'}") as conn:
            conn.execute("BEGIN")  # one snapshot for the whole export
            try:
                sql = SELECT_MEMORY + (" WHERE namespace = ?" if namespace else "") + \
                    " ORDER BY namespace, key"
                cursor = conn.execute(sql, (namespace,) if namespace else ())
                while rows := cursor.fetchmany(500):
                    for row in rows:
                        fp.write(json.dumps(_row_memory(row).to_record(), ensure_ascii=False,
                                            allow_nan=False) + "\n")
                        count += 1
            finally:
                conn.execute("COMMIT")
        return count

    def settings(self) -> dict[str, Any]:
        """The connection settings as SQLite reports them back (for start-up logs)."""
        with self._reads.borrow("settings") as conn:
            return read_settings(conn)

    def stats(self) -> dict[str, Any]:
        """Settings read back, file figures, counts, background and group-commit state,
        the configuration (token hidden), health, and the process id."""
        now = self.clock()
        with self._reads.borrow("stats") as conn:
            out = database_stats(conn)
            live, archived, expired = conn.execute(
                f"SELECT sum({LIVE}), sum(archived = 1 AND NOT {EXPIRED}), sum({EXPIRED})"
                " FROM memories", (now, now, now)).fetchone()
            pending = int(conn.execute(GET_PENDING_THROUGH).fetchone()[0] or 0)
        out["counts"] = {"live": live or 0, "archived": archived or 0,
                         "expired_pending": expired or 0}
        out["group_commit"] = self._writer.stats()
        out["checkpointer"] = self._checkpointer.state() if self._checkpointer else None
        out["decay"] = self._decay.state() if self._decay else None
        out["search_index"] = {"rebuilding": bool(pending), "pending_through": pending,
                               "builder": self._indexer.state() if self._indexer else None}
        out["last_prune"] = prune_record(self._last_prune) if self._last_prune else None
        out["health"] = self.health()
        out["config"] = self.config.public()
        out["pid"] = os.getpid()
        return out

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "problems": [...], "past": {...}}``.  Problems hold now: the
        database does not answer a read, the file or its -wal or -shm is not the one opened
        (deleted or replaced; writes are refused then: ``FileWatch``), an operation met a
        corrupt page, a background
        thread failed, the last checkpoint after a commit failed, a reader holds a snapshot
        past ``reader_warn_s``, the WAL is past the hard cap.  ``past``: those of the last
        kinds that held once and no longer do, with when last seen (``ok`` ignores them)."""
        problems = []
        identity = self.files.problem()
        if identity:
            problems.append(identity)
        for name, failure in (("reads", self._reads.failure), ("writes", self._writer.failure)):
            if failure:
                problems.append(f"{name} met a damaged database: {failure}")
        for name, part in (("checkpointer", self._checkpointer), ("decay", self._decay)):
            failed = part.state()["failed"] if part is not None else None
            if failed:
                problems.append(f"{name} failed: {failed}")
        problems.extend(self.conditions.problems())
        try:
            self.get("healthz-probe", namespace="kvmem-health")  # the database answers
        except KvmemError as exc:
            problems.append(f"{exc.code}: {exc}")
        return {"ok": not problems, "problems": problems, "past": self.conditions.past()}


def _put_exact(memories: Sequence[Memory], conn: KvmemConnection) -> int:
    """Store memories exactly as given (the import op), replacing any with the same key."""
    for m in memories:
        _write(conn, conn.execute(GET_ROW, (m.namespace, m.key)).fetchone(), m)
    return len(memories)


# ======================================================================== background ====


class _Background:
    """A daemon thread that runs ``_step()``, which returns the delay to the next, until
    ``stop()``; ``state()`` is read by stats and health.  A step that fails for a transient
    reason (busy, I/O, a full disk) is logged, counted and retried after ``_retry_delay``;
    one that finds the file not a database, corrupt or newer, or fails by a bug of its own,
    ends the thread in the failed state (``state()["failed"]``), so that health shows the
    problem instead of a loop hiding it."""

    name = "background"
    what = "step"  # what a step does, for the log
    log = log

    def __init__(self, role: str, state: dict[str, Any]) -> None:
        self.role = role
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._state = {"errors": 0, "last_error": None, "failed": None, **state}

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"kvmem-{self.name}-{self.role}")
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and join it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def state(self) -> dict[str, Any]:
        with self._state_lock:
            return dict(self._state)

    def _update(self, count: str = "", **changes: Any) -> None:
        """Set ``changes`` in the state, and add one to its ``count`` if given."""
        with self._state_lock:
            if count:
                self._state[count] += 1
            self._state.update(changes)

    def _run(self) -> None:
        delay, failures = self._first_delay(), 0
        try:
            while not self._stop.wait(delay):
                try:
                    delay, failures = self._step(), 0
                except (NotADatabaseError, CorruptDatabaseError, SchemaTooNewError) as exc:
                    self.log.error("[%s] %s failed for good: %s", self.role, self.name, exc)
                    self._update(failed=f"{exc.code}: {exc}")
                    return
                except (KvmemError, OSError) as exc:
                    failures += 1
                    delay = self._retry_delay(failures)
                    self.log.warning("[%s] %s failed (%s), retrying in %.2f s: %s", self.role,
                                     self.what, type(exc).__name__, delay, exc)
                    self._update("errors", last_error=f"{type(exc).__name__}: {exc}")
                except Exception as exc:
                    self.log.exception("[%s] %s stopped by an unexpected error", self.role,
                                       self.name)
                    self._update(failed=f"internal: {type(exc).__name__}: {exc}")
                    return
        finally:
            self._finish()

    def _first_delay(self) -> float:
        return 0.0

    def _retry_delay(self, failures: int) -> float:
        raise NotImplementedError

    def _step(self) -> float:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


ACTIVE_POLL_S = 0.05  # the checkpointer's poll while the WAL is changing


def checkpoint_request(wal_bytes: int, *, changed: bool, since_s: float, complete: bool,
                       pages_limit: int, page_size: int, config: Config) -> str | None:
    """What the elected process's Checkpointer asks its writer for, after one look at the
    WAL file (``wal_bytes``, ``changed`` since the last look, ``since_s`` since the last
    checkpoint or request, the last checkpoint ``complete`` or held back by a reader):

    * "shrink" when the file is past the soft cap, or past four checkpoint intervals of
      frames: it grew far past what the WAL needs, so give the disk space back;
    * "idle" when the WAL holds frames the writer did not count (another process wrote,
      or a reader held the last checkpoint back), at most one request per ACTIVE_POLL_S;
    * ``None``: the writer's own checkpoints keep up.
    """
    if wal_bytes > min(config.wal_soft_cap_bytes, 4 * pages_limit * (page_size + 24)):
        return "shrink"
    if (changed or not complete) and since_s >= ACTIVE_POLL_S:
        return "idle"
    return None


def fallback_reason(wal_bytes: int, *, lock_free: bool, config: Config) -> str | None:
    """Why a writer that is not the elected one checkpoints itself, if it must: past the
    soft cap with no checkpointer at all, or past the hard cap with one that does not keep
    up (stuck, or its disk too slow)."""
    if wal_bytes <= config.wal_soft_cap_bytes:
        return None
    if lock_free:
        return "no checkpointer"
    return "fallback" if wal_bytes > config.wal_hard_cap_bytes else None


def wal_pages_limit(free_bytes: int, page_size: int, config: Config) -> int:
    """Frames between checkpoints: ``wal_pages``, or a quarter of the free disk space (at
    least 16): a WAL may never hold what the database needs to grow by to take it back."""
    return max(16, min(config.wal_pages, free_bytes // page_size // 4))


class Checkpointer(_Background):
    """Daemon thread that holds the election of the file's single checkpointer and covers
    what the write path cannot see.

    About every ``checkpoint_poll_s`` it tries to become the holder of the checkpoint lock
    (so when the holder dies, a standby takes over within one poll).  In a ``Store`` the
    holder makes the store's writer connection the checkpointing one
    (``GroupCommitter.set_elected``), which checkpoints between its own groups; this thread
    only asks it for more (``checkpoint_request``; polling every ACTIVE_POLL_S while the
    WAL changes).  It lowers the writer's ``pages_limit`` when the disk is nearly full,
    gives up the election if the lock file is replaced, and names reads of this process
    that held a snapshot past ``reader_warn_s``.  Without a writer (a process that only
    checkpoints) it checkpoints on its own connection under the same rules.
    """

    name = "checkpointer"
    what = "checkpoint"
    log = checkpoint_log

    def __init__(self, path: str | os.PathLike[str] | None = None, *, config: Config | None = None,
                 role: str = "library", writer: GroupCommitter | None = None,
                 reads: _ReadPool | None = None, conditions: Conditions | None = None,
                 files: FileWatch | None = None) -> None:
        self.config = config or Config.build()
        self.path = os.path.realpath(os.fspath(path) if path is not None else self.config.db)
        super().__init__(role, {"holder": False, "last_request": None, "last_time": None,
                                "wal_bytes": wal_size(self.path), "requests": 0,
                                "checkpoints": 0, "polls": 0})
        self.writer = writer
        self._own_writer = writer is None
        self.reads = reads
        self.files = files  # a Store's: the holder publishes them, the others compare
        self.conditions = conditions or (writer.conditions if writer else Conditions())
        self._lock = CheckpointLock(self.path)  # given up when the thread ends
        self._seen: tuple[int, int] | None = None  # the WAL's (size, mtime_ns) when last looked
        self._last_request = time.monotonic()
        self._reported: set[str] = set()  # long readers already logged

    def _retry_delay(self, failures: int) -> float:
        return self.config.checkpoint_poll_s

    def _finish(self) -> None:
        if self.writer is not None and self.writer.elected:
            self.writer.set_elected(False)  # no checkpoint runs once the lock is let go
        self._lock.release()
        self._update(holder=False)
        if self._own_writer and self.writer is not None:
            self.writer.close()

    def _step(self) -> float:
        try:
            return self._poll()
        finally:
            self._update("polls")

    def _poll(self) -> float:
        """One look at the lock and the WAL; returns the delay to the next."""
        if self.writer is None:  # its own connection and gate; it never commits a group
            self.writer = GroupCommitter(self.path, self.config, conditions=self.conditions)
        writer, poll = self.writer, self.config.checkpoint_poll_s
        if self.reads is not None:
            self._watch_readers(self.reads)
        if self.files is not None and self.files.problem(names=("",)):
            # This process's database file is gone (moved, deleted, replaced): it may not
            # hold the election of the file now at the path, whose WAL it cannot see.
            if self._lock.held:
                writer.set_elected(False)
                self._lock.release()
                self._update(holder=False)
            return poll
        if self._lock.held and not self._lock.still_ours():
            # The lock file was deleted or replaced: another process may hold a lock on
            # the new file, so this one is not the checkpointer any more.
            self.log.warning("[%s] %s was replaced; competing for it again", self.role,
                             self._lock.lock_path)
            writer.set_elected(False)
            self._lock.release()
            self._update(holder=False)
        if not self._lock.held:
            if not self._lock.acquire() or not self._lock.still_ours():
                self._lock.release()
                if self.files is not None and self.files.split is None:
                    self.files.check_others(holder=True)
                self._update(holder=False, wal_bytes=wal_size(self.path))
                return poll
            self.log.info("[%s] pid %d is now the checkpointer of %s", self.role, os.getpid(),
                          self.path)
            if self.files is not None:
                self._lock.write_record(self.files.record())
            writer.set_elected(True)
            self._update(holder=True)
        if self.config.journal_mode != "wal":
            return poll
        try:
            st = os.stat(self.path + "-wal")
            seen = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = (0, 0)
        free = os.statvfs(os.path.dirname(self.path))
        writer.pages_limit = wal_pages_limit(free.f_bavail * free.f_frsize, writer.page_size,
                                             self.config)
        changed, self._seen = seen != self._seen, seen
        now = time.monotonic()
        since_s = now - max(writer.last_checkpoint, self._last_request)
        reason = checkpoint_request(seen[0], changed=changed, since_s=since_s,
                                    complete=writer.last_complete, pages_limit=writer.pages_limit,
                                    page_size=writer.page_size, config=self.config)
        if reason is not None:
            self._last_request = now
            writer.request_checkpoint(reason)
            self._update("requests", last_request=reason, last_time=rfc3339(time.time()))
        # A request may have shrunk the file: stat it again then.
        self._update(wal_bytes=wal_size(self.path) if reason else seen[0],
                     checkpoints=writer.stats()["checkpoints"])
        return min(poll, ACTIVE_POLL_S) if changed or reason else poll

    def _watch_readers(self, reads: _ReadPool) -> None:
        long = reads.long_readers(self.config.reader_warn_s)
        if not long:
            self.conditions.clear("long_reader")
            self._reported.clear()
            return
        for seconds, what in long:
            if what not in self._reported:
                self._reported.add(what)
                self.log.warning("[%s] a read has held its snapshot for %.1f s, keeping the "
                                 "WAL from restarting: %s", self.role, seconds, what)
        seconds, what = long[0]
        self.conditions.set("long_reader", f"{len(long)} read(s) have held a snapshot past "
                            f"{self.config.reader_warn_s:g} s; the longest, {seconds:.0f} s: "
                            f"{what}")


def _holds_half(conn: KvmemConnection, namespaces: Sequence[str]) -> bool:
    """Whether ``namespaces`` hold at least half of the indexed memories: else the best
    matches of the whole index are mostly elsewhere, and _bounded_best would not pay."""
    total = indexed_rows(conn) or 0
    held = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM memories WHERE namespace IN"
                        f" ({', '.join('?' * len(namespaces))}) LIMIT ?)",
                        [*namespaces, (total + 1) // 2]).fetchone()[0]
    return bool(2 * held >= total)


BOUND_CANDIDATES = 200  # matches _bounded_best reads best BM25 first


def _bounded_best(conn: KvmemConnection, match: str, now: float, scope: str,
                  scope_params: Sequence[Any], limit: int) -> list[tuple[int, float]] | None:
    """``(id, score)`` of the ``limit`` best matches, best first, when the
    BOUND_CANDIDATES best by BM25 alone prove it; None when they do not.

    FTS5 ranks matches by bm25() without joining memories (in C, fast); only those
    candidates are then joined, filtered and scored.  A strength is at most 1, so a match
    that is not a candidate scores at most the BM25 of the last candidate: when the
    ``limit``-th best candidate scores more (or the same, with a BM25 that is the last
    candidate's, so that it also comes first in id order), no other match can be among the
    ``limit`` best, which are then exactly what SEARCH_SCAN would return."""
    top = conn.execute(f"SELECT rowid, -bm25(memory_index, {BM25_ARGS}) AS r FROM memory_index"
                       " WHERE memory_index MATCH ? ORDER BY r DESC, rowid LIMIT ?",
                       (match, BOUND_CANDIDATES)).fetchall()
    bm25 = dict(top)
    rows = conn.execute(
        f"SELECT m.id, {STRENGTH_SQL} FROM json_each(?) AS c CROSS JOIN memories AS m"
        " ON m.id = c.value WHERE m.archived = 0"
        f" AND NOT (m.expires_at IS NOT NULL AND m.expires_at <= ?){scope}",
        [now, json.dumps(list(bm25)), now, *scope_params]).fetchall()
    scored = sorted(((search_score(-bm25[i], strength), i) for i, strength in rows),
                    key=lambda item: (-item[0], item[1]))[:limit]
    best = [(row_id, score) for score, row_id in scored]
    if len(top) < BOUND_CANDIDATES:
        return best  # every match was a candidate
    if len(scored) < limit:
        return None
    last = top[-1][1]
    score, row_id = scored[-1]
    return best if score > last or (score == last and bm25[row_id] == last) else None


def indexed_rows(conn: KvmemConnection) -> int | None:
    """How many memories the search index holds, as bm25() counts them: the first varint
    of FTS5's "averages" record (row 1 of memory_index_data); None if it cannot be read."""
    row = conn.execute("SELECT block FROM memory_index_data WHERE id = 1").fetchone()
    if row is None or not isinstance(row[0], bytes):
        return None
    value = 0
    for n, byte in enumerate(row[0][:9]):  # an SQLite varint: 7 bits a byte, big-endian
        if n == 8:
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value
    return None


def _informative_terms(conn: KvmemConnection, terms: list[str]) -> tuple[list[str], bool]:
    """``terms`` without those in at least half of the indexed memories, unless that
    leaves none, and whether the terms kept match fewer than BOUND_CANDIDATES memories.
    BM25's IDF of such a word, log((N - n + 0.5) / (n + 0.5)), is not positive (FTS5
    clamps it to 1e-6): kvmem gives it no weight at all, which also spares reading (and
    ranking) most of the index to match it."""
    total = indexed_rows(conn) or 0
    half = total // 2 + total % 2  # n >= half  <=>  2n >= total
    cap = max(half, BOUND_CANDIDATES)

    def count(term: str) -> int:
        return int(conn.execute("SELECT count(*) FROM (SELECT 1 FROM memory_index"
                                " WHERE memory_index MATCH ? LIMIT ?)", (term, cap)).fetchone()[0])

    counts: dict[str, int] = {}
    for term in terms:  # a prefix matches all its word does: count the (cheaper) word first
        exact = count(term[:-1]) if term.endswith("*") else None
        counts[term] = exact if exact is not None and exact >= half else count(term)
    kept = [term for term in terms if counts[term] < half] or terms
    return kept, sum(counts[term] for term in kept) < BOUND_CANDIDATES


INDEX_BATCH_S = 0.05  # about how long one batch of the index rebuild holds the write lock
INDEX_STEP_BYTES = 64 * 1024  # a batch indexes memories in steps of about this much text


def index_batch(conn: KvmemConnection, seconds: float = INDEX_BATCH_S) -> tuple[int, int]:
    """Index the memories migration 3 left to IndexBuilder, highest id first, in the
    caller's transaction, for about ``seconds`` (at least one step of at least one
    memory; a step ends past INDEX_STEP_BYTES or 64 memories, so one huge value is a step
    of its own); ``(indexed, still_pending_through)``."""
    started = time.monotonic()
    pending = int(conn.execute(GET_PENDING_THROUGH).fetchone()[0] or 0)
    indexed = 0
    while pending and (not indexed or time.monotonic() - started < seconds):
        ids = conn.execute("SELECT id, length(CAST(value AS BLOB)) FROM memories"
                           " WHERE id <= ? ORDER BY id DESC LIMIT 64", (pending,)).fetchall()
        size, taken = 0, 0
        for _, length in ids:
            if taken and size + length > INDEX_STEP_BYTES:
                break
            taken, size = taken + 1, size + length
        # Below the lowest id taken, unless every memory left was taken.
        below = 0 if taken == len(ids) < 64 else ids[taken - 1][0] - 1 if ids else 0
        conn.execute("INSERT INTO memory_index (rowid, key, body, tags)"
                     " SELECT id, kvmem_index_text(key), kvmem_value_text(value),"
                     " kvmem_tags_text(tags) FROM memories WHERE id > ? AND id <= ?",
                     (below, pending))
        indexed += taken
        pending = below
    conn.execute("UPDATE kvmem_meta SET value = ? WHERE name = 'index_pending_through'",
                 (pending,))
    return indexed, pending


class IndexBuilder(_Background):
    """Daemon thread that indexes the memories an upgrade left unindexed (migration 3),
    in batches through the store's writer, each holding the write lock about
    INDEX_BATCH_S; every process that opens the file takes part, until none is left.
    Search refuses with IndexRebuildingError meanwhile."""

    name = "index"
    what = "index batch"

    def __init__(self, store: Store, *, role: str = "library") -> None:
        self.store = store
        super().__init__(role, {"batches": 0, "indexed": 0, "pending_through": None,
                                "longest_batch_s": 0.0})

    def _retry_delay(self, failures: int) -> float:
        return min(5.0, 0.05 * 2.0 ** min(failures, 10))

    def _step(self) -> float:
        started = time.monotonic()
        indexed, pending = self.store._writer.submit(index_batch)
        took = time.monotonic() - started
        with self._state_lock:
            self._state["batches"] += 1
            self._state["indexed"] += indexed
            self._state["pending_through"] = pending
            self._state["longest_batch_s"] = max(self._state["longest_batch_s"], took)
        if not pending:
            self.log.info("[%s] search index rebuilt", self.role)
            self._stop.set()
            return 0.0
        return 0.01  # let other writers in between batches


class Prunable(Protocol):
    """What DecayScheduler needs of a store: kvmem.Store, or kvmem_pg.PgStore."""

    config: Config

    def prune(self, now: float | None = None) -> PruneResult: ...


class DecayScheduler(_Background):
    """Daemon thread running ``store.prune()`` every ``decay_interval_s``; a failed prune
    is retried with backoff (see ``_Background``), logged on ``kvmem.decay``."""

    name = "decay"
    what = "prune"
    log = decay_log

    def __init__(self, store: Prunable, *, role: str = "library") -> None:
        self.store = store
        super().__init__(role, {"runs": 0, "last_result": None})

    def _first_delay(self) -> float:
        return self.store.config.decay_interval_s

    def _retry_delay(self, failures: int) -> float:
        return min(self.store.config.decay_interval_s, 0.05 * 2.0 ** min(failures, 10))

    def _step(self) -> float:
        self._update("runs", last_result=prune_record(self.store.prune()))
        return self.store.config.decay_interval_s


if __name__ == "__main__":  # the command line is kvmem_cli.py; say so instead of exiting 0
    raise SystemExit("kvmem.py is the library; run kvmem_cli.py (or the kvmem command)")
