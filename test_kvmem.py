"""Foundation tests: Config, open_db, transaction, errors, Checkpointer, CLI.

Real files in tmp_path, real second connections for busy errors, real child processes
killed with SIGKILL.  Fixture files are made with the raw ``sqlite3`` module on purpose:
they stand for files written by other tools.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

import kvmem
import kvmem_cli
from testchildren import RAW_INSERT as INSERT  # the raw_writer child's too
from testutil import (
    FILTER_NAMESPACES,
    HERE,
    Child,
    check_acknowledged,
    child_command,
    child_env,
    file_digest,
    fill_filter_store,
    run_cli,
)


def cfg(**settings: str) -> kvmem.Config:
    return kvmem.Config.build(environ={}, flags=settings)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "kv.db")


@pytest.fixture
def conns() -> Iterator[list[kvmem.KvmemConnection]]:
    """Connections to close after the test, whatever happened."""
    opened: list[kvmem.KvmemConnection] = []
    yield opened
    for conn in opened:
        conn.close()


# ---------------------------------------------------------------------------- Config ----


def test_config_defaults() -> None:
    config = kvmem.Config.build(environ={"HOME": "/home/u"})
    assert config.db == "/home/u/.local/share/kvmem/memory.db"
    assert config.journal_mode == "wal" and config.synchronous == "extra"
    assert config.busy_timeout_ms == 5000
    assert config.cache_size_kib == 64000 and config.wal_cap_bytes == 64 * 1024 * 1024
    assert config.wal_hard_cap_bytes == 4 * config.wal_cap_bytes
    assert config.host == "127.0.0.1" and config.token == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HOME": "/h"}, "/h/.local/share/kvmem/memory.db"),
        ({"HOME": "/h", "XDG_DATA_HOME": "/data"}, "/data/kvmem/memory.db"),
        ({"HOME": "/h", "XDG_DATA_HOME": "relative/ignored"}, "/h/.local/share/kvmem/memory.db"),
        ({"HOME": "/h", "XDG_DATA_HOME": "/data", "KVMEM_DB": "/x/y.db"}, "/x/y.db"),
    ],
)
def test_default_db_path(environ: dict[str, str], expected: str) -> None:
    assert kvmem.Config.build(environ=environ).db == expected


def test_default_db_path_ignores_working_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"HOME": str(tmp_path)}
    seen = set()
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        seen.add(kvmem.Config.build(environ=environ).db)
    assert seen == {str(tmp_path / ".local/share/kvmem/memory.db")}


def test_config_env_then_flags() -> None:
    environ = {"KVMEM_SYNCHRONOUS": "normal", "KVMEM_BUSY_TIMEOUT_MS": "250",
               "KVMEM_QUICK_CHECK": "off", "KVMEM_TOKEN": "s3cret"}
    config = kvmem.Config.build(environ=environ, flags={"synchronous": "FULL"})
    assert config.synchronous == "full"  # the flag beats the environment
    assert config.busy_timeout_ms == 250 and config.quick_check is False
    assert config.token == "s3cret" and config.public()["token"] == "set"


@pytest.mark.parametrize(("given", "db", "shown"), [
    ("postgresql://kv:s3cret@db1:5432,db2:5433/mem?target_session_attrs=read-write",
     "postgresql://kv:s3cret@db1:5432,db2:5433/mem?target_session_attrs=read-write",
     "postgresql://kv:***@db1:5432,db2:5433/mem?target_session_attrs=read-write"),
    ("POSTGRES://kv@db/mem?password=s3cret&sslmode=require",  # libpq takes lowercase only
     "postgres://kv@db/mem?password=s3cret&sslmode=require",
     "postgres://kv@db/mem?password=***&sslmode=require"),
    (" postgresql://[::1]:5432/mem ", "postgresql://[::1]:5432/mem",
     "postgresql://[::1]:5432/mem"),
])
def test_a_postgres_url_is_kept_and_its_password_never_shown(given: str, db: str,
                                                              shown: str) -> None:
    for config in (kvmem.Config.build(environ={}, flags={"db": given}),
                   kvmem.Config.build(environ={"KVMEM_DB": given})):
        assert config.db == db and kvmem.is_postgres(config.db)
        assert config.public()["db"] == shown
        assert "s3cret" not in json.dumps(config.public())


@pytest.mark.parametrize(
    ("environ", "flags", "named"),
    [
        ({"KVMEM_SYNCHRONOUS": "fastest"}, {}, "KVMEM_SYNCHRONOUS='fastest'"),
        ({"KVMEM_JOURNAL_MODE": "memory"}, {}, "KVMEM_JOURNAL_MODE"),
        ({"KVMEM_BUSY_TIMEOUT_MS": "-1"}, {}, "KVMEM_BUSY_TIMEOUT_MS"),
        ({"KVMEM_BUSY_TIMEOUT_MS": "1.5"}, {}, "KVMEM_BUSY_TIMEOUT_MS"),
        ({"KVMEM_WAL_CAP_BYTES": "lots"}, {}, "KVMEM_WAL_CAP_BYTES"),
        ({"KVMEM_CHECKPOINT_INTERVAL_S": "nan"}, {}, "KVMEM_CHECKPOINT_INTERVAL_S"),
        ({"KVMEM_QUICK_CHECK": "maybe"}, {}, "KVMEM_QUICK_CHECK"),
        ({}, {"port": "http"}, "--port='http'"),
        ({}, {"port": "99999"}, "--port='99999': must be at most 65535"),
        ({"KVMEM_DB": "mysql://u@h/db"}, {}, "KVMEM_DB='mysql://u@h/db': mysql:// is not a "
         "database kvmem can open: give the path of an SQLite file or a postgresql:// URL"),
        ({}, {"db": "sqlite:///x.db"}, "--db='sqlite:///x.db': sqlite:// is not a database"),
        ({"KVMEM_MCP_PORT": "65536"}, {}, "KVMEM_MCP_PORT='65536': must be at most 65535"),
        ({}, {"db": ""}, "--db"),
        ({}, {"decay_interval_s": "0"}, "--decay-interval-s"),
    ],
)
def test_config_bad_value_names_its_source(environ: dict[str, str], flags: dict[str, str],
                                            named: str) -> None:
    with pytest.raises(kvmem.ConfigError, match=named.replace("[", r"\[")):
        kvmem.Config.build(environ=environ, flags=flags)


def test_unknown_variable_warns_once_naming_the_closest(
        caplog: pytest.LogCaptureFixture) -> None:
    environ = {"KVMEM_SYNCRONOUS": "off", "KVMEM_ZZQ": "1", "KVMEM_TEST_SOAK": "1",
               "KVMEM_DB": "/tmp/x.db"}
    caplog.set_level(logging.WARNING, logger="kvmem")
    kvmem._WARNED.clear()
    config = kvmem.Config.build(environ=environ)
    kvmem.Config.build(environ=environ)
    assert config.synchronous == "extra"  # still ignored, but no longer silently
    warnings = [r.getMessage() for r in caplog.records if r.name == "kvmem"]
    assert warnings == [
        "KVMEM_SYNCRONOUS is not a kvmem setting and is ignored "
        "(did you mean KVMEM_SYNCHRONOUS?)",
        "KVMEM_ZZQ is not a kvmem setting and is ignored"]


def test_unknown_variable_warning_reaches_a_server_log(tmp_path: Path) -> None:
    env = {**os.environ, "KVMEM_DB": str(tmp_path / "kv.db"), "KVMEM_SYNCRONOUS": "off"}
    out = subprocess.run([sys.executable, "-m", "kvmem_cli", "check"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert "KVMEM_SYNCRONOUS is not a kvmem setting" in out.stderr
    assert "did you mean KVMEM_SYNCHRONOUS?" in out.stderr


# ------------------------------------------------------------------------- open_db ----


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
@pytest.mark.parametrize("synchronous", ["off", "normal", "full", "extra"])
def test_every_pragma_read_back(db: str, synchronous: str, journal_mode: str,
                                conns: list[kvmem.KvmemConnection]) -> None:
    config = cfg(synchronous=synchronous, journal_mode=journal_mode, busy_timeout_ms="1234",
                 cache_size_kib="2000")
    expected = {"journal_mode": journal_mode, "synchronous": synchronous, "busy_timeout": 1234,
                "cache_size": -2000, "temp_store": 2, "foreign_keys": 1, "wal_autocheckpoint": 0,
                "journal_size_limit": 32 + 1000 * 4120}  # one checkpoint interval of frames
    conns.append(kvmem.open_db(db, config=config))
    assert kvmem.read_settings(conns[0]) == expected
    # A second connection, opened from another thread, gets exactly the same settings.
    seen: dict[str, object] = {}

    def other() -> None:
        conn = kvmem.open_db(db, config=config)
        seen.update(kvmem.read_settings(conn))
        conn.close()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == expected


def test_schema_created_once(db: str, conns: list[kvmem.KvmemConnection]) -> None:
    for _ in range(3):
        conns.append(kvmem.open_db(db, config=cfg()))
    conn = conns[0]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == kvmem.SCHEMA_VERSION
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name = 'memories'")]
    assert names == ["memories"]


def _write_wal_file(tmp_path: Path) -> Path:
    """A real -wal file, left behind by a process that died with its connection open."""
    src = tmp_path / "src.db"
    subprocess.run(child_command("wal_left_behind", str(src)), check=True, cwd=HERE)
    target = tmp_path / "wal-as-db.db"
    shutil.copyfile(str(src) + "-wal", target)
    return target


def _truncated_sqlite(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"truncated-{size}.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE t(x)")
    raw.executemany("INSERT INTO t VALUES (?)", [("x" * 500,) for _ in range(200)])
    raw.commit()
    raw.close()
    with open(path, "r+b") as fp:
        fp.truncate(size)
    return path


@pytest.mark.parametrize(
    ("make", "error", "found"),
    [
        (lambda p: (p / "text.db").write_text("hello, I am a config file\n") and p / "text.db",
         kvmem.NotADatabaseError, "text starting 'hello"),
        (lambda p: (p / "zeros.db").write_bytes(b"\0" * 8192) and p / "zeros.db",
         kvmem.NotADatabaseError, "8192 bytes of zeros"),
        (lambda p: _truncated_sqlite(p, 50), kvmem.NotADatabaseError, "truncated SQLite file"),
        (lambda p: _truncated_sqlite(p, 4096), kvmem.CorruptDatabaseError, "malformed|quick_check"),
        (_write_wal_file, kvmem.NotADatabaseError, "WAL file"),
    ],
    ids=["text", "zeros", "truncated-50", "truncated-4096", "wal-file"],
)
def test_not_a_database_refused_and_unchanged(tmp_path: Path, make: object,
                                              error: type[kvmem.KvmemError], found: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    before = file_digest(path)
    with pytest.raises(error, match=found) as info:
        kvmem.open_db(path, config=cfg())
    assert str(path) in str(info.value)
    assert file_digest(path) == before
    assert not os.path.exists(f"{path}-wal")
    # The registration was given back: a later open checks the header again.
    with pytest.raises(error):
        kvmem.open_db(path, config=cfg())


def _mkdir_error(make: Callable[[str], None], directory: str) -> tuple[object, ...]:
    with pytest.raises(OSError) as info:
        make(directory)
    return type(info.value), info.value.errno, info.value.filename


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_new_directories_fail_as_makedirs_fails(tmp_path: Path, below: str) -> None:
    """open_db makes the database's missing directories with ``make_dirs_durable`` (which
    also syncs them: test_powerloss.py); a file in the way fails exactly as
    ``os.makedirs`` fails, naming the path, and is left unchanged (a permission error
    comes from the same ``os.mkdir``)."""
    (tmp_path / "file").write_bytes(b"x")
    target = str(tmp_path / "file" / below)
    mine = _mkdir_error(kvmem.make_dirs_durable, target)
    assert mine == _mkdir_error(lambda d: os.makedirs(d, exist_ok=True), target)
    assert mine[0] is (NotADirectoryError if below else FileExistsError), mine
    assert (tmp_path / "file").read_bytes() == b"x"
    kvmem.make_dirs_durable(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("journal", [True, False], ids=["hot-journal", "no-journal"])
def test_torn_first_transaction_rolled_back_not_refused(tmp_path: Path, journal: bool) -> None:
    """Power cut during a new database's first transaction (found by crashsim.py): the
    file's sectors never reached the disk (zeros), its synced rollback journal did.  The
    header check must let SQLite roll the journal back, not refuse the file; zeros
    without a journal are still refused."""
    path = tmp_path / "new.db"
    child = Child("first_transaction", str(path), stdin=True)
    size = int(child.expect("spilled").split()[1])
    child.kill()
    assert size > 4096 and os.path.exists(f"{path}-journal")
    path.write_bytes(bytes(size))  # no connection in this process
    if not journal:
        os.remove(f"{path}-journal")
        with pytest.raises(kvmem.NotADatabaseError, match="zeros"):
            kvmem.open_db(path, config=cfg())
        return
    conn = kvmem.open_db(path, config=cfg())
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "memories" in tables and "t" not in tables  # rolled back, then kvmem's schema
    finally:
        conn.close()
    assert not os.path.exists(f"{path}-journal")


def _open_error(path: Path, *, as_nobody: bool) -> str:
    """The message of open_db(path)'s error, from this process or (as root, who may write
    anywhere) from a forked child that became ``nobody``."""
    if not as_nobody:
        with pytest.raises(kvmem.StorageError) as caught:
            kvmem.open_db(path, config=cfg())
        return str(caught.value)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only kvmem code, then _exit
        message = "opened"
        try:
            os.setgid(65534)
            os.setuid(65534)
            kvmem.open_db(path, config=cfg()).close()
        except kvmem.StorageError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fp:
        message = fp.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return message


def test_unusable_directory_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    message = _open_error(tmp_path / "file" / "sub" / "kv.db", as_nobody=False)
    assert f"cannot create its directory: {tmp_path / 'file'} is not a directory" in message
    shared = Path(tempfile.mkdtemp(prefix="kvmem-perm-"))  # pytest's tmp_path is 0700
    try:
        shared.chmod(0o755)
        (shared / "ro").mkdir(mode=0o555)
        as_nobody = os.geteuid() == 0
        message = _open_error(shared / "ro" / "kv.db", as_nobody=as_nobody)
        assert (f"SQLITE_CANTOPEN: permission denied: cannot create files in {shared / 'ro'}"
                in message), message
        message = _open_error(shared / "ro" / "sub" / "kv.db", as_nobody=as_nobody)
        assert f"cannot create its directory: Permission denied ({shared / 'ro' / 'sub'})" \
            in message, message
        assert os.listdir(shared / "ro") == []
    finally:
        shutil.rmtree(shared)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_header_check_pure() -> None:
    assert kvmem.describe_header(b"", 0) is None
    assert kvmem.describe_header(kvmem.SQLITE_MAGIC + b"\0" * 84, 4096) is None
    assert "zeros" in str(kvmem.describe_header(b"\0" * 100, 100))
    assert "WAL" in str(kvmem.describe_header(b"\x37\x7f\x06\x82" + b"\0" * 96, 4096))
    assert "unknown bytes" in str(kvmem.describe_header(b"\x89PNG\r\n\x1a\n" + b"\0" * 92, 100))


def test_schema_too_new_refused_and_unchanged(db: str) -> None:
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    before = file_digest(db)
    with pytest.raises(kvmem.SchemaTooNewError, match="99"):
        kvmem.open_db(db, config=cfg())
    assert file_digest(db) == before
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    raw.close()


def test_delete_mode_file_converts_to_wal_and_back(db: str) -> None:
    # An older tool left a DELETE-mode file with a table of its own and no kvmem schema.
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE notes (n INTEGER)")
    raw.executemany("INSERT INTO notes VALUES (?)", [(i,) for i in range(500)])
    raw.commit()
    raw.close()

    conn = kvmem.open_db(db, config=cfg())
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*), sum(n) FROM notes").fetchone() == (500, sum(range(500)))
    with kvmem.transaction(conn):
        conn.executemany(INSERT, [(f"k{i}", json.dumps(i)) for i in range(100)])
    conn.close()

    conn = kvmem.open_db(db, config=cfg(journal_mode="delete"))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 100
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 500
    conn.close()
    assert not os.path.exists(db + "-wal")


def test_recovery_record_after_kill(db: str, caplog: pytest.LogCaptureFixture) -> None:
    child = Child("raw_writer", db, "0")
    child.expect("50 ok")
    child.kill()
    wal_before = os.stat(db + "-wal").st_size
    assert wal_before > 0
    with caplog.at_level(logging.INFO, logger="kvmem.recovery"):
        conn = kvmem.open_db(db, config=cfg())
    try:
        record = kvmem.recovery_record(db)
        assert record is not None
        assert record.wal_bytes_found == wal_before
        assert record.quick_check == "ok" and record.checkpoint == "done"
        assert record.wal_frames and record.frames_checkpointed == record.wal_frames
        assert "recovery record" in caplog.text and f"wal_bytes_found={wal_before}" in caplog.text
        # PASSIVE, not TRUNCATE: startup does not shrink the WAL.
        assert os.stat(db + "-wal").st_size == wal_before
    finally:
        conn.close()


# --------------------------------------------------------------------- transaction ----


def test_transaction_waits_for_a_writer_then_succeeds(db: str,
                                                      conns: list[kvmem.KvmemConnection]) -> None:
    conns.append(kvmem.open_db(db, config=cfg()))
    conn = conns[0]
    held, released = threading.Event(), threading.Event()

    def other_writer() -> None:  # holds the write lock for 0.3 s, in its own thread
        holder = kvmem.open_db(db, config=cfg())
        holder.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(0.3)
        holder.execute("COMMIT")
        released.set()
        holder.close()

    thread = threading.Thread(target=other_writer)
    thread.start()
    assert held.wait(10)
    started = time.monotonic()
    with kvmem.transaction(conn, timeout_s=10):
        assert released.is_set()
        conn.execute(INSERT, ("waited", "1"))
    assert time.monotonic() - started >= 0.2
    thread.join()
    assert conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 1


def test_transaction_raises_busy_past_deadline(db: str, conns: list[kvmem.KvmemConnection]) -> None:
    conns.extend([kvmem.open_db(db, config=cfg()), kvmem.open_db(db, config=cfg())])
    conn, holder = conns
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(kvmem.BusyError, match="locked"), kvmem.transaction(conn, timeout_s=0.3):
        pytest.fail("the block must not run without the lock")
    took = time.monotonic() - started
    assert 0.3 <= took < 2.0  # the deadline, not SQLite's 5 s busy_timeout
    assert kvmem.read_settings(conn)["busy_timeout"] == 5000  # restored
    holder.execute("ROLLBACK")
    with kvmem.transaction(conn, timeout_s=0.3):
        conn.execute(INSERT, ("after", "1"))


def test_transaction_rolls_back_on_exception(db: str, conns: list[kvmem.KvmemConnection]) -> None:
    conns.append(kvmem.open_db(db, config=cfg()))
    conn = conns[0]
    with pytest.raises(ZeroDivisionError), kvmem.transaction(conn):
        conn.execute(INSERT, ("lost", "1"))
        _ = 1 / 0
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 0


def test_read_then_write_never_immediate_busy(db: str, conns: list[kvmem.KvmemConnection]) -> None:
    conns.extend([kvmem.open_db(db, config=cfg()), kvmem.open_db(db, config=cfg())])
    a, b = conns
    with kvmem.transaction(a):
        a.execute(INSERT, ("counter", "0"))

    # The trap, shown with a deferred BEGIN: A reads, B commits, A's write fails at once.
    a.execute("BEGIN")
    a.execute("SELECT value FROM memories WHERE key = 'counter'").fetchone()
    with kvmem.transaction(b):
        b.execute("UPDATE memories SET value = '100' WHERE key = 'counter'")
    with pytest.raises(kvmem.BusyError) as info:  # mapped: SQLite's own error is the cause
        a.execute("UPDATE memories SET value = '1' WHERE key = 'counter'")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert info.value.__cause__.sqlite_errorname == "SQLITE_BUSY_SNAPSHOT"
    a.execute("ROLLBACK")

    # transaction(): 4 threads x 50 read-modify-write increments, no error, no lost update.
    errors: list[BaseException] = []

    def incrementer() -> None:
        conn = kvmem.open_db(db, config=cfg())
        try:
            for _ in range(50):
                with kvmem.transaction(conn):
                    (value,) = conn.execute(
                        "SELECT value FROM memories WHERE key = 'counter'").fetchone()
                    conn.execute("UPDATE memories SET value = ? WHERE key = 'counter'",
                                 (str(int(value) + 1),))
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=incrementer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.execute("SELECT value FROM memories WHERE key = 'counter'").fetchone()[0] == "300"


def test_sqlite_errors_mapped_by_code(db: str, conns: list[kvmem.KvmemConnection]) -> None:
    conns.append(kvmem.open_db(db, config=cfg()))
    conn = conns[0]
    page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {page_count + 1}")
    with pytest.raises(kvmem.StorageFullError, match="SQLITE_FULL"), kvmem.transaction(conn):
        conn.executemany(INSERT, [(f"big{i}", json.dumps("x" * 3000)) for i in range(50)])
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 0


# ------------------------------------------------------------- processes and crashes ----


def test_sigkill_loses_no_acknowledged_commit(db: str) -> None:
    rng = random.Random(1234)
    acked: set[int] = set()
    for run in range(20):
        child = Child("raw_writer", db, str(run * 1_000_000))
        child.expect(f"{run * 1_000_000 + rng.randint(0, 300)} ok")
        acked.update(int(line.split()[0]) for line in child.kill() if line.endswith(" ok"))
        # The writer inserts each row once (version 1): acknowledged means present.
        check_acknowledged(db, {str(i): 1 for i in acked}, config=cfg(), namespace="test",
                           exact_version=False)
    assert len(acked) >= 20


def test_cold_start_race_eight_processes(tmp_path: Path) -> None:
    for trial in range(20):  # in new directories, which all eight make at once
        path = str(tmp_path / f"race{trial}" / "a" / "b" / "kv.db")
        children = [Child("opener", path, stdin=True) for _ in range(8)]
        for child in children:
            child.expect("ready")
        for child in children:
            child.send("go\n")
        for child in children:
            assert child.expect("opened") == "opened wal", child.stderr
            assert child.wait() == 0, child.stderr
        conn = kvmem.open_db(path, config=cfg())
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == kvmem.SCHEMA_VERSION
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'memories'")
            assert tables.fetchone()[0] == 1
        finally:
            conn.close()


# -------------------------------------------------------------------- checkpointer ----


def test_one_checkpointer_holder_and_takeover(db: str) -> None:
    kvmem.open_db(db, config=cfg()).close()
    first = Child("checkpointer", db, "first")
    first.expect("holder")
    second = Child("checkpointer", db, "second")
    try:
        second.expect("standby")
        assert not kvmem.checkpoint_lock_free(db)
        assert "holder" not in second.lines
        first.kill()
        killed = time.monotonic()
        second.expect("holder", timeout=10)
        assert time.monotonic() - killed < 1.0  # within a few polls of 0.05 s
        assert first.lines.count("holder") == 1 and "standby" not in first.lines
    finally:
        first.kill()
        second.kill()


def _burst(store: kvmem.Store, writes: int, threads: int = 1, *,
           value: str = "y" * 200) -> int:
    """``writes`` sets from ``threads`` threads; the largest WAL file seen after any."""
    largest = [0] * threads
    wal = store.path + "-wal"

    def run(t: int) -> None:
        for i in range(writes // threads):
            store.set(f"t{t}-{i % 300}", f"{i} {value}", tags=["burst"])
            largest[t] = max(largest[t], os.stat(wal).st_size)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return max(largest)


def _wal_bound(config: kvmem.Config, page_size: int = 4096) -> int:
    """Twice checkpoint_pages frames: the WAL restarts after each checkpoint, or it
    would pass this within a few hundred writes."""
    return 32 + 2 * config.checkpoint_pages * (24 + page_size)


@pytest.mark.parametrize("threads", [1, 8])
def test_wal_is_bounded_by_size_after_a_burst(db: str, threads: int) -> None:
    """3,000 writes put thousands of frames through the WAL (tens of MiB: about 5 a
    write from one thread); the file stays under twice checkpoint_pages frames only
    because it restarts."""
    config = cfg(checkpoint_pages="64", synchronous="normal")
    with kvmem.Store.open(db, config=config) as store:
        largest = _burst(store, 3000, threads)
        stats = store.stats()
    # Every commit writes at least two pages (the row and its key index), so the WAL took
    # in far more than the bound: it stays under it only by restarting.
    assert stats["group_commit"]["commits"] * 2 * 4096 > 4 * _wal_bound(config)
    assert stats["group_commit"]["checkpoints"] > 10
    assert largest <= _wal_bound(config), f"WAL reached {largest} bytes"
    assert stats["group_commit"]["after_commit_errors"] == 0


def test_wal_stays_bounded_with_a_reader_taking_short_snapshots(db: str) -> None:
    """A reader holding snapshots for 20 ms at a time delays some restarts, never for long."""
    config = cfg(checkpoint_pages="64", synchronous="full", checkpoint_poll_s="0.01")
    stop = threading.Event()

    def reader() -> None:
        conn = kvmem.open_db(db, config=config)
        try:
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT count(*) FROM memories").fetchone()
                stop.wait(0.02)  # an old snapshot, held briefly
                conn.execute("COMMIT")
                stop.wait(0.02)
        finally:
            conn.close()

    with kvmem.Store.open(db, config=config) as store:
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            largest = _burst(store, 1500)
        finally:
            stop.set()
            thread.join()
    assert largest <= 8 * _wal_bound(config), f"WAL reached {largest} bytes"


def test_wal_grows_without_a_checkpointer(db: str) -> None:
    """The control for the two tests above: with the checkpoint lock held by a stuck
    process, the same burst takes the WAL far past the same bound."""
    config = cfg(checkpoint_pages="64", synchronous="normal")
    kvmem.open_db(db, config=config).close()
    stuck = kvmem.CheckpointLock(os.path.realpath(db))
    assert stuck.acquire()
    try:
        with kvmem.Store.open(db, config=config) as store:
            largest = _burst(store, 1500)
    finally:
        stuck.release()
    assert largest > 10 * _wal_bound(config)


def test_writer_checkpoints_when_nobody_holds_the_lock(db: str) -> None:
    """No checkpointer in any process: past half the cap the writer takes the lock and
    empties the WAL itself."""
    cap = 512 * 1024
    config = cfg(wal_cap_bytes=str(cap), synchronous="normal", checkpoint_poll_s="0.01")
    with kvmem.Store.open(db, config=config, checkpointer=False) as store:
        largest = _burst(store, 1500)
        stats = store.stats()
    assert largest <= cap // 2 + 256 * 1024, largest  # a poll's worth of writes past it
    assert stats["group_commit"]["checkpoints"] > 0
    assert stats["health"]["ok"] and kvmem.checkpoint_lock_free(db)


def test_writers_fall_back_past_the_hard_cap_and_health_clears(db: str) -> None:
    """A stuck holder: past the hard cap (4x) the writers checkpoint themselves, health
    says so while they have had to within checkpoint_interval_s, and then the problem
    moves to ``past`` with when it was last seen."""
    cap = 256 * 1024
    config = cfg(wal_cap_bytes=str(cap), synchronous="normal", checkpoint_poll_s="0.01",
                 checkpoint_interval_s="0.5")
    kvmem.open_db(db, config=config).close()
    stuck = kvmem.CheckpointLock(os.path.realpath(db))
    assert stuck.acquire()
    try:
        with kvmem.Store.open(db, config=config, checkpointer=False) as store:
            largest = _burst(store, 1500)
            during = store.health()
            stats = store.stats()["group_commit"]
            stuck.release()  # the holder "recovers": now nobody holds the lock
            deadline = time.monotonic() + 30
            while not store.health()["ok"] and time.monotonic() < deadline:
                store.set("after", "x" * 2000)  # writes bring the WAL back under the caps
            after = store.health()
            wal_after = os.stat(db + "-wal").st_size
    finally:
        stuck.release()
    assert wal_after <= cap, wal_after  # nobody holds the lock now: the writer keeps it small
    assert stats["fallback_checkpoints"] > 0
    assert largest <= config.wal_hard_cap_bytes + 256 * 1024  # a poll past it, no more
    assert not during["ok"] and any("hard cap" in p for p in during["problems"]), during
    assert after["ok"], after
    past = after["past"]["wal_hard_cap"]
    assert past["count"] >= 1 and past["last_seen"], past


@pytest.mark.parametrize("fault", ["fd_limit", "lock_is_a_directory", "checkpoint_raises"])
def test_work_after_commit_never_fails_a_committed_write(
        db: str, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fault makes the work after a COMMIT fail; every write still returns, is
    stored once, a retry with if_version=0 conflicts as it should, and stats and health
    show the failure until a checkpoint works again."""
    import resource

    # The elected writer keeps its descriptors open, so the descriptor and lock-file
    # faults hit the path of a process that is not the checkpointer (the fallback).
    elected = fault == "checkpoint_raises"
    config = cfg(checkpoint_pages="16", synchronous="normal", checkpoint_poll_s="0.05",
                 wal_cap_bytes="262144", checkpoint_interval_s="0.5")
    # The other faults hit a process that is not the checkpointer while another one is.
    other = None if elected else kvmem.Store.open(db, config=config)
    store = kvmem.Store.open(db, config=config, checkpointer=elected)
    held: list[int] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        holder = store if other is None else other
        deadline = time.monotonic() + 10  # wait for the election (a condition, not a sleep)
        while not holder._writer.elected and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        assert holder._writer.elected and not (other and store._writer.elected)
        if fault == "checkpoint_raises":
            def broken(*args: object, **kwargs: object) -> None:
                raise kvmem.StorageError("injected: checkpoint failed after COMMIT")
            monkeypatch.setattr(kvmem, "checkpoint_wal", broken)
        elif fault == "lock_is_a_directory":
            os.remove(os.path.realpath(db) + ".checkpoint.lock")
            os.mkdir(os.path.realpath(db) + ".checkpoint.lock")
        else:  # no descriptor left: the gate connection or the lock file cannot open
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1,
                                                        hard))
            while True:
                try:
                    held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
        written = [store.set(f"k{i}", "v" * 3000, if_version=0) for i in range(40)]
        with pytest.raises(kvmem.VersionConflictError):
            store.set("k0", "again", if_version=0)
        stats = store.stats()
        for fd in held:
            os.close(fd)
        held.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        monkeypatch.undo()
        assert [m.version for m in written] == [1] * 40
        assert all(store.get(f"k{i}").value == "v" * 3000 for i in range(40))  # type: ignore[union-attr]
        assert stats["group_commit"]["after_commit_errors"] > 0
        assert stats["group_commit"]["last_after_commit_error"]
        assert not stats["health"]["ok"]
        assert any("after a commit" in p for p in stats["health"]["problems"])
        if fault == "lock_is_a_directory":
            os.rmdir(os.path.realpath(db) + ".checkpoint.lock")
        deadline = time.monotonic() + 30  # the faults are gone: checkpoints work again
        while not store.health()["ok"] and time.monotonic() < deadline:
            store.set("later", "w")  # paced, so that an idle checkpointer keeps up
            threading.Event().wait(0.01)
        health = store.health()
        assert health["ok"], health
        assert health["past"]["after_commit"]["count"] > 0
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        store.close()
        if other is not None:
            other.close()


