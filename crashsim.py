"""Power loss, simulated by replaying a writer's own system calls (stdlib only).

The method of ALICE (OSDI'14) and CrashMonkey (OSDI'18), at the size of one directory tree:

1. **Record.**  A writer (a workload below, running kvmem's real code) runs under
   ``strace -f``, which logs every open, write (with all its bytes), truncate,
   fsync/fdatasync, rename, unlink and mkdir under a root directory that exists
   before.  After each call that returned, the writer writes ``KVMEM-ACK {...}`` to
   ``/dev/null`` (kvmem-http's are its 2xx responses): the same trace orders
   acknowledgements against disk operations.
2. **Replay.**  A model disk: each file (inode) has a *durable* image and a list of
   *pending* (unsynced) operations; fsync/fdatasync folds in those done before it
   started.  Directory entries (creates, unlinks, renames, and new directories) are
   durable at once in the *lenient* model and only after an fsync of the directory that
   holds them in the *strict* (POSIX) one.  A file is in a crash image only if its own
   entry and the entry of every directory created above it are durable: a directory
   lost with its parent's unsynced entry takes its files with it.
   ``-shm`` is never part of a crash image: SQLite does not need it to recover.
3. **Crash.**  After every event, the disk a power cut would leave is the durable
   state (one image per distinct durable state, cached).  Torn images add a seeded
   random subset of the pending writes, 512-byte sector by sector, and for each
   directory a random prefix of its pending operations.
4. **Check.**  Each image is opened with kvmem (``open_db``), must pass
   ``integrity_check``, and must hold every write acknowledged before the crash point
   with its exact value and version.

Self-check: replaying every event must reproduce the writer's final files byte for byte,
and its directories (a missed system call -- mmap stores, io_uring, sendfile -- would
show here).

Usage: ``python crashsim.py write KIND DIR N`` runs a workload (what the tests record);
settings come from ``KVMEM_*`` as for every kvmem process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import testutil

ACK_PREFIX = b"KVMEM-ACK "
SECTOR = 512
NAMESPACE = "default"
BATCH_SIZE = 5
THREADS = 6

# Everything that can create, change, sync or remove a file.  "?" = this architecture
# may not have it (aarch64 has no open/creat/rename/unlink).
TRACED = ("openat", "?open", "?creat", "openat2", "write", "pwrite64", "writev", "pwritev",
          "pwritev2", "ftruncate", "?truncate", "fsync", "fdatasync", "sync_file_range",
          "?rename", "renameat", "renameat2", "?unlink", "unlinkat", "sendfile",
          "copy_file_range", "splice", "fallocate", "io_uring_setup", "sync", "syncfs",
          "?link", "linkat", "?symlink", "symlinkat", "?mknod", "mknodat", "?mkdir",
          "mkdirat", "?rmdir",
          "sendto")  # sendto: kvmem-http's responses, the earliest acknowledgement


class TraceError(Exception):
    """The trace cannot be replayed faithfully (a call the model does not cover, a
    truncated buffer, a replay that does not reproduce the final files)."""


# ------------------------------------------------------------------------- events ----

@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One disk-relevant step, in trace order.  ``kind``: open, write, truncate, unlink,
    rename, mkdir, syncstart/sync and dirsyncstart/dirsync (a sync covers only what was written
    before it *started*: ``tid`` pairs the two), or ack.  ``path`` names the file the way
    the kernel did at the time; ``deleted`` marks a descriptor whose file was unlinked."""

    kind: str
    path: str = ""
    tid: str = ""
    offset: int = 0
    data: bytes = b""
    new_path: str = ""
    deleted: bool = False
    ack: Mapping[str, Any] | None = None


WAL_HEADER_BYTES = 32
_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+= (.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<((?:\\x[0-9a-f]{2})*)>)?(\(deleted\))?$")
_STRING = re.compile(r'^"((?:\\x[0-9a-f]{2})*)"$')


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def _fd(arg: str) -> tuple[str, bool]:
    """``3<\\x2f...>(deleted)`` -> (path, deleted); '' when not annotated."""
    match = _FD.match(arg)
    if match is None:
        raise TraceError(f"unparsable descriptor {arg[:80]!r}")
    return (_hex(match.group(2)).decode("utf-8", "surrogateescape") if match.group(2) else "",
            bool(match.group(3)))


def _string(arg: str) -> bytes:
    match = _STRING.match(arg)
    if match is None:
        raise TraceError(f"truncated or unparsable buffer {arg[:80]!r} (raise strace -s)")
    return _hex(match.group(1))


def _path_arg(dirfd: str | None, arg: str) -> str:
    path = _string(arg).decode("utf-8", "surrogateescape")
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = _fd(dirfd)[0] if dirfd else ""
    if not base:
        raise TraceError(f"relative path {path!r} without a directory: cannot place it")
    return os.path.normpath(os.path.join(base, path))


