"""The metrics' append-only log, after Redis's AOF (docs/metrics.md, "Durability").

Every state change the metrics accept (an update, a reset, a guard) is appended as a record;
replaying the records in order over the last snapshot rebuilds the state. A file is a header
(:data:`MAGIC`) and records, each ``length (u32 LE), crc32 (u32 LE), payload``, the payload the
MessagePack array ``[seq, kind, body]``. ``seq`` grows by one per record, across rewrites: a
snapshot records the last ``seq`` it holds, so a crash between writing a snapshot and rewriting
the log never applies a record twice.

When a change counts as **acknowledged**: :meth:`MetricsLog.append` only buffers the record in
memory. :meth:`MetricsLog.commit` writes the buffer to the file with one ``write`` (from then on
the change survives the process being killed, ``kill -9`` included: it is in the kernel) and
fsyncs according to the policy:

* ``always``: fsync in every commit; a committed change survives a power loss too;
* ``everysec`` (the default): fsync when the last one is a second old or more, in ``commit`` or
  in :meth:`MetricsLog.tick`, which the owner calls about every second so that a quiet log is
  synced too. Driven by the caller's clock, not by a thread: no lock is taken on the hot path and
  tests decide the time. A power loss loses at most the last second (plus the time between
  ticks);
* ``no``: the kernel decides when to write back (about 30 s on Linux).

A reply that promises durability (the ``flush`` call) is sent after the ``commit`` that covers
it; :attr:`MetricsLog.written_seq` and :attr:`MetricsLog.synced_seq` say how far each point got.

At open, a torn or corrupt tail (a record cut short by a crash, a checksum mismatch, bytes that do
not decode, with no good record after them) is cut off with a warning and copied aside
(``<log>.bad-<time>``), as Redis's ``aof-load-truncated``. A damaged record in the middle whose
length is intact (the next record is good) is stepped over with a warning (its bytes copied
aside, the file left as it is): one record lost, not all those after it. Damage in the middle
that cannot be stepped over, and a log of another version (``CSMLOG2``...), make the open fail
with :class:`LogError`, the file untouched (Redis also refuses a log damaged in the middle).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgpack
import structlog

from campaignstats.files import fsync_dir

log = structlog.get_logger(__name__)

FsyncPolicy = Literal["always", "everysec", "no"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "everysec", "no")
MAGIC = b"CSMLOG1\n"
_HEAD = struct.Struct("<II")
#: no record is larger (an update is bounded far below): a larger length is corruption
MAX_RECORD = 16 * 1024 * 1024
#: ``everysec``: seconds between fsyncs
FSYNC_INTERVAL = 1.0


class Record(NamedTuple):
    seq: int
    kind: str  # "u": an update map; "r": [campaign, name | nil]; "g": [campaign, name, ...]
    body: Any


class Mark(NamedTuple):
    """A point of the log: the last record written, and the file's size then."""

    seq: int
    offset: int


def encode_record(seq: int, kind: str, body: Any) -> bytes:
    payload: bytes = msgpack.packb([seq, kind, body])
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


class LogError(Exception):
    """A log (or snapshot) that must not be repaired automatically: a later format, or damage
    in the middle that cannot be stepped over. The open fails and the file is left as it is."""


class Scan(NamedTuple):
    """What :func:`scan` found in a log file's bytes."""

    records: list[Record]
    #: where the good part ends (the length to keep)
    good: int
    #: what is wrong past ``good`` (a damaged tail), or None
    problem: str | None
    #: damaged records in the middle that were stepped over: (offset, length, problem)
    skipped: list[tuple[int, int, str]]


