"""One writer's segment files: append frames, rotate by size and age, seal with a trailer, and
recover after a crash (a torn tail is truncated to the last whole frame and the segment sealed;
corruption followed by valid frames is never truncated away: it is reported and left in place).

A writer directory `w<index>` belongs to one process at a time: `SegmentWriter` holds an
exclusive `flock` on `w<index>/LOCK` (released by the kernel when the process dies, so a
restarted worker takes over at once). Not thread safe: one thread (the log's writer thread)
appends; construction (which recovers) may run on another before that thread starts.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import grpc

from uwrt.runtime.errors import UwrtError
from uwrt.runtime.pb import rec
from uwrt.runtime.records.format import (
    FORMAT_VERSION,
    BadFrame,
    Frame,
    frame,
    next_good_frame,
    parse_entry,
    scan,
    segment_name,
    segments_of,
)

__all__ = ["RecordsError", "SegmentWriter", "Recovery", "recover_writer", "read_trailer", "lock_writer"]

log = logging.getLogger("uwrt.records")


class RecordsError(UwrtError):
    """The decision log cannot be written (or its directory is held by another process)."""
    code = grpc.StatusCode.UNAVAILABLE


@dataclass
class Recovery:
    """What start-up found in a writer directory."""
    last_number: int = 0                 # highest segment number (0: none)
    last_seq: int = 0                    # highest record seq (0: none)
    last_sha256: bytes = b""             # the newest sealed segment's trailer sha256 (the chain)
    sealed: list[str] = field(default_factory=list)       # segments this recovery sealed
    truncated_bytes: int = 0             # torn tail cut off, over all of them
    corrupt: list[str] = field(default_factory=list)      # unsealed segments with bad frames in the middle


def read_trailer(path: str) -> rec.SegmentTrailer | None:
    """The trailer when `path` ends with one (a sealed segment), else None. Reads only the end."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        start = max(0, size - 1024)
        fh.seek(start)
        tail = fh.read()
    for off in range(max(0, len(tail) - 12), -1, -1):
        f = next(scan(tail, off), None)
        if isinstance(f, Frame) and f.end == len(tail):
            try:
                e = parse_entry(f.payload)
            except Exception:  # noqa: BLE001 - a frame that happens to verify but is not an entry
                continue
            if e.WhichOneof("entry") == "trailer":
                return e.trailer
    return None


