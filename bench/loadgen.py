"""`uwrt bench`: load generator for a running Underwriting server, free of coordinated omission.

    uwrt bench --target 127.0.0.1:50051 --rate 1000 --duration 30 [--json OUT] [--csv OUT]
    uwrt bench --target HOST:PORT --rates 200,500,1000,1500 --duration 20      # sweep, one line a step
    uwrt bench --target HOST:PORT --search --p99-limit-ms 10                   # highest rate with p99 <= 10 ms
    uwrt bench --target HOST:PORT --concurrency 16 --duration 10               # closed loop, 16 in flight
    uwrt bench --target HOST:PORT --rate 500 --stream                          # DecideStream instead of unary
    uwrt bench --target HOST:PORT --rate 3000 --rpc health --procs 2           # the generator's own ceiling
    python -m uwrt.bench.loadgen ...                                                # the same, without the CLI

Traffic: generator applicants (`--pool N --seed S`) or `--input requests.jsonl`, pre-serialized,
each with a unique request id. Open loop (default): a seeded schedule of intended send times,
Poisson (default) or constant arrivals; a ticker thread (time.sleep, ~0.1 ms precise; asyncio
timers round to whole ms) hands every due request to the grpc.aio client at its intended time,
whatever earlier requests are doing. Closed loop (`--concurrency N`): N requests in flight, each
sent as soon as the previous one of its slot answers (intended = actual send time).

Latency runs from each request's INTENDED send time to its response, so the client's own lag and
the server's queueing are both charged (no coordinated omission). Deadlines (`--timeout-ms`)
also count from the intended time; a request whose deadline passed before it could be sent is
"unsent". A send more than 1 ms after its intended time is "late"; a step where more than 1% of
sends were late, or any was unsent, is flagged GENERATOR FELL BEHIND, and the achieved send
rate is printed next to the target. Latencies go into microsecond-resolution log-linear
histograms (`uwrt.bench.hist`, <= 0.1% error above 2 ms, exact below).

Per step: target and achieved rate, completed rate, p50/p90/p99/p99.9/max over successful
responses (and `p99_all_ms`, where a failed request counts as never answered), errors by gRPC
status name, the server-side breakdown joined per request from each response's `timing`
(queue / featurize / encode / trees / policy / total: mean and p99), the share of adverse
outcomes (DECLINE / COUNTEROFFER, the only ones that compute TreeSHAP reasons) with the mean
policy_us of adverse vs other responses, the mean batch size
(GetModelInfo `stats.requests` / `stats.batches` deltas, when the server has them), late sends
and send lag, and the generator's own CPU per request. A live progress line runs on stderr.
Output: a table on stdout, `--json` ({meta, steps}) and `--csv` (one row per step) for machines,
`--plot` a latency-vs-rate PNG for people (uwrt.bench.plot).

One process drives a few thousand requests/s on this 2-core machine (measure it: `--rpc health`);
`--procs K` splits the schedule over K worker processes (Poisson r/K each, or constant r/K with
phases i/K: together exactly the requested arrival process) and merges their histograms.

Thread safety: `run_step` owns one event loop and one ticker thread per call; a `Recorder` is
written from its loop thread only. Library entry points: `run_step`, `run_sweep`, `summarize`.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from uwrt.bench.hist import Histogram
from uwrt.bench.meta import git_sha  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("queue_us", "featurize_us", "encode_us", "trees_us", "policy_us", "total_us")
LATE_S = 0.001                 # a send later than this after its intended time is "late"
FELL_BEHIND_LATE_SHARE = 0.01  # more late sends than this share (or any unsent) flags the step
DECIDE = "/uwrt.v1.Underwriting/Decide"
DECIDE_STREAM = "/uwrt.v1.Underwriting/DecideStream"
INFO = "/uwrt.v1.Underwriting/GetModelInfo"
HEALTH = "/grpc.health.v1.Health/Check"
SWITCH_INTERVAL_S = 0.001      # GIL switch interval in generator processes (Python's default: 0.005);
                               # 0.0002 / 0.001 / 0.005 measured the same within noise at 1000-1500 rps
clock = time.monotonic         # CLOCK_MONOTONIC: the same clock in every worker process (Linux)

__all__ = ["StepSpec", "StepRaw", "Recorder", "run_step", "run_sweep", "summarize", "register", "main"]


# ------------------------------------------------------------------------------------------------
# Step description and raw, mergeable results


@dataclasses.dataclass
class StepSpec:
    """One load step. rate=None with concurrency=N is a closed-loop step."""
    rate: float | None = 100.0
    duration_s: float = 10.0
    arrivals: str = "poisson"
    concurrency: int = 0               # > 0: closed loop with this many requests in flight
    rpc: str = "decide"                # decide | stream | health | info
    timeout_s: float = 1.0
    seed: int = 1
    tag: str = "s0"                    # request id infix: unique per step

    def __post_init__(self) -> None:
        if self.rpc not in ("decide", "stream", "health", "info"):
            raise ValueError(f"rpc must be decide|stream|health|info, got {self.rpc!r}")
        if self.concurrency <= 0 and (self.rate is None or self.rate <= 0):
            raise ValueError("an open-loop step needs rate > 0 (or give concurrency > 0)")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("duration and timeout must be > 0")


class StepRaw:
    """Counts and histograms of one step (or of several worker processes, merged)."""

    def __init__(self) -> None:
        self.lat = Histogram()         # us, intended send -> response, successful requests only
        self.lag = Histogram()         # us, actual send - intended send (clamped at 0)
        self.stages = {k: Histogram() for k in STAGES}   # server-side timing per OK response
        self.errors: collections.Counter = collections.Counter()
        # adverse outcomes (DECLINE / COUNTEROFFER: the only ones that compute TreeSHAP reasons)
        self.adverse = 0
        self.policy_us_adverse = self.policy_us_other = 0    # sums of timing.policy_us
        self.scheduled = self.sent = self.unsent = self.late = self.ok = 0
        self.cpu_s = 0.0               # generator CPU (all worker processes)
        self.send_span_s = 0.0         # first intended send -> last actual send (max over workers)
        self.wall_s = 0.0              # first intended send -> last completion (max over workers)

    def merge(self, o: StepRaw) -> None:
        self.lat.add(o.lat)
        self.lag.add(o.lag)
        for k in STAGES:
            self.stages[k].add(o.stages[k])
        self.errors.update(o.errors)
        for a in ("scheduled", "sent", "unsent", "late", "ok", "adverse", "policy_us_adverse", "policy_us_other"):
            setattr(self, a, getattr(self, a) + getattr(o, a))
        self.cpu_s += o.cpu_s
        self.wall_s = max(self.wall_s, o.wall_s)
        self.send_span_s = max(self.send_span_s, o.send_span_s)

    def to_dict(self) -> dict:
        return dict(lat=self.lat.to_dict(), lag=self.lag.to_dict(),
                    stages={k: h.to_dict() for k, h in self.stages.items()}, errors=dict(self.errors),
                    scheduled=self.scheduled, sent=self.sent, unsent=self.unsent, late=self.late, ok=self.ok,
                    adverse=self.adverse, policy_us_adverse=self.policy_us_adverse,
                    policy_us_other=self.policy_us_other,
                    cpu_s=self.cpu_s, wall_s=self.wall_s, send_span_s=self.send_span_s)

    @classmethod
    def from_dict(cls, d: dict) -> StepRaw:
        r = cls()
        r.lat, r.lag = Histogram.from_dict(d["lat"]), Histogram.from_dict(d["lag"])
        r.stages = {k: Histogram.from_dict(v) for k, v in d["stages"].items()}
        r.errors = collections.Counter(d["errors"])
        for a in ("scheduled", "sent", "unsent", "late", "ok", "cpu_s", "wall_s", "send_span_s", "adverse",
                  "policy_us_adverse", "policy_us_other"):
            setattr(r, a, d[a])
        return r


class Recorder:
    """The accounting, kept pure (times are arguments): tests drive it with made-up times.

    `on_send(t_intended, t_sent)`; then exactly one of `on_done(t_intended, t_done, status, timing)`
    or (never sent) `on_unsent()`. Latency is always t_done - t_intended."""

    def __init__(self, live: Any = None, slot: int = 0) -> None:
        self.raw = StepRaw()
        self.t0: float | None = None   # the step's start (clock()), once known
        self.last_send = None          # clock() of the latest actual send
        self.live = live               # optional shared int array [sent, ok, err] * workers (progress)
        self.slot = 3 * slot

    def on_send(self, t_intended: float, t_sent: float) -> None:
        r = self.raw
        r.sent += 1
        self.last_send = t_sent if self.last_send is None else max(self.last_send, t_sent)
        lag = t_sent - t_intended
        r.lag.record(max(0, int(lag * 1e6)))
        if lag > LATE_S:
            r.late += 1
        if self.live is not None:
            self.live[self.slot] += 1

    def on_unsent(self) -> None:
        self.raw.unsent += 1

    def on_done(self, t_intended: float, t_done: float, status: str, timing: tuple | None = None) -> None:
        """timing: the response's (queue, featurize, encode, trees, policy, total) us, optionally
        followed by an `adverse` flag (outcome DECLINE or COUNTEROFFER)."""
        r = self.raw
        if status == "OK":
            r.ok += 1
            r.lat.record(max(0, int(round((t_done - t_intended) * 1e6))))
            if timing is not None:
                for k, v in zip(STAGES, timing):
                    r.stages[k].record(int(v))
                if len(timing) > len(STAGES):
                    if timing[len(STAGES)]:
                        r.adverse += 1
                        r.policy_us_adverse += int(timing[4])
                    else:
                        r.policy_us_other += int(timing[4])
            if self.live is not None:
                self.live[self.slot + 1] += 1
        else:
            r.errors[status] += 1
            if self.live is not None:
                self.live[self.slot + 2] += 1


# ------------------------------------------------------------------------------------------------
# Transports: call(payload, request_id, timeout_s) -> (status name, timing tuple | None)


ADVERSE_OUTCOMES = (2, 3)   # pb.DECLINE, pb.COUNTEROFFER (checked against the stubs in tests)


def _timing_of(resp) -> tuple:
    t = resp.timing
    return (t.queue_us, t.featurize_us, t.encode_us, t.trees_us, t.policy_us, t.total_us,
            resp.outcome in ADVERSE_OUTCOMES)


class UnaryTransport:
    """One unary RPC per request on a shared grpc.aio channel (payloads are pre-serialized)."""

    def __init__(self, channel: grpc.aio.Channel, rpc: str, metadata: tuple = ()) -> None:
        from grpc_health.v1 import health_pb2

        from uwrt.runtime.pb import pb
        method, resp_type = {"decide": (DECIDE, pb.DecisionResponse), "info": (INFO, pb.ModelInfo),
                             "health": (HEALTH, health_pb2.HealthCheckResponse)}[rpc]
        self.decide = rpc == "decide"
        self.metadata = metadata or None
        self.stub = channel.unary_unary(method, request_serializer=None, response_deserializer=resp_type.FromString)

    async def start(self) -> None:
        pass

    async def call(self, payload: bytes, rid: str, timeout_s: float) -> tuple[str, tuple | None]:
        try:
            resp = await self.stub(payload, timeout=timeout_s, metadata=self.metadata)
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


# ------------------------------------------------------------------------------------------------
# Drivers


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


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc (NaN if unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def _run_step_async(target: str, spec: StepSpec, source, t0: float | None, *, share: float = 1.0,
                          phase: float = 0.0, worker: int = 0, metadata: tuple = (), live: Any = None,
                          channel: grpc.aio.Channel | None = None, rec: Recorder | None = None) -> StepRaw:
    """One process's part of a step. t0 (clock()): the shared start (worker processes); None =
    start as soon as this process has built its payloads (single process)."""
    rec = rec or Recorder(live, worker)
    # The ticker thread must get the GIL back promptly when its sleep ends; the default 5 ms
    # switch interval would make sends late whenever the loop is busy parsing responses.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rng = np.random.default_rng([spec.seed, worker, zlib.crc32(spec.tag.encode())])
    own = channel is None
    ch = channel or grpc.aio.insecure_channel(target)
    try:
        transport = StreamTransport(ch, metadata) if spec.rpc == "stream" else UnaryTransport(
            ch, "decide" if spec.rpc == "decide" else spec.rpc, metadata)
        tag = f"{spec.tag}w{worker}"

        def make(i: int) -> tuple[bytes, str]:
            if source is None:
                return b"", ""
            return source.payloads(1, tag, i)[0], source.request_id(tag, i)

        if spec.concurrency > 0:
            await transport.start()
            gc.collect()
            c0 = _cpu_s()
            t0 = rec.t0 = clock() + 0.02 if t0 is None else t0
            conc = max(1, round(spec.concurrency * share))
            await drive_closed(transport, make, conc, t0, spec.duration_s, spec.timeout_s, rec)
        else:
            from uwrt.bench.traffic import schedule
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
            c0 = _cpu_s()
            t0 = rec.t0 = clock() + 0.02 if t0 is None else t0
            try:
                if len(offs):
                    await drive_open(transport, payloads, rids, offs, t0, spec.timeout_s, rec)
            finally:
                gc.unfreeze()
        await transport.close()
        rec.raw.cpu_s = _cpu_s() - c0
        rec.raw.wall_s = clock() - t0
        rec.raw.send_span_s = max(0.0, rec.last_send - t0) if rec.last_send is not None else 0.0
        if spec.concurrency > 0:
            rec.raw.scheduled = rec.raw.sent
    finally:
        if own:
            await ch.close()
    return rec.raw


# ------------------------------------------------------------------------------------------------
# Worker processes (--procs K)


def _worker_main(wid: int, nworkers: int, target: str, src_args: dict, metadata: tuple, live, inq, outq) -> None:
    """A long-lived worker: builds its own request pool once, then runs the steps it is sent."""
    try:
        source = _make_source(**src_args, worker=wid)
        outq.put(("ready", wid, None))
        while True:
            msg = inq.get()
            if msg is None:
                return
            spec, t0 = msg
            raw = asyncio.run(_run_step_async(target, spec, source, t0, share=1.0 / nworkers,
                                              phase=wid / nworkers, worker=wid, metadata=metadata, live=live))
            outq.put(("done", wid, raw.to_dict()))
    except BaseException as e:  # noqa: BLE001 - report to the parent, never hang it
        outq.put(("error", wid, f"{type(e).__name__}: {e}"))


def _make_source(kind: str, pool: int = 2000, seed: int = 1, path: str | None = None, worker: int = 0):
    from uwrt.bench.traffic import RequestSource
    if kind == "none":
        return None
    if kind == "jsonl":
        return RequestSource.from_jsonl(path, id_prefix=f"lg{os.getpid()}-")
    return RequestSource.generated(pool, seed + 7919 * worker, id_prefix=f"lg{os.getpid()}-")


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


# ------------------------------------------------------------------------------------------------
# One step, with batch stats and a progress line


async def _info(channel: grpc.aio.Channel, metadata: tuple = ()) -> dict | None:
    """GetModelInfo settings, or None when the server has no such RPC (e.g. a peer framework)."""
    from uwrt.runtime.pb import pb
    stub = channel.unary_unary(INFO, request_serializer=pb.GetModelInfoRequest.SerializeToString,
                               response_deserializer=pb.ModelInfo.FromString)
    try:
        return dict((await stub(pb.GetModelInfoRequest(), timeout=5.0, metadata=metadata or None)).settings)
    except grpc.aio.AioRpcError:
        return None


def _batch_counts(settings: dict | None) -> tuple[int, int] | None:
    if not settings or "stats.requests" not in settings or "stats.batches" not in settings:
        return None
    return int(float(settings["stats.requests"])), int(float(settings["stats.batches"]))


class Progress:
    """A live one-line status on stderr (rewritten in place on a terminal, every 5 s otherwise)."""

    def __init__(self, label: str, spec: StepSpec, enabled: bool) -> None:
        self.label, self.spec, self.enabled = label, spec, enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, t0: float, sent: int, ok: int, err: int, lat: Histogram | None) -> None:
        if not self.enabled:
            return
        now = clock()
        if not self.tty and now - self.last < 5.0:
            return
        self.last = now
        el = max(0.0, now - t0)
        p99 = f" p99 {lat.percentile(99) / 1e3:.2f} ms" if lat is not None and lat.count else ""
        line = (f"[{self.label}] {el:5.1f}/{self.spec.duration_s:.0f}s sent {sent} ({sent / el if el > 0 else 0:.0f}/s)"
                f" ok {ok} err {err} in flight {sent - ok - err}{p99}")
        print(("\r\033[K" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.enabled and self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


async def _run_step_here(target: str, spec: StepSpec, source, progress: Progress, metadata: tuple,
                         pool: WorkerPool | None, server_pid: int | None) -> tuple[StepRaw, tuple | None, float]:
    async with grpc.aio.insecure_channel(target) as ch:
        before = _batch_counts(await _info(ch, metadata)) if spec.rpc in ("decide", "stream") else None
        s0 = proc_cpu_s(server_pid) if server_pid else float("nan")
        if pool is None:
            rec = Recorder()
            task = asyncio.create_task(_run_step_async(target, spec, source, None, metadata=metadata, channel=ch,
                                                       rec=rec))
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if rec.t0 is not None and clock() > rec.t0 and not task.done():
                    r = rec.raw
                    progress.show(rec.t0, r.sent, r.ok, sum(r.errors.values()), r.lat)
            raw = task.result()
        else:
            # a shared start, late enough for every worker to build its payloads (~10-30 us each)
            t0 = clock() + 1.0 + 60e-6 * (spec.rate or 0) * spec.duration_s / pool.k
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, pool.run, spec, t0)
            while not fut.done():
                await asyncio.wait({fut}, timeout=0.5)
                if clock() > t0:
                    lv = list(pool.live)
                    progress.show(t0, sum(lv[0::3]), sum(lv[1::3]), sum(lv[2::3]), None)
            raw = fut.result()
        progress.clear()
        s1 = proc_cpu_s(server_pid) if server_pid else float("nan")
        after = _batch_counts(await _info(ch, metadata)) if before is not None else None
    batches = (after[0] - before[0], after[1] - before[1]) if before and after else None
    return raw, batches, s1 - s0


def run_step(target: str, spec: StepSpec, source=None, *, procs: int = 1, pool: WorkerPool | None = None,
             metadata: tuple = (), server_pid: int | None = None, progress: bool = False, label: str = "") -> dict:
    """Run one step against `target` and return its summary row (see `summarize`).

    `source`: a uwrt.bench.traffic.RequestSource for decide/stream (None for health/info). With
    `pool` (K worker processes) the step is split across them; `procs` is only recorded."""
    prog = Progress(label or _label(spec), spec, progress)
    raw, batches, server_cpu = asyncio.run(_run_step_here(target, spec, source, prog, metadata, pool, server_pid))
    return summarize(spec, raw, batches=batches, server_cpu_s=server_cpu, procs=pool.k if pool else procs)


def _label(spec: StepSpec) -> str:
    return f"{spec.concurrency} in flight" if spec.concurrency > 0 else f"{spec.rate:.0f} rps"


# ------------------------------------------------------------------------------------------------
# Summary


def _ms(us: float) -> float:
    return us / 1e3 if not (isinstance(us, float) and math.isnan(us)) else float("nan")


def summarize(spec: StepSpec, raw: StepRaw, *, batches: tuple[int, int] | None = None,
              server_cpu_s: float = float("nan"), procs: int = 1) -> dict:
    """The step's row: every number a report needs (JSON-ready; NaN where undefined)."""
    dur = spec.duration_s
    send_s = max(dur, raw.send_span_s)   # a generator that fell behind took longer to send the step
    closed = spec.concurrency > 0
    n_err = sum(raw.errors.values())
    lat = raw.lat
    row: dict[str, Any] = dict(
        mode="closed" if closed else "open", rpc=spec.rpc, arrivals=None if closed else spec.arrivals,
        concurrency=spec.concurrency if closed else None, target_rps=None if closed else float(spec.rate),
        duration_s=dur, procs=procs, scheduled=raw.scheduled, sent=raw.sent, achieved_rps=raw.sent / send_s, send_span_s=raw.send_span_s,
        completed=raw.ok, completed_rps=raw.ok / dur, error_count=n_err, errors=dict(sorted(raw.errors.items())),
        error_share=n_err / raw.sent if raw.sent else 0.0, unsent=raw.unsent, late_sends=raw.late,
        late_share=raw.late / raw.sent if raw.sent else 0.0,
        lag_p99_ms=_ms(raw.lag.percentile(99)), lag_max_ms=_ms(float(raw.lag.max)) if raw.lag.count else float("nan"),
        p50_ms=_ms(lat.percentile(50)), p90_ms=_ms(lat.percentile(90)), p99_ms=_ms(lat.percentile(99)),
        p999_ms=_ms(lat.percentile(99.9)), max_ms=_ms(float(lat.max)) if lat.count else float("nan"),
        mean_ms=_ms(lat.mean()), p99_all_ms=_ms(lat.percentile_with_failures(99, n_err + raw.unsent)),
        server_mean_us={k: raw.stages[k].mean() for k in STAGES},
        server_p99_us={k: raw.stages[k].percentile(99) for k in STAGES},
        mean_batch_size=(batches[0] / batches[1]) if batches and batches[1] else None,
        adverse_share=raw.adverse / raw.ok if raw.ok and raw.stages["total_us"].count else None,
        policy_us_adverse=raw.policy_us_adverse / raw.adverse if raw.adverse else None,
        policy_us_other=(raw.policy_us_other / (raw.stages["total_us"].count - raw.adverse)
                         if raw.stages["total_us"].count > raw.adverse else None),
        client_cpu_pct=100 * raw.cpu_s / raw.wall_s if raw.wall_s else float("nan"),
        client_cpu_us_per_req=1e6 * raw.cpu_s / raw.sent if raw.sent else float("nan"),
        server_cpu_pct=100 * server_cpu_s / raw.wall_s if raw.wall_s else float("nan"),
        wall_s=raw.wall_s)
    row["fell_behind"] = (not closed) and bool(raw.unsent or raw.late > FELL_BEHIND_LATE_SHARE * max(raw.sent, 1))
    return row


