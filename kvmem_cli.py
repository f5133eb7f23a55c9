"""kvmem's command-line edge: the ``kvmem`` command, a flag for every setting, and what
both servers share (their command line, the token, host and exposure checks, the shapes
of the stats and of the namespace list).

``kvmem`` reads and writes memories (get, set, delete, reinforce, list, search, export,
import) and looks after the database file (check, stats, checkpoint, backup, namespaces).
The database is ``--db`` / KVMEM_DB; the file commands also take it as their first
argument.  Only ``set`` and ``import`` create a database that is not there (and its
directory), as a user starts one; every other command refuses a missing one ("no
database at PATH") and creates no file.

Output is JSON on stdout: a memory as the HTTP API renders it, ``{"items": [...]}`` for
list and search, JSON Lines for export.  An error is one line on stdout,
``{"ok": false, "error": {"code": ..., "message": ...}}``, its code a KvmemError's.

Exit status of ``kvmem``: 0 done; 1 an error (bad input, not found, version conflict,
busy, a file problem, a check that failed); 2 a usage error (an unknown command or
option, a missing argument: argparse's message on stderr).  kvmem-http and kvmem-mcp
exit 0 when SIGINT or SIGTERM stops them, 2 when they cannot start (one line on stderr
naming the problem), 1 when kvmem-mcp runs on a Python without its packages.

The library is ``kvmem.py`` (one stdlib-only file); errors become JSON here, at the edge.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import hmac
import io
import ipaddress
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from kvmem import (
    BusyError,
    Config,
    ConfigError,
    DeleteOp,
    InvalidInputError,
    KvmemConnection,
    KvmemError,
    NotADatabaseError,
    NotFoundError,
    PayloadTooLargeError,
    ReinforceOp,
    SetOp,
    StorageError,
    Store,
    VersionConflictError,
    check_import,
    checkpoint_elected,
    checkpoint_lock_free,
    database_stats,
    default_db_path,
    env_name,
    filter_schemas,
    flag_name,
    is_postgres,
    open_db,
    redact_db,
    wal_size,
)

if TYPE_CHECKING:
    import kvmem_pg

    # What --db opens (open_store): the same methods, arguments, results and errors.
    AnyStore = Store | kvmem_pg.PgStore

# pyproject.toml's version: what --version says when kvmem runs from a checkout that is
# not installed (test_cli.py checks that the two agree).
VERSION = "0.1.0"


def version() -> str:
    """The installed package's version, else VERSION."""
    import importlib.metadata  # here: importing it costs every command 30 ms at start

    try:
        return importlib.metadata.version("kvmem")
    except importlib.metadata.PackageNotFoundError:
        return VERSION


class _Version(argparse.Action):
    """``--version``: print ``kvmem <version>`` and exit 0 (found only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"kvmem {version()}")
        parser.exit()


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version, help="print kvmem's version and exit")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, but a help text is never broken inside a word: a path in it (the
    database's default) stays whole, to copy."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False,
                             break_long_words=False)


def _shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = (),
                         aliases: Mapping[str, str] | None = None) -> None:
    """Add one ``--flag`` per Config field (and any ``aliases``: field -> extra flag);
    values stay raw strings for ``Config.build``.  The help shows each default (the
    database's as resolved from XDG_DATA_HOME or HOME)."""
    group = parser.add_argument_group("settings (each also read from KVMEM_<NAME>)")
    defaults = {"db": default_db_path({k: v for k, v in os.environ.items() if k != "KVMEM_DB"})}
    for field in dataclasses.fields(Config):
        # No --token: a secret on a command line shows in ps to every user of the machine
        # (KVMEM_TOKEN or a server's --token-file instead).
        if field.name not in exclude and field.name != "token":
            extra = [aliases[field.name]] if aliases and field.name in aliases else []
            value = defaults.get(field.name, field.default)
            default = f" (default {_shown(value)})" if value != "" else ""
            # argparse reads "%" in a help text as a format
            text = f"{field.metadata['help']}{default} [env {env_name(field)}]".replace("%", "%%")
            group.add_argument(*extra, flag_name(field), dest=field.name, default=None,
                               metavar=field.name.upper(), help=text,
                               action="append" if field.metadata["repeat"] else "store")


def config_from_args(args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> Config:
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    for name, value in flags.items():  # a repeated flag: its values, comma-separated
        if isinstance(value, list):
            flags[name] = ",".join(value)
    return Config.build(environ=environ, flags=flags)


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# A server that cannot start (a bad flag or setting, the port taken, the database
# refused) says why in one line on stderr and exits with this; argparse's own usage
# errors exit 2 too.
EXIT_STARTUP = 2


def parse_server_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
                      exclude: Sequence[str] = (),
                      aliases: Mapping[str, str] | None = None) -> argparse.Namespace:
    """A server's command line: its own flags (already on ``parser``), ``--version``,
    ``--log-level``, ``--token-file`` and a flag per setting (``server_config`` reads
    them); logging goes to stderr.  Raises ConfigError for an unknown log level."""
    parser.allow_abbrev = False  # "--token" must not pass for "--token-file"
    add_version_argument(parser)
    parser.add_argument("--log-level", default="info", metavar="LEVEL",
                        help=f"{', '.join(LOG_LEVELS)} (default info)")
    parser.add_argument("--token-file", help="read the bearer token (UTF-8) from this file")
    add_config_arguments(parser, exclude=exclude, aliases=aliases)
    args = parser.parse_args(argv)
    if args.log_level.strip().lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level={args.log_level!r}: must be one of "
                          f"{', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=args.log_level.strip().upper(), stream=sys.stderr,
                        format=LOG_FORMAT)
    limit_malloc_arenas()  # before the server starts its threads
    return args


