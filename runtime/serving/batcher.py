"""The async driver around the pure batching policy (`uwrt.runtime.serving.batching.plan`).

    submit()/enqueue() --queue--> _drive(): plan(queue, clock.now_us()) --> expire / dispatch / arm timer
                                  dispatch --> run_batch(items) on `executor` (one thread), or inline

The driver is a plain callback on the event loop, not a task: every event that can change the
plan (an arrival while the worker is free, a cancellation, a batch completion, the wake-up
timer) schedules one `_drive` with `call_soon`, and the events of one loop iteration share it.
Its cost per event does not grow with the backlog: an arrival while the worker is busy never
calls the policy (the policy can then only expire, and the armed timer already covers every
queued request's expiry; the new request can only move that timer earlier), the queue's token
sum is kept incrementally for admission, and while the worker is free the queue holds at most
one batch being formed (any backlog dispatches at once). There is one timer, moved only when the
next wake-up comes earlier. Expired requests are failed with DeadlineExpired as soon as the
policy says so, even while a batch runs (thread mode). Every submitted request ends in exactly
one of: its result, DeadlineExpired, the exception run_batch raised, BatcherClosed (drain timed
out, or the driver itself failed), or the caller's cancellation.

Where batches run (`executor`): a one-thread executor ("thread" mode: the loop keeps accepting
and expiring while a batch computes; a hand-off per batch costs two thread wake-ups), or None
("inline" mode: run_batch runs on the loop's own thread inside `_drive`, and the loop reads the
requests that arrived meanwhile right after it; no hand-off, no context switches, but nothing is
accepted or expired while a batch computes, so a deadline can only be seen missed after it).
With one core per process the thread buys no parallelism (runtime/config.py `batch_runner`).

Time comes only from the injected `Clock`, so tests drive the batcher with a fake clock and
never sleep. `MonotonicClock` is the production clock; its timers can be late by the event
loop's timer granularity (about 1 ms with the default epoll selector), which
`BatchingConfig.deadline_margin_us` absorbs.

Thread safety: a Batcher belongs to one event loop; call submit/enqueue/cancel/start/drain/stats
from it. `run_batch` runs on the executor's thread (or the loop's, inline) and is never called
concurrently with itself.
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
from uwrt.runtime.serving.batching import BatchingConfig, CostModel, Pending, expiry_us, plan

__all__ = ["Batcher", "BatcherClosed", "Clock", "DeadlineExpired", "Deferred", "MonotonicClock", "QueueFull"]

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
    """Microsecond time source for the batcher. Tests pass a fake. A clock may also offer
    `call_at(t_us, callback) -> handle with cancel()` (a loop timer, cheaper than a task that
    sleeps); the batcher uses it when present."""

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

    def call_at(self, t_us: int, callback: Callable[[], object]) -> asyncio.TimerHandle:
        """Run `callback` on the running loop at `t_us` (the loop's clock is time.monotonic too)."""
        return asyncio.get_running_loop().call_at(t_us / 1e6, callback)


class Deferred:
    """What `run_batch` may return instead of its results: a concurrent.futures.Future of them.
    The worker counts as free at once (the next batch may run), and the callers' futures settle
    when it resolves (runtime/serving/audit.py: once the batch's decision records are durable)."""
    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future


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
    fresh CostModel and is fed every successful batch's measured time. `executor`: where
    run_batch runs (one thread); None runs it inline on the event loop's thread (see the module
    docstring). Call `await start()` on the serving loop, `await submit(...)` per request (or
    `enqueue` + the entry's future), `await drain(timeout_s)` to stop.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], cfg: BatchingConfig, *, clock: Clock,
                 executor: concurrent.futures.Executor | None, cost: CostModel | None = None,
                 tokens_of: Callable[[Any], int]) -> None:
        self.run_batch = run_batch
        self.cfg = cfg
        self.clock = clock
        self.executor = executor
        self.cost = cost if cost is not None else CostModel()
        self.tokens_of = tokens_of
        self._queue: dict[int, _Entry] = {}          # seq -> entry, in arrival order
        self._queued_tokens = 0                      # sum of the queued entries' tokens
        self._seq = itertools.count()
        self._inflight: list[_Entry] | None = None   # the running batch (thread mode)
        self._inflight_until_us = 0                  # its predicted end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False                      # a _drive call is pending on the loop
        self._timer: Any = None                      # handle with cancel(): the one wake-up timer
        self._timer_at: int | None = None
        self._finished: asyncio.Future | None = None  # result: the driver ended cleanly (True) or failed
        self._settle_until: int | None = None          # inline: gathering arrivals after a batch until then
        self._settle_seen = 0
        self._settle_idle = 0
        self._stopped = False
        self._closing = False
        self._deferred = 0                           # Deferred batches not yet settled
        self._flushing = False                       # draining: dispatch without waiting for company
        self._stats = _Stats()

    # ---------------------------------------------------------------- public API

    async def start(self) -> None:
        """Start the driver on the running event loop (idempotent)."""
        if self._loop is None:
            if self._closing:
                raise BatcherClosed("batcher is closed")
            self._loop = asyncio.get_running_loop()
            self._finished = self._loop.create_future()

    def enqueue(self, item: Any, *, priority: int = 0, deadline_us: int | None = None) -> _Entry:
        """Admit `item` and queue it; its `future` resolves to the result (or the exception) and
        `queue_us` is set when it is dispatched. Raises QueueFull / BatcherClosed /
        DeadlineExpired at once when it is refused. The caller must `cancel(entry)` if it stops
        waiting. `submit` wraps this."""
        if self._closing or self._loop is None:
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
        pending = Pending(seq, priority, now, deadline_us, tokens)
        entry = _Entry(pending, item, self._loop.create_future())
        self._queue[seq] = entry
        self._queued_tokens += tokens
        if self._inflight is not None or self._settle_until is not None:
            # The worker is busy: the policy can only expire requests until it frees (its
            # completion re-plans), and the others' expiries are already on the timer, so the
            # only new reason to wake is this request's own expiry. O(1): no plan() call.
            if deadline_us is not None:
                self._arm_timer(expiry_us(pending, self.cost))
        else:
            self._kick()
        return entry

    def cancel(self, entry: _Entry) -> bool:
        """The caller stopped waiting: remove a queued entry (it never runs; True) and cancel
        its future. An entry already dispatched runs; its result is dropped."""
        removed = self._pop(entry.pending.seq) is not None
        if removed:
            self._stats.cancelled += 1
            if self._inflight is None:
                self._kick()        # the head or the batch being formed may have changed
        entry.future.cancel()
        return removed

    async def submit(self, item: Any, *, priority: int = 0, deadline_us: int | None = None) -> tuple[Any, int]:
        """Queue `item`; return (result, queue_us) once its batch ran (queue_us: time from
        arrival to dispatch on the batcher's clock). `deadline_us` is absolute on that clock.

        Raises QueueFull (max_queue queued), BatcherClosed (draining/stopped), DeadlineExpired
        (policy gave up on it), or whatever run_batch raised for its batch. If the caller is
        cancelled while the item is queued, the item is removed and never runs; once its batch
        started, the batch completes and the result is dropped.
        """
        entry = self.enqueue(item, priority=priority, deadline_us=deadline_us)
        try:
            result = await entry.future
        except asyncio.CancelledError:
            self.cancel(entry)
            raise
        return result, entry.queue_us

    def predicted_wait_us(self, now_us: int) -> int:
        """Predicted time until a request arriving now could start: the rest of the running batch
        plus every queued request, run in full batches (cost model). Conservative for high
        priorities, which may overtake part of the queue. O(1): token sums are kept as requests
        come and go."""
        wait = max(0, self._inflight_until_us - now_us) if self._inflight is not None else 0
        n = len(self._queue)
        if n:
            full = -(-n // self.cfg.max_batch_size)
            wait += self.cost.predict(n, self._queued_tokens) + (full - 1) * self.cost.predict(0, 0)
        return wait

    def flush(self) -> None:
        """From now on dispatch every queued request as soon as the worker is free (no waiting for
        company), while still accepting submissions: the server's shutdown calls it before gRPC
        stops accepting, so the calls gRPC already accepted are decided, not refused."""
        self._flushing = True
        self._kick()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting (new submits raise BatcherClosed), run every queued request without
        waiting for company, wait for the batch in flight. True if all finished within
        `timeout_s` (real time); otherwise every unfinished request fails with BatcherClosed
        (a batch already running on the worker thread cannot be interrupted) and False."""
        self._closing = True
        if self._finished is None:
            return True
        self._kick()
        try:
            return bool(await asyncio.wait_for(asyncio.shield(self._finished), timeout_s))
        except TimeoutError:
            self._stop()
            self._fail_all(BatcherClosed(f"batcher drain timed out after {timeout_s}s"))
            return False

    def stats(self) -> dict[str, float]:
        """Counters since start, plus mean_batch_size and the current queue depth."""
        s = self._stats
        out: dict[str, float] = dict(vars(s))
        out["mean_batch_size"] = s.requests / s.batches if s.batches else 0.0
        out["queued"] = len(self._queue)
        return out

    # ---------------------------------------------------------------- driver

    def _pop(self, seq: int) -> _Entry | None:
        e = self._queue.pop(seq, None)
        if e is not None:
            self._queued_tokens -= e.pending.tokens
        return e

    def _kick(self) -> None:
        """Run the driver soon, once for every event of this loop iteration (coalesced)."""
        if not self._scheduled and not self._stopped and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        """One planning pass: expire, dispatch (possibly several batches inline), arm the timer."""
        self._scheduled = False
        if self._stopped:
            return
        try:
            now = self.clock.now_us()
            settling = self._settle_until is not None and self._settling(now)
            p = plan([e.pending for e in self._queue.values()], now, self.cfg, self.cost,
                     worker_free=self._inflight is None and not settling, flush=self._closing or self._flushing)
            for seq in p.expire:
                e = self._pop(seq)
                assert e is not None
                self._stats.expired += 1
                _settle(e.future, exc=DeadlineExpired(
                    f"deadline cannot be met (queued {now - e.pending.arrival_us} us)"))
            if p.dispatch:
                entries = []
                for seq in p.dispatch:
                    e = self._pop(seq)
                    assert e is not None
                    e.queue_us = now - e.pending.arrival_us
                    entries.append(e)
                if self.executor is None:
                    self._run_inline(entries)
                    # requests that arrived during the batch wait in gRPC, which hands the loop one
                    # new call per round trip: gather them before forming the next batch
                    self._settle_until = self.clock.now_us() + self.cfg.max_wait_us
                    self._settle_seen, self._settle_idle = len(self._queue), 0
                    self._kick()
                else:
                    self._start_thread(entries)
                    self._drive_busy(now)
                return
            if settling:
                self._kick()            # look again next loop iteration
                return
            if self._closing and not self._queue and self._inflight is None and not self._deferred:
                self._stop()
                if self._finished is not None and not self._finished.done():
                    self._finished.set_result(True)
                return
            self._arm_timer(p.wake_at_us)
        except BaseException as exc:   # a bug in the driver: never strand a caller
            log.exception("batcher driver failed")
            self._closing = True
            self._stop()
            self._fail_all(BatcherClosed(f"batcher failed: {type(exc).__name__}: {exc}"))
            if self._finished is not None and not self._finished.done():
                self._finished.set_result(False)
            if not isinstance(exc, Exception):
                raise

    def _settling(self, now: int) -> bool:
        """Inline mode, right after a batch: still gathering the calls that arrived during it?
        Until two loop iterations in a row bring no new request (gRPC hands over one new call per
        round trip), at most max_wait_us; never while draining or with a full batch queued."""
        assert self._settle_until is not None
        n = len(self._queue)
        if n > self._settle_seen:
            self._settle_seen, self._settle_idle = n, 0
        else:
            self._settle_idle += 1
        if (self._settle_idle >= 2 or now >= self._settle_until or self._closing or self._flushing
                or n >= self.cfg.max_batch_size):
            self._settle_until = None
            return False
        return True

    def _drive_busy(self, now: int) -> None:
        """Right after a dispatch to the worker: only expiry matters until it frees."""
        p = plan([e.pending for e in self._queue.values()], now, self.cfg, self.cost, worker_free=False,
                 flush=self._closing or self._flushing) if self._queue else None
        if p is not None:
            for seq in p.expire:
                e = self._pop(seq)
                assert e is not None
                self._stats.expired += 1
                _settle(e.future, exc=DeadlineExpired(
                    f"deadline cannot be met (queued {now - e.pending.arrival_us} us)"))
            self._arm_timer(p.wake_at_us)

    def _stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None

    def _arm_timer(self, at_us: int | None) -> None:
        """Keep one wake-up timer. It is moved only when `at_us` is earlier than the armed time;
        a timer that fires for nothing costs one plan() call, re-arming costs more."""
        if at_us is None or self._stopped:
            return
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= at_us:
                return
            self._timer.cancel()
        self._timer_at = at_us
        call_at = getattr(self.clock, "call_at", None)
        if call_at is not None:
            self._timer = call_at(at_us, self._on_timer)
        else:       # a clock with only sleep_until (tests' fake clocks)
            assert self._loop is not None
            self._timer = self._loop.create_task(self._sleep_then(at_us))

    async def _sleep_then(self, at_us: int) -> None:
        await self.clock.sleep_until(at_us)
        self._on_timer()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        if not self._scheduled:
            self._drive()

    def _call(self, items: list[Any]) -> list[Any] | Deferred:
        results = self.run_batch(items)
        if isinstance(results, Deferred):
            return results
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} requests")
        return results

    def _begin(self, entries: list[_Entry]) -> tuple[int, int, int]:
        n, tokens = len(entries), sum(e.pending.tokens for e in entries)
        self._stats.batches += 1
        self._stats.requests += n
        return n, tokens, self.clock.now_us()

    def _run_inline(self, entries: list[_Entry]) -> None:
        """Run one batch here, on the loop's thread; settle every member's future exactly once."""
        n, tokens, t0 = self._begin(entries)
        try:
            results = self._call([e.item for e in entries])
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            self._stats.failed += n
            for e in entries:
                _settle(e.future, exc=exc)
            return
        self.cost.observe(n, tokens, self.clock.now_us() - t0)
        self._settle_all(entries, results)

    def _settle_all(self, entries: list[_Entry], results: list[Any] | Deferred) -> None:
        if not isinstance(results, Deferred):
            for e, r in zip(entries, results, strict=True):
                _settle(e.future, result=r)
            return
        self._deferred += 1
        loop = self._loop
        assert loop is not None

        def resolved(df: concurrent.futures.Future) -> None:    # on whatever thread resolved it
            try:
                loop.call_soon_threadsafe(self._finish_deferred, entries, df)
            except RuntimeError:        # the loop is closed: drain timed out and its callers were failed
                pass

        results.future.add_done_callback(resolved)

    def _finish_deferred(self, entries: list[_Entry], df: concurrent.futures.Future) -> None:
        self._deferred -= 1
        exc = df.exception()
        if exc is not None:
            self._stats.failed += len(entries)
            for e in entries:
                _settle(e.future, exc=exc)
        else:
            res = df.result()
            if len(res) != len(entries):
                exc = RuntimeError(f"run_batch returned {len(res)} results for {len(entries)} requests")
                for e in entries:
                    _settle(e.future, exc=exc)
            else:
                for e, r in zip(entries, res, strict=True):
                    _settle(e.future, result=r)
        if self._closing:
            self._kick()

    def _start_thread(self, entries: list[_Entry]) -> None:
        """Hand one batch to the executor; its completion comes back through call_soon_threadsafe."""
        assert self.executor is not None and self._loop is not None
        n, tokens, t0 = self._begin(entries)
        self._inflight = entries
        self._inflight_until_us = t0 + self.cost.predict(n, tokens)
        loop = self._loop

        def done(f: concurrent.futures.Future) -> None:    # on the worker thread (or inline in tests)
            try:
                loop.call_soon_threadsafe(self._finish_thread, entries, f, n, tokens, t0)
            except RuntimeError:        # the loop is closed: drain timed out and its callers were failed
                pass

        self.executor.submit(self._call, [e.item for e in entries]).add_done_callback(done)

    def _finish_thread(self, entries: list[_Entry], f: concurrent.futures.Future, n: int, tokens: int,
                       t0: int) -> None:
        if self._inflight is entries:
            self._inflight = None
        exc = f.exception()
        if exc is not None:
            self._stats.failed += n
            for e in entries:
                _settle(e.future, exc=exc)
        else:
            self.cost.observe(n, tokens, self.clock.now_us() - t0)
            self._settle_all(entries, f.result())
        self._kick()

    def _fail_all(self, exc: BaseException) -> None:
        for e in self._queue.values():
            if _settle(e.future, exc=exc):
                self._stats.closed += 1
        self._queue.clear()
        self._queued_tokens = 0
        if self._inflight is not None:
            for e in self._inflight:
                if _settle(e.future, exc=BatcherClosed("batcher stopped while the batch was running")):
                    self._stats.closed += 1
            self._inflight = None


def _settle(fut: asyncio.Future, *, result: Any = None, exc: BaseException | None = None) -> bool:
    """Set a future's outcome unless its caller is gone (cancelled). True if set."""
    if fut.done():
        return False
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
    return True
