"""Shared fixtures for the load generator's tests: grpc.aio servers (the echo server, or a
subclass that fails or stalls on purpose) on their own event loop in a background thread, bound
to port 0 (never a fixed port: gRPC sets SO_REUSEPORT, so two servers could share one)."""
from __future__ import annotations

import asyncio
import threading

import pytest


class LoopThread:
    """An event loop running in a daemon thread; `run(coro)` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server-loop")
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class EchoThread:
    """A uwrt.bench.echo_server (or a subclass's service) serving from a LoopThread."""

    def __init__(self, service=None) -> None:
        from uwrt.bench.echo_server import start_server
        self.lt = LoopThread()
        self.server, self.port, self.service = self.lt.run(start_server(service))
        self.target = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.lt.run(self.server.stop(0.5))
        self.lt.close()


@pytest.fixture
def echo_factory():
    """echo_factory(service=None) -> a started EchoThread; all are stopped after the test."""
    made: list[EchoThread] = []

    def make(service=None) -> EchoThread:
        made.append(EchoThread(service))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture(scope="module")
def echo_server():
    e = EchoThread()
    yield e
    e.close()


@pytest.fixture
def own_traffic(traffic):
    """Private copies of the session's 300 generator requests: a RequestSource (and the native
    engine's body encoder) rewrites request ids in place, which must not leak into other tests
    that share the session fixture."""
    out = []
    for r in traffic:
        c = type(r)()
        c.CopyFrom(r)
        out.append(c)
    return out
