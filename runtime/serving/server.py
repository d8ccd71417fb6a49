"""`uwrt serve`: the gRPC decision server (grpc.aio) with deadline-aware dynamic batching.

One process, one event loop, one model worker thread:

    gRPC handlers (event loop) --submit--> Batcher (pure policy + async driver, event loop)
        --batch--> Pipeline.decide in a 1-thread executor (torch and xgboost release the GIL)

so the loop keeps accepting while a batch computes. Health (`grpc.health.v1`) is NOT_SERVING
until the bundle is loaded and every (batch size x token bucket) shape the batcher can form
has been run once; SERVING after. Reflection is on. SIGTERM/SIGINT: health goes NOT_SERVING,
new RPCs are refused (UNAVAILABLE), queued and in-flight requests finish within `grace_s`,
then the process exits 0.

Errors map to status codes in one place (`_status_of`): uwrt.runtime.errors.UwrtError subclasses
carry their code; anything else is INTERNAL and logged with its traceback.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from uwrt.runtime.config import RuntimeConfig, pow2_buckets
from uwrt.runtime.errors import InvalidRequest, UwrtError
from uwrt.runtime.featurize import Limits
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.pipeline import Pipeline, StageTimes
from uwrt.runtime.serving.batcher import Batcher, MonotonicClock
from uwrt.runtime.serving.warmup import warmup_batches

log = logging.getLogger("uwrt.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Underwriting"].full_name
MAX_GRPC_MESSAGE_BYTES = 64 << 20    # transport cap; our own max_request_bytes check is stricter and names the field


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
    log.exception("internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


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
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uwrt-model")
        self.clock = MonotonicClock()
        self.batcher = Batcher(self._run_batch, cfg.batching, clock=self.clock, executor=self.executor,
                               tokens_of=self._tokens_of)
        self.batch_sizes: list[int] = []     # recent batch sizes, for tests and GetModelInfo

    def _tokens_of(self, req: pb.DecisionRequest) -> int:
        return max(1, min(len(req.history.type), self.max_history))

    def _run_batch(self, reqs: list[pb.DecisionRequest]) -> list:
        """Runs on the worker thread."""
        self.batch_sizes.append(len(reqs))
        del self.batch_sizes[:-1000]
        return self.pipeline.decide(reqs, StageTimes())

    async def start(self) -> None:
        await self.batcher.start()

    def warm_up(self, passes: int = 2) -> list[tuple[int, int, float]]:
        """Run every batch shape the batcher can form (blocking; before reporting SERVING).

        Returns (batch size, tokens, microseconds) of the passes after the first (cold) one, to
        calibrate the batcher's cost model before the first real request. An encoder with its own
        `warmup` (the GPU path: CUDA-graph capture for every bucket) runs it first."""
        enc_warmup = getattr(self.pipeline.encoder, "warmup", None)
        if callable(enc_warmup):
            t0 = time.perf_counter()
            enc_warmup()
            log.info("encoder %s warm-up in %.1fs", self.pipeline.encoder.name, time.perf_counter() - t0)
        timings = []
        batches = list(warmup_batches(self.pipeline.schema, self.max_history, self.cfg.batching))
        for p in range(passes):
            if p == 1:      # after the cold pass: time the tree paths per batch size on this machine
                t0 = time.perf_counter()
                self.pipeline.calibrate_trees(batches, batch_sizes=pow2_buckets(self.cfg.batching.max_batch_size))
                log.info("tree stage %s calibrated in %.1fs: %s", self.pipeline.trees.name, time.perf_counter() - t0,
                         self.pipeline.tree_stats())
            for batch in batches:
                t0 = time.perf_counter_ns()
                res = self.pipeline.decide(batch)
                us = (time.perf_counter_ns() - t0) / 1000
                bad = [r for r in res if isinstance(r, InvalidRequest)]
                if bad:
                    raise RuntimeError(f"warm-up request rejected: {bad[0]}")
                if p:
                    timings.append((len(batch), sum(self._tokens_of(r) for r in batch), us))
        return timings

    async def decide(self, req: pb.DecisionRequest, *, time_remaining_s: float | None) -> pb.DecisionResponse:
        t0 = time.perf_counter_ns()
        size = req.ByteSize()
        if size > self.cfg.max_request_bytes:
            raise InvalidRequest("request", f"{size} bytes exceeds the limit of {self.cfg.max_request_bytes}")
        deadline_us = None if time_remaining_s is None else self.clock.now_us() + int(time_remaining_s * 1e6)
        result, queue_us = await self.batcher.submit(req, priority=req.priority, deadline_us=deadline_us)
        if isinstance(result, BaseException):
            raise result
        result.timing.queue_us = queue_us
        result.timing.total_us = (time.perf_counter_ns() - t0) // 1000
        return result

    def model_info(self) -> pb.ModelInfo:
        b = self.pipeline.bundle
        info = pb.ModelInfo(max_history=self.max_history, profile=self.profile,
                            encoder_backend=self.pipeline.encoder.name, tree_backend=self.pipeline.trees.name,
                            degraded=self.pipeline.degraded)
        info.model.CopyFrom(self.pipeline.identity)
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
        if self.profile_reason:
            settings["profile.reason"] = self.profile_reason
        info.settings.update({k: json_value(v) for k, v in settings.items()})   # every value is JSON text
        return info

    async def drain(self, grace_s: float) -> None:
        await self.batcher.drain(grace_s)
        self.executor.shutdown(wait=True)


class UnderwritingService(pb_grpc.UnderwritingServicer):
    def __init__(self, rt: ServingRuntime) -> None:
        self.rt = rt

    async def Decide(self, request: pb.DecisionRequest, context: grpc.aio.ServicerContext) -> pb.DecisionResponse:
        try:
            return await self.rt.decide(request, time_remaining_s=context.time_remaining())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status, never a crash
            code, msg = _status_of(e)
            await context.abort(code, msg)
            raise AssertionError("unreachable: ServicerContext.abort raises") from e

    async def DecideStream(self, request_iterator: AsyncIterator[pb.DecisionRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecisionResponse]:
        """Each request is decided as soon as its batch completes; responses carry the request id
        and may come out of order. Per-request failures come back in-band in `error`."""
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(req: pb.DecisionRequest) -> None:
            try:
                resp = await self.rt.decide(req, time_remaining_s=context.time_remaining())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                code, msg = _status_of(e)
                resp = pb.DecisionResponse(request_id=req.request_id)
                resp.error.code, resp.error.message = code.name, msg
                if isinstance(e, InvalidRequest):
                    resp.error.field = e.field
            await out.put(resp)

        async def reader() -> None:
            async for req in request_iterator:
                t = asyncio.create_task(one(req))
                pending.add(t)
                t.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
            await out.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
            await read_task
        finally:
            read_task.cancel()
            for t in list(pending):
                t.cancel()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.rt.model_info()


class Server:
    """A running decision server. `await start()`, then `await stop()` (or run `serve()`)."""

    def __init__(self, pipeline: Pipeline, cfg: RuntimeConfig, *, profile: str = "cpu",
                 profile_reason: str = "") -> None:
        self.cfg = cfg
        self.rt = ServingRuntime(pipeline, cfg, profile=profile, profile_reason=profile_reason)
        self.health = health.aio.HealthServicer()
        opts = [("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES)]
        self.grpc = grpc.aio.server(options=opts)
        pb_grpc.add_UnderwritingServicer_to_server(UnderwritingService(self.rt), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {cfg.host}:{cfg.port}")
        self._stopped = asyncio.Event()

    async def _set_health(self, status) -> None:
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, status)

    async def start(self, *, warm: bool = True) -> None:
        """Start listening (NOT_SERVING), warm every shape, start the batcher, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d (NOT_SERVING until warm)", self.cfg.host, self.port)
        if warm:
            t0 = time.perf_counter()
            timings = await asyncio.get_running_loop().run_in_executor(self.rt.executor, self.rt.warm_up)
            for n, tokens, us in timings:          # calibrate deadline predictions on this machine
                self.rt.batcher.cost.observe(n, tokens, us)
            log.info("warm-up: %d batch shapes in %.1fs; cost model %r", len(timings), time.perf_counter() - t0,
                     self.rt.batcher.cost)
        await self.rt.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING bundle %s (%s); profile %s, encoder %s, trees %s%s", self.rt.pipeline.identity.bundle_id,
                 self.rt.pipeline.identity.bundle_digest[:12], self.rt.profile, self.rt.pipeline.encoder.name,
                 self.rt.pipeline.trees.name, " (DEGRADED)" if self.rt.pipeline.degraded else "")

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, finish accepted ones within the grace period."""
        grace = self.cfg.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: draining for up to %.1fs", grace)
        t0 = time.monotonic()
        # grpc refuses new RPCs with UNAVAILABLE as soon as stop() begins; the handlers already
        # running keep awaiting the batcher, which finishes every queued request.
        stop_task = asyncio.create_task(self.grpc.stop(grace))
        await self.rt.drain(grace)
        await stop_task
        log.info("stopped after %.2fs", time.monotonic() - t0)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(pipeline: Pipeline, cfg: RuntimeConfig, *, profile: str = "cpu", profile_reason: str = "") -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    server = Server(pipeline, cfg, profile=profile, profile_reason=profile_reason)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"uwrt serving on {cfg.host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def build_pipeline(cfg: RuntimeConfig, bundle_dir: str) -> Pipeline:
    cfg.apply_threads()
    return Pipeline.from_dir(bundle_dir, limits=Limits(cfg.max_request_events), tree_threads=cfg.tree_threads,
                             config=cfg)