_TRACED_CALL = re.compile("^({})\\(".format("|".join(name.strip("?") for name in TRACED)))


def _calls(lines: Iterator[str]) -> Iterator[tuple[str, str, list[str], str, str]]:
    """Calls ``(tid, name, args, result, phase)``: phase ``whole`` for a call strace
    printed in one line; ``<unfinished ...>``/``resumed>`` pairs of concurrent threads
    give ``entry`` (args only) and ``exit`` (merged); a call still unfinished when the
    trace ends gives ``lost`` (its process died in it).  Effects count at exit, the start
    of a sync and an acknowledgement at entry."""
    unfinished: dict[str, str] = {}
    for raw in lines:
        line = _LINE.match(raw.rstrip("\n"))
        if line is None:
            continue
        tid, rest = line.groups()
        if rest.endswith(" <unfinished ...>"):
            unfinished[tid] = start = rest[: -len(" <unfinished ...>")]
            name, _, args = start.partition("(")
            yield tid, name, args.split(", "), "", "entry"
            continue
        phase = "whole"
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            phase = "exit"
            rest = unfinished.pop(tid, "") + resumed.group(2)
            if not rest.startswith(resumed.group(1) + "("):
                raise TraceError(f"resumed call without its start: {raw[:120]!r}")
        call = _CALL.match(rest)
        if call is None:
            if _TRACED_CALL.match(rest):
                raise TraceError(f"unparsable call: {raw[:120]!r}")
            continue  # signals, exits: not disk events
        name, args, result = call.groups()
        yield tid, name, args.split(", "), result, phase
    for tid, start in unfinished.items():
        name, _, args = start.partition("(")
        yield tid, name, args.split(", "), "", "lost"


def _http_ack(answered_2xx: dict[str, bool], tid: str, data: bytes) -> dict[str, Any] | None:
    """A memory sent by a server thread after a 2xx status line: the moment the server
    acknowledged that write (the client's ack comes later, when it has read it).  Kept by
    ``parse`` only when a client acknowledged the same write: a 2xx ``GET`` also sends a
    memory, and reading a value is no acknowledgement of its durability.  The head and
    the body may come in one send (kvmem-http's way) or in two."""
    if data.startswith(b"HTTP/1."):
        answered_2xx[tid] = data[9:10] == b"2"
        data = data.partition(b"\r\n\r\n")[2]
        if not data:
            return None  # the body, if any, comes in the next send
    if not answered_2xx.pop(tid, False) or not data.startswith(b"{"):
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("key"), str) and \
            isinstance(body.get("version"), int) and body.get("namespace") == NAMESPACE:
        return {"key": body["key"], "n": body["version"], "by": "server"}
    return None


def _touches(args: Sequence[str], tracked: Callable[[str], bool]) -> str:
    """The tracked path among a call's arguments (descriptors and path strings), or ''."""
    for arg in args:
        if _FD.match(arg):
            where = _fd(arg)[0]
        elif _STRING.match(arg):
            where = os.path.normpath(_string(arg).decode("utf-8", "surrogateescape"))
        else:
            continue
        if where and tracked(where):
            return where
    return ""


