"""Helpers for the scale-out tests: a background open-loop client that records every request's
final status and response, and response comparison that ignores only server-side timing."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import grpc
import pytest

from deploy.cluster import find_haproxy
from uwrt.runtime.pb import pb, pb_grpc

needs_haproxy = pytest.mark.skipif(find_haproxy() is None,
                                   reason="needs the Debian package haproxy (>= 2.6): `make ops-install`")


@dataclasses.dataclass
class Outcome:
    request_id: str
    t_sent: float
    t_done: float
    status: str                                 # "OK" or a grpc.StatusCode name
    response: pb.DecisionResponse | None
    details: str = ""


class Driver(threading.Thread):
    """Sends `requests` (each once, in order) at `rate_rps` (constant arrivals) on its own event loop
    and thread, through `make_channel()` (called on that loop), each with a `timeout_s` deadline.
    Everything it sent and has not yet answered is in `outstanding` (request id -> send time);
    `stop_sending` ends the schedule early (what was sent is still awaited)."""

    def __init__(self, make_channel, requests: list[pb.DecisionRequest], rate_rps: float, timeout_s: float = 10.0):
        super().__init__(daemon=True)
        self.make_channel, self.requests, self.rate, self.timeout_s = make_channel, requests, rate_rps, timeout_s
        self.lock = threading.Lock()
        self.outstanding: dict[str, float] = {}
        self.results: list[Outcome] = []
        self.started = threading.Event()
        self.stop_sending = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported by join_results
            self.error = e

    async def _one(self, stub, req: pb.DecisionRequest) -> None:
        t0 = time.monotonic()
        with self.lock:
            self.outstanding[req.request_id] = t0
        try:
            resp = await stub.Decide(req, timeout=self.timeout_s)
            out = Outcome(req.request_id, t0, time.monotonic(), "OK", resp)
        except grpc.aio.AioRpcError as e:
            out = Outcome(req.request_id, t0, time.monotonic(), e.code().name, None, e.details() or "")
        with self.lock:
            del self.outstanding[req.request_id]
            self.results.append(out)

    async def _main(self) -> None:
        async with self.make_channel() as ch:
            stub = pb_grpc.UnderwritingStub(ch)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks = []
            self.started.set()
            for i, req in enumerate(self.requests):
                if self.stop_sending.is_set():
                    break
                delay = t0 + i / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(stub, req)))
            await asyncio.gather(*tasks)

    def answered(self) -> int:
        with self.lock:
            return len(self.results)

    def outstanding_since(self, t: float) -> int:
        """Requests sent at or after monotonic time `t` and not answered yet."""
        with self.lock:
            return sum(1 for ts in self.outstanding.values() if ts >= t)

    def join_results(self, timeout_s: float) -> list[Outcome]:
        self.join(timeout_s)
        assert not self.is_alive(), f"client still running after {timeout_s}s"
        if self.error is not None:
            raise self.error
        return self.results


def comparable(resp: pb.DecisionResponse) -> bytes:
    """The response without its server-side timing, serialized deterministically."""
    r = pb.DecisionResponse()
    r.CopyFrom(resp)
    r.ClearField("timing")
    return r.SerializeToString(deterministic=True)


def decide_all(target: str, requests: list[pb.DecisionRequest], *, concurrent: bool,
               timeout_s: float = 30.0) -> list[pb.DecisionResponse]:
    """Decide `requests` on one server: all at once (they batch together) or one at a time."""
    async def main():
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.UnderwritingStub(ch)
            if concurrent:
                return await asyncio.gather(*(stub.Decide(r, timeout=timeout_s) for r in requests))
            return [await stub.Decide(r, timeout=timeout_s) for r in requests]
    return asyncio.run(main())


def wait_until(cond, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s}s"
        time.sleep(poll_s)


class FakeReplica:
    """A stand-in replica for balancer and client tests (no model): grpc.health.v1 plus a `Decide`
    that answers with its own name in `model.bundle_id` and counts calls. `fail_first` (a status)
    fails the first attempt of every request id -- first among all replicas sharing `seen` -- and
    `fail_always` every attempt; `hold` (an Event) makes Decide wait until it is set."""

    def __init__(self, name: str, seen: set[str] | None = None) -> None:
        from concurrent import futures

        from grpc_health.v1 import health, health_pb2_grpc

        self.name = name
        self.lock = threading.Lock()
        self.calls: list[str] = []                    # request ids, one per attempt received
        self.seen = set() if seen is None else seen   # request ids any replica sharing it has received
        self.fail_first: grpc.StatusCode | None = None
        self.fail_always: grpc.StatusCode | None = None
        self.hold: threading.Event | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        pb_grpc.add_UnderwritingServicer_to_server(_FakeService(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.set("SERVING")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, status: str) -> None:
        from grpc_health.v1 import health_pb2
        value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        for svc in ("", "uwrt.v1.Underwriting"):
            self.health.set(svc, value)

    def count(self) -> int:
        with self.lock:
            return len(self.calls)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


_SEEN_LOCK = threading.Lock()


class _FakeService(pb_grpc.UnderwritingServicer):
    def __init__(self, replica: FakeReplica) -> None:
        self.r = replica

    def Decide(self, request, context):
        r = self.r
        with _SEEN_LOCK:
            first = request.request_id not in r.seen
            r.seen.add(request.request_id)
        with r.lock:
            r.calls.append(request.request_id)
        if r.hold is not None:
            r.hold.wait(30)
        if r.fail_always is not None:
            context.abort(r.fail_always, f"{r.name}: always failing")
        if first and r.fail_first is not None:
            context.abort(r.fail_first, f"{r.name}: first attempt fails")
        resp = pb.DecisionResponse(request_id=request.request_id, outcome=pb.APPROVE)
        resp.model.bundle_id = r.name
        return resp


@pytest.fixture
def fakes():
    """Three FakeReplicas, stopped after the test."""
    seen: set[str] = set()
    made = [FakeReplica(f"f{i + 1}", seen) for i in range(3)]
    yield made
    for f in made:
        f.stop()