def meets(row: dict, p99_limit_ms: float) -> bool:
    """The step held the latency limit: p99 counting failures as unanswered, and the generator
    kept its schedule (a fell-behind step proves nothing)."""
    return (not row["fell_behind"]) and row["p99_all_ms"] <= p99_limit_ms


HEADER = (f"{'target':>7} {'sent/s':>7} {'ok/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>8} {'max':>8}"
          f" {'batch':>5} {'queue':>6} {'enc':>6} {'trees':>6} {'srv':>6} {'cli%':>5} {'us/req':>6}  errors")


def format_row(r: dict) -> str:
    f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    s = r["server_mean_us"]
    target = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target_rps']:.0f}"
    err = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    line = (f"{target:>7} {r['achieved_rps']:>7.1f} {r['completed_rps']:>7.1f} {f(r['p50_ms'], '7.3f')} "
            f"{f(r['p90_ms'], '7.3f')} {f(r['p99_ms'], '7.3f')} {f(r['p999_ms'], '8.3f')} {f(r['max_ms'], '8.3f')} "
            f"{f(r['mean_batch_size'], '5.2f')} {f(s['queue_us'], '6.0f')} {f(s['encode_us'], '6.0f')} "
            f"{f(s['trees_us'], '6.0f')} {f(s['total_us'], '6.0f')} {f(r['client_cpu_pct'], '5.0f')} "
            f"{f(r['client_cpu_us_per_req'], '6.0f')}  {err}")
    if r["fell_behind"]:
        line += (f"  [GENERATOR FELL BEHIND: sent {r['achieved_rps']:.0f}/s of {r['target_rps']:.0f}/s, "
                 f"{r['late_share']:.1%} late > 1 ms, lag p99 {r['lag_p99_ms']:.1f} ms, {r['unsent']} unsent]")
    return line


