"""Power loss, proven on the real stack by replaying kvmem's own system calls (crashsim.py).

Each workload runs once under strace; its trace is replayed on a model disk under the
strict (POSIX: directory entries need a directory fsync) and lenient directory models; a
crash after every event, plus torn images, is opened with kvmem and checked.  The table
printed at the end of the run is the README's.  Needs ``strace`` and ptrace: without them
these tests skip, unless ``KVMEM_TEST_REQUIRE_STRACE=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Protocol

import pytest

import crashsim
import testutil
from crashsim import Event, Model, Report

COUNT = 600 if testutil.SOAK else 160  # acknowledged writes per workload
TORN = 4000 if testutil.SOAK else 250  # torn images at random crash points (plus the first 80)
MODELS = (Model(strict=True), Model(strict=False))
# Small checkpoint settings, so that the short traces contain checkpoints, WAL restarts
# (the writer rewinding the WAL after a complete checkpoint) and shrinks, not only appends.
CHECKPOINTS = {"KVMEM_CHECKPOINT_PAGES": "16", "KVMEM_CHECKPOINT_POLL_S": "0.01",
               "KVMEM_WAL_CAP_BYTES": "131072"}


class Recorded(NamedTuple):
    events: list[Event]
    settings: dict[str, str]
    kind: str  # the workload (crashsim.workload_writes says what it acknowledges)


class Record(Protocol):
    def __call__(self, kind: str, synchronous: str, journal_mode: str, *,
                 subdir: str = "") -> Recorded: ...


@pytest.fixture(scope="module")
def strace() -> None:
    problem = crashsim.strace_problem()
    if problem:
        if os.environ.get("KVMEM_TEST_REQUIRE_STRACE") == "1":
            pytest.fail(f"{problem}; KVMEM_TEST_REQUIRE_STRACE=1 requires the power-loss proof")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def record(strace: None, tmp_path_factory: pytest.TempPathFactory) -> Record:
    """Record a workload once per module (``kind, synchronous, journal_mode``, and the
    ``subdir`` of the database: directories kvmem creates); the replay self-check (the
    trace rebuilds the final tree byte for byte) runs on each."""
    cache: dict[tuple[str, str, str, str], Recorded] = {}

    def get(kind: str, synchronous: str, journal_mode: str, *, subdir: str = "") -> Recorded:
        if (kind, synchronous, journal_mode, subdir) not in cache:
            settings = {"KVMEM_SYNCHRONOUS": synchronous, "KVMEM_JOURNAL_MODE": journal_mode,
                        **CHECKPOINTS}
            work = tmp_path_factory.mktemp(f"{kind}-{journal_mode}-{synchronous}")
            events = crashsim.record_events(kind, settings, str(work), COUNT, subdir=subdir)
            cache[(kind, synchronous, journal_mode, subdir)] = Recorded(events, settings, kind)
        return cache[(kind, synchronous, journal_mode, subdir)]

    return get


def check(recorded: Recorded, label: str, tmp_path: Path, model: Model,
          events: list[Event] | None = None, torn: int = TORN) -> Report:
    """Replay under ``model`` and add the row to the run's power-loss table."""
    scratch = tempfile.mkdtemp(prefix=f"images-{model.name}-", dir=tmp_path)
    report = Report(label, model.name)
    events = events if events is not None else recorded.events
    crashsim.replay(events, model, crashsim.Checker(recorded.settings, scratch), report,
                    torn=torn, seed=1, head=0 if torn == 0 else 80)
    testutil.POWERLOSS_REPORTS.append(report)
    # Every write of the workload acknowledged, each once (a replay checks only those),
    # and a crash after every event.
    shortfall = crashsim.ack_shortfall(events, recorded.kind, COUNT)
    assert not shortfall, shortfall
    assert report.crash_points == len(events), report
    if recorded[1]["KVMEM_JOURNAL_MODE"] == "wal":  # the replay covers rewound WALs too
        assert crashsim.wal_restarts(recorded[0]) >= 3, label
    return report