def test_after_commit_report_survives_a_strange_clock(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Health timestamps come from the wall clock, not the store's injectable one: a
    clock far in the future must not turn the report of a failed checkpoint into a
    failed (but committed) write."""
    config = cfg(synchronous="normal", checkpoint_poll_s="60")
    with kvmem.Store.open(db, config=config, clock=lambda: 1e12) as store:
        deadline = time.monotonic() + 10
        while not store._writer.elected and time.monotonic() < deadline:
            threading.Event().wait(0.005)

        def broken(*args: object, **kwargs: object) -> None:
            raise kvmem.StorageError("injected")
        monkeypatch.setattr(kvmem, "checkpoint_wal", broken)
        store._writer.request_checkpoint("idle")
        assert store.set("k", 1, if_version=0).version == 1
        assert store._writer.stats()["after_commit_errors"] > 0


def test_delete_mode_writer_waits_for_readers(db: str) -> None:
    """In rollback-journal mode a COMMIT waits for readers to let go: the writer keeps
    SQLite's busy handler there (with it off, most writes failed with busy)."""
    config = cfg(journal_mode="delete", synchronous="normal")
    stop = threading.Event()
    with kvmem.Store.open(db, config=config) as store:
        store.set("seed", 0)

        def reader() -> None:
            while not stop.is_set():
                store.list(limit=100)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        try:
            written = [store.set(f"k{i}", i) for i in range(300)]
        finally:
            stop.set()
            for thread in readers:
                thread.join()
    assert [m.version for m in written] == [1] * 300


def test_checkpoint_runs_only_under_the_write_lock(db: str) -> None:
    """While another connection holds the write lock, checkpoint_wal does not checkpoint
    (it returns None, where a checkpoint without the gate would return its frame counts):
    a checkpoint never runs while some other connection could commit, and so reset the
    WAL.  Once the lock is free it checkpoints every frame."""
    config = cfg(synchronous="normal")
    with kvmem.Store.open(db, config=config, checkpointer=False) as store:
        for i in range(50):
            store.set(f"k{i}", "v" * 500)
        conn = kvmem.open_db(db, config=config)
        gate = kvmem._gate_connection(conn.kv_path, config)
        writer = kvmem.open_db(db, config=config)
        try:
            with kvmem.transaction(writer):
                writer.execute(INSERT, ("held", '"x"'))
                assert kvmem.checkpoint_wal(conn, gate, wait_ms=50) is None
                assert not gate.in_transaction
            result = kvmem.checkpoint_wal(conn, gate, wait_ms=50)
            assert result is not None and result[1] == result[2] > 50, result
        finally:
            gate.close()
            writer.close()
            conn.close()


def test_a_replaced_lock_file_ends_the_election(db: str) -> None:
    """The holder's lock is on a file that was deleted: another process can lock the new
    one, so the holder must step down and compete again (never two checkpointers)."""
    config = cfg(checkpoint_poll_s="0.02")
    with kvmem.Store.open(db, config=config) as store:
        deadline = time.monotonic() + 10
        while not store._writer.elected and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        assert store._writer.elected
        os.remove(os.path.realpath(db) + ".checkpoint.lock")
        rival = kvmem.CheckpointLock(os.path.realpath(db))
        assert rival.acquire()  # what a process opening the file now would do
        try:
            deadline = time.monotonic() + 10
            while store._writer.elected and time.monotonic() < deadline:
                threading.Event().wait(0.005)
            assert not store._writer.elected
            assert not store.stats()["checkpointer"]["holder"]
        finally:
            rival.release()
        deadline = time.monotonic() + 10  # the lock is free again: elected again
        while not store._writer.elected and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        assert store._writer.elected


def test_long_reader_is_named_and_health_clears(db: str, caplog: pytest.LogCaptureFixture) -> None:
    """An export stalled on its output holds a snapshot while writers run: past
    reader_warn_s it is logged with what it was doing, health says so, the WAL cannot
    restart; once it ends, health clears (the condition moves to ``past``) and the WAL
    restarts again."""
    config = cfg(checkpoint_pages="32", synchronous="normal", checkpoint_poll_s="0.02",
                 reader_warn_s="0.2")
    release = threading.Event()
    started = threading.Event()

    class Stalled:
        def write(self, text: str) -> int:
            started.set()
            release.wait(60)
            return len(text)

    caplog.set_level(logging.WARNING, logger="kvmem.checkpoint")
    with kvmem.Store.open(db, config=config) as store:
        for i in range(50):
            store.set(f"seed{i}", "s" * 500)
        exporter = threading.Thread(target=store.export, args=(Stalled(),),
                                    kwargs={"namespace": "default"})
        exporter.start()
        try:
            assert started.wait(10)
            deadline = time.monotonic() + 30
            while (not any("export" in p for p in store.health()["problems"])
                   and time.monotonic() < deadline):
                store.set("during", "d" * 3000)
            during = store.health()
            pinned = _burst(store, 300)
        finally:
            release.set()
            exporter.join()
        deadline = time.monotonic() + 30
        while not store.health()["ok"] and time.monotonic() < deadline:
            store.set("after", "a" * 100)
        after = store.health()
        largest_after = _burst(store, 1500)
    assert not during["ok"]
    assert any("export default" in p for p in during["problems"]), during
    assert any("export default" in r.getMessage() for r in caplog.records)
    assert pinned > 2 * _wal_bound(config)  # no restart while the snapshot is held
    assert after["ok"], after
    assert "long_reader" in after["past"] and after["past"]["long_reader"]["last_seen"]
    # restarted again: a burst after it grows the WAL no further
    assert largest_after <= max(pinned, 2 * _wal_bound(config))


def test_only_the_elected_connection_checkpoints(tmp_path: Path) -> None:
    """Two processes write the same file at once, both traced by strace.  In WAL mode
    only a checkpoint writes to the database file itself, so every such write must come
    from one descriptor (one connection) of the process holding the checkpoint lock."""
    import crashsim

    problem = crashsim.strace_problem()
    if problem:  # as for the power-loss replays: CI installs strace and requires it
        if os.environ.get("KVMEM_TEST_REQUIRE_STRACE") == "1":
            pytest.fail(f"{problem}; KVMEM_TEST_REQUIRE_STRACE=1 requires this proof")
        pytest.skip(problem)
    db = str(tmp_path / "kv.db")
    kvmem.open_db(db, config=cfg()).close()  # the file exists and is in WAL mode already
    children, traces = [], []
    for name in ("a", "b"):
        trace = str(tmp_path / f"trace-{name}")
        child = Child("under_strace", trace, "traced_writer", db, name, "1500", stdin=True)
        children.append(child)
        traces.append(trace)
        child.expect("ready")  # a first, so that a is the holder
    ready = {name: child.lines[-1].split() for name, child in zip("ab", children, strict=True)}
    pids = {name: int(line[1]) for name, line in ready.items()}
    holders = {name: line[2] for name, line in ready.items()}
    assert holders == {"a": "True", "b": "False"}
    for child in children:
        child.send("go\n")
    done = [int(child.expect("done", timeout=120).split()[1]) for child in children]
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    for child in children:
        child.wait()
    writers: set[tuple[int, str]] = set()
    db_writes = 0
    for name, trace in zip("ab", traces, strict=True):
        with open(trace) as fp:  # a trace file, not the database
            for line in fp:
                call = line.split(None, 1)[1]  # after the thread id (padded to a width)
                if call.startswith(("pwrite64(", "pwritev(", "write(")) and f"<{db}>" in call:
                    writers.add((pids[name], call[call.index("(") + 1:call.index("<")]))
                    db_writes += 1
    assert done[0] > 5 and db_writes > 5  # checkpoints ran and were seen
    assert {process for process, _ in writers} == {pids["a"]}, writers
    assert len(writers) == 1, writers


def test_checkpointer_fails_for_good_on_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "text.db"
    path.write_text("not a database at all\n")
    checkpointer = kvmem.Checkpointer(path, config=cfg(checkpoint_poll_s="0.01"), role="t").start()
    try:
        checkpointer._thread.join(timeout=10)  # type: ignore[union-attr]
        state = checkpointer.state()
    finally:
        checkpointer.stop()
    assert state["failed"] and state["failed"].startswith("not_a_database")
    assert path.read_text() == "not a database at all\n"


# ----------------------------------------------------------------------------- CLI ----


def test_cli_check_stats_checkpoint_backup(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    conn = kvmem.open_db(db, config=cfg())
    with kvmem.transaction(conn):
        conn.executemany(INSERT, [(f"k{i}", json.dumps({"n": i})) for i in range(300)])
    conn.close()

    check = run_cli("check", db)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] and report["integrity"] == ["ok"]
    assert report["schema_version"] == kvmem.SCHEMA_VERSION

    stats = run_cli("stats", db, "--synchronous", "full")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["settings"]["synchronous"] == "full"
    assert figures["settings"]["journal_mode"] == "wal"
    assert figures["sqlite_version"] == sqlite3.sqlite_version
    assert figures["page_count"] > 0 and "freelist_count" in figures
    if sqlite3.sqlite_version_info < (3, 51, 3):
        assert any("WAL-reset bug" in w for w in figures["warnings"])
    assert figures["checkpointer_running_elsewhere"] is False

    ckpt = run_cli("checkpoint", db, "--truncate")
    assert ckpt.returncode == 0, ckpt.stderr
    assert json.loads(ckpt.stdout)["wal_bytes_after"] == 0

    dest = str(tmp_path / "copy.db")
    backup = run_cli("backup", db, dest)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert json.loads(backup.stdout)["ok"]
    src, copy = kvmem.open_db(db, config=cfg()), kvmem.open_db(dest, config=cfg())
    try:
        rows = "SELECT namespace, key, value, version FROM memories ORDER BY key"
        assert copy.execute(rows).fetchall() == src.execute(rows).fetchall()
        assert len(copy.execute(rows).fetchall()) == 300
    finally:
        src.close()
        copy.close()
    again = run_cli("backup", db, dest)  # never overwrites
    assert again.returncode == 1 and "already exists" in again.stdout


def test_cli_checkpoint_defers_to_running_checkpointer(db: str) -> None:
    kvmem.open_db(db, config=cfg()).close()
    lock = kvmem.CheckpointLock(os.path.realpath(db))
    assert lock.acquire()
    try:
        result = run_cli("checkpoint", db)
        stats = json.loads(run_cli("stats", db).stdout)
    finally:
        lock.release()
    assert result.returncode == 1 and json.loads(result.stdout)["error"]["code"] == "busy"
    assert stats["checkpointer_running_elsewhere"] is True


@pytest.mark.parametrize("content", [b"just text\n", b"\0" * 4096])
def test_cli_check_reports_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_a_database"
    assert path.read_bytes() == content


def test_cli_check_missing_file_is_not_created(tmp_path: Path) -> None:
    result = run_cli("check", str(tmp_path / "nope.db"))
    assert result.returncode == 1 and not (tmp_path / "nope.db").exists()


def test_cli_namespaces(tmp_path: Path) -> None:
    db = str(tmp_path / "kv.db")
    clock = [0.0]
    with kvmem.Store.open(db, config=cfg(), clock=lambda: clock[0]) as store:
        fill_filter_store(store, clock)
    for args in (("namespaces", db), ("namespaces", "--db", db)):
        result = run_cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        listed = json.loads(result.stdout)
        assert listed == {"items": FILTER_NAMESPACES}, args
        jsonschema.validate(listed, kvmem_cli.NAMESPACE_LIST_SCHEMA)
    empty = str(tmp_path / "empty.db")
    kvmem.Store.open(empty, config=cfg()).close()
    assert json.loads(run_cli("namespaces", empty).stdout) == {"items": []}
    missing = run_cli("namespaces", str(tmp_path / "nope.db"))  # never created
    assert missing.returncode == 1 and not (tmp_path / "nope.db").exists()
    assert json.loads(missing.stdout)["error"]["code"] == "not_found"


def test_cli_bad_setting(tmp_path: Path) -> None:
    result = run_cli("stats", str(tmp_path / "x.db"),
                     env=child_env(KVMEM_SYNCHRONOUS="sometimes"))
    assert result.returncode == 1
    assert "KVMEM_SYNCHRONOUS" in json.loads(result.stdout)["error"]["message"]


def test_kvmem_imports_only_stdlib() -> None:
    import ast

    tree = ast.parse(Path(kvmem.__file__).read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert modules - set(sys.stdlib_module_names) - {"__future__"} == set()


_ = signal  # SIGKILL is sent by Child.kill()
