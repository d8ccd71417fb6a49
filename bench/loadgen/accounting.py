"""What a load step is and how it is counted: `StepSpec`, `StepRaw` (mergeable counts and
histograms) and `Recorder` (the accounting, pure: times are arguments).

Latency always runs from a request's INTENDED send time to its completion, so a late send is
charged to the result (no coordinated omission). A send more than `LATE_S` after its intended
time is "late"; a request whose deadline passed before it could be sent is "unsent". Latencies
are recorded in microsecond-resolution histograms (`uwrt.bench.hist`).

`Recorder.on_send` / `on_done` / `on_unsent` count one request at a time (the Python engine);
`record_arrays` counts a whole step of per-request arrays at once (the native engine), with the
same rules (tested equal).

Thread safety: a Recorder / StepRaw has one writer (the generator's event loop thread).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import numpy as np

from uwrt.bench.hist import Histogram

STAGES = ("queue_us", "featurize_us", "encode_us", "trees_us", "policy_us", "total_us")
LATE_S = 0.001                 # a send later than this after its intended time is "late"
FELL_BEHIND_LATE_SHARE = 0.01  # more late sends than this share (or any unsent) flags the step
clock = time.monotonic         # CLOCK_MONOTONIC: the same clock in every worker process (Linux)

__all__ = ["STAGES", "LATE_S", "FELL_BEHIND_LATE_SHARE", "clock", "StepSpec", "StepRaw", "Recorder", "record_arrays"]


@dataclasses.dataclass
class StepSpec:
    """One load step. rate=None with concurrency=N is a closed-loop step."""
    rate: float | None = 100.0
    duration_s: float = 10.0
    arrivals: str = "poisson"
    concurrency: int = 0               # > 0: closed loop with this many requests in flight
    rpc: str = "decide"                # decide | stream | health | info
    connections: int = 1               # TCP connections per step (unary RPCs; a stream uses one)
    engine: str = "python"             # python | native (open-loop unary only)
    fifo: bool = False                 # native engine under SCHED_FIFO (root): on-time wake-ups under load
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
        if self.connections < 1:
            raise ValueError("connections must be >= 1")
        if self.engine not in ("python", "native"):
            raise ValueError(f"engine must be python|native, got {self.engine!r}")


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
                for k, v in zip(STAGES, timing, strict=False):     # timing may carry an adverse flag after
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




def record_arrays(raw: StepRaw, intended_ns, sent_ns, done_ns, status, names: dict[int, str], *,
                  timing=None, has_timing=None, adverse=None) -> None:
    """Count a step's requests from arrays, as `Recorder` would one by one (times in integer ns
    on one clock; sent_ns < 0 = never sent; status codes named by `names`, 0 = OK; timing
    [n, 6] with has_timing / adverse flags per request, for OK responses)."""
    intended_ns, sent_ns, done_ns = (np.asarray(a, np.int64) for a in (intended_ns, sent_ns, done_ns))
    status = np.asarray(status)
    was_sent = sent_ns >= 0
    raw.unsent += int((~was_sent).sum())
    raw.sent += int(was_sent.sum())
    lag_ns = sent_ns[was_sent] - intended_ns[was_sent]
    raw.lag.record_many(np.maximum(0, lag_ns) // 1000)
    raw.late += int((lag_ns > LATE_S * 1e9).sum())
    ok = was_sent & (status == 0)
    raw.ok += int(ok.sum())
    raw.lat.record_many(np.maximum(0, np.rint((done_ns[ok] - intended_ns[ok]) / 1e3)).astype(np.int64))
    failed = status[was_sent & (status != 0)]
    for code, n in zip(*np.unique(failed, return_counts=True), strict=True):
        raw.errors[names.get(int(code), f"STATUS_{int(code)}")] += int(n)
    if timing is not None and has_timing is not None:
        timed = ok & np.asarray(has_timing, bool)
        t = np.asarray(timing, np.int64)[timed]
        for k, name in enumerate(STAGES):
            raw.stages[name].record_many(t[:, k])
        adv = np.asarray(adverse, bool)[timed] if adverse is not None else np.zeros(len(t), bool)
        raw.adverse += int(adv.sum())
        raw.policy_us_adverse += int(t[adv, 4].sum())
        raw.policy_us_other += int(t[~adv, 4].sum())