@pytest.mark.parametrize("synchronous", ["full", "extra"])
def test_wal_full_and_extra_lose_nothing(record: Record,
                                         tmp_path: Path, synchronous: str) -> None:
    recorded = record("single", synchronous, "wal")
    for model in MODELS:
        report = check(recorded, f"WAL {synchronous}, Store.set", tmp_path, model)
        assert (report.lost, report.integrity_failures) == (0, 0), report.failures
        assert report.torn > 80 and report.images > COUNT // 2, report


def test_wal_normal_loses_the_last_commits_but_stays_consistent(
        record: Record, tmp_path: Path) -> None:
    recorded = record("single", "normal", "wal")
    for model in MODELS:
        report = check(recorded, "WAL normal, Store.set", tmp_path, model)
        assert report.lost > 0 and report.lossy_points > 0, report  # the instrument can fail
        assert report.integrity_failures == 0, report.failures


def test_wal_off_loses_acknowledged_writes(record: Record,
                                           tmp_path: Path) -> None:
    recorded = record("single", "off", "wal")
    for model in MODELS:
        report = check(recorded, "WAL off, Store.set", tmp_path, model)
        assert report.lost > 0 and report.max_lost_at_one_point > 1, report
        # off may also corrupt the file (SQLite orders no write before another without a
        # sync): counted in the table, not asserted


def test_delete_mode_full_loses_the_last_commit_extra_nothing(
        record: Record, tmp_path: Path) -> None:
    full = record("single", "full", "delete")
    strict, lenient = (check(full, "DELETE full, Store.set", tmp_path, m) for m in MODELS)
    # The unlinked journal survives the cut (no directory fsync) and rolls back the last
    # acknowledged commit -- and never more than that one.
    assert strict.lost > 0 and strict.max_lost_at_one_point == 1, strict
    assert strict.integrity_failures == 0, strict.failures
    assert (lenient.lost, lenient.integrity_failures) == (0, 0), lenient.failures
    extra = record("single", "extra", "delete")
    for model in MODELS:
        report = check(extra, "DELETE extra, Store.set", tmp_path, model)
        assert (report.lost, report.integrity_failures) == (0, 0), report.failures


@pytest.mark.parametrize("kind, label", [
    ("group", f"WAL extra, group commit, {crashsim.THREADS} threads"),
    ("batch", f"WAL extra, batch of {crashsim.BATCH_SIZE}"),
    ("http", f"WAL extra, kvmem-http, {crashsim.THREADS} clients"),
])
def test_default_settings_lose_nothing_from_any_writer(
        record: Record, tmp_path: Path, kind: str,
        label: str) -> None:
    recorded = record(kind, "extra", "wal")
    for model in MODELS:
        report = check(recorded, label, tmp_path, model)
        assert (report.lost, report.integrity_failures, report.partial_batches) == (0, 0, 0), \
            report.failures


NESTED = ("a", "b", "c")  # directories that do not exist before the first write


def test_new_directories_are_durable_before_the_first_acknowledgement(
        record: Record, tmp_path: Path) -> None:
    """The database in directories kvmem creates on first use.  SQLite fsyncs only the
    database's own directory, and a new directory's entry is durable only once its parent
    is fsynced: without kvmem syncing each new directory and its parent, the strict model
    loses the directories, and with them every acknowledged write."""
    recorded = record("single", "extra", "wal", subdir=os.path.join(*NESTED))
    for model in MODELS:
        report = check(recorded, f"WAL extra, Store.set, in new directories {'/'.join(NESTED)}",
                       tmp_path, model)
        assert (report.lost, report.integrity_failures) == (0, 0), report.failures
    made = [e.path for e in recorded.events if e.kind == "mkdir"]
    root = os.path.dirname(made[0])
    assert made == [os.path.join(root, *NESTED[:depth]) for depth in (1, 2, 3)]
    # Each synced when made, and its parent (the database's directory by SQLite too,
    # for each new -wal).
    synced = collections.Counter(e.path for e in recorded.events if e.kind == "dirsync")
    assert (synced[root], synced[made[0]], synced[made[1]]) == (1, 2, 2), synced
    assert synced[made[2]] > 1, synced


