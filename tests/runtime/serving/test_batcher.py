"""The async batcher driven deterministically: a fake clock that only moves when the test says,
and an executor whose batches run when the test says. No sleeps (asyncio.sleep(0) only yields)."""
from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import pytest

from uwrt.runtime.serving.batcher import Batcher, BatcherClosed, DeadlineExpired, MonotonicClock, QueueFull
from uwrt.runtime.serving.batching import BatchingConfig, CostModel

CFG = BatchingConfig(max_batch_size=4, max_batch_tokens=1000, max_wait_us=1000, max_queue=8,
                     length_buckets=(), deadline_margin_us=0)


class FakeClock:
    """Time stands still until advance(); sleep_until returns once the time has come."""

    def __init__(self, t_us: int = 0) -> None:
        self.t = t_us
        self._sleepers: list[asyncio.Future] = []

    def now_us(self) -> int:
        return self.t

    async def sleep_until(self, t_us: int) -> None:
        while self.t < t_us:
            fut = asyncio.get_running_loop().create_future()
            self._sleepers.append(fut)
            await fut

    def advance(self, dt_us: int) -> None:
        self.t += dt_us
        for fut in self._sleepers:
            if not fut.done():
                fut.set_result(None)
        self._sleepers.clear()


class ManualExecutor(concurrent.futures.Executor):
    """Holds each submitted batch until run_next() (on the loop's thread: deterministic)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[concurrent.futures.Future, object, tuple]] = []

    def submit(self, fn, /, *args, **kwargs):
        f: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.append((f, fn, args))
        return f

    def run_next(self) -> None:
        f, fn, args = self.jobs.pop(0)
        f.set_running_or_notify_cancel()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001
            f.set_exception(e)


class Recorder:
    """run_batch: records each batch and answers x -> x * 10 (or raises `fail`)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail: BaseException | None = None

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return [x * 10 for x in items]


async def turn(n: int = 20) -> None:
    """Let every ready task and callback run (a handful of loop iterations, no real waiting)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def setup(cfg=CFG, cost=None):
    clock, ex, rec = FakeClock(), ManualExecutor(), Recorder()
    b = Batcher(rec, cfg, clock=clock, executor=ex, cost=cost or CostModel(100, 10, 0), tokens_of=lambda x: 5)
    await b.start()
    return b, clock, ex, rec


def spawn(b, item, **kw) -> asyncio.Task:
    return asyncio.create_task(b.submit(item, **kw))


def outcome(t: asyncio.Task):
    """The task's result (or exception); it must already be done: tests fail, never hang."""
    assert t.done(), "submit is still pending"
    return t.result()


def test_concurrent_submits_form_batches_and_loop_keeps_accepting():
    async def main():
        b, clock, ex, rec = await setup()
        first = [spawn(b, i) for i in range(4)]             # a full batch: sent at once
        await turn()
        assert len(ex.jobs) == 1 and rec.batches == []
        more = [spawn(b, i) for i in range(4, 7)]            # accepted while the batch computes
        await turn()
        assert len(ex.jobs) == 1 and b.stats()["queued"] == 3
        ex.run_next()
        await turn()
        assert [t.result() for t in first] == [(0, 0), (10, 0), (20, 0), (30, 0)]
        assert rec.batches == [[0, 1, 2, 3]]
        assert ex.jobs == []                                  # 3 queued, not full: wait for company
        clock.advance(1000)
        await turn()
        ex.run_next()
        await turn()
        assert rec.batches[1] == [4, 5, 6]
        assert [t.result() for t in more] == [(40, 1000), (50, 1000), (60, 1000)]
        s = b.stats()
        assert s["batches"] == 2 and s["requests"] == 7 and s["mean_batch_size"] == 3.5
        assert await b.drain(1.0)
    asyncio.run(main())


def test_max_wait_is_respected_to_the_microsecond():
    async def main():
        b, clock, ex, rec = await setup()
        t = spawn(b, 1)
        await turn()
        clock.advance(999)
        await turn()
        assert ex.jobs == []
        clock.advance(1)
        await turn()
        assert len(ex.jobs) == 1
        ex.run_next()
        await turn()
        assert outcome(t) == (10, 1000)
        await b.drain(1.0)
    asyncio.run(main())


def test_priority_jumps_the_queue():
    async def main():
        cfg = BatchingConfig(max_batch_size=1, max_wait_us=0, length_buckets=())
        b, clock, ex, rec = await setup(cfg)
        ts = [spawn(b, 1)]
        await turn()                                          # 1 runs; 2 and 3 queue behind it
        ts += [spawn(b, 2), spawn(b, 3, priority=5)]
        await turn()
        for _ in range(3):
            ex.run_next()
            await turn()
        assert rec.batches == [[1], [3], [2]]
        assert [outcome(t)[0] for t in ts] == [10, 20, 30]
        await b.drain(1.0)
    asyncio.run(main())