def parse(lines: Iterator[str], root: str) -> list[Event]:
    """The events under ``root`` (a directory that exists before the trace starts: the
    directories created in it, at any depth, and their files), and the acknowledgements,
    in a ``strace -f -xx -y`` log."""
    root = os.path.realpath(root)
    dirs = {root}  # root and the directories created under it so far

    def tracked_or_dir(path: str) -> bool:
        return (path == root or path.startswith(root + os.sep)) and not path.endswith("-shm")

    def tracked(path: str) -> bool:  # a file
        return tracked_or_dir(path) and path not in dirs

    events: list[Event] = []
    answered_2xx: dict[str, bool] = {}  # thread -> its last response head was 2xx
    for tid, name, args, result, phase in _calls(lines):
        if name == "sendto":
            if phase in ("entry", "whole"):
                if not _STRING.match(args[1]):  # e.g. a netlink message: not HTTP
                    answered_2xx.pop(tid, None)
                    continue
                ack = _http_ack(answered_2xx, tid, _string(args[1]))
                if ack is not None:
                    events.append(Event("ack", ack=ack))
            continue
        if name == "write" and _fd(args[0])[0] == os.devnull:
            data = _string(args[1])
            if data.startswith(ACK_PREFIX) and phase in ("entry", "whole"):
                events.append(Event("ack", ack=json.loads(data[len(ACK_PREFIX):])))
            continue
        if name in ("fsync", "fdatasync") and phase in ("entry", "whole"):
            path, deleted = _fd(args[0])
            if path in dirs:
                events.append(Event("dirsyncstart", path, tid))
            elif tracked(path):
                events.append(Event("syncstart", path, tid, deleted=deleted))
        if phase == "lost":
            if _touches(args, tracked_or_dir):
                raise TraceError(f"{name}() on {_touches(args, tracked_or_dir)} never returned")
            continue
        if phase == "entry":
            continue
        if result.startswith("-1") or result.startswith("?"):
            continue  # failed: no effect
        if name in ("openat", "open", "creat", "openat2"):
            path, _ = _fd(result.split(" ", 1)[0])
            if not tracked(path):
                continue  # elsewhere, or a directory (opened to be synced)
            flags = args[2] if name in ("openat", "openat2") else (
                args[1] if name == "open" else "O_CREAT|O_WRONLY|O_TRUNC")
            if name == "openat2":
                raise TraceError("openat2 on a tracked file: not modelled")
            if "O_DIRECTORY" in flags or os.path.dirname(path) not in dirs:
                raise TraceError(f"open of {path}: a directory not seen created")
            events.append(Event("open", path, data=flags.encode()))
        elif name in ("pwrite64", "write"):
            path, deleted = _fd(args[0])
            if not tracked(path):
                continue
            if name == "write":
                raise TraceError(f"write() to {path}: position-relative writes are not modelled")
            data, count, written = _string(args[1]), int(args[2]), int(result.split()[0])
            if len(data) != count:
                raise TraceError(f"pwrite64 of {count} bytes shows {len(data)} (strace -s)")
            events.append(Event("write", path, offset=int(args[3]), data=data[:written],
                                deleted=deleted))
        elif name == "ftruncate":
            path, deleted = _fd(args[0])
            if tracked(path):
                events.append(Event("truncate", path, offset=int(args[1]), deleted=deleted))
        elif name in ("fsync", "fdatasync"):
            path, deleted = _fd(args[0])
            if path in dirs:
                events.append(Event("dirsync", path, tid))
            elif tracked(path):
                events.append(Event("sync", path, tid, deleted=deleted))
        elif name in ("unlink", "unlinkat"):
            path = _path_arg(None, args[0]) if name == "unlink" else _path_arg(*args[:2])
            if path in dirs:
                raise TraceError(f"removal of the directory {path}: not modelled")
            if tracked(path):
                events.append(Event("unlink", path))
        elif name in ("mkdir", "mkdirat"):
            path = _path_arg(None, args[0]) if name == "mkdir" else _path_arg(*args[:2])
            if tracked_or_dir(path):
                if os.path.dirname(path) not in dirs:
                    raise TraceError(f"mkdir of {path}: its parent was not seen created")
                dirs.add(path)
                events.append(Event("mkdir", path))
        elif name in ("rename", "renameat", "renameat2"):
            old = _path_arg(None, args[0]) if name == "rename" else _path_arg(args[0], args[1])
            new = _path_arg(None, args[1]) if name == "rename" else _path_arg(args[2], args[3])
            if tracked_or_dir(old) or tracked_or_dir(new):
                if not (tracked(old) and tracked(new)) or \
                        os.path.dirname(old) != os.path.dirname(new):
                    raise TraceError(f"rename out of its directory, or of a directory: "
                                     f"{old} -> {new}")
                if name == "renameat2" and "RENAME_EXCHANGE" in args[4]:
                    raise TraceError("renameat2(RENAME_EXCHANGE): not modelled")
                events.append(Event("rename", old, new_path=new))
        elif name in ("sync", "syncfs", "io_uring_setup"):
            raise TraceError(f"{name}() seen: not modelled")
        elif _touches(args, tracked_or_dir):  # writev, pwritev*, truncate, link, ...
            raise TraceError(f"{name}() on {_touches(args, tracked_or_dir)}: not modelled")
    confirmed = {(e.ack.get("key"), e.ack["n"]) for e in events
                 if e.ack is not None and "by" not in e.ack}
    return [e for e in events if e.ack is None or "by" not in e.ack
            or (e.ack["key"], e.ack["n"]) in confirmed]


# ---------------------------------------------------------------------- the disk ----

class Inode:
    __slots__ = ("durable", "live", "pending")

    def __init__(self, data: bytes = b"") -> None:
        self.live = bytearray(data)  # what the running system reads
        self.durable = bytes(data)  # what survives a power cut
        # (sequence number, offset, data) for a write, (sequence number, size, None)
        # for a truncate: in the order they happened
        self.pending: list[tuple[int, int, bytes | None]] = []


def _apply(buf: bytearray, offset: int, data: bytes | None) -> None:
    if data is None:  # truncate to `offset`
        if len(buf) > offset:
            del buf[offset:]
        else:
            buf.extend(bytes(offset - len(buf)))
        return
    end = offset + len(data)
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