def _check(data: bytes, pos: int, last_seq: int) -> tuple[Record | None, int, str | None]:
    """The record at ``pos`` and where it ends, or None and what is wrong (the end is then
    where the record would end if its length field is believable, else -1)."""
    size = len(data)
    if size - pos < _HEAD.size:
        return None, -1, "torn record header"
    length, crc = _HEAD.unpack_from(data, pos)
    if length > MAX_RECORD:
        return None, -1, f"record length {length} is not believable"
    end = pos + _HEAD.size + length
    if end > size:
        return None, -1, "torn record"
    payload = data[pos + _HEAD.size : end]
    if zlib.crc32(payload) != crc:
        return None, end, "checksum mismatch"
    try:
        seq, kind, body = msgpack.unpackb(payload, strict_map_key=False)
    except Exception:
        return None, end, "record does not decode"
    if type(seq) is not int or seq <= last_seq or type(kind) is not str:
        return None, end, "record out of sequence"
    return Record(seq, kind, body), end, None


def _later_record(data: bytes, pos: int, last_seq: int) -> int | None:
    """The offset of a good record anywhere after ``pos``, or None (the damage is the tail)."""
    start = pos + 1
    while True:
        # A payload is the MessagePack array [seq, kind, body]: its first byte is 0x93.
        i = data.find(b"\x93", start + _HEAD.size)
        if i < 0:
            return None
        candidate = i - _HEAD.size
        if _check(data, candidate, last_seq)[0] is not None:
            return candidate
        start = candidate + 1


def scan(data: bytes) -> Scan:
    """The records of a log file's bytes, where the good part ends, and what is wrong past it.

    A damaged record whose length is believable and whose next record is good is stepped over
    (listed in ``skipped``): it is not the tail. Damage after which no good record can be
    found is the tail (``problem``). Damage that cannot be stepped over while good records
    follow it raises :class:`LogError`, as does a header of another version (docs/metrics.md,
    "Durability").
    """
    if not data.startswith(MAGIC):
        if data.startswith(MAGIC[:6]):
            header = data[: data.find(b"\n") + 1 or 16]
            raise LogError(f"a metrics log of an unknown format (header {header!r})")
        return Scan([], 0, "not a metrics log (bad header)", [])
    records: list[Record] = []
    skipped: list[tuple[int, int, str]] = []
    pos = len(MAGIC)
    size = len(data)
    last_seq = 0
    while pos < size:
        record, end, problem = _check(data, pos, last_seq)
        if record is not None:
            records.append(record)
            last_seq = record.seq
            pos = end
            continue
        assert problem is not None
        if 0 < end < size and _check(data, end, last_seq)[0] is not None:
            skipped.append((pos, end - pos, problem))
            pos = end
            continue
        later = _later_record(data, pos, last_seq)
        if later is not None:
            raise LogError(
                f"{problem} at offset {pos}, with good records after it (from offset {later}): "
                "damage in the middle of the log that cannot be stepped over"
            )
        return Scan(records, pos, problem, skipped)
    return Scan(records, pos, None, skipped)