def startup_failed(program: str, exc: KvmemError | OSError) -> int:
    """Say in one line on stderr why ``program`` could not start; EXIT_STARTUP."""
    print(f"{program}: {describe(exc)}", file=sys.stderr)
    return EXIT_STARTUP


def describe(exc: BaseException) -> str:
    """An error in words: a KvmemError's message; an OSError's reason and file name
    (never Python's "[Errno 2]")."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


# glibc gives threads that allocate at the same time arenas of their own (up to 8 a core)
# and seldom hands their freed memory back: with 4 clients posting 7 MB batches, kvmem-http
# held 404 MiB; with 2 arenas, 117 MiB at the same rate (bench.py's hostile section).
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at MALLOC_ARENAS (``mallopt``), unless MALLOC_ARENA_MAX
    is set in the environment; a no-op where the C library has no ``mallopt``."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def server_config(args: argparse.Namespace) -> Config:
    """A server's Config from its command line (``--token-file`` wins over KVMEM_TOKEN),
    checked before anything is bound or created: ConfigError for a bad token or token
    file, a host nothing can listen on (``check_host``) or one that would expose the
    database (``check_exposure``)."""
    config = config_from_args(args)
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fp:
                token = fp.read().strip()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--token-file {args.token_file}: not UTF-8 text") from exc
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror}") from exc
        if not token:  # an empty file must not turn the check off
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
        config = dataclasses.replace(config, token=token)
    if config.token != config.token.strip() or any(
            ch < " " or "\x7f" <= ch <= "\x9f" for ch in config.token) or \
            not _is_utf8(config.token):
        raise ConfigError("the token must be UTF-8 text without control characters or "
                          "surrounding spaces, e.g. openssl rand -hex 32")
    check_host(config.host)
    check_exposure(config.host, config.token)  # before the database is created
    return config


def check_host(host: str) -> None:
    """Refuse (ConfigError) a host that is neither an IP address nor a name this machine
    resolves: nothing can listen on it.  ``""`` is every interface."""
    name = host.strip("[]")
    if not name:
        return
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"--host={host!r}: not an IP address or a host name this machine "
                          f"can resolve, so nothing can listen on it ({describe(exc)})") from exc


def host_port(host: str, port: int) -> str:
    """``host:port`` for a message or a URL; an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Why a listening socket could not be made, in words, by errno.
LISTEN_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (is another server running there? "
                      "choose another --port)",
    errno.EADDRNOTAVAIL: "that is not an address of this machine",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EAFNOSUPPORT: "this machine does not support that address family",
}


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """The ConfigError for a socket that could not listen on ``host``:``port``."""
    reason = LISTEN_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    return ConfigError(f"cannot listen on {host_port(host, port)}: {reason}")