@dataclasses.dataclass(frozen=True)
class Model:
    """How the disk behaves.  ``strict``: directory operations need a directory fsync.
    The ``broken_*`` switches are deliberately wrong disks, used to prove that the
    checker catches what they break."""

    strict: bool
    broken_ignore_fsync: bool = False

    @property
    def name(self) -> str:
        return ("strict" if self.strict else "lenient") + (
            "+ignore-fsync" if self.broken_ignore_fsync else "")


class Disk:
    """The model disk for one directory tree, advanced one event at a time.  Paths the
    trace never created (the root and above) are there before and durable; a directory
    the trace created is an entry of its parent, like a file."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.live: dict[str, Inode] = {}  # the writer starts in an empty directory
        self.durable: dict[str, Inode] = {}
        self.directories: set[str] = set()  # the entries of ``live`` that are directories
        # (sequence number, parent directory, op, path, inode) of creates (of files and
        # directories), unlinks, renames ("old\0new")
        self.pending_dir: list[tuple[int, str, str, str, Inode | None]] = []
        self.unlinked: dict[str, list[Inode]] = {}  # files unlinked from each name
        self.sync_started: dict[str, int] = {}  # thread -> sequence number at its sync's start
        self.seq = 0
        self.generation = 0  # changes whenever the durable state does

    def _inode(self, event: Event) -> Inode:
        if event.path in self.directories:
            raise TraceError(f"{event.kind} on the directory {event.path}: not modelled")
        if not event.deleted:
            ino = self.live.get(event.path)
            if ino is None:
                raise TraceError(f"{event.kind} on {event.path}, absent in the model")
            return ino
        gone = self.unlinked.get(event.path, [])
        if len(gone) != 1:
            raise TraceError(f"{event.kind} on an unlinked {event.path}: {len(gone)} candidates")
        return gone[0]

    def _forget(self, path: str) -> None:
        """``path``'s file leaves the namespace (unlinked or renamed over)."""
        ino = self.live.pop(path, None)
        if ino is not None:
            self.unlinked.setdefault(path, []).append(ino)

    def _dir_op(self, op: str, path: str, ino: Inode | None, new: str = "") -> None:
        self.seq += 1
        if self.model.strict:
            self.pending_dir.append((self.seq, os.path.dirname(path), op,
                                     path if op != "rename" else path + "\0" + new, ino))
        else:
            _dir_apply(self.durable, op, path if op != "rename" else path + "\0" + new, ino)
            self.generation += 1

    def apply(self, event: Event) -> None:
        kind = event.kind
        if kind in ("write", "truncate"):
            ino = self._inode(event)
            data = event.data if kind == "write" else None
            _apply(ino.live, event.offset, data)
            self.seq += 1
            ino.pending.append((self.seq, event.offset, data))
        elif kind in ("syncstart", "dirsyncstart"):
            self.sync_started[event.tid] = self.seq
        elif kind == "sync":
            ino = self._inode(event)
            done = self._synced_upto(event)
            count = sum(1 for seq, _, _ in ino.pending if seq <= done)
            if count and not self.model.broken_ignore_fsync:
                buf = bytearray(ino.durable)
                for _, offset, data in ino.pending[:count]:
                    _apply(buf, offset, data)
                ino.durable = bytes(buf)
                del ino.pending[:count]
                self.generation += 1
        elif kind == "dirsync":  # this directory's own entries, not its entry in its parent
            done = self._synced_upto(event)
            synced = [op for op in self.pending_dir if op[0] <= done and op[1] == event.path]
            for _, _, op, path, target in synced:
                _dir_apply(self.durable, op, path, target)
            if synced:
                self.pending_dir = [op for op in self.pending_dir if op not in synced]
                self.generation += 1
        elif kind == "mkdir":
            if event.path in self.live:
                raise TraceError(f"mkdir of {event.path}, present in the model")
            self.live[event.path] = made = Inode()
            self.directories.add(event.path)
            self._dir_op("link", event.path, made)
        elif kind == "open":
            if event.path in self.directories:
                raise TraceError(f"open of the directory {event.path}: not modelled")
            flags = event.data.decode()
            opened = self.live.get(event.path)
            if opened is None:
                if "O_CREAT" not in flags:
                    raise TraceError(f"open of {event.path}, absent in the model")
                opened = self.live[event.path] = Inode()
                self._dir_op("link", event.path, opened)
            if "O_TRUNC" in flags:
                _apply(opened.live, 0, None)
                self.seq += 1
                opened.pending.append((self.seq, 0, None))
        elif kind == "unlink":
            if event.path not in self.live or event.path in self.directories:
                raise TraceError(f"unlink of {event.path}, absent in the model")
            self._forget(event.path)
            self._dir_op("unlink", event.path, None)
        elif kind == "rename":
            if {event.path, event.new_path} & self.directories:
                raise TraceError(f"rename of the directory {event.path}: not modelled")
            ino = self.live.pop(event.path)
            self._forget(event.new_path)
            self.live[event.new_path] = ino
            self._dir_op("rename", event.path, ino, event.new_path)

    def _synced_upto(self, event: Event) -> int:
        """A sync makes durable what was done before it started (POSIX), not what other
        threads did while it ran."""
        if event.tid not in self.sync_started:
            raise TraceError(f"{event.kind} of {event.path} without its start")
        return self.sync_started.pop(event.tid)

    def _files(self, entries: Mapping[str, Inode]) -> Iterator[tuple[str, Inode]]:
        """The files among durable ``entries`` that a power cut leaves reachable: each
        directory created above one must have a durable entry too."""
        for path, ino in entries.items():
            if path in self.directories:
                continue
            parent = os.path.dirname(path)
            while parent in self.directories and parent in entries:
                parent = os.path.dirname(parent)
            if parent not in self.directories:
                yield path, ino

    def image(self) -> dict[str, bytes]:
        """The files a power cut now leaves: durable entries, durable contents."""
        return {path: ino.durable for path, ino in self._files(self.durable)}

    def torn_image(self, rng: random.Random) -> dict[str, bytes]:
        """A power cut that also persisted some of what was pending: for each directory a
        random prefix of its pending operations, and a random subset of the written
        sectors."""
        entries = dict(self.durable)
        pending = collections.Counter(parent for _, parent, _, _, _ in self.pending_dir)
        keep = {parent: rng.randint(0, count) for parent, count in pending.items()}
        for _, parent, op, path, ino in self.pending_dir:
            if keep[parent]:
                keep[parent] -= 1
                _dir_apply(entries, op, path, ino)
        image = {}
        for path, ino in self._files(entries):
            buf = bytearray(ino.durable)
            for _, offset, data in ino.pending:
                if rng.random() < 0.5:
                    continue
                if data is None:
                    _apply(buf, offset, None)
                    continue
                first = offset - offset % SECTOR
                for start in range(first, offset + len(data), SECTOR):
                    if rng.random() < 0.5:
                        lo, hi = max(start, offset), min(start + SECTOR, offset + len(data))
                        _apply(buf, lo, data[lo - offset: hi - offset])
            image[path] = bytes(buf)
        return image

    def has_pending(self) -> bool:
        return bool(self.pending_dir) or any(ino.pending for ino in self.durable.values())


