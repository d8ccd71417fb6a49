"""The Python engine's two drivers: open loop (a schedule of intended send times, kept whatever
the server does) and closed loop (N requests in flight).

Open loop: a ticker thread sleeps until the next intended time (time.sleep, ~0.1 ms precise;
asyncio timers round to whole ms) and hands every request that is due to the event loop in one
call_soon_threadsafe, whatever earlier requests are doing; each request is one task awaiting its
transport. Closed loop: `concurrency` slots, each sending its next request as soon as the
previous one of its slot answers (intended = actual send time: a closed loop has no schedule).

Thread safety: both run on the caller's event loop; the open loop's ticker thread only
schedules callbacks onto it, so the Recorder is written from the loop thread only.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np

from uwrt.bench.loadgen.accounting import Recorder, clock

__all__ = ["drive_open", "drive_closed"]


async def drive_open(transport, payloads: list[bytes], rids: list[str], offs: np.ndarray, t0: float,
                     timeout_s: float, rec: Recorder) -> None:
    """Send payloads[i] at t0 + offs[i] (clock() time); wait for every answer (bounded by deadlines).

    A ticker thread sleeps until the next intended time and hands every request that is due to
    the loop in one call_soon_threadsafe (cheap at high rates). A request whose deadline passed
    before the ticker reached it is never sent (`on_unsent`)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    finished = asyncio.Event()

    async def one(i: int) -> None:
        t_int = t0 + offs[i]
        now = clock()
        if now - t_int >= timeout_s:     # its deadline passed before the loop could send it
            rec.on_unsent()
            return
        rec.on_send(t_int, now)
        status, timing = await transport.call(payloads[i], rids[i], max(t_int + timeout_s - now, 1e-4))
        rec.on_done(t_int, clock(), status, timing)

    def fire(batch: list[int]) -> None:
        for i in batch:
            tasks.append(loop.create_task(one(i)))

    def tick() -> None:
        try:
            n, i = len(offs), 0
            while i < n:
                now = clock()
                delay = t0 + offs[i] - now
                if delay > 0:
                    time.sleep(delay)
                    now = clock()
                due = []
                while i < n and t0 + offs[i] <= now + 5e-5:
                    if now - (t0 + offs[i]) >= timeout_s:
                        loop.call_soon_threadsafe(rec.on_unsent)
                    else:
                        due.append(i)
                    i += 1
                if due:
                    loop.call_soon_threadsafe(fire, due)
        finally:
            loop.call_soon_threadsafe(finished.set)

    threading.Thread(target=tick, daemon=True, name="uwrt-bench-ticker").start()
    await finished.wait()               # FIFO: every fire() ran before this
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=max(0.0, t0 + offs[-1] + timeout_s + 2.0 - clock()))
        for t in late:                  # transports honour deadlines; this is only a safety net
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)


async def drive_closed(transport, make_payload: Callable[[int], tuple[bytes, str]], concurrency: int,
                       t0: float, duration_s: float, timeout_s: float, rec: Recorder) -> None:
    """`concurrency` slots, each sending its next request when the previous one answers, until
    t0 + duration_s. Intended send time = actual send time (a closed loop has no schedule)."""
    counter = iter(range(1 << 62))

    async def slot() -> None:
        await asyncio.sleep(max(0.0, t0 - clock()))
        while clock() < t0 + duration_s:
            payload, rid = make_payload(next(counter))
            t = clock()
            rec.on_send(t, t)
            status, timing = await transport.call(payload, rid, timeout_s)
            rec.on_done(t, clock(), status, timing)

    await asyncio.gather(*(slot() for _ in range(concurrency)))


