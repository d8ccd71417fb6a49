"""The Python engine: one process's part of a step over grpc.aio (`run_step_async`), and
`WorkerPool`, K spawned worker processes that run each step together (`--procs K`).

A single process builds its payloads (pre-serialized, unique ids), starts 20 ms later, and
drives the open-loop or closed-loop driver (`uwrt.bench.loadgen.drivers`). With K workers the
schedule is split: Poisson r/K each, or constant r/K with phases i/K, together exactly the
requested arrival process; every worker builds its own request pool once, starts at a shared
clock() time, and the parent merges their StepRaw (histograms merge exactly).

Connections: a step's unary requests go round robin over `spec.connections` TCP connections
(split over the worker processes, at least one each); DecideStream uses one per process.

The generator's CPU is this process's (os.times) from the start of sending to the end of the
step; a worker's is its own, summed by the parent. One process drives a few thousand requests/s
at ~0.3-0.6 ms of CPU per request on the 2-core machine (bench/RESULTS.md).

Thread safety: `run_step_async` owns its channel(s) and Recorder on the running loop.
"""
from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing as mp
import sys
import zlib
from typing import Any

import grpc
import numpy as np

from uwrt.bench.loadgen.accounting import Recorder, StepRaw, StepSpec, clock
from uwrt.bench.loadgen.cpus import cpu_s
from uwrt.bench.loadgen.drivers import drive_closed, drive_open
from uwrt.bench.loadgen.traffic import make_source, schedule
from uwrt.bench.loadgen.transports import StreamTransport, UnaryTransport, open_channels

SWITCH_INTERVAL_S = 0.001      # GIL switch interval in generator processes (Python's default: 0.005);
                               # 0.0002 / 0.001 / 0.005 measured the same within noise at 1000-1500 rps

__all__ = ["run_step_async", "WorkerPool"]


async def run_step_async(target: str, spec: StepSpec, source, t0: float | None, *, share: float = 1.0,
                          phase: float = 0.0, worker: int = 0, metadata: tuple = (), live: Any = None,
                          channel: grpc.aio.Channel | None = None, rec: Recorder | None = None) -> StepRaw:
    """One process's part of a step. t0 (clock()): the shared start (worker processes); None =
    start as soon as this process has built its payloads (single process)."""
    rec = rec or Recorder(live, worker)
    # The ticker thread must get the GIL back promptly when its sleep ends; the default 5 ms
    # switch interval would make sends late whenever the loop is busy parsing responses.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rng = np.random.default_rng([spec.seed, worker, zlib.crc32(spec.tag.encode())])
    # this process's share of the step's connections (at least one); `channel`, when given, is one of them
    n_conn = 1 if spec.rpc == "stream" else max(1, math.ceil(spec.connections * share))
    own = open_channels(target, n_conn - (channel is not None))
    chans = ([channel] if channel is not None else []) + own
    try:
        transport = StreamTransport(chans[0], metadata) if spec.rpc == "stream" else UnaryTransport(
            chans, "decide" if spec.rpc == "decide" else spec.rpc, metadata)
        tag = f"{spec.tag}w{worker}"

        def make(i: int) -> tuple[bytes, str]:
            if source is None:
                return b"", ""
            return source.payloads(1, tag, i)[0], source.request_id(tag, i)

        if spec.concurrency > 0:
            await transport.start()
            gc.collect()
            c0 = cpu_s()
            t0 = rec.t0 = clock() + 0.02 if t0 is None else t0
            conc = max(1, round(spec.concurrency * share))
            await drive_closed(transport, make, conc, t0, spec.duration_s, spec.timeout_s, rec)
        else:
            offs = schedule(spec.rate * share, spec.duration_s, spec.arrivals, rng, phase)
            rec.raw.scheduled = len(offs)
            if source is None:
                payloads, rids = [b""] * len(offs), [""] * len(offs)
            else:
                payloads = source.payloads(len(offs), tag)
                rids = [source.request_id(tag, i) for i in range(len(offs))]
            await transport.start()
            gc.collect()
            gc.freeze()             # the payloads are long-lived: keep the collector off them
            c0 = cpu_s()
            t0 = rec.t0 = clock() + 0.02 if t0 is None else t0
            try:
                if len(offs):
                    await drive_open(transport, payloads, rids, offs, t0, spec.timeout_s, rec)
            finally:
                gc.unfreeze()
        await transport.close()
        rec.raw.cpu_s = cpu_s() - c0
        rec.raw.wall_s = clock() - t0
        rec.raw.send_span_s = max(0.0, rec.last_send - t0) if rec.last_send is not None else 0.0
        if spec.concurrency > 0:
            rec.raw.scheduled = rec.raw.sent
    finally:
        for ch in own:
            await ch.close()
    return rec.raw




def _worker_main(wid: int, nworkers: int, target: str, src_args: dict, metadata: tuple, live, inq, outq) -> None:
    """A long-lived worker: builds its own request pool once, then runs the steps it is sent."""
    try:
        source = make_source(**src_args, worker=wid)
        outq.put(("ready", wid, None))
        while True:
            msg = inq.get()
            if msg is None:
                return
            spec, t0 = msg
            raw = asyncio.run(run_step_async(target, spec, source, t0, share=1.0 / nworkers,
                                              phase=wid / nworkers, worker=wid, metadata=metadata, live=live))
            outq.put(("done", wid, raw.to_dict()))
    except BaseException as e:  # noqa: BLE001 - report to the parent, never hang it
        outq.put(("error", wid, f"{type(e).__name__}: {e}"))


class WorkerPool:
    """K spawned worker processes that run each step together, on one shared start time."""

    def __init__(self, k: int, target: str, src_args: dict, metadata: tuple = ()) -> None:
        ctx = mp.get_context("spawn")
        self.k = k
        self.live = ctx.Array("q", 3 * k, lock=False)
        self.outq = ctx.Queue()
        self.inqs = [ctx.Queue() for _ in range(k)]
        self.procs = [ctx.Process(target=_worker_main, args=(w, k, target, src_args, metadata, self.live,
                                                              self.inqs[w], self.outq), daemon=True)
                      for w in range(k)]
        for p in self.procs:
            p.start()
        for _ in range(k):
            kind, wid, err = self._get(120)
            if kind != "ready":
                self.close()
                raise RuntimeError(f"load generator worker {wid} failed to start: {err}")

    def _get(self, timeout: float):
        import queue
        try:
            return self.outq.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError("a load generator worker did not answer in time") from None

    def run(self, spec: StepSpec, t0: float) -> StepRaw:
        for i in range(3 * self.k):
            self.live[i] = 0
        for q in self.inqs:
            q.put((spec, t0))
        total = StepRaw()
        for _ in range(self.k):
            kind, wid, payload = self._get(spec.duration_s + spec.timeout_s + 120)
            if kind != "done":
                raise RuntimeError(f"load generator worker {wid} failed: {payload}")
            total.merge(StepRaw.from_dict(payload))
        return total

    def close(self) -> None:
        for q in self.inqs:
            q.put(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