def flat_row(r: dict) -> dict:
    """A CSV-friendly copy: nested dicts become prefixed columns, errors one 'CODE:n;...' cell."""
    out = {}
    for k, v in r.items():
        if k == "errors":
            out[k] = ";".join(f"{c}:{n}" for c, n in v.items())
        elif isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    import csv
    flat = [flat_row(r) for r in rows]
    cols: list[str] = []
    for fr in flat:
        cols += [c for c in fr if c not in cols]
    _mkdir_for(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)


def _mkdir_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    _mkdir_for(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_json_safe(dict(meta=meta, steps=rows)), fh, indent=1)




def machine_meta() -> dict:
    return dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), git=git_sha(),
                platform=platform.platform(), cpu_count=os.cpu_count(), python=platform.python_version(),
                grpc=grpc.__version__)


# ------------------------------------------------------------------------------------------------
# Sweeps


@dataclasses.dataclass
class SweepSpec:
    """A warm-up, then either the listed `rates` (or closed-loop `concurrencies`), or a search
    for the highest rate whose p99 (failures counted as unanswered) stays <= p99_limit_ms."""
    rates: list[float] = dataclasses.field(default_factory=list)
    concurrencies: list[int] = dataclasses.field(default_factory=list)
    search: bool = False
    p99_limit_ms: float = 10.0
    search_start: float = 100.0
    search_max: float = 20000.0
    search_steps: int = 4              # bisection steps after the first failing rate
    warmup_s: float = 2.0
    pause_s: float = 0.5               # between steps (lets the server settle)