def _dir_apply(entries: dict[str, Inode], op: str, path: str, ino: Inode | None) -> None:
    if op == "link" and ino is not None:
        entries[path] = ino
    elif op == "unlink":
        entries.pop(path, None)
    elif op == "rename" and ino is not None:
        old, new = path.split("\0")
        entries.pop(old, None)
        entries[new] = ino


def acks_moved_earlier(events: Sequence[Event]) -> list[Event]:
    """A deliberately wrong trace: each acknowledgement one event earlier than it was
    (between the start and the end of its commit's last sync, in a single-threaded
    trace).  The checker must find losses in it."""
    moved = list(events)
    for index in range(1, len(moved)):
        if moved[index].kind == "ack" and moved[index - 1].kind != "ack":
            moved[index - 1], moved[index] = moved[index], moved[index - 1]
    return moved


def wal_restarts(events: Sequence[Event]) -> int:
    """How often a WAL was restarted: its header rewritten at offset 0 while the file
    still held frames (a fresh or truncated WAL starts from an empty file instead)."""
    sizes: dict[str, int] = {}
    restarts = 0
    for event in events:
        if not event.path.endswith("-wal"):
            continue
        size = sizes.get(event.path, 0)
        if event.kind == "write":
            restarts += event.offset == 0 and size > WAL_HEADER_BYTES
            sizes[event.path] = max(size, event.offset + len(event.data))
        elif event.kind == "truncate":
            sizes[event.path] = event.offset
        elif event.kind == "unlink":
            sizes.pop(event.path, None)
    return restarts


def final_tree(events: Sequence[Event]) -> tuple[dict[str, bytes], set[str]]:
    """Every event replayed: the files (path: contents) and the directories the writer's
    root should hold at the end."""
    disk = Disk(Model(strict=False))
    for event in events:
        disk.apply(event)
    files = {path: bytes(ino.live) for path, ino in disk.live.items()
             if path not in disk.directories}
    return files, disk.directories


def verify_replay(events: Sequence[Event], root: str) -> int:
    """Self-check: the replay reproduces the tree under ``root`` byte for byte (``-shm``
    aside).  Returns the number of bytes compared.  Call only when no process has the
    database open."""
    expected, expected_dirs = final_tree(events)
    actual: dict[str, bytes] = {}
    actual_dirs: set[str] = set()
    for where, subdirs, names in os.walk(os.path.realpath(root)):
        actual_dirs.update(os.path.join(where, name) for name in subdirs)
        for name in names:
            path = os.path.join(where, name)
            if os.path.isfile(path) and not name.endswith("-shm"):
                with open(path, "rb") as fp:
                    actual[path] = fp.read()
    if sorted(expected_dirs) != sorted(actual_dirs):
        raise TraceError(f"replay has directories {sorted(expected_dirs)}, "
                         f"the disk {sorted(actual_dirs)}")
    if sorted(expected) != sorted(actual):
        raise TraceError(f"replay has files {sorted(expected)}, the disk {sorted(actual)}")
    for path, data in actual.items():
        if expected[path] != data:
            raise TraceError(f"replay of {path} differs from the file on disk "
                             f"({len(expected[path])} vs {len(data)} bytes)")
    return sum(len(data) for data in actual.values())


