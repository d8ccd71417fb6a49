"""`uwrt serve`: the gRPC decision server (grpc.aio) with deadline-aware dynamic batching.

One process, one event loop, and where each batch runs (`batch_runner`):

    gRPC handlers (event loop) --enqueue--> Batcher (pure policy + callback driver, event loop)
        --batch--> Pipeline.decide in a 1-thread executor ("thread", default: torch/ORT/xgboost
                   release the GIL, so the loop keeps accepting while a batch computes, at two
                   thread wake-ups per batch), or inline on the loop's thread ("inline")

Per request the handlers do no more than: size check, enqueue (a future, no task), await it,
stamp the timing. DecideStream adds a done-callback per request (no task per message). After
warm-up the process freezes what is alive into the GC's permanent generation and, if configured,
sets the GC thresholds (`gc_after_warmup`, `gc_threshold`). Health (`grpc.health.v1`) is NOT_SERVING
until the bundle is loaded and every (batch size x token bucket) shape the batcher can form
has been run once; SERVING after. Reflection only with `reflection = true`. SIGTERM/SIGINT: health goes NOT_SERVING,
new RPCs are refused (UNAVAILABLE), queued and in-flight requests finish within `grace_s`,
then the process exits 0.

The port: `Server(..., reuse_port=False)` (one process, `workers = 1`) binds with SO_REUSEPORT
explicitly off, so an occupied port fails with `PortUnavailable` instead of silently sharing it.
A worker of `uwrt serve --workers N` (runtime/serving/worker_process.py) builds the server with
`reuse_port=True, bind=False`: it warms up first and binds in `start()`, so a (re)started worker
never receives a connection while cold; runtime/serving/supervisor.py owns the port meanwhile.

Errors map to status codes in one place (`_status_of`): uwrt.runtime.errors.UwrtError subclasses
carry their code; anything else is INTERNAL and logged with its traceback (rate-limited).

Hardening (README: Security): the Underwriting methods are registered with raw-bytes request
handlers (runtime/serving/wire.py), so an undecodable request is INVALID_ARGUMENT (in-band on a
DecideStream, which goes on) and the size check runs on the bytes before parsing; gRPC itself
refuses messages above max_request_bytes + headroom, and limits RPCs, streams, connections and
their age (runtime/serving/limits.py); TLS, mTLS and the per-caller auth interceptor are in
runtime/serving/security.py; a DecideStream holds at most `stream_max_pending` unanswered
requests (then it stops reading: flow control). Client errors are logged rate-limited
(runtime/serving/ratelog.py), never with a traceback.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sized
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from uwrt.runtime.config import RuntimeConfig, pow2_buckets
from uwrt.runtime.errors import InvalidRequest, UwrtError, echo
from uwrt.runtime.featurize import Limits
from uwrt.runtime.pb import admin_pb, pb, pb_grpc, rec
from uwrt.runtime.pipeline import Pipeline, StageTimes
from uwrt.runtime.serving import limits, security, wire
from uwrt.runtime.serving.admin import ADMIN_SERVICE_NAME, AdminService
from uwrt.runtime.serving.audit import Audit, AuditItem, ClaimBusy, WaitForClaim, open_audit
from uwrt.runtime.serving.batcher import Batcher, MonotonicClock, _Entry
from uwrt.runtime.serving.explain import ExplainService
from uwrt.runtime.serving.observe import Observer
from uwrt.runtime.serving.ports import PortUnavailable, format_address
from uwrt.runtime.serving.ratelog import RateLimitedLog
from uwrt.runtime.serving.reload import LocalReloader
from uwrt.runtime.serving.shadow import attach_shadow
from uwrt.runtime.serving.warmup import warmup_batches
from uwrt.runtime.serving.workers import worker_settings

log = logging.getLogger("uwrt.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Underwriting"]
SERVICE_NAME = SERVICE.full_name
#: client errors (undecodable / oversize requests, refused credentials) and internal errors
RATE_LOG = RateLimitedLog(log)


def json_value(v: object) -> str:
    """A GetModelInfo settings value as JSON text, so any language parses it the same way:
    `32`, `true`, `[8,32,128]`, `"cpu"` (strings quoted), `null`. numpy scalars become numbers;
    anything else JSON cannot hold is sent as its string."""
    def default(o: object) -> object:
        item = getattr(o, "item", None)            # numpy scalars
        return item() if callable(item) else str(o)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=default)


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, UwrtError):
        return e.code, str(e)
    RATE_LOG.log("internal", logging.ERROR, "internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


def _refused(method: str, context: grpc.aio.ServicerContext, e: Exception) -> None:
    """Log a request refused before it was parsed (rate-limited, no traceback)."""
    RATE_LOG.log("bad_request", logging.INFO, "%s from %s refused: %s", method, context.peer(), e)


def _denied(method: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    RATE_LOG.log("auth", logging.WARNING, "%s from %s: %s (%s)", method, context.peer(), code.name, message)


class ServingRuntime:
    """The pipeline behind a batcher. Created and used on the event loop's thread; the pipeline
    itself only ever runs on the single worker thread."""

    def __init__(self, pipeline: Pipeline, cfg: RuntimeConfig, *, profile: str = "cpu",
                 profile_reason: str = "") -> None:
        self.pipeline = pipeline
        self.cfg = cfg
        self.profile = profile
        self.profile_reason = profile_reason
        self.max_history = pipeline.encoder_config.max_history
        # the executor runs the warm-up (off the loop, so health answers meanwhile), and the batches
        # when batch_runner == "thread"
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uwrt-model")
        self.clock = MonotonicClock()
        self.batcher = Batcher(self._run_batch, cfg.batching, clock=self.clock,
                               executor=None if cfg.batch_runner == "inline" else self.executor,
                               tokens_of=self._tokens_of)
        self.batch_sizes: list[int] = []     # recent batch sizes, for tests and GetModelInfo
        #: extra GetModelInfo settings (the worker process and the supervisor's view of all workers)
        self.info_sources: list[Callable[[], Mapping[str, Any]]] = []
        self.gc_stats = _GcStats()
        self._gc_before: tuple[int, int, int] | None = None
        self.priority_ignored = 0            # requests with priority > 0 from callers without the role
        # observability (runtime/serving/observe.py: metrics, drift, tracing) and Explain
        self.obs = Observer(pipeline, cfg, self.batcher, tracing=_tracing(cfg))
        self.explain = ExplainService(pipeline, self.obs.cache, timeout_s=cfg.explain_timeout_s,
                                      max_queue=cfg.explain_max_queue, model_executor=self.executor)
        self.info_sources += [self.obs.info, self.explain.info]
        #: decision records and idempotency (runtime/serving/audit.py); None when records_dir is empty
        self.audit: Audit | None = None

    def _tokens_of(self, req: pb.DecisionRequest | AuditItem) -> int:
        if isinstance(req, AuditItem):
            req = req.req
        return max(1, min(len(req.history.type), self.max_history))

    def _run_batch(self, reqs: list) -> list:
        """Runs on the worker thread (or the loop's, inline)."""
        self.batch_sizes.append(len(reqs))
        if len(self.batch_sizes) > 2000:
            del self.batch_sizes[:-1000]
        if self.audit is not None:        # records + idempotency: results come once the records are durable
            return self.audit.run_batch(self.pipeline, reqs, self.profile)  # type: ignore[return-value]
        return self.pipeline.decide(reqs, StageTimes())

    async def start(self) -> None:
        """Start the batcher; then (after warm-up: everything long-lived now exists) freeze the
        heap out of the collector's reach and set the GC thresholds, as configured."""
        await self.batcher.start()
        self._gc_before = gc.get_threshold()
        if self.cfg.gc_after_warmup == "freeze":
            gc.collect()
            gc.freeze()
        if self.cfg.gc_threshold:
            gc.set_threshold(*self.cfg.gc_threshold)
        self.gc_stats.install()
        self.obs.install()          # after warm-up: warm-up batches are not observed
        log.info("gc after warm-up: %s, thresholds %s, %d objects frozen", self.cfg.gc_after_warmup,
                 gc.get_threshold(), gc.get_freeze_count())

    def warm_up(self, passes: int = 2, pipeline: Pipeline | None = None) -> list[tuple[int, int, float]]:
        """Run every batch shape the batcher can form (blocking; before reporting SERVING), on
        the serving pipeline or on `pipeline` (a hot reload's new one, runtime/serving/reload.py).

        Returns (batch size, tokens, microseconds) of the passes after the first (cold) one, to
        calibrate the batcher's cost model before the first real request. An encoder with its own
        `warmup` (the GPU path: CUDA-graph capture for every bucket) runs it first."""
        pipe = pipeline or self.pipeline
        max_history = pipe.encoder_config.max_history
        enc_warmup = getattr(pipe.encoder, "warmup", None)
        if callable(enc_warmup):
            t0 = time.perf_counter()
            enc_warmup()
            log.info("encoder %s warm-up in %.1fs", pipe.encoder.name, time.perf_counter() - t0)
        timings = []
        batches = list(warmup_batches(pipe.schema, max_history, self.cfg.batching))
        for p in range(passes):
            if p == 1:      # after the cold pass: time the tree paths per batch size on this machine
                t0 = time.perf_counter()
                pipe.calibrate_trees(batches, batch_sizes=pow2_buckets(self.cfg.batching.max_batch_size))
                log.info("tree stage %s calibrated in %.1fs: %s", pipe.trees.name, time.perf_counter() - t0,
                         pipe.tree_stats())
            for batch in batches:
                t0 = time.perf_counter_ns()
                res = pipe.decide(batch)
                us = (time.perf_counter_ns() - t0) / 1000
                bad = [r for r in res if isinstance(r, InvalidRequest)]
                if bad:
                    raise RuntimeError(f"warm-up request rejected: {bad[0]}")
                if p:
                    timings.append((len(batch), sum(max(1, min(len(r.history.type), max_history)) for r in batch),
                                    us))
        return timings

    def swap(self, pipeline: Pipeline, timings: list[tuple[int, int, float]]) -> Pipeline:
        """Serve `pipeline` from the next batch on (call on the event loop; the batch running now
        finishes on the old one, which is returned). `timings`: its warm-up, for the cost model."""
        old = self.pipeline
        self.pipeline = pipeline
        self.max_history = pipeline.encoder_config.max_history
        self.obs.swap(old, pipeline)          # metrics hook, bundle info and drift baseline of the new bundle
        self.explain.pipe = pipeline
        for n, tokens, us in timings:
            self.batcher.cost.observe(n, tokens, us)
        return old

    def enqueue(self, req: pb.DecisionRequest | AuditItem, time_remaining_s: float | None, *,
                size: int | None = None, priority_allowed: bool = True) -> _Entry:
        """Check the size (`size`: already checked on the raw bytes) and queue the request (raises
        at once when it is refused); the entry's future resolves to the pipeline's result.
        `finish` turns it into the response. `priority_allowed` False: served at priority 0."""
        msg = req.req if isinstance(req, AuditItem) else req
        if size is None and (size := msg.ByteSize()) > self.cfg.max_request_bytes:
            raise InvalidRequest("request", f"{size} bytes exceeds the limit of {self.cfg.max_request_bytes}")
        deadline_us = None if time_remaining_s is None else self.clock.now_us() + int(time_remaining_s * 1e6)
        priority = msg.priority
        if priority and not priority_allowed:
            priority = 0
            self.priority_ignored += 1
        return self.batcher.enqueue(req, priority=priority, deadline_us=deadline_us)

    @staticmethod
    def finish(result: object, queue_us: int, t0_ns: int) -> pb.DecisionResponse:
        """The response for a pipeline result (raises it when it is an error), timing stamped."""
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, pb.DecisionResponse)
        tm = result.timing
        tm.queue_us = queue_us
        tm.total_us = (time.perf_counter_ns() - t0_ns) // 1000
        return result

    async def decide(self, req: pb.DecisionRequest, *, time_remaining_s: float | None, size: int | None = None,
                     priority_allowed: bool = True, rpc: int = rec.RPC_DECIDE) -> pb.DecisionResponse:
        if self.audit is not None:
            return await self._decide_recorded(req, time_remaining_s, rpc, size=size,
                                               priority_allowed=priority_allowed)
        t0 = time.perf_counter_ns()
        entry = self.enqueue(req, time_remaining_s, size=size, priority_allowed=priority_allowed)
        try:
            result = await entry.future
        except asyncio.CancelledError:
            self.batcher.cancel(entry)
            raise
        return self.finish(result, entry.queue_us, t0)

    async def _decide_recorded(self, req: pb.DecisionRequest, time_remaining_s: float | None,
                               rpc: int, *, size: int | None = None,
                               priority_allowed: bool = True) -> pb.DecisionResponse:
        """`decide` with records on: every answer, error or decision, is recorded before it goes
        out; a request whose id another request is deciding waits for that one (runtime/serving/audit.py)."""
        audit = self.audit
        assert audit is not None
        item = AuditItem(req, time.perf_counter_ns(), time.time_ns(), rpc)
        end_s = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        for _ in range(3):
            left = None if end_s is None else end_s - time.monotonic()
            try:
                entry = self.enqueue(item, left, size=size, priority_allowed=priority_allowed)
            except Exception as e:
                await audit.record_error(item, e)
                raise
            try:
                result = await entry.future
            except asyncio.CancelledError:
                self.batcher.cancel(entry)
                audit.record_error(item, asyncio.CancelledError())
                raise
            except Exception as e:
                await audit.record_error(item, e)
                raise
            if isinstance(result, WaitForClaim):
                resp = await audit.wait_claim(item, result, None if end_s is None else end_s - time.monotonic())
                if resp is None:      # the other request's claim was released (it failed): decide this one
                    continue
                return resp
            if isinstance(result, BaseException):
                raise result          # recorded with its batch
            return result
        busy = ClaimBusy(f"request_id {req.request_id!r}: claims kept being released; retry")
        await audit.record_error(item, busy)
        raise busy

    def model_info(self, *, full: bool = True) -> pb.ModelInfo:
        """Everything (`full`), or only identity, profile, backends, max_history and degraded."""
        b = self.pipeline.bundle
        info = pb.ModelInfo(max_history=self.max_history, profile=self.profile,
                            encoder_backend=self.pipeline.encoder.name, tree_backend=self.pipeline.trees.name,
                            degraded=self.pipeline.degraded)
        info.model.CopyFrom(self.pipeline.identity)
        if not full:
            return info
        for f in b.schema.features:
            info.features.add(name=f.name, source=f.source, impute_value=f.impute_value, reason_code=f.reason_code)
        p = b.policy
        info.policy.CopyFrom(pb.PolicyInfo(version=p.version, approve_max_pd=p.approve_max_pd,
                                           counteroffer_max_pd=p.counteroffer_max_pd, review_max_pd=p.review_max_pd,
                                           counteroffer_amount_ratio=p.counteroffer_amount_ratio))
        settings: dict[str, object] = dict(self.cfg.flat())
        sections: tuple[tuple[str, Mapping[str, object]], ...] = (
            ("stats", self.batcher.stats()), ("encoder", self.pipeline.encoder_stats()),
            ("trees", self.pipeline.tree_stats()))
        for prefix, stats in sections:
            for k, v in stats.items():
                settings[f"{prefix}.{k}"] = v
        if self.audit is not None:
            for k, v in self.audit.stats().items():
                settings[f"records.{k}"] = v
        if self.profile_reason:
            settings["profile.reason"] = self.profile_reason
        settings["security.priority_ignored"] = self.priority_ignored
        for kind, n in RATE_LOG.counts().items():
            settings[f"security.logged.{kind}"] = n
        for source in self.info_sources:
            settings.update(source())
        info.settings.update({k: json_value(v) for k, v in settings.items()})   # every value is JSON text
        return info

    async def drain(self, grace_s: float) -> bool:
        """True when every queued and running request finished within grace_s."""
        ok = await self.batcher.drain(grace_s)
        self.executor.shutdown(wait=True)
        self.explain.shutdown()
        self.obs.close()
        self.gc_stats.uninstall()
        s = self.batcher.stats()
        log.info("gc while serving: %s (%d requests)", self.gc_stats.summary(), s["requests"])
        if self._gc_before is not None:       # leave the process's collector as it was (tests run many servers)
            gc.set_threshold(*self._gc_before)
            if self.cfg.gc_after_warmup == "freeze":
                gc.unfreeze()
        return ok