def listen_family(host: str) -> socket.AddressFamily:
    """The address family to listen on ``host`` with: IPv6 for an IPv6 address."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # an undecodable environment byte arrives as a surrogate
    except UnicodeEncodeError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str) -> None:
    """Refuse a non-loopback address without a token (ConfigError): anyone who can reach
    it could read and write every memory."""
    if not token and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without a token: set KVMEM_TOKEN "
                          "or --token-file, or bind 127.0.0.1")


UNAUTHORIZED = "a valid 'Authorization: Bearer <token>' header is required"


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``: the header's bytes
    (both servers hand it over decoded as Latin-1, byte for byte) against the token's
    UTF-8, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    try:
        sent = given.strip().encode("latin-1")
    except UnicodeEncodeError:  # not as a server decodes a header
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(
        sent, token.encode("utf-8", "surrogateescape"))


def origin_allowed(origin: str, host: str, allowed: str = "") -> bool:
    """Whether a browser page from ``origin`` may call a server bound to ``host``: one
    served from this machine (loopback), the bound address or one of ``allowed``.  A page
    from elsewhere would be another site reaching the server through the browser."""
    try:
        parts = urllib.parse.urlsplit(origin)
        name = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and name is not None and (
        is_loopback(name) or name == host.strip("[]").lower() or name in _names(allowed))


def _names(allowed: str) -> set[str]:
    return {name.strip().lower() for name in allowed.split(",") if name.strip()}


def host_allowed(host_header: str, host: str, allowed: str = "") -> bool:
    """Whether a request's ``Host`` (any port) names this server: a loopback name or
    address, the bound address, or one of ``allowed`` (comma-separated).  A page whose own
    name was re-pointed at 127.0.0.1 sends that name (DNS rebinding)."""
    try:
        name = urllib.parse.urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    return name is not None and (is_loopback(name) or name == host.strip("[]").lower()
                                 or name in _names(allowed))


def request_refusal(host_header: str, origin: str | None, host: str,
                    allowed: str) -> tuple[int, str, str] | None:
    """(status, code, message) refusing a request to a server bound to ``host`` by its
    ``Host`` and ``Origin`` against DNS rebinding (``host_allowed``, ``origin_allowed``),
    or None; both servers ask."""
    if not host_allowed(host_header, host, allowed):
        return (421, "misdirected", f"this server does not answer to {host_header[:100]!r} "
                "(add it with --allowed-host)")
    if origin is not None and not origin_allowed(origin, host, allowed):
        return 403, "forbidden", f"a page from {origin[:100]!r} may not use this server"
    return None


# How many connections wait to be accepted (Python's default of 5 resets bursts).
LISTEN_BACKLOG = 128

# The largest request body either HTTP server reads: a batch may carry several large values.
MAX_BODY_BYTES = 8 * 1024 * 1024


_NULLABLE_OBJECT = {"type": ["object", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_BYTES = {"type": ["integer", "null"], "minimum": 0}

# The shape of Store.stats() and PgStore.stats(), as kvmem-mcp's memory_stats publishes
# it: what both backends report is required, the rest is one backend's.
STATS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "backend": {"enum": ["sqlite", "postgresql"]},
    "path": {"type": "string", "description": "the file, or the URL without its password"},
    "sqlite_version": {"type": "string"},
    "schema_version": _COUNT,
    "settings": {"type": "object", "description": "the PRAGMAs, read back"},
    "page_size": _COUNT, "page_count": _COUNT, "freelist_count": _COUNT,
    "db_bytes": _BYTES, "wal_bytes": _BYTES, "wal_cap_bytes": _COUNT,
    "recovery": {**_NULLABLE_OBJECT, "description": "what this process's first open found"},
    "warnings": {"type": "array", "items": {"type": "string"}},
    "counts": {"type": "object", "required": ["live", "archived", "expired_pending"],
               "properties": {"live": _COUNT, "archived": _COUNT, "expired_pending": _COUNT}},
    "group_commit": {"type": "object"}, "checkpointer": _NULLABLE_OBJECT,
    "decay": _NULLABLE_OBJECT, "last_prune": _NULLABLE_OBJECT,
    "search_index": {"type": "object", "required": ["rebuilding", "pending_through", "builder"],
                     "properties": {"rebuilding": {"type": "boolean"},
                                    "pending_through": _COUNT, "builder": _NULLABLE_OBJECT},
                     "description": "an upgrade's rebuild of the search index (search waits "
                                    "for it)"},
    "health": {"type": "object", "required": ["ok", "problems", "past"], "properties": {
        "ok": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "string"}},
        "past": {"type": "object"}}},
    "config": {"type": "object", "required": [f.name for f in dataclasses.fields(Config)],
               "description": "the settings (the token shown as \"set\" or \"\")"},
    "pid": {"type": "integer"},
    "server": {"type": "object", "description": "PostgreSQL: version, standby or not, the "
                                                "settings checked at open"},
    "pool": {"type": "object", "description": "PostgreSQL: the connection pool's figures"},
    "replication": {"type": "object", "description": "PostgreSQL: each standby's lag, or "
                                                     "this standby's replay lag"},
    "transactions": {"type": "object", "description": "PostgreSQL: transactions this "
                                                      "process committed"},
}}
STATS_SCHEMA["required"] = ["backend", "path", "counts", "decay", "last_prune", "health",
                            "config", "pid"]

# The shape of Store.namespaces() as every interface answers it: GET /v1/namespaces,
# memory_namespaces and ``kvmem namespaces``.
NAMESPACE_LIST_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["items"], "additionalProperties": False, "properties": {
        "items": {"type": "array", "description": "in name order", "items": {
            "type": "object", "required": ["namespace", "live", "archived"],
            "additionalProperties": False, "properties": {
                "namespace": {"type": "string"},
                "live": {**_COUNT, "description": "memories that are neither expired nor "
                                                  "archived"},
                "archived": {**_COUNT, "description": "archived (faded) memories"}}}}}}


# ----------------------------------------------------------------- the database file ----


def require_database(path: str) -> None:
    """Refuse a path with no file (NotFoundError, "no database at PATH"): every command
    but set and import works on a database that exists and must not create one.  Why a
    database cannot be opened or created is open_db's to say."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"no database at {os.path.realpath(path)}") from None
    except OSError:
        return  # there may be one this process cannot see: opening it says why
    if not stat.S_ISREG(st.st_mode) or wal_size(path):
        return  # open_db says what a non-file is; with a WAL, the header may be stale
    # open_db would make an empty file a new database, and give another program's SQLite
    # file kvmem's schema.  Read only the header (this process has no connection yet):
    # kvmem's user_version (offset 60) is never 0.
    with open(path, "rb") as fp:
        head = fp.read(100)
    if not head:
        raise NotADatabaseError(f"{os.path.realpath(path)} is an empty file, not a kvmem "
                                "database (left as it is)")
    if head.startswith(b"SQLite format 3\0") and len(head) == 100 \
            and int.from_bytes(head[60:64], "big") == 0:
        raise NotADatabaseError(f"{os.path.realpath(path)}: no kvmem schema (another "
                                "program's SQLite database?); left as it is")


