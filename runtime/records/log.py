"""The decision log's writer thread: records are appended and made durable off the event loop,
and whoever submitted them is told when they are.

    submit(bodies, then) --queue--> writer thread: take everything queued (a group), assign seqs,
        one write(); durability "fsync": fdatasync, then call every `then(first_seq)`;
        "interval": call `then` after the write, fdatasync at most every interval_ms

`bodies` are serialized DecisionRecords without their `seq`: the writer prefixes each with its
seq (field 1) and wraps it as LogEntry.record (field 2); protobuf parsers accept fields in any
order, so the bytes parse as if serialized whole. A write or fsync failure fails that group and
every later submission (`then` gets the exception): no response goes out without its record.

Thread safety: `submit` from any thread; `then` callbacks run on the writer thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from uwrt.runtime.records.segments import RecordsError, SegmentWriter

__all__ = ["DecisionLog", "varint", "DURABILITY_CHOICES"]

log = logging.getLogger("uwrt.records")

DURABILITY_CHOICES = ("fsync", "interval")
Then = Callable[[int | BaseException], None]
_MAX_GROUP = 4096


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _entry(seq: int, body: bytes) -> bytes:
    inner = b"\x08" + varint(seq) + body           # DecisionRecord.seq = 1 (varint)
    return b"\x12" + varint(len(inner)) + inner      # LogEntry.record = 2 (length-delimited)


@dataclass
class LogStats:
    records: int = 0
    writes: int = 0           # groups written (one write() each)
    fsyncs: int = 0
    bytes: int = 0
    write_us: int = 0         # total time in write()
    fsync_us: int = 0         # total time in fdatasync
    max_fsync_us: int = 0
    failures: int = 0         # records whose submission failed


class DecisionLog:
    """A writer directory (`root/w<index>`) and its writer thread. Construct (recovers the
    directory), `start()`, `submit(...)`, `close()` (seals)."""

    def __init__(self, root: str, index: int, *, durability: str = "fsync", interval_ms: int = 10,
                 segment_bytes: int = 64 << 20, segment_s: float = 3600.0) -> None:
        if durability not in DURABILITY_CHOICES:
            raise ValueError(f"durability must be one of {DURABILITY_CHOICES}, got {durability!r}")
        self.root = root
        self.index = index
        self.writer = f"w{index}"
        self.durability = durability
        self.interval_s = interval_ms / 1000
        self.segments = SegmentWriter(root, index, segment_bytes=segment_bytes, segment_s=segment_s)
        self.stats = LogStats()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"uwrt-records-{index}", daemon=True)
        self._failed: BaseException | None = None
        self._closed = False
        self._dirty = False
        self._last_sync = time.monotonic()

    @property
    def recovery(self):
        return self.segments.recovery

    def start(self) -> None:
        self._thread.start()

    def submit(self, bodies: list[bytes], then: Then | None = None) -> None:
        """Queue records (serialized DecisionRecords without seq); `then(first seq)` runs on the
        writer thread once they are durable (or written, with durability "interval"), or
        `then(exception)` when they cannot be."""
        if self._failed is not None or self._closed:
            exc = self._failed or RecordsError("the decision log is closed")
            self.stats.failures += len(bodies)
            if then is not None:
                then(exc)
            return
        self._q.put((bodies, then))

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, seal the open segment, release the directory."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout_s)
        else:
            self._drain_now()
        try:
            self.segments.close("shutdown")
        except OSError as e:
            log.error("decision log %s: sealing failed: %s", self.segments.dir, e)

    # -- the writer thread

    def _drain_now(self) -> None:
        items = []
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if it is not None:
                items.append(it)
        if items:
            self._write(items)

    def _run(self) -> None:
        while True:
            timeout = None
            if self._dirty:         # interval mode with unsynced data: wake up to sync it
                timeout = max(0.0, self.interval_s - (time.monotonic() - self._last_sync))
            try:
                first = self._q.get(timeout=timeout) if timeout is not None else self._q.get()
            except queue.Empty:
                self._sync()
                continue
            items, stop = [], first is None
            if first is not None:
                items.append(first)
            while not stop and len(items) < _MAX_GROUP:
                try:
                    it = self._q.get_nowait()
                except queue.Empty:
                    break
                if it is None:
                    stop = True
                else:
                    items.append(it)
            if items:
                self._write(items)
            if stop:
                self._drain_now()
                if self._dirty:
                    self._sync()
                return

    def _sync(self) -> None:
        t0 = time.perf_counter_ns()
        try:
            self.segments.sync()
        except OSError as e:
            self._fail(e)
            return
        us = (time.perf_counter_ns() - t0) // 1000
        self.stats.fsyncs += 1
        self.stats.fsync_us += us
        self.stats.max_fsync_us = max(self.stats.max_fsync_us, us)
        self._dirty = False
        self._last_sync = time.monotonic()

    def _fail(self, e: BaseException) -> None:
        if self._failed is None:
            log.error("decision log %s cannot be written: %s; every later decision fails (UNAVAILABLE) until "
                      "restarted", self.segments.dir, e)
            self._failed = RecordsError(f"the decision log cannot be written: {e}")

    def _write(self, items: list) -> None:
        if self._failed is None:
            seq0 = self.segments.next_seq
            recs, firsts, seq = [], [], seq0
            for bodies, _ in items:
                firsts.append(seq)
                for b in bodies:
                    recs.append((seq, _entry(seq, b)))
                    seq += 1
            t0 = time.perf_counter_ns()
            try:
                self.segments.append(recs)
                self.segments.next_seq = seq
                self.stats.write_us += (time.perf_counter_ns() - t0) // 1000
                self.stats.writes += 1
                self.stats.records += len(recs)
                self.stats.bytes += sum(len(p) + 12 for _, p in recs)
                self._dirty = True
                if self.durability == "fsync":
                    self._sync()
            except OSError as e:
                self._fail(e)
        outcome: list[int | BaseException]
        if self._failed is not None:
            self.stats.failures += sum(len(b) for b, _ in items)
            outcome = [self._failed] * len(items)
        else:
            outcome = list(firsts)
        for (_, then), o in zip(items, outcome, strict=True):
            if then is not None:
                try:
                    then(o)
                except Exception:  # noqa: BLE001 - a callback's bug must not stop the log
                    log.exception("decision log callback failed")
        if (self.durability == "interval" and self._dirty and self._failed is None
                and time.monotonic() - self._last_sync >= self.interval_s):
            self._sync()        # after the release: "interval" never makes a response wait for an fsync