class _GcStats:
    """Collections per generation and the time they took, while serving (a gc callback)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.ns = [0, 0, 0]
        self._t0 = 0

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter_ns()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.ns[g] += time.perf_counter_ns() - self._t0

    def install(self) -> None:
        if self._cb not in gc.callbacks:
            gc.callbacks.append(self._cb)

    def uninstall(self) -> None:
        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)

    def summary(self) -> str:
        return " ".join(f"gen{g}={self.count[g]} ({self.ns[g] / 1e6:.1f} ms)" for g in range(3))


def _error_response(request_id: str, e: Exception) -> pb.DecisionResponse:
    """DecideStream's in-band error for a request (`request_id` "" when it did not parse; an
    over-long one is cut, runtime/errors.py echo)."""
    code, msg = _status_of(e)
    resp = pb.DecisionResponse(request_id=request_id if len(request_id) <= 128 else echo(request_id))
    resp.error.code, resp.error.message = code.name, msg
    if isinstance(e, InvalidRequest):
        resp.error.field = e.field
    return resp


class _Outbox:
    """A DecideStream's responses on their way to the client, with the stream's flow control:
    `put_nowait` a response (None ends the stream); the reader awaits `room()` after each message,
    which waits while `stream_max_pending` requests are read but not yet handed to the client
    (`pending`: the requests in flight, any sized collection, plus the responses queued here), so
    HTTP/2 flow control pushes back on a client that writes and never reads; `responses()` is the
    writer's side and lets the reader go on once there is room again."""

    __slots__ = ("q", "max_pending", "pending", "space")

    def __init__(self, max_pending: int, pending: Sized) -> None:
        self.q: asyncio.Queue = asyncio.Queue()
        self.max_pending = max_pending
        self.pending = pending
        self.space: asyncio.Event | None = None     # set by the writer when the waiting reader may go on

    def put_nowait(self, item: pb.DecisionResponse | None) -> None:
        self.q.put_nowait(item)

    def _full(self) -> bool:
        return len(self.pending) + self.q.qsize() >= self.max_pending

    async def room(self) -> None:
        if self._full():
            self.space = asyncio.Event()
            await self.space.wait()

    async def responses(self, read_task: asyncio.Task) -> AsyncIterator[pb.DecisionResponse]:
        """Every response until the end marker, then the reader's own end (its error, if any)."""
        while True:
            item = await self.q.get()
            if item is None:
                break
            if self.space is not None and not self._full():
                self.space.set()
                self.space = None
            yield item
        await read_task