def check_database(path: str, config: Config) -> dict[str, Any]:
    """Header, schema version and ``integrity_check`` of ``path``, changing nothing."""
    report: dict[str, Any] = {"path": os.path.realpath(path), "ok": False}
    if not os.path.exists(path):
        report["error"] = {"code": NotFoundError.code,
                           "message": f"no database at {report['path']}"}
        return report
    try:
        conn = open_db(path, config=dataclasses.replace(config, quick_check=False), readonly=True)
    except KvmemError as exc:
        report["error"] = {"code": exc.code, "message": str(exc)}
        return report
    try:
        report["header"] = "ok"
        report["schema_version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        report["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        report["integrity"] = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        report["ok"] = report["integrity"] == ["ok"] and report["schema_version"] > 0
        if report["schema_version"] == 0:
            report["error"] = {"code": NotADatabaseError.code, "message": f"{report['path']}: "
                               "no kvmem schema (an empty file or another program's "
                               "database)"}
    except KvmemError as exc:
        report["error"] = {"code": exc.code, "message": str(exc)}
    finally:
        conn.close()
    return report


def backup_database(path: str, dest: str, config: Config) -> dict[str, Any]:
    """Copy the database ``path`` to the new file ``dest`` with SQLite's online backup
    API, then check the copy.  Refuses an existing ``dest`` (a backup never overwrites
    anything) and a missing ``path`` (never created).

    The copy is one self-contained file in the rollback-journal mode: no -wal, -shm or
    checkpoint lock beside it, so it can be copied or mailed as it is; kvmem switches it
    to WAL when it next opens it.  A backup that fails leaves no file behind."""
    require_database(path)
    _refuse_database_file(dest, path)
    if os.path.lexists(dest):
        raise InvalidInputError(f"{dest}: already exists; a backup only writes a new file")
    src = open_db(path, config=config, create=False)
    try:
        _backup_into(src, dest, config)
    except BaseException:
        for name in (dest, dest + "-journal", dest + "-wal", dest + "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(name)  # what this backup began: nothing else has it open
        raise
    finally:
        src.close()
    return check_database(dest, config)


def _backup_into(src: KvmemConnection, dest: str, config: Config) -> None:
    # A rollback journal: no WAL, so no checkpoint lock either (open_db takes it only to
    # checkpoint a WAL).
    out = open_db(dest, config=dataclasses.replace(config, quick_check=False,
                                                   journal_mode="delete"))
    try:
        src.backup(out)
        # The copied header says WAL, as the source's does, and this connection follows
        # it; switching back folds the WAL in, marks the header and deletes -wal and -shm.
        out.execute("PRAGMA journal_mode = DELETE")
    finally:
        out.close()


def _cli_checkpoint(path: str, config: Config, *, truncate: bool) -> dict[str, Any]:
    require_database(path)
    conn = open_db(path, config=config, create=False)
    try:
        result = checkpoint_elected(conn, wait_ms=config.busy_timeout_ms, shrink=truncate)
        if isinstance(result, str):
            raise BusyError(f"{path}: {result}; no checkpoint ran")
        busy, frames, done = result
        return {"path": conn.kv_path, "mode": "TRUNCATE" if truncate else "PASSIVE",
                "busy": busy, "wal_frames": frames, "frames_checkpointed": done,
                "wal_bytes_after": wal_size(conn.kv_path)}
    finally:
        conn.close()


def _cli_stats(path: str, config: Config) -> dict[str, Any]:
    require_database(path)
    conn = open_db(path, config=config, create=False)
    try:
        result = database_stats(conn)
        result["checkpointer_running_elsewhere"] = not checkpoint_lock_free(path)
        result["config"] = config.public()
        return result
    finally:
        conn.close()


def list_namespaces(path: str, config: Config) -> dict[str, Any]:
    """The namespaces of the database ``path`` with their counts (``Store.namespaces``),
    shaped as NAMESPACE_LIST_SCHEMA; a missing file is a NotFoundError, never created."""
    if not is_postgres(path):
        require_database(path)
    with open_store(dataclasses.replace(config, db=path), role="cli",
                    checkpointer=False, create=False) as store:
        return {"items": store.namespaces()}


def open_store(config: Config, *, role: str, checkpointer: bool = True,
               decay: bool = False, clock: Callable[[], float] = time.time,
               create: bool = True) -> AnyStore:
    """The store ``config.db`` names: a ``kvmem_pg.PgStore`` for a ``postgresql://`` URL,
    else a ``kvmem.Store`` on the file (with a ``Checkpointer`` unless
    ``checkpointer=False``: PostgreSQL checkpoints by itself, and commits one by one).
    ``create=False`` (the commands that must not create a database): a PostgreSQL
    database without kvmem's tables is a NotFoundError, as a missing file is
    (``require_database``).  ConfigError when the URL needs psycopg and it is not
    installed."""
    if not is_postgres(config.db):
        return Store.open(config.db, config=config, role=role, checkpointer=checkpointer,
                          decay=decay, clock=clock)
    try:
        import kvmem_pg
    except ImportError as exc:
        raise ConfigError(f"{redact_db(config.db)}: PostgreSQL needs psycopg 3 and "
                          f"psycopg-pool: pip install 'kvmem[postgres]' ({exc})") from None
    return kvmem_pg.PgStore.open(config.db, config=config, role=role, decay=decay,
                                 clock=clock, create=create)


def _postgres_file_command(command: str, config: Config) -> dict[str, Any]:
    """check, stats and namespaces on PostgreSQL; checkpoint and backup are SQLite's."""
    if command == "checkpoint":
        raise ConfigError("checkpoint is for an SQLite file: PostgreSQL checkpoints by itself")
    if command == "backup":
        raise ConfigError("backup is for an SQLite file: for PostgreSQL use pg_dump (or "
                          "kvmem export, which any kvmem database can import)")
    if command == "namespaces":
        return list_namespaces(config.db, config)
    if command == "stats":
        with open_store(config, role="cli", checkpointer=False, create=False) as store:
            return store.stats()
    report: dict[str, Any] = {"path": redact_db(config.db), "backend": "postgresql",
                              "ok": False}
    try:  # check reports, as check_database does for a file
        with open_store(config, role="cli", checkpointer=False, create=False) as store:
            health = store.health()
    except KvmemError as exc:
        report["error"] = {"code": exc.code, "message": str(exc)}
        return report
    return {**report, "ok": health["ok"], "problems": health["problems"]}


# ------------------------------------------------------------------------- memories ----
#
# The data commands call the Store as the HTTP API does, render memories as it does
# (``Memory.render``) and take the ops' arguments under their own names: a flag per
# argument of SetOp, DeleteOp and ReinforceOp (``--if-version``, ``--ttl-seconds``...)
# and per filter of list and search (``--tag``, ``--prefix``, ``--updated-after``...).
# A flag's text goes to kvmem as a JSON number or null when it reads as one, else as the
# text itself, and kvmem checks it as it checks every client's input.

# The largest value text ``set`` reads, from an argument or stdin: what kvmem-http takes.
MAX_VALUE_TEXT = MAX_BODY_BYTES


def _number_or_text(text: str) -> Any:
    """A flag's text as kvmem takes it: a JSON number or null as that, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return text


_OP_GIVEN = ("namespace", "key", "value")  # positional or --namespace, not op flags


def add_op_arguments(parser: argparse.ArgumentParser, op: type[SetOp | DeleteOp | ReinforceOp]
                     ) -> None:
    """A flag per argument of ``op`` but its namespace, key and value, helped by the op's
    own schema; ``--tag`` (repeated) for tags.  A flag not given is left out, so the op
    takes its own default."""
    schema = op.schema(Config())["properties"]
    for field in op.arguments():
        if field.name in _OP_GIVEN:
            continue
        description = schema[field.name].get("description", "").replace("%", "%%")
        if field.name == "tags":
            parser.add_argument("--tag", dest="tags", action="append", metavar="TAG",
                                default=argparse.SUPPRESS, help="a label that groups "
                                "related memories (repeat for several)")
        else:
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name,
                                type=_number_or_text, default=argparse.SUPPRESS,
                                metavar=field.name.upper(), help=description)


def _op(op: type[SetOp | DeleteOp | ReinforceOp], args: argparse.Namespace, config: Config,
        **spec: Any) -> Any:
    """``op`` parsed from the command line (its flags given, and ``spec``)."""
    given = {f.name: getattr(args, f.name) for f in op.arguments()
             if f.name not in _OP_GIVEN and hasattr(args, f.name)}
    return op.parse({**given, **spec}, config, key=args.key, namespace=args.namespace)


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The filters of list and search (``kvmem.Filters``), helped by their schemas."""
    schemas = filter_schemas(Config())
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help=f"{schemas['tags']['description']} (repeat for several)")
    parser.add_argument("--prefix", help=schemas["prefix"]["description"])
    for name in ("updated_after", "updated_before"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_number_or_text,
                            metavar="TIME", help=schemas[name]["description"])


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"tags": args.tags, "prefix": args.prefix, "updated_after": args.updated_after,
            "updated_before": args.updated_before}


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("limit", "cursor") if hasattr(args, name)}


