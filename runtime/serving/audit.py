"""The server's side of decision records and idempotency (runtime/records/ holds the log and
the index).

Per batch, on the model thread (`run_batch`): the canonical digest of every request; one index
transaction claims their ids (runtime/records/index.py); ids already decided come back as
replays (path REPLAY), ids used for another request as ALREADY_EXISTS, ids being decided right
now (another batch, another worker) as a `WaitForClaim` the handler resolves; the rest go
through the pipeline. Every answer of the batch becomes a record, the records go to the log's
writer thread, and the batch returns a `Deferred`: the model thread is free for the next batch
while the writer makes this one durable, updates the index and only then releases the
responses (runtime/serving/batcher.py). Errors that never reached a batch (size, shed,
deadline, shutdown) are recorded from the event loop (`record_error`) before their status goes
out. A record's response is the response exactly as sent: its timing is stamped here, before
the record is written (`timing.total_us` excludes the wait for durability).

Thread safety: `run_batch` on the model thread only; `record_*`, `wait_claim` on the event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.errors import InvalidRequest, UwrtError
from uwrt.runtime.featurize import MAX_REQUEST_ID_BYTES
from uwrt.runtime.pb import pb, rec
from uwrt.runtime.pipeline import Pipeline, StageTimes
from uwrt.runtime.records.format import request_digest
from uwrt.runtime.records.index import CONFLICT, DONE, NEW, PENDING, IdempotencyIndex
from uwrt.runtime.records.log import DecisionLog, varint
from uwrt.runtime.records.recover import index_path, recover
from uwrt.runtime.serving.batcher import Deferred

__all__ = ["Audit", "AuditItem", "AlreadyDecided", "ClaimBusy", "WaitForClaim", "open_audit"]

log = logging.getLogger("uwrt.audit")

STORED_ID_BYTES = 256          # most of a request id a record keeps
PREFIX_BYTES = 256             # most of an unstorable request a record keeps


class AlreadyDecided(UwrtError):
    """The request id was already used for a different request (another digest)."""
    code = grpc.StatusCode.ALREADY_EXISTS


class ClaimBusy(UwrtError):
    """Another request with this id is still being decided (its owner is slow or stopped)."""
    code = grpc.StatusCode.UNAVAILABLE


@dataclass(eq=False, slots=True)
class AuditItem:
    """What the batcher queues when records are on: the request and when it arrived."""
    req: pb.DecisionRequest
    t0_ns: int               # perf_counter_ns at arrival (timing)
    recv_ns: int             # wall clock at arrival (the record)
    rpc: int                 # rec.RPC_DECIDE / RPC_DECIDE_STREAM
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class WaitForClaim:
    """Result for a request whose id another request is deciding: the handler waits for it."""
    request_id: str
    digest: bytes
    owner: str


def _fv(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v & 0xFFFFFFFFFFFFFFFF) if v else b""


def _fb(num: int, data: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(data)) + data if data else b""


def _status(e: BaseException) -> tuple[str, str, str]:
    if isinstance(e, UwrtError):
        return e.code.name, str(e), getattr(e, "field", "") or ""
    if isinstance(e, asyncio.CancelledError):
        return "CANCELLED", "the client cancelled or went away", ""
    return "INTERNAL", f"internal error: {type(e).__name__}", ""


class Audit:
    """One server process's decision log (writer `w<index>`) and its view of the host's index."""

    def __init__(self, cfg: RuntimeConfig, dlog: DecisionLog, index: IdempotencyIndex | None) -> None:
        self.cfg = cfg
        self.log = dlog
        self.index = index
        self.full = cfg.records_payload == "full"
        self.batch_id = 0
        self.counts = {"replays": 0, "conflicts": 0, "waits": 0, "wait_timeouts": 0, "errors_recorded": 0}
        self.idem_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uwrt-idem")
        self._loop: asyncio.AbstractEventLoop | None = None
        #: called on the writer thread with (items, responses) of every durable batch's decisions
        #: (the shadow scorer, runtime/serving/shadow.py)
        self.on_decided: Callable[[list[AuditItem], list[pb.DecisionResponse]], None] | None = None
        #: METRICS HOOK (the observability work's Prometheus exporter plugs in here; until then
        #: GetModelInfo `records.*` is the export): `metrics_hook(name, labels, value)` for every
        #: counter increment: `uwrt_records_written_total` (records made durable, per writer),
        #: `uwrt_records_<count>_total` for each of `counts`. Called from the model thread, the
        #: writer thread and the event loop: it must be thread safe (a prometheus_client Counter is).
        self.metrics_hook: Callable[[str, str, float], None] | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        if self.metrics_hook is not None:
            self.metrics_hook(f"uwrt_records_{name}_total", f"writer={self.log.writer}", float(n))

    # ---------------------------------------------------------------- records

    def _head(self, kind: int, item: AuditItem, digest: bytes, raw: bytes | None, answered_ns: int,
              ctx: bytes) -> bytes:
        rid = item.req.request_id
        rid_b = rid.encode()
        trunc = len(rid_b) > STORED_ID_BYTES
        if trunc:
            rid_b = rid_b[:STORED_ID_BYTES].decode("utf-8", "ignore").encode()
        out = (_fv(2, kind) + _fv(3, item.rpc) + _fb(4, rid_b) + _fv(5, 1 if trunc else 0) + _fb(6, digest)
               + _fv(9, item.req.as_of.seconds) + _fv(10, item.recv_ns) + _fv(11, answered_ns) + ctx)
        if raw is not None and self.full:
            out += varint(7 << 3 | 2) + varint(len(raw)) + raw
        return out

    @staticmethod
    def _ctx(pipeline: Pipeline, profile: str, batch_id: int, batch_size: int) -> bytes:
        return (_fb(14, profile.encode()) + _fb(15, pipeline.encoder.name.encode())
                + _fb(16, pipeline.trees.name.encode()) + _fv(17, int(pipeline.degraded))
                + _fv(18, batch_id) + _fv(19, batch_size))

    def decision_body(self, kind: int, item: AuditItem, raw: bytes | None, resp_bytes: bytes, ctx: bytes,
                      extra: bytes = b"") -> bytes:
        return self._head(kind, item, item.digest, raw, time.time_ns(), ctx) + _fb(12, resp_bytes) + extra

    def error_body(self, item: AuditItem, e: BaseException, raw: bytes | None, ctx: bytes = b"") -> bytes:
        code, msg, fld = _status(e)
        err = pb.RequestError(code=code, message=msg[:1024], field=fld[:256]).SerializeToString()
        return self._head(rec.KIND_ERROR, item, item.digest, raw, time.time_ns(), ctx) + _fb(13, err)

    # ---------------------------------------------------------------- model thread

    def run_batch(self, pipeline: Pipeline, items: list[AuditItem], profile: str) -> Deferred:
        t_batch = time.perf_counter_ns()
        n = len(items)
        self.batch_id += 1
        ctx = self._ctx(pipeline, profile, self.batch_id, n)
        raws: list[bytes] = []
        for it in items:
            raw, it.digest = request_digest(it.req)
            raws.append(raw)
        claimable = [k for k, it in enumerate(items) if 0 < len(it.req.request_id.encode()) <= MAX_REQUEST_ID_BYTES]
        claims: dict[int, Any] = {}
        if self.index is not None and claimable:
            for k, c in zip(claimable, self.index.claim([(items[k].req.request_id, items[k].digest)
                                                          for k in claimable]), strict=True):
                claims[k] = c
        results: list[Any] = [None] * n
        bodies: list[bytes] = []
        body_pos: list[tuple[int, str, bytes]] = []   # (item position, "done" | "release" | "", response bytes)
        todo = [k for k in range(n) if k not in claims or claims[k].state == NEW]
        for k, c in claims.items():
            it = items[k]
            if c.state == DONE:
                resp = pb.DecisionResponse()
                resp.ParseFromString(c.response)
                resp.path = pb.REPLAY
                results[k] = resp
                self._count("replays")
                bodies.append(self.decision_body(rec.KIND_REPLAY, it, raws[k], resp.SerializeToString(), ctx,
                                                 _fb(20, c.writer.encode()) + _fv(21, c.seq)))
                body_pos.append((k, "", b""))
            elif c.state == CONFLICT:
                self._count("conflicts")
                results[k] = AlreadyDecided(
                    f"request_id {it.req.request_id!r} was already used for a different request (stored digest "
                    f"{c.digest.hex()[:16]}, this one {it.digest.hex()[:16]}); use a new request id")
                bodies.append(self.error_body(it, results[k], raws[k], ctx))
                body_pos.append((k, "", b""))
            elif c.state == PENDING:
                results[k] = WaitForClaim(it.req.request_id, it.digest, c.owner)
        claimed = {k for k in todo if k in claims}
        if todo:
            try:
                decided = pipeline.decide([items[k].req for k in todo], StageTimes())
            except BaseException:
                if self.index is not None and claimed:
                    self.index.complete((), [items[k].req.request_id for k in claimed])
                raise
            for k, res in zip(todo, decided, strict=True):
                it = items[k]
                if isinstance(res, InvalidRequest):
                    results[k] = res
                    bodies.append(self.error_body(it, res, raws[k], ctx))
                    body_pos.append((k, "release" if k in claimed else "", b""))
                    continue
                tm = res.timing
                tm.queue_us = max(0, t_batch - it.t0_ns) // 1000
                tm.total_us = (time.perf_counter_ns() - it.t0_ns) // 1000
                results[k] = res
                rb = res.SerializeToString()
                bodies.append(self.decision_body(rec.KIND_DECISION, it, raws[k], rb, ctx))
                body_pos.append((k, "done" if k in claimed else "", rb))
        fut: concurrent.futures.Future = concurrent.futures.Future()
        writer = self.log.writer

        def then(first: int | BaseException) -> None:          # the writer thread
            if isinstance(first, BaseException):
                if self.index is not None and claimed:
                    try:
                        self.index.complete((), [items[k].req.request_id for k in claimed])
                    except Exception:  # noqa: BLE001
                        log.exception("idempotency index: releasing claims failed")
                fut.set_exception(first)
                return
            try:
                if self.index is not None:
                    done, release = [], []
                    for j, (k, what, rb) in enumerate(body_pos):
                        if what == "done":
                            it = items[k]
                            done.append((it.req.request_id, it.digest, rb, writer, first + j))
                        elif what == "release":
                            release.append(items[k].req.request_id)
                    self.index.complete(done, release, (writer, first + len(bodies) - 1) if bodies else None)
            except BaseException as e:  # noqa: BLE001 - the records are durable; the index lags (catch_up repairs)
                log.exception("idempotency index update failed")
                fut.set_exception(e)
                return
            fut.set_result(results)
            if self.metrics_hook is not None:
                self.metrics_hook("uwrt_records_written_total", f"writer={writer}", float(len(bodies)))
            if self.on_decided is not None:
                dec = [(items[k], results[k]) for k, _, rb in body_pos if rb]
                if dec:
                    self.on_decided([d[0] for d in dec], [d[1] for d in dec])

        if bodies:
            self.log.submit(bodies, then)
        else:
            fut.set_result(results)
        return Deferred(fut)

    # ---------------------------------------------------------------- event loop

    def _durable(self, bodies: list[bytes]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        f = loop.create_future()

        def then(x: int | BaseException) -> None:
            if self.metrics_hook is not None and isinstance(x, int):
                self.metrics_hook("uwrt_records_written_total", f"writer={self.log.writer}", float(len(bodies)))

            def settle() -> None:
                if not f.done():
                    f.set_result(x)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                pass

        self.log.submit(bodies, then)
        return f

    def item_digest(self, item: AuditItem) -> bytes | None:
        """The canonical bytes (or None when the request is too big to store or hash here)."""
        if item.req.ByteSize() > self.cfg.max_request_bytes:
            return None
        raw, item.digest = request_digest(item.req)
        return raw

    def record_error(self, item: AuditItem, e: BaseException) -> asyncio.Future:
        """Record an error the request got outside a batch; the future resolves once it is
        durable (its value is the record's seq, or the exception that kept it from the log)."""
        raw = self.item_digest(item)
        body = self.error_body(item, e, raw)
        if raw is None:
            body += _fb(8, _bounded_prefix(item.req))
        self._count("errors_recorded")
        return self._durable([body])

    async def record_replay(self, item: AuditItem, resp: pb.DecisionResponse, writer: str, seq: int) -> None:
        raw = self.item_digest(item)
        await self._durable([self.decision_body(rec.KIND_REPLAY, item, raw, resp.SerializeToString(), b"",
                                                _fb(20, writer.encode()) + _fv(21, seq))])

    def record_undecodable(self, raw: bytes, e: BaseException, rpc: int) -> asyncio.Future:
        """For handlers that parse raw bytes themselves (hook for the srvharden work): a request
        that could not be decoded, stored as the SHA-256 of its bytes and their first 256."""
        item = AuditItem(pb.DecisionRequest(), time.perf_counter_ns(), time.time_ns(), rpc,
                         hashlib.sha256(raw).digest())
        return self._durable([self.error_body(item, e, None) + _fb(8, raw[:PREFIX_BYTES])])

    async def wait_claim(self, item: AuditItem, w: WaitForClaim, time_remaining_s: float | None
                         ) -> pb.DecisionResponse | None:
        """Wait until the request deciding this id is done. Returns the stored decision as a
        replay (recorded), None when the claim was released (decide it now), raises
        AlreadyDecided or ClaimBusy."""
        assert self.index is not None
        self._count("waits")
        loop = asyncio.get_running_loop()
        budget = self.cfg.idempotency_wait_s if time_remaining_s is None else min(self.cfg.idempotency_wait_s,
                                                                                  max(0.0, time_remaining_s - 0.002))
        end = loop.time() + budget
        pause = 0.002
        while True:
            c = await loop.run_in_executor(self.idem_executor, self.index.lookup, w.request_id)
            if c is None:
                return None
            if c.digest != w.digest:
                e = AlreadyDecided(f"request_id {w.request_id!r} was already used for a different request; use a "
                                   f"new request id")
                await self.record_error(item, e)
                raise e
            if c.state == DONE:
                resp = pb.DecisionResponse()
                resp.ParseFromString(c.response)
                resp.path = pb.REPLAY
                self._count("replays")
                await self.record_replay(item, resp, c.writer, c.seq)
                return resp
            if loop.time() + pause > end:
                self._count("wait_timeouts")
                e2 = ClaimBusy(f"request_id {w.request_id!r} is being decided by another request ({w.owner}) that "
                               f"has not finished; retry")
                await self.record_error(item, e2)
                raise e2
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def stats(self) -> dict[str, object]:
        s = self.log.stats
        out: dict[str, object] = {"dir": self.log.root, "writer": self.log.writer, "durability": self.log.durability,
                                  "records": s.records, "writes": s.writes, "fsyncs": s.fsyncs, "bytes": s.bytes,
                                  "mean_fsync_us": round(s.fsync_us / s.fsyncs) if s.fsyncs else 0,
                                  "max_fsync_us": s.max_fsync_us, "failures": s.failures,
                                  "segment": os.path.basename(self.log.segments.path),
                                  "recovered_truncated_bytes": self.log.recovery.truncated_bytes,
                                  "recovered_sealed": len(self.log.recovery.sealed),
                                  "corrupt_segments": len(self.log.recovery.corrupt)}
        out.update(self.counts)
        out["idempotency"] = "on" if self.index is not None else "off"
        return out

    def close(self) -> None:
        self.idem_executor.shutdown(wait=True)
        self.log.close()
        if self.index is not None:
            self.index.close()


def _bounded_prefix(req: pb.DecisionRequest) -> bytes:
    """The first bytes of an oversized request without serializing all of it: its id and purchase."""
    head = pb.DecisionRequest(request_id=req.request_id[:STORED_ID_BYTES])
    head.as_of.CopyFrom(req.as_of)
    head.purchase.CopyFrom(req.purchase)
    return head.SerializeToString()[:PREFIX_BYTES]


def open_audit(cfg: RuntimeConfig, writer_index: int, *, recover_all: bool) -> Audit | None:
    """The records of this process (None when records_dir is empty): recovers what a previous
    process left (every writer when `recover_all`, as a single server or before workers start;
    else this writer only), catches the index up from the log and drops dead claims."""
    if not cfg.records_dir:
        return None
    root = cfg.records_dir
    os.makedirs(root, exist_ok=True)
    index = None
    if cfg.idempotency_window_s > 0:
        index = IdempotencyIndex(index_path(root), window_s=cfg.idempotency_window_s,
                                 owner=f"w{writer_index}:{os.getpid()}")
    if recover_all:
        recover(root, index)
    dlog = DecisionLog(root, writer_index, durability=cfg.records_durability, interval_ms=cfg.records_interval_ms,
                       segment_bytes=cfg.records_segment_bytes, segment_s=cfg.records_segment_s)
    rep = recover(root, index, only=[writer_index], held={writer_index})
    r = dlog.recovery
    log.info("decision log %s writer w%d: seq continues at %d in segment %s%s%s", root, writer_index,
             dlog.segments.next_seq, os.path.basename(dlog.segments.path),
             f"; torn tail of {r.truncated_bytes} bytes truncated" if r.truncated_bytes else "",
             f"; {rep.indexed} decisions indexed from the log" if rep.indexed else "")
    dlog.start()
    return Audit(cfg, dlog, index)