def test_directories_are_synced_when_made_and_only_then(strace: None, tmp_path: Path
                                                         ) -> None:
    """``make_dirs_durable`` alone, traced: each new directory synced after its mkdir,
    with its parent; a second call, on directories that exist, makes no traced call on
    them (it is one ``stat``, which runs on every ``open_db``)."""
    root = os.path.realpath(tmp_path / "root")
    os.mkdir(root)
    x, y = os.path.join(root, "x"), os.path.join(root, "x", "y")
    trace = str(tmp_path / "trace.txt")

    def traced() -> None:
        subprocess.run(["strace", "-f", "-qq", "-o", trace, "-xx", "-y",
                        "-e", "trace=" + ",".join(crashsim.TRACED), sys.executable, "-c",
                        f"import kvmem; kvmem.make_dirs_durable({y!r})"],
                       check=True, cwd=testutil.HERE, capture_output=True)

    def synced(path: str) -> list[tuple[str, str]]:
        return [("dirsyncstart", path), ("dirsync", path)]

    traced()
    assert [(e.kind, e.path) for e in crashsim.load_trace(trace, root)] == [
        ("mkdir", x), *synced(x), *synced(root), ("mkdir", y), *synced(y), *synced(x)]
    traced()
    with open(trace, encoding="ascii") as fp:  # -xx: every path in hex
        assert [line for line in fp if _hex(root) in line] == []


def test_checker_catches_deliberately_broken_disks(
        record: Record, tmp_path: Path) -> None:
    """A disk that ignores fsync, and acknowledgements moved one event earlier, must show
    up as losses: the instrument is sensitive to one missing sync."""
    wal = record("single", "full", "wal")
    broken = check(wal, "WAL full, disk ignores fsync", tmp_path,
                   Model(strict=True, broken_ignore_fsync=True), torn=0)
    assert broken.lost > 0, broken
    delete = record("single", "extra", "delete")
    early = check(delete, "DELETE extra, acks one event early", tmp_path,
                  Model(strict=True), events=crashsim.acks_moved_earlier(delete[0]), torn=0)
    assert early.lost > 0 and early.max_lost_at_one_point == 1, early


@pytest.mark.parametrize("kind", ["single", "batch"])
def test_acknowledgement_check_catches_a_short_recording(record: Record, kind: str) -> None:
    """A recording with a fifth of its acknowledgements -- a recorder that misses four
    in five (``single``), or a batch acknowledging only its first key -- replays without
    a loss, because only acknowledged writes are checked.  The old count check
    (``acks >= COUNT // BATCH_SIZE``) let 32 of 160 through; the exact one refuses it."""
    recorded = record(kind, "extra", "wal")
    assert crashsim.ack_shortfall(recorded.events, kind, COUNT) == ""
    acks = [i for i, e in enumerate(recorded.events) if e.kind == "ack"]
    short = list(recorded.events)
    if kind == "single":
        dropped = set(acks) - set(acks[::5])
        short = [e for i, e in enumerate(short) if i not in dropped]
    else:
        for i in acks:
            ack = short[i].ack
            assert ack is not None
            short[i] = dataclasses.replace(short[i], ack={**ack, "keys": ack["keys"][:1]})
    problem = crashsim.ack_shortfall(short, kind, COUNT)
    assert problem.startswith(f"{kind}: {COUNT // 5} of the {COUNT} acknowledgements"), problem
    again = crashsim.ack_shortfall([*recorded.events, recorded.events[acks[0]]], kind, COUNT)
    assert again.startswith(f"{kind}: {crashsim.BATCH_SIZE if kind == 'batch' else 1} "
                            "unexpected"), again  # acknowledged twice


def test_replay_self_check_catches_a_wrong_write(
        record: Record, tmp_path: Path) -> None:
    """The self-check is what makes a trace trustworthy: one write whose bytes the final
    database still shows, replayed with one byte wrong (as a mis-captured or missed
    system call would leave it), and ``verify_replay`` refuses the trace."""
    events = record("single", "extra", "wal")[0]
    db = next(e.path for e in events if e.path.endswith("/memory.db"))
    cut = [i for i, e in enumerate(events) if e.kind == "truncate" and e.path == db]
    last = max(i for i, e in enumerate(events) if e.kind == "write" and e.path == db
               and all(events[c].offset > e.offset for c in cut if c > i))
    wrong = b"\x01" if events[last].data[:1] == b"\x00" else b"\x00"
    events = list(events)  # the recording is shared by the module's tests
    events[last] = dataclasses.replace(events[last], data=wrong + events[last].data[1:])
    directory = os.path.dirname(db)
    with pytest.raises(crashsim.TraceError, match="differs"):
        crashsim.verify_replay(events, directory)