@dataclasses.dataclass(frozen=True)
class Command:
    """A data command: its help, its arguments, what it does with an open Store, and
    whether it may create the database."""

    help: str
    usage: str  # its arguments, as the usage line shows them
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[AnyStore, argparse.Namespace, Any], Any]  # the store, args, prepared
    creates: bool = False
    # Reads and checks the input before the database is opened (or created).
    prepare: Callable[[argparse.Namespace, Config], Any] | None = None


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY", help="the memory's key, e.g. user/tea")
    parser.add_argument("--namespace", default="default",
                        help="keeps agents, users or projects apart (default default)")


def _get(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    memory = store.get(args.key, namespace=args.namespace)
    if memory is None:
        raise NotFoundError(f"no memory {args.key[:200]!r} in namespace {args.namespace!r}")
    return memory.render(store.clock())


def _op_arguments(op: type[SetOp | DeleteOp | ReinforceOp]
                  ) -> Callable[[argparse.ArgumentParser], None]:
    """The arguments of a command that runs ``op``: the key, the value if the op takes
    one, ``--namespace`` and the op's flags (``add_op_arguments``)."""
    def add(parser: argparse.ArgumentParser) -> None:
        _key_arguments(parser)
        if any(field.name == "value" for field in op.arguments()):
            parser.add_argument("value", metavar="VALUE", help="the value as JSON (a string "
                                "in quotes: '\"green\"'), or - to read it from stdin")
        add_op_arguments(parser, op)
    return add


def _read_value(args: argparse.Namespace, config: Config) -> SetOp:
    """The set op, checked before the database is opened (or created)."""
    if args.value == "-":
        data = sys.stdin.buffer.read(MAX_VALUE_TEXT + 1)
        if len(data) > MAX_VALUE_TEXT:
            raise PayloadTooLargeError(f"the value on stdin is over {MAX_VALUE_TEXT} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("the value on stdin is not UTF-8 text") from None
    else:
        text = args.value  # the system bounds an argument's length; kvmem the value's
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"the value must be JSON (a string in quotes, as "
                                f"'\"green\"'): {exc}") from None
    op: SetOp = _op(SetOp, args, config, value=value)
    return op


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _set(store: AnyStore, args: argparse.Namespace, op: SetOp) -> Any:
    memory = store.apply(op)
    return memory.render(store.clock())


def _delete(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    if not store.apply(_op(DeleteOp, args, store.config)):
        raise NotFoundError(f"no memory {args.key[:200]!r} in namespace {args.namespace!r}")
    return {"deleted": True}


def _reinforce(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    return store.apply(_op(ReinforceOp, args, store.config)).render(store.clock())


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default="default",
                        help="the namespace to list (default default)")
    add_filter_arguments(parser)
    parser.add_argument("--archived", action="store_true",
                        help="archived (faded) memories instead of live ones")
    parser.add_argument("--limit", type=_number_or_text, default=argparse.SUPPRESS,
                        help="most memories on a page (default 100)")
    parser.add_argument("--cursor", default=argparse.SUPPRESS,
                        help="the next_cursor of the page before")


def _list(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    page = store.list(namespace=args.namespace, **_filters(args), archived=args.archived,
                      **_limits(args))
    now = store.clock()
    return {"items": [m.render(now) for m in page.items], "next_cursor": page.next_cursor}


def _search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="QUERY", help="plain words")
    parser.add_argument("--namespace", action="append", metavar="NAMESPACE",
                        help="where to search (default default): repeat for several, * for all")
    add_filter_arguments(parser)
    parser.add_argument("--limit", type=_number_or_text, default=argparse.SUPPRESS,
                        help="most hits (default 20)")


def _search(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    namespaces = args.namespace or ["default"]
    hits = store.search(args.query, namespace=namespaces[0] if len(namespaces) == 1
                        else namespaces, **_filters(args), **_limits(args))
    now = store.clock()
    return {"items": [{**h.memory.render(now), "score": h.score} for h in hits]}


def _forget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default="default",
                        help="the namespace to forget in (default default)")
    add_filter_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="only report how many memories would go, and which")


def _forget(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    return store.forget(namespace=args.namespace, **_filters(args), dry_run=args.dry_run)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", help="only this namespace (default: all)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write to this new file (never overwritten) instead of stdout")


def _export(store: AnyStore, args: argparse.Namespace, prepared: None) -> Any:
    if args.output is None:
        store.export(sys.stdout, namespace=args.namespace)
        return None
    if not is_postgres(store.config.db):
        _refuse_database_file(args.output, store.path)
    try:
        fp = open(args.output, "x", encoding="utf-8")  # noqa: SIM115 (removed on failure)
    except FileExistsError:
        raise InvalidInputError(f"{args.output}: already exists; export only writes a new "
                                "file") from None
    except OSError as exc:
        raise InvalidInputError(f"--output: {describe(exc)}") from exc
    try:
        count = store.export(fp, namespace=args.namespace)
        fp.flush()
        os.fsync(fp.fileno())
        fp.close()
    except BaseException:
        fp.close()
        os.unlink(args.output)  # a partial export must not pass for a whole one
        raise
    return {"exported": count, "path": os.path.realpath(args.output)}


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", default="-", metavar="FILE",
                        help="JSON Lines written by export (default -: stdin)")


def _open_import(args: argparse.Namespace, config: Config) -> IO[str]:
    """The input of import, seekable (as Store.import_ needs): the file, or stdin (or a
    pipe) spooled to a temporary file.  A database not there yet is created only for an
    input that Store.import_ would take (``check_import``)."""
    if args.file != "-" and not is_postgres(config.db):
        _refuse_database_file(args.file, config.db)
    try:
        if args.file != "-" and os.path.isfile(args.file):
            fp: IO[str] = open(args.file, encoding="utf-8")  # noqa: SIM115 (closed by main)
        else:
            fp = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
            source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
            with source:
                shutil.copyfileobj(source, fp.buffer)
            fp.seek(0)
    except OSError as exc:
        cls = NotFoundError if isinstance(exc, FileNotFoundError) else InvalidInputError
        raise cls(describe(exc)) from exc
    if is_postgres(config.db) or not os.path.exists(config.db):
        try:
            check_import(fp, config)  # before a new database is created: bad input leaves none
        except BaseException:
            fp.close()
            raise
    return fp


def _import(store: AnyStore, args: argparse.Namespace, fp: IO[str]) -> Any:
    return store.import_(fp)


def _refuse_database_file(name: str, db: str) -> None:
    """Refuse the database or a file of SQLite's beside it as an export's or import's
    file: opening and closing it in this process would drop the locks of its
    connection, and an export would overwrite it."""
    real, db = os.path.realpath(name), os.path.realpath(db)
    if real in {db, *(db + suffix for suffix in ("-wal", "-shm", "-journal",
                                                 ".checkpoint.lock"))}:
        raise InvalidInputError(f"{name} is the database or one of its files")


COMMANDS: dict[str, Command] = {
    "get": Command("print a live memory (not_found if absent, expired or archived)",
                   "KEY", _key_arguments, _get),
    "set": Command("create or replace a memory (creates the database if needed)",
                   "KEY VALUE", _op_arguments(SetOp), _set, creates=True,
                   prepare=_read_value),
    "delete": Command("delete a memory, live or archived", "KEY", _op_arguments(DeleteOp),
                      _delete),
    "reinforce": Command("strengthen a memory and restart its decay; restores an archived one",
                         "KEY", _op_arguments(ReinforceOp), _reinforce),
    "list": Command("memories in key order, a page at a time", "", _list_arguments, _list),
    "search": Command("full-text search, best first", "QUERY", _search_arguments, _search),
    "forget": Command("delete every memory of a namespace that --prefix and --tag select "
                      "(live, archived or expired), in batches; "
                      "--dry-run only reports", "", _forget_arguments, _forget),
    "export": Command("every memory as JSON Lines (archived and expired too)", "",
                      _export_arguments, _export),
    "import": Command("memories from JSON Lines written by export, replacing those with the "
                      "same key (creates the database if needed)", "[FILE]", _import_arguments,
                      _import, creates=True, prepare=_open_import),
}


def _run_data_command(command: Command, args: argparse.Namespace, config: Config) -> Any:
    """Prepare (read and check the input), open the database (refusing a missing one
    unless the command creates), run, close."""
    prepared = command.prepare(args, config) if command.prepare else None
    try:
        if not command.creates and not is_postgres(config.db):
            require_database(config.db)
        # Writers run a checkpointer, so that the WAL they grow is folded in when they
        # close if no other process is the checkpointer.
        with open_store(config, role="cli", checkpointer=command.creates,
                        create=command.creates) as store:
            return command.run(store, args, prepared)
    finally:
        if isinstance(prepared, io.IOBase):
            prepared.close()


# ---------------------------------------------------------------------------- main ----

# Settings only the servers read: no flags for them on kvmem.
SERVER_SETTINGS = tuple(f.name for f in dataclasses.fields(Config) if f.name in (
    "host", "port", "mcp_port", "allowed_hosts", "cors_origins", "access_log",
    "shutdown_grace_s")
    or f.name.startswith("http_"))

FILE_COMMANDS = (
    ("check", "header, schema version and integrity_check; exit 1 on a problem"),
    ("stats", "settings read back from a live connection, sizes, state"),
    ("checkpoint", "one checkpoint, unless another process is the checkpointer"),
    ("backup", "online backup to a new, self-contained file, then check the copy"),
    ("namespaces", "the namespaces that hold memories, with live and archived counts"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmem", description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog="Exit status: 0 done, 1 an error (one JSON line on stdout), 2 a usage error.",
        formatter_class=HelpFormatter)
    parser.allow_abbrev = False
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help,
                                  usage=f"%(prog)s [options] {command.usage}".rstrip(),
                                  allow_abbrev=False, formatter_class=HelpFormatter)
        command.arguments(sub)
        add_config_arguments(sub, exclude=SERVER_SETTINGS)
    db_default = default_db_path({k: v for k, v in os.environ.items() if k != "KVMEM_DB"})
    for name, help in FILE_COMMANDS:
        sub = commands.add_parser(name, help=help, description=help, allow_abbrev=False,
                                  usage=f"%(prog)s [options] [PATH]"
                                        f"{' DEST' if name == 'backup' else ''}",
                                  formatter_class=HelpFormatter)
        sub.add_argument("path", nargs="?", help="the database file (default: --db, "
                         f"KVMEM_DB, else {db_default})")
        if name == "backup":
            sub.add_argument("dest", help="the new file to write")
        if name == "checkpoint":
            sub.add_argument("--truncate", action="store_true", help="TRUNCATE, not PASSIVE")
        add_config_arguments(sub, exclude=SERVER_SETTINGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``kvmem COMMAND ...``: see the module's docstring (and ``kvmem --help``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    # JSON is UTF-8 (RFC 8259), whatever the locale says.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8")
    try:
        config = config_from_args(args)
        if args.command in COMMANDS:
            result = _run_data_command(COMMANDS[args.command], args, config)
        else:
            result = _file_command(args, config)
        if result is not None:  # export printed its lines itself
            print(json.dumps(result, indent=2, default=str, ensure_ascii=False), flush=True)
    except KvmemError as exc:
        return _failed(error_fields(exc))
    except UnicodeDecodeError:  # an import's input
        return _failed({"code": InvalidInputError.code,
                        "message": "the input is not UTF-8 text; nothing imported"})
    except BrokenPipeError:  # the reader went away (kvmem export | head): stop quietly
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file of the command's, or stdout (kvmem's are KvmemErrors)
        return _failed({"code": StorageError.code, "message": describe(exc)})
    return 0 if result is None or result.get("ok", True) else 1


def _failed(error: dict[str, Any]) -> int:
    """Print a failed command's error line on stdout, or on stderr when stdout itself
    failed (a full disk); the exit status, 1."""
    line = json.dumps({"ok": False, "error": error}, ensure_ascii=False)
    try:
        print(line, flush=True)
    except OSError:
        _silence_stdout()
        print(line, file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that what is left in its buffer cannot fail again
    when the interpreter exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def error_fields(exc: KvmemError) -> dict[str, Any]:
    """The ``error`` object of a failed command: code and message (and, for a version
    conflict, the version the store holds, as the HTTP API adds it)."""
    fields: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if isinstance(exc, VersionConflictError):
        fields["current_version"] = exc.current_version
    return fields


def _file_command(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    # A PATH argument follows the rules of --db (no URL, made absolute).
    path = Config.build(environ={}, flags={"db": args.path}).db if args.path else config.db
    if is_postgres(path):
        return _postgres_file_command(args.command, dataclasses.replace(config, db=path))
    if args.command == "check":
        return check_database(path, config)
    if args.command == "stats":
        return _cli_stats(path, config)
    if args.command == "checkpoint":
        return _cli_checkpoint(path, config, truncate=args.truncate)
    if args.command == "namespaces":
        return list_namespaces(path, config)
    return backup_database(path, args.dest, config)


if __name__ == "__main__":
    sys.exit(main())