def run_sweep(target: str, base: StepSpec, sweep: SweepSpec, source=None, *, procs: int = 1,
              src_args: dict | None = None, metadata: tuple = (), server_pid: int | None = None,
              progress: bool = True, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every step of the sweep; returns the rows in the order they ran (search rows carry
    `meets_limit`). With procs > 1 a WorkerPool builds its own sources from `src_args`."""
    pool = WorkerPool(procs, target, src_args or dict(kind="none"), metadata) if procs > 1 else None
    rows: list[dict] = []
    n = [0]

    def step(**kw) -> dict:
        n[0] += 1
        spec = dataclasses.replace(base, tag=f"s{n[0]}", seed=base.seed + n[0], **kw)
        row = run_step(target, spec, source, procs=procs, pool=pool, metadata=metadata, server_pid=server_pid,
                       progress=progress)
        row["meets_limit"] = meets(row, sweep.p99_limit_ms) if spec.concurrency <= 0 else None
        rows.append(row)
        if on_row:
            on_row(row)
        time.sleep(sweep.pause_s)
        return row

    try:
        first = (sweep.concurrencies[:1] and dict(concurrency=sweep.concurrencies[0], rate=None)) or \
            dict(rate=(sweep.rates[0] if sweep.rates else sweep.search_start), concurrency=0)
        if sweep.warmup_s > 0:
            n[0] += 1
            run_step(target, dataclasses.replace(base, tag="warm", duration_s=sweep.warmup_s, **first), source,
                     pool=pool, metadata=metadata, progress=progress, label="warm-up")
        if sweep.concurrencies:
            for c in sweep.concurrencies:
                step(concurrency=c, rate=None)
        elif sweep.search:
            lo, hi = None, None
            r = sweep.search_start
            while r <= sweep.search_max:
                if meets(step(rate=r, concurrency=0), sweep.p99_limit_ms):
                    lo = r
                    r *= 2
                else:
                    hi = r
                    break
            if lo is not None and hi is not None:
                for _ in range(sweep.search_steps):
                    if hi - lo <= 0.05 * lo:
                        break
                    mid = round((lo + hi) / 2)
                    if meets(step(rate=mid, concurrency=0), sweep.p99_limit_ms):
                        lo = mid
                    else:
                        hi = mid
        else:
            for r in sweep.rates:
                step(rate=r, concurrency=0)
    finally:
        if pool:
            pool.close()
    return rows


def max_rate_meeting(rows: list[dict], p99_limit_ms: float) -> float | None:
    """The highest target rate among the rows whose step met the limit (None if none did)."""
    ok = [r["target_rps"] for r in rows if r.get("target_rps") and meets(r, p99_limit_ms)]
    return max(ok) if ok else None


# ------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="server address HOST:PORT (loopback only)")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=None, help="one open-loop step at this many requests/s")
    load.add_argument("--rates", default=None, help="sweep: comma-separated requests/s, one step each")
    load.add_argument("--concurrency", default=None,
                      help="closed loop: N requests in flight (comma-separated list: one step each)")
    load.add_argument("--search", action="store_true",
                      help="find the highest rate whose p99 (failures count as unanswered) stays <= --p99-limit-ms")
    load.add_argument("--p99-limit-ms", type=float, default=10.0, help="latency limit for --search (default 10)")
    load.add_argument("--search-start", type=float, default=100.0, help="first rate of --search (doubles until it fails)")
    load.add_argument("--search-steps", type=int, default=4, help="bisection steps after the first failure (default 4)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step (default 10)")
    load.add_argument("--warmup", type=float, default=2.0, help="unreported warm-up seconds at the first step's load")
    load.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    load.add_argument("--timeout-ms", type=float, default=1000.0, help="deadline, from the intended send time")
    load.add_argument("--stream", action="store_true", help="send over one DecideStream per process instead of unary Decide")
    load.add_argument("--rpc", choices=["decide", "health", "info"], default="decide",
                      help="health/info: cheap RPCs that measure the generator's own ceiling")
    load.add_argument("--procs", type=int, default=1, help="generator processes (split the load; default 1)")
    load.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                      help="gRPC metadata on every call (e.g. application=NAME for a Ray Serve proxy)")
    src = p.add_argument_group("traffic")
    src.add_argument("--input", default=None, help="requests JSONL instead of generator traffic")
    src.add_argument("--pool", type=int, default=2000, help="distinct generator applicants (default 2000)")
    src.add_argument("--seed", type=int, default=1)
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, help="write {meta, steps} JSON here")
    out.add_argument("--csv", default=None, help="write one CSV row per step here")
    out.add_argument("--plot", default=None, help="write a latency-vs-rate PNG here (needs matplotlib)")
    out.add_argument("--label", default=None, help="series name in the JSON and plot (default: the target)")
    out.add_argument("--server-pid", type=int, default=None, help="report this process's CPU use per step")
    out.add_argument("--quiet", action="store_true", help="no live progress line")
    out.add_argument("--allow-remote", action="store_true", help=argparse.SUPPRESS)


def _parse_list(s: str, conv) -> list:
    try:
        return [conv(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: not a comma-separated list of numbers: {s!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    host = args.target.rsplit(":", 1)[0]
    if not args.allow_remote and host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        print(f"error: only loopback targets are allowed, got {args.target}", file=sys.stderr)
        return 2
    modes = sum(x is not None and x is not False for x in (args.rate, args.rates, args.concurrency, args.search or None))
    if modes > 1:
        print("error: give one of --rate, --rates, --concurrency, --search", file=sys.stderr)
        return 2
    rpc = "stream" if args.stream else args.rpc
    if args.stream and args.rpc != "decide":
        print("error: --stream sends DecideStream; it cannot be combined with --rpc", file=sys.stderr)
        return 2
    sweep = SweepSpec(p99_limit_ms=args.p99_limit_ms, search=args.search, search_start=args.search_start,
                      search_steps=args.search_steps, warmup_s=args.warmup)
    if args.concurrency:
        sweep.concurrencies = _parse_list(args.concurrency, int)
    elif args.rates:
        sweep.rates = _parse_list(args.rates, float)
    elif not args.search:
        sweep.rates = [args.rate if args.rate is not None else 100.0]
    base = StepSpec(rate=(sweep.rates or [sweep.search_start])[0], duration_s=args.duration, arrivals=args.arrivals,
                    rpc=rpc, timeout_s=args.timeout_ms / 1e3, seed=args.seed)
    metadata = tuple(tuple(kv.split("=", 1)) for kv in args.metadata)
    if any(len(kv) != 2 for kv in metadata):
        print("error: --metadata takes KEY=VALUE", file=sys.stderr)
        return 2
    src_args = dict(kind="none") if rpc in ("health", "info") else (
        dict(kind="jsonl", path=args.input) if args.input else dict(kind="gen", pool=args.pool, seed=args.seed))
    try:
        source = _make_source(**src_args) if args.procs <= 1 else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = None
    try:
        settings = asyncio.run(_probe(args.target, metadata))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uwrt bench -> {args.target}: {rpc}, {args.procs} generator process(es), "
          f"{'closed loop' if sweep.concurrencies else args.arrivals + ' arrivals'}, {args.duration:g}s per step",
          flush=True)
    print(HEADER, flush=True)
    rows = run_sweep(args.target, base, sweep, source, procs=args.procs, src_args=src_args, metadata=metadata,
                     server_pid=args.server_pid, progress=not args.quiet,
                     on_row=lambda r: print(format_row(r), flush=True))
    if any(r["fell_behind"] for r in rows):
        print("WARNING: the generator fell behind its schedule in some steps (late sends / unsent): their latencies "
              "are not the server's alone; use --procs or a lower rate", flush=True)
    if sweep.search:
        best = max_rate_meeting(rows, args.p99_limit_ms)
        print(f"highest rate with p99 <= {args.p99_limit_ms:g} ms: "
              f"{'none of the tried rates' if best is None else f'{best:.0f} requests/s'}", flush=True)
    meta = dict(machine_meta(), target=args.target, label=args.label or args.target, command=sys.argv,
                rpc=rpc, arrivals=args.arrivals, duration_s=args.duration, warmup_s=args.warmup,
                timeout_ms=args.timeout_ms, seed=args.seed, procs=args.procs, input=args.input, pool=args.pool,
                p99_limit_ms=args.p99_limit_ms, late_threshold_ms=LATE_S * 1e3,
                server_settings={k: v for k, v in (settings or {}).items() if not k.startswith("stats.")})
    if args.json:
        write_json(args.json, meta, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        from uwrt.bench.plot import plot_latency_vs_rate
        plot_latency_vs_rate({meta["label"]: rows}, args.plot, p99_limit_ms=args.p99_limit_ms)
    return 0


async def _probe(target: str, metadata: tuple, timeout_s: float = 10.0) -> dict | None:
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout_s)
        except TimeoutError:
            raise ConnectionError(f"cannot reach a server at {target} within {timeout_s:g}s") from None
        return await _info(ch, metadata)


def register(sub) -> None:
    """Add `bench` to the uwrt CLI's subparsers."""
    b = sub.add_parser("bench", help="load-test a running server (open/closed loop, sweeps, p99 search)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(b)
    b.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uwrt.bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
