"""kvmem's command-line edge: a flag for every setting, and what both servers share (the
token and exposure checks, the shapes of the stats and of the namespace list); and the
``kvmem`` command, which checks, checkpoints, backs up and reports on a database file and
lists its namespaces.

Every command prints JSON on stdout and exits 1 on a problem.  The library is ``kvmem.py``
(one stdlib-only file); errors become JSON here, at the edge.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from kvmem import (
    BusyError,
    Config,
    ConfigError,
    InvalidInputError,
    KvmemError,
    NotFoundError,
    Store,
    checkpoint_elected,
    checkpoint_lock_free,
    database_stats,
    env_name,
    flag_name,
    open_db,
    wal_size,
)


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = (),
                         aliases: Mapping[str, str] | None = None) -> None:
    """Add one ``--flag`` per Config field (and any ``aliases``: field -> extra flag);
    values stay raw strings for ``Config.build``."""
    group = parser.add_argument_group("settings (each also read from KVMEM_<NAME>)")
    for field in dataclasses.fields(Config):
        # No --token: a secret on a command line shows in ps to every user of the machine
        # (KVMEM_TOKEN or a server's --token-file instead).
        if field.name not in exclude and field.name != "token":
            extra = [aliases[field.name]] if aliases and field.name in aliases else []
            default = f" (default {field.default!r})" if field.default != "" else ""
            group.add_argument(*extra, flag_name(field), dest=field.name, default=None,
                               metavar=field.name.upper(), help=f"{field.metadata['help']}"
                               f"{default} [env {env_name(field)}]")


def config_from_args(args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> Config:
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    return Config.build(environ=environ, flags=flags)


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def parse_server_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
                      exclude: Sequence[str] = (),
                      aliases: Mapping[str, str] | None = None) -> argparse.Namespace:
    """A server's command line: its own flags (already on ``parser``), ``--log-level``,
    ``--token-file`` and a flag per setting (``server_config`` reads them); logging goes
    to stderr."""
    parser.allow_abbrev = False  # "--token" must not pass for "--token-file"
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--token-file", help="read the bearer token (UTF-8) from this file")
    add_config_arguments(parser, exclude=exclude, aliases=aliases)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    limit_malloc_arenas()  # before the server starts its threads
    return args


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
    refused (ConfigError) when it would expose the database: see ``check_exposure``."""
    config = config_from_args(args)
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fp:
            config = dataclasses.replace(config, token=fp.read().strip())
        if not config.token:  # an empty file must not turn the check off
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
    if config.token != config.token.strip() or any(
            ch < " " or "\x7f" <= ch <= "\x9f" for ch in config.token) or \
            not _is_utf8(config.token):
        raise ConfigError("the token must be UTF-8 text without control characters or "
                          "surrounding spaces, e.g. openssl rand -hex 32")
    check_exposure(config.host, config.token)  # before the database is created
    return config


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

# The shape of Store.stats(), as kvmem-mcp's memory_stats publishes it.
STATS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "path": {"type": "string"}, "sqlite_version": {"type": "string"},
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
}}
STATS_SCHEMA["required"] = list(STATS_SCHEMA["properties"])

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


def check_database(path: str, config: Config) -> dict[str, Any]:
    """Header, schema version and ``integrity_check`` of ``path``, changing nothing."""
    report: dict[str, Any] = {"path": os.path.realpath(path), "ok": False}
    if not os.path.exists(path):
        report["error"] = {"code": NotFoundError.code, "message": f"{path}: no such file"}
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
        report["ok"] = report["integrity"] == ["ok"]
    except KvmemError as exc:
        report["error"] = {"code": exc.code, "message": str(exc)}
    finally:
        conn.close()
    return report


def backup_database(path: str, dest: str, config: Config) -> dict[str, Any]:
    """Copy ``path`` to the new file ``dest`` with SQLite's online backup API, then check
    the copy.  Refuses an existing ``dest`` (a backup never overwrites anything)."""
    if os.path.lexists(dest):
        raise InvalidInputError(f"{dest}: already exists; a backup only writes a new file")
    src = open_db(path, config=config)
    try:
        out = open_db(dest, config=dataclasses.replace(config, quick_check=False))
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()
    return check_database(dest, config)


def _cli_checkpoint(path: str, config: Config, *, truncate: bool) -> dict[str, Any]:
    conn = open_db(path, config=config)
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


def list_namespaces(path: str, config: Config) -> dict[str, Any]:
    """The namespaces of the database ``path`` with their counts (``Store.namespaces``),
    shaped as NAMESPACE_LIST_SCHEMA; a missing file is a NotFoundError, never created."""
    if not os.path.exists(path):
        raise NotFoundError(f"{path}: no such file")
    with Store.open(path, config=config, role="cli", checkpointer=False) as store:
        return {"items": store.namespaces()}


def main(argv: Sequence[str] | None = None) -> int:
    """``kvmem check|stats|checkpoint|backup|namespaces``: JSON on stdout, exit 1 on a
    problem."""
    parser = argparse.ArgumentParser(prog="kvmem", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("check", "header, schema version and integrity_check; exit 1 on a problem"),
                       ("stats", "settings read back from a live connection, sizes, state"),
                       ("checkpoint", "one checkpoint, unless another process is the checkpointer"),
                       ("backup", "online backup to a new file, then check the copy"),
                       ("namespaces", "the namespaces that hold memories, with live and "
                                      "archived counts")):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("path", nargs="?", help="database file (default: --db / KVMEM_DB)")
        if name == "backup":
            sub.add_argument("dest", help="the new file to write")
        if name == "checkpoint":
            sub.add_argument("--truncate", action="store_true", help="TRUNCATE, not PASSIVE")
        add_config_arguments(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    try:
        config = config_from_args(args)
        path = args.path or config.db
        if args.command == "check":
            result = check_database(path, config)
        elif args.command == "stats":
            conn = open_db(path, config=config)
            try:
                result = database_stats(conn)
                result["checkpointer_running_elsewhere"] = not checkpoint_lock_free(path)
                result["config"] = config.public()
            finally:
                conn.close()
        elif args.command == "checkpoint":
            result = _cli_checkpoint(path, config, truncate=args.truncate)
        elif args.command == "namespaces":
            result = list_namespaces(path, config)
        else:
            result = backup_database(path, args.dest, config)
    except KvmemError as exc:
        print(json.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}}))
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