# -- the model, on hand-made events (no strace needed) -------------------------------------

def _disk_after(model: Model, events: list[Event]) -> crashsim.Disk:
    disk = crashsim.Disk(model)
    for event in events:
        disk.apply(event)
    return disk


def test_a_sync_covers_only_writes_made_before_it_started() -> None:
    f = "/d/memory.db-wal"
    events = [Event("open", f, data=b"O_RDWR|O_CREAT"), Event("dirsyncstart", "/d", "1"),
              Event("dirsync", "/d", "1"), Event("write", f, offset=0, data=b"A" * 512),
              Event("syncstart", f, "1"), Event("write", f, offset=512, data=b"B" * 512),
              Event("sync", f, "1")]
    disk = _disk_after(Model(strict=True), events)
    assert disk.image() == {f: b"A" * 512}  # B finished while the sync ran: still pending
    assert disk.has_pending()
    disk.apply(Event("syncstart", f, "2"))
    disk.apply(Event("sync", f, "2"))
    assert disk.image() == {f: b"A" * 512 + b"B" * 512}


def test_directory_models() -> None:
    """Strict: a new file, and an unlink, count only after a directory sync (so an
    unlinked journal comes back); lenient: at once."""
    j = "/d/memory.db-journal"
    made = [Event("open", j, data=b"O_RDWR|O_CREAT"), Event("write", j, data=b"J" * 512),
            Event("syncstart", j, "1"), Event("sync", j, "1")]
    strict, lenient = (_disk_after(Model(strict=s), made) for s in (True, False))
    assert strict.image() == {} and lenient.image() == {j: b"J" * 512}
    synced = [*made, Event("dirsyncstart", "/d", "1"), Event("dirsync", "/d", "1"),
              Event("unlink", j)]
    strict, lenient = (_disk_after(Model(strict=s), synced) for s in (True, False))
    assert strict.image() == {j: b"J" * 512} and lenient.image() == {}
    strict.apply(Event("dirsyncstart", "/d", "1"))
    strict.apply(Event("dirsync", "/d", "1"))
    assert strict.image() == {}


def test_a_new_directory_needs_its_parent_synced() -> None:
    """Strict: a file in new directories is in a crash image only once its entry, and the
    entry of each directory made above it, are synced in their parents (a directory's
    sync covers its own entries, not its entry in its parent); lenient: at once."""
    a, b = "/r/a", "/r/a/b"
    f = f"{b}/memory.db"
    made = [Event("mkdir", a), Event("mkdir", b), Event("open", f, data=b"O_RDWR|O_CREAT"),
            Event("write", f, data=b"D" * 512), Event("syncstart", f, "1"),
            Event("sync", f, "1"), Event("dirsyncstart", b, "1"), Event("dirsync", b, "1")]
    strict, lenient = (_disk_after(Model(strict=s), made) for s in (True, False))
    assert strict.image() == {} and lenient.image() == {f: b"D" * 512}
    for directory in ("/r", a):  # a's entry in /r, then b's in a
        assert strict.image() == {}
        strict.apply(Event("dirsyncstart", directory, "1"))
        strict.apply(Event("dirsync", directory, "1"))
    assert strict.image() == {f: b"D" * 512}
    # Torn: f's own entry is durable, a's and b's each kept or not (a prefix of the one
    # pending operation of /r, and of a): f in about a quarter of the images.
    torn = _disk_after(Model(strict=True), made)
    rng = random.Random(3)
    hits = sum(f in torn.torn_image(rng) for _ in range(400))
    assert 60 < hits < 140, hits