# ----------------------------------------------------------------------- workloads ----

def value_for(key: str, n: int) -> dict[str, Any]:
    """The value of the ``n``-th write of ``key`` (so version ``n``): sizes vary from a
    few bytes to past a page, so writes span several pages and overflow pages."""
    size = 20 + (n * 97 + sum(map(ord, key)) * 31) % 700
    if (n + len(key)) % 7 == 0:
        size += 5000
    return {"key": key, "n": n, "text": (f"{key}:{n} " * (size // 4 + 1))[:size]}


class _Acks:
    """Acknowledgements, written straight to /dev/null so strace orders them against the
    disk; ``os.write`` of one small buffer is one system call, also across threads."""

    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def __call__(self, **ack: Any) -> None:
        os.write(self.fd, ACK_PREFIX + json.dumps(ack).encode() + b"\n")


def _sequential(keys: int, n_writes: int, prefix: str) -> list[tuple[str, int]]:
    """(key, n) for ``n_writes`` writes over ``keys`` keys, round robin: overwrites."""
    return [(f"{prefix}{i % keys}", i // keys + 1) for i in range(n_writes)]


def workload_writes(kind: str, count: int) -> list[list[tuple[str, int]]]:
    """The writes ``(key, n)`` workload ``kind`` makes of ``count``: one list per writer
    thread (``batch``: per batch, one commit).  The workloads run exactly these."""
    if kind == "single":
        return [_sequential(max(1, count // 2), count, "k")]
    if kind in ("group", "http"):
        prefix = "t" if kind == "group" else "h"
        return [_sequential(max(1, count // THREADS // 2), count // THREADS, f"{prefix}{t}-")
                for t in range(THREADS)]
    if kind == "batch":
        return [[(f"b{b}-{i}", 1) for i in range(BATCH_SIZE)] for b in range(count // BATCH_SIZE)]
    raise SystemExit(f"unknown workload {kind!r}")


def acknowledgements(events: Sequence[Event]) -> collections.Counter[tuple[str, int, str]]:
    """How often each ``(key, n, by)`` was acknowledged in ``events``; ``by`` is
    ``server`` for kvmem-http's response, ``writer`` for the workload's own."""
    return collections.Counter((key, int(e.ack["n"]), e.ack.get("by", "writer"))
                               for e in events if e.ack is not None
                               for key in e.ack.get("keys") or [e.ack["key"]])


def ack_shortfall(events: Sequence[Event], kind: str, count: int) -> str:
    """Why ``events`` do not acknowledge every write of workload ``kind`` exactly once
    (and once more by the server, for ``http``), or ''.  A replay checks only what was
    acknowledged, so a recording short of acknowledgements proves less than it seems."""
    by = ("writer", "server") if kind == "http" else ("writer",)
    expected = collections.Counter((key, n, who) for writes in workload_writes(kind, count)
                                   for key, n in writes for who in by)
    seen = acknowledgements(events)
    missing, extra = expected - seen, seen - expected
    problems = []
    if missing:
        problems.append(f"{expected.total() - missing.total()} of the {expected.total()} "
                        f"acknowledgements expected, missing e.g. {sorted(missing)[:3]}")
    if extra:
        problems.append(f"{extra.total()} unexpected, e.g. {sorted(extra)[:3]}")
    return f"{kind}: {'; '.join(problems)}" if problems else ""


def write_workload(kind: str, directory: str, count: int) -> None:
    """Run one workload on ``directory/memory.db`` with the settings in ``KVMEM_*``
    (kvmem creates ``directory`` if it does not exist)."""
    import kvmem

    db = os.path.join(directory, "memory.db")
    ack = _Acks()
    writes = workload_writes(kind, count)
    if kind == "http":
        _http_workload(db, writes, ack)
        return
    config = kvmem.Config.build()
    if kind == "single":
        # Ends like a killed process (no final checkpoint), so that whatever the WAL
        # holds is part of the byte-for-byte self-check; the other workloads close cleanly.
        store = kvmem.Store.open(db, config=config)
        for key, n in writes[0]:
            memory = store.set(key, value_for(key, n), namespace=NAMESPACE)
            ack(key=key, n=memory.version)
        store._stop_background()  # no checkpoint in flight from here on (no final one)
        os._exit(0)
    with kvmem.Store.open(db, config=config) as store:
        if kind == "group":
            def run(t: int) -> None:
                for key, n in writes[t]:
                    memory = store.set(key, value_for(key, n), namespace=NAMESPACE)
                    ack(key=key, n=memory.version)
            _threads(run)
        elif kind == "batch":
            for batch in writes:
                keys = [key for key, _ in batch]
                store.batch([{"op": "set", "key": k, "value": value_for(k, n)} for k, n in batch],
                            namespace=NAMESPACE)
                ack(keys=keys, n=1)


def _threads(run: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            run(t)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _http_workload(db: str, writes: list[list[tuple[str, int]]], ack: _Acks) -> None:
    """A real ``kvmem-http`` process (traced too: strace -f follows it) under concurrent
    PUTs from this process.  Acknowledged twice in the trace: when the server sends the
    2xx response (``sendto``, see ``_http_ack``) and when this client has read it."""
    import http.client

    server = subprocess.Popen(
        testutil.child_command("serve_http", "--db", db, "--port", "0", "--log-level", "WARNING"),
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("listening on http://"):
        server.kill()
        raise SystemExit(f"server did not start: {line!r}")
    port = int(line.rsplit(":", 1)[1])

    def run(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for key, n in writes[t]:
            body = json.dumps({"value": value_for(key, n)})
            conn.request("PUT", f"/v1/memories/{key}", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            if response.status // 100 != 2:
                raise RuntimeError(f"PUT {key}: {response.status} {reply}")
            ack(key=key, n=reply["version"])
        conn.close()

    try:
        _threads(run)
    finally:
        server.send_signal(signal.SIGINT)  # a clean stop: final checkpoint, traced too
        server.wait(timeout=60)


# ------------------------------------------------------------------------ record ----

def strace_problem() -> str | None:
    """Why tracing cannot run here (no strace, ptrace refused), or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (Debian package: strace)"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync",
                            sys.executable, "-c", "pass"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"strace cannot trace a child here: {probe.stderr.strip()[:300]}"
    return None


def record(kind: str, directory: str, count: int, settings: Mapping[str, str],
           trace_path: str) -> None:
    """Run workload ``kind`` under strace into ``trace_path``."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMEM_")}
    env.update(settings)
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    argv = ["strace", "-f", "-qq", "-o", trace_path, "-s", str(16 << 20), "-xx", "-y",
            "--seccomp-bpf", "-e", "signal=none", "-e", "trace=" + ",".join(TRACED),
            sys.executable, os.path.join(here, "crashsim.py"), "write", kind, directory,
            str(count)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise TraceError(f"workload {kind} failed (rc={done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")


# ------------------------------------------------------------------------- check ----

@dataclasses.dataclass
class Report:
    """One configuration's figures (a row of the README table)."""

    label: str
    model: str
    crash_points: int = 0
    images: int = 0  # distinct durable states opened
    torn: int = 0
    ack_checks: int = 0
    lost: int = 0  # (crash point, acknowledged write) pairs missing or wrong
    lossy_points: int = 0
    max_lost_at_one_point: int = 0
    integrity_failures: int = 0
    partial_batches: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def row(self) -> str:
        lost = str(self.lost) if not self.lost else (
            f"{self.lost} ({self.lossy_points} points, at most {self.max_lost_at_one_point})")
        return (f"| {self.label} | {self.model} | {self.crash_points} | {self.images} | "
                f"{self.torn} | {self.ack_checks} | {lost} | {self.integrity_failures} |")


def table(reports: Sequence[Report]) -> list[str]:
    """The power-loss table (Markdown), one row per configuration and model."""
    return ["| configuration | directory model | crash points | durable images opened | "
            "torn images | acknowledged-write checks | lost | integrity failures |",
            "|---|---|---|---|---|---|---|---|", *(report.row() for report in reports)]


@dataclasses.dataclass
class Verdict:
    """What kvmem found in one crash image."""

    rows: dict[str, testutil.Stored]
    problem: str = ""  # integrity failure: why
    partial_batches: int = 0


class Checker:
    """Opens crash images with kvmem in a scratch directory and reads them back."""

    def __init__(self, settings: Mapping[str, str], scratch: str) -> None:
        import kvmem

        self.kvmem = kvmem
        self.config = kvmem.Config.build(environ=dict(settings))
        self.scratch = scratch
        self.opened = 0
        self.known_good: set[tuple[str, int, str]] = set()

    def verdict(self, image: Mapping[str, bytes]) -> Verdict:
        kvmem = self.kvmem
        self.opened += 1
        where = os.path.join(self.scratch, str(self.opened))
        os.mkdir(where)
        try:
            if len({os.path.basename(path) for path in image}) != len(image):
                raise TraceError(f"one image, files of one name in two directories: {image}")
            for path, data in image.items():  # kvmem's files share the database's directory
                with open(os.path.join(where, os.path.basename(path)), "wb") as fp:
                    fp.write(data)
            db = os.path.join(where, "memory.db")
            if not os.path.exists(db):
                return Verdict({})  # the database's own entry never became durable
            try:
                conn = kvmem.open_db(db, config=self.config, create=False)
            except kvmem.KvmemError as exc:
                return Verdict({}, problem=f"open_db: {exc.code}: {exc}")
            try:
                found = testutil.read_back(conn, namespace=NAMESPACE)
            except (sqlite3.DatabaseError, kvmem.KvmemError) as exc:
                return Verdict({}, problem=f"read: {exc}")
            finally:
                conn.close()
            if not found.sound:
                return Verdict(found.rows, problem=f"integrity_check: {found.integrity[:3]}")
            return _judge_rows(found.rows, self.known_good)
        finally:
            shutil.rmtree(where, ignore_errors=True)


def _judge_rows(rows: dict[str, testutil.Stored], known_good: set[tuple[str, int, str]]
                ) -> Verdict:
    """Every row must be a value some write intended; batches all or nothing.
    ``known_good`` remembers rows already proven (the same rows recur in many images)."""
    batches: dict[str, int] = {}
    for key, row in rows.items():
        if (key, row.version, row.value_json) not in known_good:
            if row.value != value_for(key, row.version):
                return Verdict(rows,
                               problem=f"row {key} v{row.version} holds a value never written")
            known_good.add((key, row.version, row.value_json))
        if key.startswith("b"):
            batch = key.split("-")[0]
            batches[batch] = batches.get(batch, 0) + 1
    partial = sum(1 for n in batches.values() if n != BATCH_SIZE)
    return Verdict(rows, problem=f"{partial} partial batches" if partial else "",
                   partial_batches=partial)


def replay(events: Sequence[Event], model: Model, checker: Checker, report: Report, *,
           torn: int, seed: int, head: int = 80) -> Report:
    """Crash after every event and check each distinct durable image; also check one
    torn image at each of the first ``head`` events (creating the database) and at
    ``torn`` seeded random points, where something is pending."""
    rng = random.Random(seed)
    disk = Disk(model)
    acked: dict[str, int] = {}
    cache: dict[int, Verdict] = {}
    torn_at = set(range(min(head, len(events))))
    torn_at.update(rng.sample(range(len(events)), min(torn, len(events))))
    for index, event in enumerate(events):
        disk.apply(event)
        if event.kind == "ack":
            assert event.ack is not None
            for key in event.ack.get("keys") or [event.ack["key"]]:
                acked[key] = max(acked.get(key, 0), int(event.ack["n"]))
        if disk.generation not in cache:
            cache[disk.generation] = checker.verdict(disk.image())
            report.images += 1
        _score(report, cache[disk.generation], acked, f"event {index} ({event.kind})")
        report.crash_points += 1
        if index in torn_at and disk.has_pending():
            report.torn += 1
            _score(report, checker.verdict(disk.torn_image(rng)), acked,
                   f"torn at event {index}")
    return report


def _score(report: Report, verdict: Verdict, acked: Mapping[str, int], where: str) -> None:
    if verdict.problem:
        report.integrity_failures += 1
        report.partial_batches += verdict.partial_batches
        if len(report.failures) < 5:
            report.failures.append(f"{where}: {verdict.problem}")
    # At a version >= the acknowledged one: a later write may be durable too.
    report.ack_checks += len(acked)
    lost = len(testutil.lost_writes(verdict.rows, acked, exact_version=False))
    if lost:
        report.lost += lost
        report.lossy_points += 1
        report.max_lost_at_one_point = max(report.max_lost_at_one_point, lost)
        if len(report.failures) < 5:
            report.failures.append(f"{where}: {lost} acknowledged writes lost")


def load_trace(trace_path: str, root: str) -> list[Event]:
    with open(trace_path, encoding="utf-8", errors="surrogateescape") as fp:
        return parse(iter(fp), root)


def record_events(kind: str, settings: Mapping[str, str], workdir: str, count: int, *,
                  subdir: str = "") -> list[Event]:
    """Record workload ``kind`` with its database in ``workdir/disk/subdir`` (``subdir``
    does not exist yet: the writer creates it), parse it and self-check the replay
    against the tree it left; the trace (tens of MB) is deleted, the events returned."""
    root = os.path.join(workdir, "disk")
    os.makedirs(root)
    trace = os.path.join(workdir, "trace.txt")
    record(kind, os.path.join(root, subdir), count, settings, trace)
    events = load_trace(trace, root)
    verify_replay(events, root)
    os.remove(trace)
    return events


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "write":
        write_workload(argv[1], argv[2], int(argv[3]))
        return 0
    print(__doc__.strip().splitlines()[-2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