class UnderwritingService(pb_grpc.UnderwritingServicer):
    """The Underwriting methods. Decide and DecideStream receive raw bytes (registered by
    runtime/serving/wire.py) and parse them here, size check first; GetModelInfo its message."""

    def __init__(self, rt: ServingRuntime) -> None:
        self.rt = rt
        self.max_bytes = rt.cfg.max_request_bytes

    async def _record_refused(self, data: bytes, e: InvalidRequest, rpc: int) -> None:
        """With records on, a request refused before it was parsed is recorded like every other
        answer: an oversize one (within the transport cap) parsed for its id and purchase, an
        undecodable one as an empty request."""
        audit = self.rt.audit
        if audit is None:
            return
        try:
            req = pb.DecisionRequest.FromString(data)
        except DecodeError:
            req = pb.DecisionRequest()
        await audit.record_error(AuditItem(req, time.perf_counter_ns(), time.time_ns(), rpc), e)

    async def Decide(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.DecisionResponse:
        t0 = time.perf_counter_ns()
        try:
            req = wire.parse(request, pb.DecisionRequest, self.max_bytes)
        except InvalidRequest as e:
            _refused("Decide", context, e)
            self.rt.obs.rpc_done("Decide", e.code.name, t0)
            await self._record_refused(request, e, rec.RPC_DECIDE)
            await context.abort(e.code, str(e))
        try:
            resp = await self.rt.decide(req, time_remaining_s=context.time_remaining(), size=len(request),
                                        priority_allowed=security.may_set_priority())
        except asyncio.CancelledError:
            self.rt.obs.rpc_done("Decide", "CANCELLED", t0)
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a crash
            code, msg = _status_of(e)
            self.rt.obs.rpc_done("Decide", code.name, t0)
            await context.abort(code, msg)
            raise AssertionError("unreachable: ServicerContext.abort raises") from e
        self.rt.obs.rpc_done("Decide", "OK", t0, resp, self.rt.obs.trace_parent(context))
        return resp

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        """The full TreeSHAP attribution, off the decision path (runtime/serving/explain.py)."""
        t0 = time.perf_counter_ns()
        try:
            resp = await self.rt.explain.explain(request, context.time_remaining())
        except asyncio.CancelledError:
            self.rt.obs.rpc_done("Explain", "CANCELLED", t0)
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a crash
            code, msg = _status_of(e)
            self.rt.obs.rpc_done("Explain", code.name, t0)
            await context.abort(code, msg)
            raise AssertionError("unreachable: ServicerContext.abort raises") from e
        self.rt.obs.rpc_done("Explain", "OK", t0)
        return resp

    async def DecideStream(self, request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecisionResponse]:
        """Each request is decided as soon as its batch completes; responses carry the request id
        and may come out of order. Per-request failures come back in-band in `error`; a message
        that is not a DecisionRequest too (with an empty request id), and the stream goes on.

        Per message: parse, enqueue and a done-callback on its future (no task per request);
        responses go through one queue to this generator. Flow control: once `stream_max_pending`
        requests are read but not yet handed to the client, the reader waits for the client to
        read (so HTTP/2 flow control pushes back on a client that writes and never reads). When
        the stream ends early (client gone), the requests still queued are removed (never run)."""
        rt = self.rt
        if rt.audit is not None:
            async for resp in self._stream_recorded(request_iterator, context):
                yield resp
            return
        live: dict[int, _Entry] = {}
        out = _Outbox(rt.cfg.transport.stream_max_pending, live)
        reading = True
        priority_allowed = security.may_set_priority()
        error_response = _error_response
        parent = rt.obs.trace_parent(context)

        def done(req: pb.DecisionRequest, entry: _Entry, t0: int, fut: asyncio.Future) -> None:
            live.pop(id(entry), None)
            if not fut.cancelled():
                exc = fut.exception()
                try:
                    resp = rt.finish(exc if exc is not None else fut.result(), entry.queue_us, t0)
                    rt.obs.rpc_done("DecideStream", "OK", t0, resp, parent)
                except Exception as e:  # noqa: BLE001 - in-band, never a broken stream
                    resp = error_response(req.request_id, e)
                    rt.obs.rpc_done("DecideStream", resp.error.code, t0)
                out.put_nowait(resp)
            if not reading and not live:
                out.put_nowait(None)

        async def reader() -> None:
            nonlocal reading
            try:
                async for data in request_iterator:
                    t0 = time.perf_counter_ns()
                    try:
                        req = wire.parse(data, pb.DecisionRequest, self.max_bytes)
                    except InvalidRequest as e:
                        _refused("DecideStream", context, e)
                        rt.obs.rpc_done("DecideStream", e.code.name, t0)
                        out.put_nowait(error_response("", e))
                    else:
                        try:
                            entry = rt.enqueue(req, context.time_remaining(), size=len(data),
                                               priority_allowed=priority_allowed)
                        except Exception as e:  # noqa: BLE001
                            resp = error_response(req.request_id, e)
                            rt.obs.rpc_done("DecideStream", resp.error.code, t0)
                            out.put_nowait(resp)
                        else:
                            live[id(entry)] = entry
                            entry.future.add_done_callback(functools.partial(done, req, entry, t0))
                    await out.room()
            finally:
                reading = False
                if not live:
                    out.put_nowait(None)

        read_task = asyncio.create_task(reader())
        try:
            async for item in out.responses(read_task):
                yield item
        finally:
            read_task.cancel()
            for entry in list(live.values()):
                rt.batcher.cancel(entry)

    async def _stream_recorded(self, request_iterator: AsyncIterator[bytes],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecisionResponse]:
        """DecideStream with records on: a task per message runs `decide` (records, idempotency,
        waiting for a claim), its response or in-band error goes to the stream when recorded.
        Undecodable messages and flow control (`stream_max_pending`) as without records."""
        rt = self.rt
        live: set[asyncio.Task] = set()
        out = _Outbox(rt.cfg.transport.stream_max_pending, live)
        reading = True
        priority_allowed = security.may_set_priority()
        parent = rt.obs.trace_parent(context)

        async def one(req: pb.DecisionRequest, size: int, t0: int) -> None:
            try:
                resp = await rt.decide(req, time_remaining_s=context.time_remaining(), size=size,
                                       priority_allowed=priority_allowed, rpc=rec.RPC_DECIDE_STREAM)
                rt.obs.rpc_done("DecideStream", "OK", t0, resp, parent)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - in-band, never a broken stream
                resp = _error_response(req.request_id, e)
                rt.obs.rpc_done("DecideStream", resp.error.code, t0)
            out.put_nowait(resp)

        async def refused(data: bytes, e: InvalidRequest, t0: int) -> None:
            rt.obs.rpc_done("DecideStream", e.code.name, t0)
            await self._record_refused(data, e, rec.RPC_DECIDE_STREAM)
            out.put_nowait(_error_response("", e))

        def done(task: asyncio.Task) -> None:
            live.discard(task)
            if not reading and not live:
                out.put_nowait(None)

        async def reader() -> None:
            nonlocal reading
            try:
                async for data in request_iterator:
                    t0 = time.perf_counter_ns()
                    try:
                        req = wire.parse(data, pb.DecisionRequest, self.max_bytes)
                    except InvalidRequest as e:
                        _refused("DecideStream", context, e)
                        task = asyncio.ensure_future(refused(data, e, t0))
                    else:
                        task = asyncio.ensure_future(one(req, len(data), t0))
                    live.add(task)
                    task.add_done_callback(done)
                    await out.room()
            finally:
                reading = False
                if not live:
                    out.put_nowait(None)

        read_task = asyncio.create_task(reader())
        try:
            async for item in out.responses(read_task):
                yield item
        finally:
            read_task.cancel()
            for task in list(live):
                task.cancel()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        t0 = time.perf_counter_ns()
        info = self.rt.model_info(full=security.may_introspect(self.rt.cfg.security))
        self.rt.obs.rpc_done("GetModelInfo", "OK", t0)
        return info


class Server:
    """A running decision server. `await start()`, then `await stop()` (or run `serve()`)."""

    def __init__(self, pipeline: Pipeline, cfg: RuntimeConfig, *, profile: str = "cpu",
                 profile_reason: str = "", reuse_port: bool = False, bind: bool = True, writer_index: int = 0,
                 recover_all: bool = True, bundle_path: str = "") -> None:
        """`reuse_port`: SO_REUSEPORT on the listener (only for the workers of one supervisor,
        which holds the port; off otherwise, so an occupied port fails). `bind`: bind cfg.host:cfg.port
        now (raises PortUnavailable); False = bind in start(), after the warm-up. With records_dir:
        this process writes decision records as writer `writer_index`, after recovering what a
        previous process left (every writer's directory when `recover_all`: a single server)."""
        self.cfg = cfg
        self.rt = ServingRuntime(pipeline, cfg, profile=profile, profile_reason=profile_reason)
        self.rt.audit = open_audit(cfg, writer_index, recover_all=recover_all)
        if self.rt.audit is not None:
            self.rt.obs.attach_audit(self.rt.audit)
        self.shadow = attach_shadow(self.rt, cfg, build_pipeline)     # the challenger (runtime/serving/shadow.py)
        if self.shadow is not None:
            self.rt.obs.attach_shadow(self.shadow)
        self.health = health.aio.HealthServicer()
        self.credentials = security.server_credentials(cfg.security)     # raises SecurityError
        self.interceptors = security.interceptors(cfg.security, on_denied=_denied)
        self.grpc = grpc.aio.server(interceptors=self.interceptors, **limits.server_kwargs(cfg, reuse_port=reuse_port))
        wire.add_service(self.grpc, UnderwritingService(self.rt), SERVICE, raw=("Decide", "DecideStream"),
                         on_undecodable=_refused)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        # hot reload (runtime/serving/reload.py): SIGHUP / Admin.Reload; a worker replaces
        # reload_fn with a request to its supervisor, which reloads every worker together
        self.reloader = LocalReloader(self.rt, bundle_path or cfg.bundle, build_pipeline)
        self.reload_fn: Callable[[str, str], Awaitable[Any]] = self.reloader.reload
        self.rt.obs.attach_reloader(self.reloader)
        self.rt.info_sources.append(lambda: {f"reload.{k}": v for k, v in self.reloader.stats().items()})
        services = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        if cfg.admin_enabled:      # raw-bytes handlers too (undecodable: INVALID_ARGUMENT); role "admin" with auth on
            wire.add_service(self.grpc, AdminService(lambda b, d: self.reload_fn(b, d)),
                             admin_pb.DESCRIPTOR.services_by_name["Admin"], on_undecodable=_refused)
            services.append(ADMIN_SERVICE_NAME)
        if cfg.security.reflection:
            reflection.enable_server_reflection(tuple(services), self.grpc)
        self.port: int = 0           # the bound port; 0 until bound
        self._warm = False
        self._stopped = asyncio.Event()
        if bind:
            self.bind()

    def bind(self) -> int:
        """Bind cfg.host:cfg.port (not yet listening: start() does). Raises PortUnavailable."""
        addr = format_address(self.cfg.host, self.cfg.port)
        why = ""
        try:
            self.port = (self.grpc.add_secure_port(addr, self.credentials) if self.credentials is not None
                         else self.grpc.add_insecure_port(addr))
        except RuntimeError as e:     # grpcio >= 1.5x raises "Failed to bind to address ..."; older ones return 0
            why = f" ({e})"
        if not self.port:
            raise PortUnavailable(f"cannot listen on {addr}: the address is in use or cannot be bound{why}. Stop "
                                  f"the other server or pick another --port (0 picks a free one)")
        return self.port

    async def _set_health(self, status) -> None:
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, status)

    async def warm_up(self) -> None:
        """Run every batch shape on the model thread and calibrate the batcher's cost model."""
        t0 = time.perf_counter()
        timings = await asyncio.get_running_loop().run_in_executor(self.rt.executor, self.rt.warm_up)
        for n, tokens, us in timings:          # calibrate deadline predictions on this machine
            self.rt.batcher.cost.observe(n, tokens, us)
        self._warm = True
        log.info("warm-up: %d batch shapes in %.1fs; cost model %r", len(timings), time.perf_counter() - t0,
                 self.rt.batcher.cost)

    async def start(self, *, warm: bool = True) -> None:
        """Start listening (NOT_SERVING), warm every shape, start the batcher, then report SERVING.
        Not bound yet (bind=False): warm first, then bind and listen (raises PortUnavailable)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        late = not self.port
        if late and warm and not self._warm:
            await self.warm_up()
        if late:
            self.bind()
        await self.grpc.start()
        log.info("listening on %s (%s)", format_address(self.cfg.host, self.port),
                 "warm" if self._warm or not warm else "NOT_SERVING until warm")
        if warm and not self._warm:
            await self.warm_up()
        await self.rt.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING bundle %s (%s); profile %s, encoder %s, trees %s%s", self.rt.pipeline.identity.bundle_id,
                 self.rt.pipeline.identity.bundle_digest[:12], self.rt.profile, self.rt.pipeline.encoder.name,
                 self.rt.pipeline.trees.name, " (DEGRADED)" if self.rt.pipeline.degraded else "")

    async def stop(self, grace_s: float | None = None, *, drain_delay_s: float | None = None) -> bool:
        """Graceful, in this order:

        1. health NOT_SERVING (every service), so balancers and health-checking clients stop
           sending here;
        2. keep serving for `drain_delay_s` (knob), the time a balancer needs to notice step 1;
        3. the batcher stops waiting for company (every queued request runs as soon as it can)
           but keeps accepting: calls gRPC has already accepted are decided, never refused;
        4. gRPC refuses new RPCs (UNAVAILABLE) and waits up to `grace_s` for the accepted ones;
        5. the batcher closes (anything still queued or running then is failed).

        True when every accepted request finished within the grace period."""
        grace = self.cfg.grace_s if grace_s is None else grace_s
        delay = self.cfg.drain_delay_s if drain_delay_s is None else drain_delay_s
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            log.info("shutting down: NOT_SERVING; still serving for %.1fs (drain_delay_s) while balancers notice",
                     delay)
            await asyncio.sleep(delay)
        log.info("shutting down: refusing new RPCs, draining for up to %.1fs", grace)
        t0 = time.monotonic()
        batcher = self.rt.batcher
        cancelled = batcher.stats()["cancelled"]
        batcher.flush()
        await self.grpc.stop(grace)      # cancels the handlers still running when grace runs out
        cut = batcher.stats()["cancelled"] > cancelled and time.monotonic() - t0 >= grace
        ok = await self.rt.drain(max(0.0, grace - (time.monotonic() - t0))) and not cut
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.close)
        if self.rt.audit is not None:       # every answer recorded: seal the open segment
            await asyncio.to_thread(self.rt.audit.close)
        RATE_LOG.flush()
        log.log(logging.INFO if ok else logging.ERROR, "stopped after %.2fs%s", time.monotonic() - t0,
                "" if ok else ": requests still queued or running after the grace period were failed")
        self._stopped.set()
        return ok

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(pipeline: Pipeline, cfg: RuntimeConfig, *, profile: str = "cpu", profile_reason: str = "",
                pinned_cpu: int | None = None, bundle_path: str = "") -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a clean drain, 6 when requests were
    still queued or running when grace_s ran out). One process on an
    exclusive port (raises PortUnavailable when it is taken); `pinned_cpu` is reported in GetModelInfo."""
    server = Server(pipeline, cfg, profile=profile, profile_reason=profile_reason, bundle_path=bundle_path)
    server.rt.info_sources.append(lambda: worker_settings(index=0, count=1, cpu=pinned_cpu))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Future] = set()

    def on_hup() -> None:         # hot reload of the configured bundle path (runtime/serving/reload.py)
        log.info("SIGHUP: reloading %s", server.reloader.default_bundle)
        f = asyncio.ensure_future(server.reloader.reload())
        reloads.add(f)
        f.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    http = None
    if cfg.metrics_port:      # /metrics from its own thread (runtime/serving/metrics.py)
        from uwrt.runtime.serving.metrics import single_process_endpoint
        http = single_process_endpoint(cfg.metrics_host or cfg.host, cfg.metrics_port)
    try:
        await server.start()
        print(f"uwrt serving on {cfg.host}:{server.port}", flush=True)
        await stop.wait()
        return 0 if await server.stop() else 6
    finally:
        if http is not None:
            http.shutdown()


def _tracing(cfg: RuntimeConfig):
    """The process's Tracing when trace_sample_ratio > 0 (raises TracingUnavailable when its exporter
    cannot be built); None otherwise: no OpenTelemetry import, no per-request work."""
    if cfg.trace_sample_ratio <= 0:
        return None
    from uwrt.runtime.serving.tracing import Tracing, build_exporter
    return Tracing(cfg.trace_sample_ratio, build_exporter(cfg.trace_exporter))


def build_pipeline(cfg: RuntimeConfig, bundle_dir: str) -> Pipeline:
    cfg.apply_threads()
    return Pipeline.from_dir(bundle_dir, limits=Limits(cfg.max_request_events), tree_threads=cfg.tree_threads,
                             config=cfg)