def test_unreachable_deadline_fails_early_even_while_a_batch_runs():
    async def main():
        b, clock, ex, rec = await setup()
        running = [spawn(b, i) for i in range(4)]
        await turn()
        assert len(ex.jobs) == 1                               # the worker is busy from now on
        # predict(1) = 110 us: deadline 500 becomes unreachable at t = 391
        doomed = spawn(b, 99, deadline_us=500)
        await turn()
        clock.advance(390)
        await turn()
        assert not doomed.done()
        clock.advance(1)
        await turn()
        with pytest.raises(DeadlineExpired) as ei:
            outcome(doomed)
        assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        ex.run_next()
        await turn()
        assert all(t.done() for t in running)
        assert rec.batches == [[0, 1, 2, 3]] and ex.jobs == []     # 99 never ran
        assert b.stats()["expired"] == 1
        # already unreachable on arrival
        late = spawn(b, 7, deadline_us=clock.now_us() + 50)
        await turn()
        with pytest.raises(DeadlineExpired):
            outcome(late)
        await b.drain(1.0)
    asyncio.run(main())


def test_cancelled_caller_is_removed_before_running():
    async def main():
        b, clock, ex, rec = await setup()
        keep, gone = spawn(b, 1), spawn(b, 2)
        await turn()
        gone.cancel()
        await turn()
        assert gone.cancelled() and b.stats()["cancelled"] == 1 and b.stats()["queued"] == 1
        clock.advance(1000)
        await turn()
        ex.run_next()
        await turn()
        assert outcome(keep) == (10, 1000)
        assert rec.batches == [[1]]
        # cancelled after its batch started: the batch completes, the others get their results
        a, c = spawn(b, 3), spawn(b, 4)
        await turn()
        clock.advance(1000)
        await turn()
        c.cancel()
        ex.run_next()
        await turn()
        assert outcome(a) == (30, 1000)
        assert c.cancelled() and rec.batches[-1] == [3, 4]
        await b.drain(1.0)
    asyncio.run(main())


def test_queue_full_is_resource_exhausted():
    async def main():
        cfg = BatchingConfig(max_batch_size=4, max_wait_us=10_000, max_queue=3, length_buckets=())
        b, clock, ex, rec = await setup(cfg)
        ts = [spawn(b, i) for i in range(3)]
        await turn()
        with pytest.raises(QueueFull) as ei:
            await b.submit(3)
        assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert b.stats()["rejected"] == 1
        drain = asyncio.create_task(b.drain(5.0))             # flushes the queued three at once
        await turn()
        ex.run_next()
        assert await drain is True
        assert [t.result()[0] for t in ts] == [0, 10, 20]
    asyncio.run(main())


def test_run_batch_error_reaches_every_member_and_the_batcher_goes_on():
    async def main():
        b, clock, ex, rec = await setup()
        rec.fail = ValueError("model exploded")
        ts = [spawn(b, i) for i in range(4)]
        await turn()
        ex.run_next()
        await turn()
        for t in ts:
            with pytest.raises(ValueError, match="model exploded"):
                t.result()
        assert b.stats()["failed"] == 4
        rec.fail = None
        t = spawn(b, 5)
        await turn()
        clock.advance(1000)
        await turn()
        ex.run_next()
        await turn()
        assert outcome(t) == (50, 1000)
        await b.drain(1.0)
    asyncio.run(main())


def test_wrong_result_count_fails_the_batch_loudly():
    async def main():
        clock, ex = FakeClock(), ManualExecutor()
        b = Batcher(lambda items: items[:-1], CFG, clock=clock, executor=ex, tokens_of=lambda x: 1)
        await b.start()
        ts = [spawn(b, i) for i in range(4)]
        await turn()
        ex.run_next()
        await turn()
        for t in ts:
            with pytest.raises(RuntimeError, match="3 results for 4"):
                t.result()
        await b.drain(1.0)
    asyncio.run(main())