class MetricsLog:
    """An open log file, appended to by its one owner."""

    def __init__(
        self,
        path: Path,
        fd: int,
        size: int,
        next_seq: int,
        policy: FsyncPolicy = "everysec",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, not {policy!r}")
        self.path = path
        self.policy = policy
        self._fd = fd
        self._clock = clock
        self._buffer: list[bytes] = []
        self.next_seq = next_seq
        #: bytes of the file (what is written, not what is buffered)
        self.size = size
        #: the last record written to the file (acknowledged), and the last one fsynced
        self.written_seq = next_seq - 1
        self.synced_seq = next_seq - 1
        self.last_fsync = clock()
        self.fsyncs = 0

    @classmethod
    def open(
        cls,
        path: Path,
        policy: FsyncPolicy = "everysec",
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[MetricsLog, list[Record]]:
        """Open (or create) the log at ``path`` and return it with the records it holds.

        A damaged tail is cut off (and copied aside) with a warning.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        records: list[Record] = []
        if not data:  # missing, or created and never written (a crash before the header)
            _write_new(path, MAGIC)
            size = len(MAGIC)
        else:
            try:
                records, good, problem, skipped = scan(data)
            except LogError as exc:
                raise LogError(f"{path}: {exc}; the file is left as it is") from None
            for offset, length, what in skipped:
                aside = _save_aside(path, data[offset : offset + length], f"{offset}")
                log.warning(
                    "metrics.log.skipped_record",
                    path=str(path),
                    problem=what,
                    offset=offset,
                    bytes_skipped=length,
                    copied_to=str(aside),
                )
            if problem is not None:
                aside = _save_aside(path, data[good:])
                log.warning(
                    "metrics.log.damaged_tail",
                    path=str(path),
                    problem=problem,
                    records_kept=len(records),
                    offset=good,
                    bytes_dropped=len(data) - good,
                    copied_to=str(aside),
                )
                if good == 0:
                    _write_new(path, MAGIC)
                    good = len(MAGIC)
                else:
                    os.truncate(path, good)
                    _fsync_path(path)
            size = good
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        next_seq = records[-1].seq + 1 if records else 1
        return cls(path, fd, size, next_seq, policy, clock), records

    # -- appending --------------------------------------------------------------------------------

    def append(self, kind: str, body: Any) -> int:
        """Buffer one record; returns its ``seq``. Not acknowledged before :meth:`commit`."""
        seq = self.next_seq
        self._buffer.append(encode_record(seq, kind, body))
        self.next_seq = seq + 1
        return seq

    def discard(self) -> int:
        """Forget the records appended and not written (a failed commit that is not retried);
        returns how many."""
        n = len(self._buffer)
        self._buffer.clear()
        self.next_seq = self.written_seq + 1
        return n

    @property
    def pending(self) -> int:
        """Records appended and not written yet."""
        return len(self._buffer)

    def commit(self, now: float | None = None) -> int:
        """Write what is buffered (one ``write``), fsync by the policy; returns the last seq
        written. On a write error the file is cut back to its size before, the records stay
        buffered (the next commit tries again) and the error is raised: nothing is
        acknowledged."""
        if self._buffer:
            data = b"".join(self._buffer)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                os.ftruncate(self._fd, self.size)
                raise
            self._buffer.clear()
            self.size += len(data)
            self.written_seq = self.next_seq - 1
        if self.policy == "always":
            self.sync()
        elif self.policy == "everysec":
            self.tick(now)
        return self.written_seq

    def tick(self, now: float | None = None) -> bool:
        """``everysec``: fsync if something is unsynced and the last fsync is a second old."""
        if self.synced_seq == self.written_seq or self.policy != "everysec":
            return False
        if (self._clock() if now is None else now) - self.last_fsync < FSYNC_INTERVAL:
            return False
        self.sync(now)
        return True

    def sync(self, now: float | None = None) -> None:
        """fsync what is written, whatever the policy."""
        if self.synced_seq == self.written_seq:
            return
        seq = self.written_seq
        os.fsync(self._fd)
        self.synced_seq = seq
        self.last_fsync = self._clock() if now is None else now
        self.fsyncs += 1

    # -- rewriting ------------------------------------------------------------------------------

    def mark(self) -> Mark:
        """The point a snapshot taken now covers (call after :meth:`commit`)."""
        if self._buffer:
            raise RuntimeError("commit() before mark(): buffered records are not in the file")
        return Mark(self.written_seq, self.size)

    def drop_through(self, mark: Mark) -> None:
        """Rewrite the log without the records up to ``mark`` (a snapshot holds them).

        The records written since the mark are kept. The new file is written aside, fsynced and
        renamed over the log, so a crash leaves the old log or the new one.
        """
        self.commit()
        with open(self.path, "rb") as f:
            f.seek(mark.offset)
            tail = f.read()
        _write_new(self.path, MAGIC + tail)
        old = self._fd
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.close(old)
        self.size = len(MAGIC) + len(tail)
        self.synced_seq = self.written_seq

    def close(self) -> None:
        """Write and fsync what is left, then close."""
        if self._fd < 0:
            return
        self.commit()
        self.sync()
        os.close(self._fd)
        self._fd = -1


def _write_new(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_aside(path: Path, data: bytes, where: str = "") -> Path:
    at = f"-at{where}" if where else ""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}{at}")
    with open(aside, "wb") as f:
        f.write(data)
    return aside
