"""The idempotency index: request id -> the decision made for it, shared by the processes of
one host through one SQLite database (WAL mode) next to the decision log.

A row is *pending* from the moment a batch claims the id (before the model runs) until the
batch's records are durable; then it is *done* and holds the response exactly as sent, its
request digest and where its record is (writer, seq). A request whose id is already claimed:
  - done, same digest, within the window -> the stored response (a replay);
  - any state, another digest -> conflict (ALREADY_EXISTS);
  - pending, same digest -> wait for the owner (another batch or process) to finish it.
A claim whose request failed (invalid, deadline, an error) is released: nothing was decided.

The log is the source of truth: `catch_up` indexes every decision record written after the
index's per-writer watermark (a process killed between its log write and its index update
leaves such records), and `clear_pending` drops the claims of a dead process. Rows older than
the window are ignored and deleted in small steps.

Thread safety: one sqlite3 connection per thread (thread-local); SQLite's locking serialises
writers across threads and processes (busy timeout 10 s).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["IdempotencyIndex", "Claim", "NEW", "DONE", "PENDING", "CONFLICT"]

log = logging.getLogger("uwrt.records")

NEW, DONE, PENDING, CONFLICT = "new", "done", "pending", "conflict"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
  request_id TEXT PRIMARY KEY,
  digest BLOB NOT NULL,
  state INTEGER NOT NULL,          -- 0 pending, 1 done
  owner TEXT NOT NULL,             -- "w<index>:<pid>" of the process that claimed it
  response BLOB,                   -- done: the serialized DecisionResponse as sent
  writer TEXT,                     -- done: where the record is
  seq INTEGER,
  t REAL NOT NULL                  -- claim / decision time, Unix seconds
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS decisions_t ON decisions(t);
CREATE TABLE IF NOT EXISTS watermarks (writer TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""
_MAX_VARS = 900


@dataclass(frozen=True, slots=True)
class Claim:
    state: str                       # NEW, DONE, PENDING or CONFLICT
    digest: bytes = b""              # the stored digest (DONE / PENDING / CONFLICT)
    response: bytes = b""            # DONE: the stored response
    writer: str = ""
    seq: int = 0
    owner: str = ""


class IdempotencyIndex:
    def __init__(self, path: str, *, window_s: float, owner: str) -> None:
        self.path = path
        self.window_s = window_s
        self.owner = owner
        self._local = threading.local()
        c = self._conn()
        c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            c = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=True)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")     # the log is the truth; catch_up repairs a lost tail
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- the hot path (one transaction per batch)

    def claim(self, items: Sequence[tuple[str, bytes]]) -> list[Claim]:
        """Claim each (request id, digest) for this owner, in one transaction. Result i answers
        items[i]; a later duplicate of an id in `items` is PENDING (the earlier one claimed it)."""
        if not items:
            return []
        c = self._conn()
        now = time.time()
        ids = list(dict.fromkeys(rid for rid, _ in items))
        c.execute("BEGIN IMMEDIATE")
        try:
            got: dict[str, tuple] = {}
            for chunk in _chunks(ids, _MAX_VARS):
                q = ",".join("?" * len(chunk))
                for row in c.execute("SELECT request_id, digest, state, response, writer, seq, owner, t "
                                     f"FROM decisions "
                                     f"WHERE request_id IN ({q})", chunk):
                    got[row[0]] = row
            expired = [rid for rid, row in got.items() if row[2] == 1 and row[7] < now - self.window_s]
            if expired:
                c.executemany("DELETE FROM decisions WHERE request_id = ?", [(r,) for r in expired])
                for r in expired:
                    del got[r]
            out, claimed, new_rows = [], set(), []
            for rid, digest in items:
                row = got.get(rid)
                if row is not None:
                    if row[1] != digest:
                        out.append(Claim(CONFLICT, row[1], owner=row[6]))
                    elif row[2] == 1:
                        out.append(Claim(DONE, row[1], row[3], row[4] or "", row[5] or 0, row[6]))
                    else:
                        out.append(Claim(PENDING, row[1], owner=row[6]))
                elif rid in claimed:
                    first = next(d for r, d in items if r == rid)
                    out.append(Claim(PENDING, first, owner=self.owner) if first == digest
                               else Claim(CONFLICT, first, owner=self.owner))
                else:
                    claimed.add(rid)
                    new_rows.append((rid, digest, self.owner, now))
                    out.append(Claim(NEW))
            if new_rows:
                c.executemany("INSERT INTO decisions (request_id, digest, state, owner, t) VALUES (?, ?, 0, ?, ?)",
                              new_rows)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return out

    def complete(self, done: Iterable[tuple[str, bytes, bytes, str, int]], release: Iterable[str],
                 watermark: tuple[str, int] | None = None) -> None:
        """Mark claims done (request id, digest, response bytes, writer, seq), drop released
        claims of this owner, and advance the writer's watermark, in one transaction."""
        c = self._conn()
        now = time.time()
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("INSERT INTO decisions (request_id, digest, state, owner, response, writer, seq, t) "
                          "VALUES (?, ?, 1, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET state = 1, "
                          "digest = excluded.digest, response = excluded.response, writer = excluded.writer, "
                          "seq = excluded.seq, t = excluded.t",
                          [(rid, dg, self.owner, resp, w, s, now) for rid, dg, resp, w, s in done])
            c.executemany("DELETE FROM decisions WHERE request_id = ? AND state = 0 AND owner = ?",
                          [(rid, self.owner) for rid in release])
            if watermark is not None:
                c.execute("INSERT INTO watermarks (writer, seq) VALUES (?, ?) ON CONFLICT(writer) DO UPDATE SET "
                          "seq = max(seq, excluded.seq)", watermark)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def lookup(self, request_id: str) -> Claim | None:
        """The row for `request_id` (None: none, or done and older than the window)."""
        row = self._conn().execute("SELECT digest, state, response, writer, seq, owner, t FROM decisions "
                                   "WHERE request_id = ?", (request_id,)).fetchone()
        if row is None or (row[1] == 1 and row[6] < time.time() - self.window_s):
            return None
        if row[1] == 1:
            return Claim(DONE, row[0], row[2], row[3] or "", row[4] or 0, row[5])
        return Claim(PENDING, row[0], owner=row[5])

    # -- maintenance

    def watermark(self, writer: str) -> int:
        row = self._conn().execute("SELECT seq FROM watermarks WHERE writer = ?", (writer,)).fetchone()
        return int(row[0]) if row else 0

    def clear_pending(self, owner_prefix: str | None = None) -> int:
        """Drop pending claims (all, or those whose owner starts with `owner_prefix`, e.g. "w1:")."""
        c = self._conn()
        if owner_prefix is None:
            cur = c.execute("DELETE FROM decisions WHERE state = 0")
        else:
            cur = c.execute("DELETE FROM decisions WHERE state = 0 AND substr(owner, 1, ?) = ?",
                            (len(owner_prefix), owner_prefix))
        return cur.rowcount

    def expire(self, limit: int = 1000) -> int:
        """Delete up to `limit` done rows older than the window."""
        cur = self._conn().execute(
            "DELETE FROM decisions WHERE request_id IN (SELECT request_id FROM decisions WHERE state = 1 AND t < ? "
            "LIMIT ?)", (time.time() - self.window_s, limit))
        return cur.rowcount

    def count(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, count(*) FROM decisions GROUP BY state").fetchall()
        d = {int(s): int(n) for s, n in rows}
        return {"pending": d.get(0, 0), "done": d.get(1, 0)}


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]