def test_torn_images_are_sector_subsets_of_pending_writes() -> None:
    f = "/d/memory.db"
    disk = _disk_after(Model(strict=False), [
        Event("open", f, data=b"O_RDWR|O_CREAT"), Event("write", f, data=b"o" * 2048),
        Event("syncstart", f, "1"), Event("sync", f, "1"),
        Event("write", f, offset=100, data=b"n" * 1500)])
    old = b"o" * 2048
    new = old[:100] + b"n" * 1500 + old[1600:]
    rng = random.Random(7)
    seen = set()
    for _ in range(400):
        image = disk.torn_image(rng)[f]
        sectors = tuple(image[s:s + 512] for s in range(0, 2048, 512))
        for s, sector in zip(range(0, 2048, 512), sectors, strict=True):
            assert sector in (old[s:s + 512], new[s:s + 512])  # all old or all new
        seen.add(sectors)
    assert len(seen) == 2 ** 4  # every combination of the 4 touched sectors turns up


# -- the parser, on hand-written strace lines (no strace needed) --------------------------

def _hex(text: str) -> str:
    return "".join(f"\\x{b:02x}" for b in text.encode())


def _lines(directory: str) -> list[str]:
    db, journal = _hex(f"{directory}/memory.db"), _hex(f"{directory}/memory.db-journal")
    ack = _hex('KVMEM-ACK {"key": "a", "n": 1}\n')
    return [
        f'10 openat(AT_FDCWD<{_hex("/")}>, "{db}", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 3<{db}>',
        f'10 openat(AT_FDCWD<{_hex("/")}>, "{journal}", O_RDWR|O_CREAT, 0644) = 4<{journal}>',
        f'10 pwrite64(3<{db}>, "{_hex("abcd")}", 4, 8 <unfinished ...>',
        f'11 write(5<{_hex("/dev/null")}>, "{ack}", 31 <unfinished ...>',
        '10 <... pwrite64 resumed>)         = 4',
        '11 <... write resumed>)            = 31',
        f'10 fdatasync(4<{journal}>(deleted)) = 0',
        f'10 unlink("{journal}") = 0',
        f'10 openat(AT_FDCWD, "{_hex(directory)}", O_RDONLY|O_CLOEXEC) = 6<{_hex(directory)}>',
        f'10 fdatasync(6<{_hex(directory)}>) = 0',
        f'10 openat(AT_FDCWD, "{_hex("/elsewhere")}", O_RDONLY) = -1 ENOENT (No such file)',
        '10 +++ exited with 0 +++',
    ]


def test_parser_merges_threads_and_orders_acks_at_their_start(tmp_path: Path
                                                              ) -> None:
    directory = os.path.realpath(tmp_path)
    events = crashsim.parse(iter(_lines(directory)), directory)
    assert [e.kind for e in events] == ["open", "open", "ack", "write", "syncstart", "sync",
                                        "unlink", "dirsyncstart", "dirsync"]
    assert events[2].ack == {"key": "a", "n": 1}
    assert (events[3].offset, events[3].data) == (8, b"abcd")
    assert events[5].deleted and events[5].path == f"{directory}/memory.db-journal"


def test_parser_takes_server_acks_only_for_writes_a_client_acknowledged(tmp_path: Path
                                                                       ) -> None:
    """kvmem-http's 2xx response is the earliest acknowledgement; a memory sent for a GET
    (never acknowledged by a client as a write) is not one; a netlink send is skipped."""
    directory = os.path.realpath(tmp_path)

    def send(tid: int, text: str) -> str:
        return f'{tid} sendto(7<{_hex("socket:[1]")}>, "{_hex(text)}", {len(text)}, 0, NULL, 0)' \
            f" = {len(text)}"

    def memory(key: str) -> str:
        return json.dumps({"namespace": "default", "key": key, "version": 1})

    def client_ack(key: str) -> str:
        text = f'KVMEM-ACK {{"key": "{key}", "n": 1}}\n'
        return f'30 write(5<{_hex("/dev/null")}>, "{_hex(text)}", {len(text)}) = {len(text)}'

    lines = [
        send(20, "HTTP/1.1 201 Created\r\n\r\n"), send(20, memory("put")),
        send(21, "HTTP/1.1 200 OK\r\n\r\n"), send(21, memory("got")),
        '22 sendto(3<socket:[2]>, [{nlmsg_len=20, nlmsg_type=RTM_GETADDR}], 20, 0, NULL, 0) = 20',
        client_ack("put"),
        send(23, "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n\r\n"
             + memory("one")),  # head and body in one send
        send(24, "HTTP/1.1 200 OK\r\n\r\n" + memory("read")),  # a GET: no client ack
        client_ack("one"),
    ]
    events = crashsim.parse(iter(lines), directory)
    assert [e.ack for e in events] == [{"key": "put", "n": 1, "by": "server"},
                                       {"key": "put", "n": 1},
                                       {"key": "one", "n": 1, "by": "server"},
                                       {"key": "one", "n": 1}]


