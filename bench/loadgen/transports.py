"""Transports of the Python engine: how one request goes out over grpc.aio, and the small RPCs
the generator makes around a step (GetModelInfo for batch counters, a reachability probe).

A transport has `start()`, `call(payload, request_id, timeout_s) -> (status name, timing)` and
`close()`. `UnaryTransport` makes one unary RPC per request, round robin over a few channels,
each its own TCP connection (`open_channels`; a server of several processes sharing a port with
SO_REUSEPORT is balanced by the kernel per connection, not per request); payloads are
pre-serialized (no serialization on the send path). `StreamTransport` sends over one long-lived
DecideStream and matches responses to requests by id. `timing` is the response's server-side
(queue, featurize, encode, trees, policy, total) microseconds plus an adverse-outcome flag, or
None where the RPC has none (health, info) or the request failed.

Thread safety: a transport belongs to one event loop.
"""
from __future__ import annotations

import asyncio

import grpc

DECIDE = "/uwrt.v1.Underwriting/Decide"
DECIDE_STREAM = "/uwrt.v1.Underwriting/DecideStream"
INFO = "/uwrt.v1.Underwriting/GetModelInfo"
HEALTH = "/grpc.health.v1.Health/Check"
METHODS = {"decide": DECIDE, "stream": DECIDE_STREAM, "info": INFO, "health": HEALTH}
ADVERSE_OUTCOMES = (2, 3)   # pb.DECLINE, pb.COUNTEROFFER (checked against the stubs in tests)

__all__ = ["ADVERSE_OUTCOMES", "METHODS", "UnaryTransport", "StreamTransport", "open_channels", "info",
           "batch_counts", "probe"]


def _timing_of(resp) -> tuple:
    t = resp.timing
    return (t.queue_us, t.featurize_us, t.encode_us, t.trees_us, t.policy_us, t.total_us,
            resp.outcome in ADVERSE_OUTCOMES)


class UnaryTransport:
    """One unary RPC per request (payloads are pre-serialized), round robin over the given
    grpc.aio channels (one TCP connection each: see `open_channels`)."""

    def __init__(self, channel: grpc.aio.Channel | list[grpc.aio.Channel], rpc: str, metadata: tuple = ()) -> None:
        from grpc_health.v1 import health_pb2

        from uwrt.runtime.pb import pb
        method, resp_type = {"decide": (DECIDE, pb.DecisionResponse), "info": (INFO, pb.ModelInfo),
                             "health": (HEALTH, health_pb2.HealthCheckResponse)}[rpc]
        self.decide = rpc == "decide"
        self.metadata = metadata or None
        channels = channel if isinstance(channel, list) else [channel]
        self.stubs = [ch.unary_unary(method, request_serializer=None, response_deserializer=resp_type.FromString)
                      for ch in channels]
        self.k = 0

    async def start(self) -> None:
        pass

    async def call(self, payload: bytes, rid: str, timeout_s: float) -> tuple[str, tuple | None]:
        stub = self.stubs[self.k % len(self.stubs)]
        self.k += 1
        try:
            resp = await stub(payload, timeout=timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            return e.code().name, None
        return "OK", (_timing_of(resp) if self.decide else None)

    async def close(self) -> None:
        pass


class StreamTransport:
    """One long-lived DecideStream: a writer task sends queued payloads in order; a reader task
    matches responses to requests by request id. A request unanswered within its timeout counts
    as CLIENT_TIMEOUT; an in-band error counts under its status name."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple = ()) -> None:
        from uwrt.runtime.pb import pb
        self.stub = channel.stream_stream(DECIDE_STREAM, request_serializer=None,
                                          response_deserializer=pb.DecisionResponse.FromString)
        self.metadata = metadata or None
        self.waiting: dict[str, asyncio.Future] = {}
        self.outq: asyncio.Queue = asyncio.Queue()
        self.call_obj = None
        self.tasks: list[asyncio.Task] = []
        self.broken: str | None = None

    async def start(self) -> None:
        self.call_obj = self.stub(metadata=self.metadata)
        self.tasks = [asyncio.create_task(self._writer()), asyncio.create_task(self._reader())]

    async def _writer(self) -> None:
        while True:
            payload = await self.outq.get()
            if payload is None:
                await self.call_obj.done_writing()
                return
            await self.call_obj.write(payload)

    async def _reader(self) -> None:
        try:
            async for resp in self.call_obj:
                fut = self.waiting.pop(resp.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except grpc.aio.AioRpcError as e:
            self.broken = e.code().name
        finally:
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_result(None)

    async def call(self, payload: bytes, rid: str, timeout_s: float) -> tuple[str, tuple | None]:
        if self.broken:
            return self.broken, None
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        self.outq.put_nowait(payload)
        try:
            resp = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            self.waiting.pop(rid, None)
            return "CLIENT_TIMEOUT", None
        if resp is None:
            return self.broken or "STREAM_CLOSED", None
        if resp.HasField("error"):
            return resp.error.code or "UNKNOWN", None
        return "OK", _timing_of(resp)

    async def close(self) -> None:
        self.outq.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5.0)
        except TimeoutError:
            self.call_obj.cancel()



def open_channels(target: str, n: int) -> list[grpc.aio.Channel]:
    """n grpc.aio channels to `target`, each on its own TCP connection: grpc shares one
    connection between channels of equal target and arguments (its global subchannel pool), so
    every channel gets a local pool."""
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Around a step


async def info(channel: grpc.aio.Channel, metadata: tuple = ()) -> dict | None:
    """GetModelInfo settings, or None when the server has no such RPC (e.g. a peer framework)."""
    from uwrt.runtime.pb import pb
    stub = channel.unary_unary(INFO, request_serializer=pb.GetModelInfoRequest.SerializeToString,
                               response_deserializer=pb.ModelInfo.FromString)
    try:
        return dict((await stub(pb.GetModelInfoRequest(), timeout=5.0, metadata=metadata or None)).settings)
    except grpc.aio.AioRpcError:
        return None


def batch_counts(settings: dict | None) -> tuple[int, int] | None:
    """(requests, batches) from GetModelInfo's `stats.*` settings, None when absent. A uwrt
    server gives them only in the full GetModelInfo: started with `--model-info-exposure full`,
    or to a caller whose token (`--metadata`) has the role "introspect"."""
    if not settings or "stats.requests" not in settings or "stats.batches" not in settings:
        return None
    return int(float(settings["stats.requests"])), int(float(settings["stats.batches"]))


async def probe(target: str, metadata: tuple, timeout_s: float = 10.0) -> dict | None:
    """Wait until `target` accepts a channel (ConnectionError after timeout_s); its settings."""
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout_s)
        except TimeoutError:
            raise ConnectionError(f"cannot reach a server at {target} within {timeout_s:g}s") from None
        return await info(ch, metadata)
