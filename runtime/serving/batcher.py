"""The async driver around the pure batching policy (`uwrt.runtime.serving.batching.plan`).

    submit() --queue--> driver loop: plan(queue, clock.now_us()) --> expire / dispatch / sleep
                                      dispatch --> run_batch(items) on `executor` (one thread)

The loop re-plans on every arrival, cancellation, batch completion and wake-up (events that
arrive together are handled by one plan call), so the event loop keeps accepting requests while
a batch computes; one batch is in flight at a time. Expired requests are failed with
DeadlineExpired as soon as the policy says so, even while a batch runs. Every submitted request
ends in exactly one of: its result, DeadlineExpired, the exception run_batch raised, BatcherClosed
(drain timed out, or the loop itself failed), or the caller's cancellation.

Time comes only from the injected `Clock`, so tests drive the batcher with a fake clock and
never sleep. `MonotonicClock` is the production clock; its wake-ups can be late by the event
loop's timer granularity (about 1 ms with the default epoll selector), which
`BatchingConfig.deadline_margin_us` absorbs.

Thread safety: a Batcher belongs to one event loop; call submit/start/drain/stats from it.
`run_batch` runs on the executor's thread and is never called concurrently with itself.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from uwrt.runtime.errors import UwrtError
from uwrt.runtime.serving.batching import BatchingConfig, CostModel, Pending, plan

__all__ = ["Batcher", "BatcherClosed", "Clock", "DeadlineExpired", "MonotonicClock", "QueueFull"]

log = logging.getLogger("uwrt.batcher")


class QueueFull(UwrtError):
    """The batching queue holds max_queue requests: load is shed."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(UwrtError):
    """The request can no longer finish before its deadline (per the cost model); it never ran."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BatcherClosed(UwrtError):
    """The batcher is draining or stopped and accepts no new work."""
    code = grpc.StatusCode.UNAVAILABLE


class Clock(Protocol):
    """Microsecond time source for the batcher. Tests pass a fake."""

    def now_us(self) -> int: ...

    async def sleep_until(self, t_us: int) -> None: ...


class MonotonicClock:
    """time.monotonic_ns in microseconds; sleeps with asyncio.sleep (late by up to the loop's
    timer granularity, ~1 ms with epoll; never early by more than clock rounding)."""

    def now_us(self) -> int:
        return time.monotonic_ns() // 1000

    async def sleep_until(self, t_us: int) -> None:
        delay_us = t_us - self.now_us()
        if delay_us > 0:
            await asyncio.sleep(delay_us / 1e6)


@dataclass(eq=False, slots=True)
class _Entry:
    pending: Pending
    item: Any
    future: asyncio.Future
    queue_us: int = 0


@dataclass
class _Stats:
    batches: int = 0          # batches handed to run_batch
    requests: int = 0         # requests in those batches
    expired: int = 0          # failed with DeadlineExpired before running
    rejected: int = 0         # refused with QueueFull
    cancelled: int = 0        # callers cancelled while queued (removed, never run)
    failed: int = 0           # requests whose batch raised (or returned the wrong count)
    closed: int = 0           # failed with BatcherClosed (drain timeout / loop failure)


class Batcher:
    """Dynamic batching in front of a synchronous `run_batch(items) -> results` (results[i]
    answers items[i]; a result may itself be an error object, it is returned as is).

    `tokens_of(item)` gives the item's encoder tokens (clamped to >= 1); `cost` defaults to a
    fresh CostModel and is fed every successful batch's measured time. Call `await start()` on
    the serving loop, `await submit(...)` per request, `await drain(timeout_s)` to stop.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], cfg: BatchingConfig, *, clock: Clock,
                 executor: concurrent.futures.Executor, cost: CostModel | None = None,
                 tokens_of: Callable[[Any], int]) -> None:
        self.run_batch = run_batch
        self.cfg = cfg
        self.clock = clock
        self.executor = executor
        self.cost = cost if cost is not None else CostModel()
        self.tokens_of = tokens_of
        self._queue: dict[int, _Entry] = {}          # seq -> entry, in arrival order
        self._seq = itertools.count()
        self._inflight: asyncio.Task | None = None   # the running batch
        self._inflight_until_us = 0                  # its predicted end
        self._wake: asyncio.Event | None = None      # set on every event the loop must see
        self._timer: asyncio.Task | None = None
        self._timer_at: int | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._stats = _Stats()

    # ---------------------------------------------------------------- public API

    async def start(self) -> None:
        """Start the driver loop on the running event loop (idempotent)."""
        if self._task is None:
            if self._closing:
                raise BatcherClosed("batcher is closed")
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="uwrt-batcher")

    async def submit(self, item: Any, *, priority: int = 0, deadline_us: int | None = None) -> tuple[Any, int]:
        """Queue `item`; return (result, queue_us) once its batch ran (queue_us: time from
        arrival to dispatch on the batcher's clock). `deadline_us` is absolute on that clock.

        Raises QueueFull (max_queue queued), BatcherClosed (draining/stopped), DeadlineExpired
        (policy gave up on it), or whatever run_batch raised for its batch. If the caller is
        cancelled while the item is queued, the item is removed and never runs; once its batch
        started, the batch completes and the result is dropped.
        """
        if self._closing or self._task is None:
            raise BatcherClosed("batcher is closed" if self._closing else "batcher is not started")
        if len(self._queue) >= self.cfg.max_queue:
            self._stats.rejected += 1
            raise QueueFull(f"batching queue is full ({self.cfg.max_queue} requests)")
        tokens = max(1, int(self.tokens_of(item)))
        now = self.clock.now_us()
        # Admission by predicted wait (not only by count): refuse work that would queue longer
        # than max_queue_delay_us, and fail at once a request whose deadline the work already
        # ahead of it makes unreachable, instead of queueing it to expire later.
        wait = self.predicted_wait_us(now)
        if deadline_us is not None and now + wait + self.cost.predict(1, tokens) > deadline_us:
            self._stats.expired += 1
            raise DeadlineExpired(f"deadline cannot be met: predicted queue wait {wait / 1000:.1f} ms")
        if wait > self.cfg.max_queue_delay_us:
            self._stats.rejected += 1
            raise QueueFull(f"predicted queue wait {wait / 1000:.1f} ms exceeds max_queue_delay_us "
                            f"({self.cfg.max_queue_delay_us / 1000:.1f} ms)")
        seq = next(self._seq)
        entry = _Entry(Pending(seq, priority, now, deadline_us, tokens), item,
                       asyncio.get_running_loop().create_future())
        self._queue[seq] = entry
        self._poke()
        try:
            result = await entry.future
        except asyncio.CancelledError:
            if self._queue.pop(seq, None) is not None:
                self._stats.cancelled += 1
                self._poke()
            raise
        return result, entry.queue_us

    def predicted_wait_us(self, now_us: int) -> int:
        """Predicted time until a request arriving now could start: the rest of the running batch
        plus every queued request, run in full batches (cost model). Conservative for high
        priorities, which may overtake part of the queue."""
        wait = max(0, self._inflight_until_us - now_us) if self._inflight is not None else 0
        n = len(self._queue)
        if n:
            tokens = sum(e.pending.tokens for e in self._queue.values())
            full = -(-n // self.cfg.max_batch_size)
            wait += self.cost.predict(n, tokens) + (full - 1) * self.cost.predict(0, 0)
        return wait

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting (new submits raise BatcherClosed), run every queued request without
        waiting for company, wait for the batch in flight. True if all finished within
        `timeout_s` (real time); otherwise every unfinished request fails with BatcherClosed
        (a batch already running on the worker thread cannot be interrupted) and False."""
        self._closing = True
        if self._task is None:
            return True
        self._poke()
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if done:
            return not self._task.cancelled() and self._task.exception() is None  # failures were logged
        self._task.cancel()
        inflight = self._inflight
        await asyncio.wait({self._task})
        self._fail_all(BatcherClosed(f"batcher drain timed out after {timeout_s}s"))
        if inflight is not None:
            await asyncio.wait({inflight})          # its members are failed with BatcherClosed
        return False

    def stats(self) -> dict[str, float]:
        """Counters since start, plus mean_batch_size and the current queue depth."""
        s = self._stats
        out: dict[str, float] = dict(vars(s))
        out["mean_batch_size"] = s.requests / s.batches if s.batches else 0.0
        out["queued"] = len(self._queue)
        return out

    # ---------------------------------------------------------------- driver

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                self._wake.clear()
                now = self.clock.now_us()
                p = plan((e.pending for e in self._queue.values()), now, self.cfg, self.cost,
                         worker_free=self._inflight is None, flush=self._closing)
                for seq in p.expire:
                    e = self._queue.pop(seq)
                    self._stats.expired += 1
                    _settle(e.future, exc=DeadlineExpired(
                        f"deadline cannot be met (queued {now - e.pending.arrival_us} us)"))
                if p.dispatch:
                    entries = [self._queue.pop(seq) for seq in p.dispatch]
                    for e in entries:
                        e.queue_us = now - e.pending.arrival_us
                    self._inflight = asyncio.create_task(self._execute(entries))
                    continue    # re-plan at once: the worker is busy now, only expiry matters
                if self._closing and not self._queue and self._inflight is None:
                    return
                self._arm_timer(p.wake_at_us)
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # a bug in the loop: never strand a caller
            log.exception("batcher loop failed")
            self._closing = True
            self._fail_all(BatcherClosed(f"batcher failed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            self._arm_timer(None)

    def _arm_timer(self, at_us: int | None) -> None:
        """Keep exactly one wake-up timer, at `at_us` (None: none)."""
        if at_us == self._timer_at and self._timer is not None and not self._timer.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at_us
        if at_us is not None:
            self._timer = asyncio.create_task(self._sleep_then_poke(at_us))

    async def _sleep_then_poke(self, at_us: int) -> None:
        await self.clock.sleep_until(at_us)
        self._poke()

    async def _execute(self, entries: list[_Entry]) -> None:
        """Run one batch on the executor; settle every member's future exactly once."""
        items = [e.item for e in entries]
        n, tokens = len(entries), sum(e.pending.tokens for e in entries)
        self._stats.batches += 1
        self._stats.requests += n
        loop = asyncio.get_running_loop()
        t0 = self.clock.now_us()
        self._inflight_until_us = t0 + self.cost.predict(n, tokens)
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
            if len(results) != n:
                raise RuntimeError(f"run_batch returned {len(results)} results for {n} requests")
        except asyncio.CancelledError:   # drain timed out: the worker thread may still be running
            for e in entries:
                if _settle(e.future, exc=BatcherClosed("batcher stopped while the batch was running")):
                    self._stats.closed += 1
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            self._stats.failed += n
            for e in entries:
                _settle(e.future, exc=exc)
        else:
            self.cost.observe(n, tokens, self.clock.now_us() - t0)
            for e, r in zip(entries, results, strict=True):
                _settle(e.future, result=r)
        finally:
            self._inflight = None
            self._poke()

    def _fail_all(self, exc: BaseException) -> None:
        for e in self._queue.values():
            if _settle(e.future, exc=exc):
                self._stats.closed += 1
        self._queue.clear()
        if self._inflight is not None:
            self._inflight.cancel()


def _settle(fut: asyncio.Future, *, result: Any = None, exc: BaseException | None = None) -> bool:
    """Set a future's outcome unless its caller is gone (cancelled). True if set."""
    if fut.done():
        return False
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
    return True