def test_parser_follows_new_directories(tmp_path: Path) -> None:
    root = os.path.realpath(tmp_path)
    a, b = f"{root}/a", f"{root}/a/b"
    db = f"{b}/memory.db"
    lines = [
        f'10 mkdir("{_hex(a)}", 0777) = 0',
        f'10 mkdirat(AT_FDCWD<{_hex("/")}>, "{_hex(b)}", 0777) = 0',
        f'11 mkdir("{_hex(b)}", 0777) = -1 EEXIST (File exists)',
        f'10 openat(AT_FDCWD, "{_hex(a)}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 3<{_hex(a)}>',
        f'10 fsync(3<{_hex(a)}>) = 0',
        f'10 openat(AT_FDCWD, "{_hex(db)}", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 4<{_hex(db)}>',
        f'10 mkdir("{_hex("/elsewhere")}", 0777) = 0',
    ]
    events = crashsim.parse(iter(lines), root)
    assert [(e.kind, e.path) for e in events] == [
        ("mkdir", a), ("mkdir", b), ("dirsyncstart", a), ("dirsync", a), ("open", db)]


@pytest.mark.parametrize("bad, message", [
    ('10 pwrite64(3<{db}>, "\\x61\\x62"..., 4, 8) = 4', "truncated"),
    ('10 pwrite64(3<{db}>, "\\x61\\x62", 4, 8) = 4', "shows 2"),
    ('10 write(3<{db}>, "\\x61", 1) = 1', "position-relative"),
    ('10 pwritev(3<{db}>, [{{iov_base="\\x61", iov_len=1}}], 1, 0) = 1', "not modelled"),
    ('10 syncfs(3<{db}>) = 0', "not modelled"),
    ('10 unlink("\\x6d\\x65\\x6d") = 0', "relative path"),
    ('10 fdatasync(3<{db}> <unfinished ...>', "never returned"),
    ('10 pwrite64(3<{db}>, "\\x61", 1, 8 = 1', "unparsable"),
    ('10 unlinkat(AT_FDCWD<\\x2f>, "{db}", 0 <unfinished ...>', "never returned"),
    ('10 renameat2(AT_FDCWD, "{db}", AT_FDCWD, "{db}", RENAME_EXCHANGE) = 0',
     "RENAME_EXCHANGE"),
    ('10 mkdir("{sub}\\x2f\\x78", 0777) = 0', "parent was not seen created"),
    ('10 openat(AT_FDCWD, "{sub}", O_RDONLY|O_DIRECTORY) = 7<{sub}>', "not seen created"),
    ('10 rmdir("{dir}") = 0', "not modelled"),
    ('10 unlinkat(AT_FDCWD, "{dir}", AT_REMOVEDIR) = 0', "removal of the directory"),
    ('10 rename("{db}", "{sub}\\x2f\\x78") = 0', "out of its directory"),
])
def test_parser_refuses_what_it_cannot_replay(tmp_path: Path, bad: str,
                                             message: str) -> None:
    directory = os.path.realpath(tmp_path)
    db = _hex(f"{directory}/memory.db")
    line = bad.format(db=db, dir=_hex(directory), sub=_hex(f"{directory}/sub"))
    with pytest.raises(crashsim.TraceError, match=message):
        crashsim.parse(iter([*_lines(directory)[:1], line]), directory)