def test_drain_finishes_queued_work_then_refuses():
    async def main():
        b, clock, ex, rec = await setup()
        ts = [spawn(b, i) for i in range(6)]                  # one full batch + 2 waiting for company
        await turn()
        drain = asyncio.create_task(b.drain(5.0))
        await turn()
        with pytest.raises(BatcherClosed) as ei:
            await b.submit(9)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        ex.run_next()
        await turn()
        assert len(ex.jobs) == 1                              # the rest goes without waiting for max_wait
        ex.run_next()
        assert await drain is True
        assert rec.batches == [[0, 1, 2, 3], [4, 5]]
        assert [t.result()[0] for t in ts] == [0, 10, 20, 30, 40, 50]
        with pytest.raises(BatcherClosed):
            await b.submit(10)
    asyncio.run(main())


def test_drain_timeout_fails_what_is_left():
    async def main():
        b, clock, ex, rec = await setup()
        ts = [spawn(b, i) for i in range(4)]
        await turn()
        assert await b.drain(0.0) is False                  # the batch never completes
        await turn()
        for t in ts:
            with pytest.raises(BatcherClosed):
                t.result()
    asyncio.run(main())


def test_cost_model_learns_from_measured_batches():
    async def main():
        cost = CostModel(100, 10, 0)
        b, clock, ex, rec = await setup(cost=cost)
        before = cost.predict(4, 20)
        for _ in range(3):
            ts = [spawn(b, i) for i in range(4)]
            await turn()
            clock.advance(5000)                               # the batch "takes" 5 ms
            ex.run_next()
            await turn()
            assert all(outcome(t) for t in ts)
        assert cost.observations == 3 and cost.predict(4, 20) > before
        await b.drain(1.0)
    asyncio.run(main())


def test_submit_before_start_is_refused():
    async def main():
        b = Batcher(Recorder(), CFG, clock=FakeClock(), executor=ManualExecutor(), tokens_of=lambda x: 1)
        with pytest.raises(BatcherClosed):
            await b.submit(1)
    asyncio.run(main())


def test_real_thread_and_monotonic_clock_smoke():
    """Production wiring: a one-thread executor and the monotonic clock (max_wait 0: no waiting)."""
    async def main():
        cfg = BatchingConfig(max_batch_size=8, max_wait_us=0)
        rec = Recorder()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            b = Batcher(rec, cfg, clock=MonotonicClock(), executor=pool, tokens_of=lambda x: 3)
            await b.start()
            # wait_for is a hang guard only, never a timing check
            out = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(20))), 60)
            assert [r for r, _ in out] == [i * 10 for i in range(20)]
            assert all(q >= 0 for _, q in out)
            assert sorted(x for batch in rec.batches for x in batch) == list(range(20))
            assert all(len(batch) <= 8 for batch in rec.batches)
            assert await b.drain(5.0)
    asyncio.run(main())


def test_admission_by_predicted_wait():
    """Work already queued and running decides admission: a deadline it makes unreachable fails at
    once (DEADLINE_EXCEEDED, never queued); a wait over max_queue_delay_us is shed (RESOURCE_EXHAUSTED)."""
    async def main():
        cfg = BatchingConfig(max_batch_size=2, max_wait_us=10_000, max_queue=100, length_buckets=(),
                             deadline_margin_us=0, max_queue_delay_us=1000)
        b, clock, ex, rec = await setup(cfg, cost=CostModel(100, 10, 0))   # batch of n: 100 + 10 n us
        first = [spawn(b, i) for i in range(2)]
        await turn()
        assert len(ex.jobs) == 1                          # running, predicted to end at t = 120
        queued = [spawn(b, i) for i in range(2, 6)]        # 4 queued: 2 full batches = 2 * 100 + 4 * 10
        await turn()
        assert b.predicted_wait_us(clock.now_us()) == 120 + 240
        # needs 360 wait + 110 alone = 470 us: a 400 us deadline is unreachable on arrival
        with pytest.raises(DeadlineExpired, match="predicted queue wait"):
            await b.submit(99, deadline_us=400)
        assert b.stats()["queued"] == 4 and b.stats()["expired"] == 1
        ok = spawn(b, 98, deadline_us=10_000)
        await turn()
        assert b.stats()["queued"] == 5
        for i in range(7, 20):                             # grow the backlog past 1000 us of predicted wait
            spawn(b, i)
            await turn()
            if b.stats()["rejected"]:
                break
        assert b.stats()["rejected"] == 1 and b.predicted_wait_us(clock.now_us()) > 1000 - 200
        with pytest.raises(QueueFull, match="max_queue_delay_us"):
            await b.submit(50)
        drain = asyncio.create_task(b.drain(5.0))
        for _ in range(20):
            await turn()
            if ex.jobs:
                ex.run_next()
        assert await drain is True
        assert all(t.done() for t in first + queued) and ok.done()
    asyncio.run(main())


