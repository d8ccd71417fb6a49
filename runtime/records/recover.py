"""Start-up and crash recovery of a host's decision log and idempotency index.

`recover(root, index)`: for every writer directory not held by a live process (its LOCK is
free): seal what its last process left (a torn tail truncated: runtime/records/segments.py);
then index every decision record past the index's watermark for that writer (records written
by a process killed before it updated the index), and drop the pending claims of those writers
(their owners are dead). Run by a single server before it serves, by the supervisor before it
starts its workers and again whenever a worker dies, and by each worker as it starts.
Thread safety: call from one thread; the locks keep it off a live writer's directory.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from uwrt.runtime.pb import rec
from uwrt.runtime.records.format import writer_dirs
from uwrt.runtime.records.index import IdempotencyIndex
from uwrt.runtime.records.reader import records
from uwrt.runtime.records.segments import RecordsError, lock_writer, recover_writer

__all__ = ["recover", "RecoverReport", "index_path"]

log = logging.getLogger("uwrt.records")


def index_path(root: str) -> str:
    return os.path.join(root, "index.sqlite")


@dataclass
class RecoverReport:
    writers: list[str] = field(default_factory=list)      # recovered (not held by a live process)
    busy: list[str] = field(default_factory=list)         # held by a live process: left alone
    sealed: int = 0
    truncated_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    indexed: int = 0                                      # decision records caught up into the index
    cleared: int = 0                                      # pending claims of dead owners dropped


def recover(root: str, index: IdempotencyIndex | None, *, only: list[int] | None = None,
            held: set[int] | None = None) -> RecoverReport:
    """Recover the writers under `root` (or only those in `only`); `held`: writer indexes the
    caller itself holds the lock of (recovered already, still caught up into the index)."""
    rep = RecoverReport()
    targets = [(i, d) for i, d in writer_dirs(root) if only is None or i in only]
    if only is not None:
        for i in only:
            if not any(i == j for j, _ in targets):
                targets.append((i, os.path.join(root, f"w{i}")))
    for i, wdir in targets:
        if held and i in held:
            rep.writers.append(f"w{i}")
            continue
        try:
            fd = lock_writer(wdir)
        except RecordsError:
            rep.busy.append(f"w{i}")
            continue
        try:
            r = recover_writer(wdir)
        finally:
            os.close(fd)
        rep.writers.append(f"w{i}")
        rep.sealed += len(r.sealed)
        rep.truncated_bytes += r.truncated_bytes
        rep.corrupt += r.corrupt
    if index is not None and rep.writers:
        rep.indexed = catch_up(root, index, [int(w[1:]) for w in rep.writers])
        for w in rep.writers:
            rep.cleared += index.clear_pending(f"{w}:")
    if rep.sealed or rep.truncated_bytes or rep.indexed or rep.cleared or rep.corrupt:
        log.warning("decision log %s recovered: %d segment(s) sealed, %d torn byte(s) truncated, %d decision(s) "
                    "indexed from the log, %d stale claim(s) dropped%s", root, rep.sealed, rep.truncated_bytes,
                    rep.indexed, rep.cleared, f", CORRUPT: {rep.corrupt}" if rep.corrupt else "")
    return rep


def catch_up(root: str, index: IdempotencyIndex, writers: list[int]) -> int:
    """Index the decision records of `writers` past their watermarks; returns how many."""
    n = 0
    floor = time.time() - index.window_s
    for i in writers:
        w = f"w{i}"
        wm = index.watermark(w)
        batch: list[tuple[str, bytes, bytes, str, int]] = []
        last = wm
        for _, r in records(root, writers=[i], after_seq={i: wm}):
            last = max(last, r.seq)
            if r.kind == rec.KIND_DECISION and r.answered_unix_ns / 1e9 >= floor and not r.request_id_truncated:
                batch.append((r.request_id, r.request_digest, r.response.SerializeToString(), w, r.seq))
            if len(batch) >= 1000:
                index.complete(batch, (), (w, last))
                n += len(batch)
                batch = []
        if batch or last > wm:
            index.complete(batch, (), (w, last))
            n += len(batch)
    return n
