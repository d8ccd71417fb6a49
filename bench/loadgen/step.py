"""One step and a sweep of steps: `run_step` (a step with batch counters, server CPU and a live
progress line, on the Python engine in this process or its worker pool) and `run_sweep` (a
warm-up, then listed rates, closed-loop concurrencies, or a search for the highest rate whose
p99 stays under a limit).

A step's row is `uwrt.bench.loadgen.report.summarize`'s. Around the step the generator reads
the server's GetModelInfo batch counters (decide/stream only; the mean batch size is their
delta) and, given its pid, the server's CPU from /proc.

Thread safety: `run_step` runs its own event loop (asyncio.run) per call; not re-entrant.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import grpc

from uwrt.bench.hist import Histogram
from uwrt.bench.loadgen.accounting import Recorder, StepRaw, StepSpec, clock
from uwrt.bench.loadgen.cpus import format_cpus, proc_cpu_s, process_cpus
from uwrt.bench.loadgen.pyengine import WorkerPool, run_step_async
from uwrt.bench.loadgen.report import meets, summarize
from uwrt.bench.loadgen.transports import batch_counts, info

__all__ = ["Progress", "run_step", "SweepSpec", "run_sweep", "max_rate_meeting"]


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
                         pool: WorkerPool | None, server_pid: int | None
                         ) -> tuple[StepRaw, tuple | None, float, dict | None]:
    details = None
    async with grpc.aio.insecure_channel(target) as ch:
        before = batch_counts(await info(ch, metadata)) if spec.rpc in ("decide", "stream") else None
        s0 = proc_cpu_s(server_pid) if server_pid else float("nan")
        if spec.engine == "native":
            from uwrt.bench.loadgen.native import run_native_step
            run = functools.partial(run_native_step, target, spec, source, metadata=metadata,
                                    progress=progress.enabled, label=progress.label)
            raw, details = await asyncio.get_running_loop().run_in_executor(None, run)
        elif pool is None:
            rec = Recorder()
            task = asyncio.create_task(run_step_async(target, spec, source, None, metadata=metadata, channel=ch,
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
        after = batch_counts(await info(ch, metadata)) if before is not None else None
    batches = (after[0] - before[0], after[1] - before[1]) if before and after else None
    return raw, batches, s1 - s0, details


def run_step(target: str, spec: StepSpec, source=None, *, procs: int = 1, pool: WorkerPool | None = None,
             metadata: tuple = (), server_pid: int | None = None, progress: bool = False, label: str = "") -> dict:
    """Run one step against `target` and return its summary row (see `summarize`).

    `source`: a uwrt.bench.loadgen.traffic.RequestSource for decide/stream (None for health/info).
    `spec.engine` "native" runs the step on the native engine (open-loop unary; see
    uwrt.bench.loadgen.native), else the Python engine here or, with `pool` (K worker
    processes), split across them; `procs` is only recorded. The row also records the engine,
    the CPUs the generator ran on and, given `server_pid`, the server's."""
    if pool is not None and spec.engine == "native":
        raise ValueError("the native engine runs in one process: no worker pool")
    prog = Progress(label or _label(spec), spec, progress)
    raw, batches, server_cpu, details = asyncio.run(_run_step_here(target, spec, source, prog, metadata, pool,
                                                                   server_pid))
    row = summarize(spec, raw, batches=batches, server_cpu_s=server_cpu, procs=pool.k if pool else procs)
    client = details["cpus"] if details else process_cpus()
    row.update(series="model", engine=spec.engine, client_fifo=spec.fifo, client_cpus=format_cpus(client),
               server_cpus=format_cpus(process_cpus(server_pid)) if server_pid else None)
    if details:
        row["native"] = {k: details[k] for k in ("connects", "connect_failures", "conn_lost", "goaways",
                                                 "cpu_user_s", "cpu_sys_s", "parent_cpu_s", "nghttp2")}
    return row


def _label(spec: StepSpec) -> str:
    return f"{spec.concurrency} in flight" if spec.concurrency > 0 else f"{spec.rate:.0f} rps"


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
              progress: bool = True, on_row: Callable[[dict], None] | None = None,
              floor: Callable[[StepSpec], list[dict]] | None = None) -> list[dict]:
    """Run every step of the sweep; returns the rows in the order they ran (every row carries
    `meets_limit`). With procs > 1 a WorkerPool builds its own sources from `src_args`. `floor`
    (listed rates only): called with each step's spec right after it, its rows (the transport
    floor at the same rate, uwrt.bench.loadgen.floor) follow the step's row."""
    pool = WorkerPool(procs, target, src_args or dict(kind="none"), metadata) if procs > 1 else None
    rows: list[dict] = []
    n = [0]

    def step(with_floor: bool = False, **kw) -> dict:
        n[0] += 1
        spec = dataclasses.replace(base, tag=f"s{n[0]}", seed=base.seed + n[0], **kw)
        row = run_step(target, spec, source, procs=procs, pool=pool, metadata=metadata, server_pid=server_pid,
                       progress=progress)
        for r in [row] + (floor(spec) if floor and with_floor else []):
            r["meets_limit"] = meets(r, sweep.p99_limit_ms) if spec.concurrency <= 0 else None
            rows.append(r)
            if on_row:
                on_row(r)
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
                step(rate=r, concurrency=0, with_floor=True)
    finally:
        if pool:
            pool.close()
    return rows


def max_rate_meeting(rows: list[dict], p99_limit_ms: float) -> float | None:
    """The highest target rate among the model rows whose step met the limit (None if none did)."""
    ok = [r["target_rps"] for r in rows
          if r.get("target_rps") and r.get("series", "model") == "model" and meets(r, p99_limit_ms)]
    return max(ok) if ok else None