# ------------------------------------------------------------------ inline mode and the O(1) driver

async def setup_inline(cfg=CFG, cost=None):
    clock, rec = FakeClock(), Recorder()
    b = Batcher(rec, cfg, clock=clock, executor=None, cost=cost or CostModel(100, 10, 0), tokens_of=lambda x: 5)
    await b.start()
    return b, clock, rec


def test_inline_batches_run_on_the_loop_and_form_the_same_batches():
    async def main():
        b, clock, rec = await setup_inline()
        first = [spawn(b, i) for i in range(6)]                # one full batch now; 2 wait for company
        await turn()
        assert rec.batches == [[0, 1, 2, 3]] and [t.result()[0] for t in first[:4]] == [0, 10, 20, 30]
        assert not first[4].done() and b.stats()["queued"] == 2
        clock.advance(1000)
        await turn()
        assert rec.batches[1] == [4, 5] and [outcome(t) for t in first[4:]] == [(40, 1000), (50, 1000)]
        rec.fail = ValueError("boom")                          # an error reaches every member, the batcher goes on
        bad = [spawn(b, i) for i in range(4)]
        await turn()
        for t in bad:
            with pytest.raises(ValueError, match="boom"):
                t.result()
        rec.fail = None
        late = spawn(b, 7, deadline_us=clock.now_us() - 1)      # unreachable on arrival
        await turn()
        with pytest.raises(DeadlineExpired):
            outcome(late)
        s = b.stats()
        assert s["failed"] == 4 and s["expired"] == 1 and s["batches"] == 3
        assert await b.drain(1.0)
    asyncio.run(main())


def test_inline_drain_flushes_without_waiting_and_then_refuses():
    async def main():
        b, clock, rec = await setup_inline()
        ts = [spawn(b, i) for i in range(6)]
        await turn()
        assert await b.drain(5.0) is True
        assert rec.batches == [[0, 1, 2, 3], [4, 5]] and [t.result()[0] for t in ts] == [0, 10, 20, 30, 40, 50]
        with pytest.raises(BatcherClosed):
            await b.submit(9)
    asyncio.run(main())


def test_arrivals_while_busy_do_not_replan_but_expiry_still_fires(monkeypatch):
    """While a batch runs, arrivals never call plan() (O(1) per event); a queued request whose
    deadline becomes unreachable is still failed at its expiry time, by the one timer."""
    import uwrt.runtime.serving.batcher as batcher_mod
    calls = []
    real = batcher_mod.plan
    monkeypatch.setattr(batcher_mod, "plan", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    async def main():
        b, clock, ex, rec = await setup(BatchingConfig(max_batch_size=4, max_batch_tokens=1000, max_wait_us=1000,
                                                       max_queue=64, length_buckets=(), deadline_margin_us=0))
        running = [spawn(b, i) for i in range(4)]
        await turn()
        assert len(ex.jobs) == 1
        n0 = len(calls)
        doomed = spawn(b, 99, deadline_us=clock.now_us() + 500)  # expiry at 500 - 110 + 1 = 391
        waiting = [spawn(b, 10 + i) for i in range(20)]          # no deadline: nothing to do until the worker frees
        await turn()
        assert len(calls) == n0 and b.stats()["queued"] == 21
        clock.advance(391)
        await turn()
        with pytest.raises(DeadlineExpired):
            outcome(doomed)
        assert b.stats()["queued"] == 20
        ex.run_next()
        await turn()
        assert all(t.done() for t in running)
        for _ in range(10):
            if ex.jobs:
                ex.run_next()
            clock.advance(1000)
            await turn()
        assert all(t.done() for t in waiting) and sorted(x for bt in rec.batches[1:] for x in bt) == list(range(10, 30))
        await b.drain(1.0)
    asyncio.run(main())


def test_enqueue_and_cancel_without_a_coroutine():
    async def main():
        b, clock, ex, rec = await setup()
        keep, gone = b.enqueue(1), b.enqueue(2)
        assert b.predicted_wait_us(clock.now_us()) == 100 + 10 * 2 + 0
        assert b.cancel(gone) is True and gone.future.cancelled()
        assert b.stats()["queued"] == 1 and b.stats()["cancelled"] == 1
        assert b.predicted_wait_us(clock.now_us()) == 100 + 10
        clock.advance(1000)
        await turn()
        ex.run_next()
        await turn()
        assert keep.future.result() == 10 and keep.queue_us == 1000 and rec.batches == [[1]]
        assert b.cancel(keep) is False                         # already ran: nothing to remove
        await b.drain(1.0)
    asyncio.run(main())