def lock_writer(wdir: str) -> int:
    """Take the writer directory's exclusive lock (non-blocking); returns the lock's fd."""
    os.makedirs(wdir, exist_ok=True)
    fd = os.open(os.path.join(wdir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecordsError(f"decision log {wdir} is in use by another process (its LOCK is held)") from None
    return fd


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trailer_frame(count: int, first: int, last: int, sha: bytes, reason: str, truncated: int = 0) -> bytes:
    e = rec.LogEntry()
    e.trailer.CopyFrom(rec.SegmentTrailer(record_count=count, first_seq=first, last_seq=last, sha256=sha,
                                          sealed_unix_ns=time.time_ns(), reason=reason, truncated_bytes=truncated))
    return frame(e.SerializeToString())


def recover_writer(wdir: str) -> Recovery:
    """Seal every unsealed segment of a writer directory the caller holds the lock of: frames are
    scanned; a torn tail (a bad frame with no valid frame after it) is truncated, logged and
    counted; a bad frame followed by valid ones is corruption: logged at ERROR and left unsealed
    (`uwrt audit verify` reports it). Returns where the writer continues."""
    r = Recovery()
    for number, path in segments_of(wdir):
        r.last_number = number
        tr = read_trailer(path)
        if tr is not None:
            r.last_seq = max(r.last_seq, tr.last_seq)
            r.last_sha256 = tr.sha256
            continue
        with open(path, "rb") as fh:
            buf = fh.read()
        count, first, last, good_end, bad = 0, 0, 0, 0, None
        for f in scan(buf):
            if isinstance(f, BadFrame):
                bad = f
                break
            good_end = f.end
            e = parse_entry(f.payload)
            if e.WhichOneof("entry") == "record":
                count += 1
                first = first or e.record.seq
                last = e.record.seq
        if bad is not None and next_good_frame(buf, bad.offset + 1) is not None:
            r.corrupt.append(path)
            log.error("decision log %s: bad frame at byte %d (%s) with valid frames after it: corruption, not a "
                      "torn tail; left unsealed for inspection (uwrt audit verify)", path, bad.offset, bad.why)
            for f in scan(buf, next_good_frame(buf, bad.offset + 1) or 0):     # continue the seq after it
                if isinstance(f, Frame):
                    e = parse_entry(f.payload)
                    if e.WhichOneof("entry") == "record":
                        last = max(last, e.record.seq)
            r.last_seq = max(r.last_seq, last)
            continue
        truncated = len(buf) - good_end
        if good_end == 0:           # not even a whole header: an empty segment, nothing to keep
            log.warning("decision log %s: no whole frame (%d bytes): removed", path, len(buf))
            os.unlink(path)
            r.truncated_bytes += truncated
            r.last_number = number - 1
            continue
        if truncated:
            log.warning("decision log %s: torn tail of %d bytes after byte %d (%s): truncated to the last whole "
                        "record", path, truncated, good_end, bad.why if bad else "")
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, good_end)
            sha = hashlib.sha256(buf[:good_end]).digest()
            os.lseek(fd, good_end, os.SEEK_SET)
            os.write(fd, _trailer_frame(count, first, last, sha, "recovered", truncated))
            os.fsync(fd)
        finally:
            os.close(fd)
        r.sealed.append(path)
        r.truncated_bytes += truncated
        r.last_seq = max(r.last_seq, last)
        r.last_sha256 = sha
    return r


class SegmentWriter:
    """Appends records to `root/w<index>/NNNNNNNN.uwlog`, continuing after whatever a previous
    process left (recovered first). `append` takes record payloads (serialized LogEntry) and
    returns nothing; `sync` makes everything appended durable; `close` seals."""

    def __init__(self, root: str, index: int, *, segment_bytes: int, segment_s: float) -> None:
        self.dir = os.path.join(root, f"w{index}")
        self.index = index
        self.segment_bytes = segment_bytes
        self.segment_s = segment_s
        self._lock_fd: int | None = lock_writer(self.dir)
        self.recovery = recover_writer(self.dir)
        self.next_seq = self.recovery.last_seq + 1
        self._prev_sha = self.recovery.last_sha256
        self._number = self.recovery.last_number
        self._fd: int | None = None
        self.sealed_segments = 0
        self._open(self._number + 1)

    # -- segment lifecycle

    def _open(self, number: int) -> None:
        path = os.path.join(self.dir, segment_name(number))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._fd, self._number, self.path = fd, number, path
        self._sha = hashlib.sha256()
        self._size = 0
        self._count, self._first, self._last = 0, 0, 0
        self._opened = time.monotonic()
        e = rec.LogEntry()
        e.header.CopyFrom(rec.SegmentHeader(format_version=FORMAT_VERSION, writer=f"w{self.index}",
                                            worker_index=self.index, pid=os.getpid(), hostname=socket.gethostname(),
                                            segment_number=number, first_seq=self.next_seq,
                                            created_unix_ns=time.time_ns(), prev_segment_sha256=self._prev_sha))
        self._write(frame(e.SerializeToString()))
        os.fsync(fd)
        _fsync_dir(self.dir)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._sha.update(data)
        self._size += len(data)

    def seal(self, reason: str) -> None:
        """Append the trailer, fsync, and forget the segment (the next append opens the next)."""
        if self._fd is None:
            return
        sha = self._sha.digest()
        self._write(_trailer_frame(self._count, self._first, self._last, sha, reason))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._prev_sha = sha
        self.sealed_segments += 1

    def due(self) -> str | None:
        """Why the open segment should be sealed now ("size", "age"), or None."""
        if self._size >= self.segment_bytes:
            return "size"
        if self.segment_s and time.monotonic() - self._opened >= self.segment_s and self._count:
            return "age"
        return None

    # -- appending

    def append(self, records: list[tuple[int, bytes]]) -> None:
        """Append records (seq, serialized LogEntry), in seq order, as one write."""
        if self._fd is None:
            self._open(self._number + 1)
        elif (why := self.due()) is not None:
            self.seal(why)
            self._open(self._number + 1)
        self._write(b"".join(frame(p) for _, p in records))
        self._count += len(records)
        if records:
            self._first = self._first or records[0][0]
            self._last = records[-1][0]

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    @property
    def location(self) -> tuple[int, int]:
        """(open segment number, bytes written to it)."""
        return self._number, self._size

    def close(self, reason: str = "shutdown") -> None:
        """Seal the open segment and release the directory lock."""
        try:
            self.seal(reason)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
