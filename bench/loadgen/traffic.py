"""Traffic for the load generator: request payloads and arrival schedules.

* `RequestSource`: generator traffic (`uwrt.demo.synth.generate`, a seeded pool of distinct
  applicants) or a JSONL file of DecisionRequests (`uwrt.runtime.jsonl` format). `payloads(n, tag)`
  returns n pre-serialized requests cycling through the pool, each with a unique request id
  (`<prefix><tag>-<i>`), so serialization never runs on the send path and responses can be
  matched to their request (streaming) by id.
* `make_source(kind, ...)`: the source a generator process builds for itself ("gen", "jsonl" or
  "none" for RPCs without a body); ids carry the process id, so processes never collide.
* `schedule(rate, duration_s, arrivals, rng, phase)`: intended send offsets in seconds, Poisson
  (exponential gaps) or constant (evenly spaced). `phase` in [0, 1) shifts a constant schedule
  by that fraction of one gap, so k processes with rate r/k and phases i/k together send evenly
  at rate r; k independent Poisson processes of rate r/k together are Poisson of rate r.

Thread safety: a RequestSource mutates its pool's request ids while serializing; use one per
thread/process. `schedule` is a pure function of its arguments.
"""
from __future__ import annotations

import os

import numpy as np

from uwrt.runtime.pb import pb

__all__ = ["RequestSource", "make_source", "schedule"]


def schedule(rate: float, duration_s: float, arrivals: str, rng: np.random.Generator,
             phase: float = 0.0) -> np.ndarray:
    """Intended send offsets (s), increasing, in [0, duration_s)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    if arrivals == "constant":
        t = (np.arange(int(np.ceil(rate * duration_s)) + 1) + phase) / rate
    elif arrivals == "poisson":
        t = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s * 1.2) + 100))
        while t[-1] < duration_s:  # very unlikely: extend the draw
            t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s) + 100))])
    else:
        raise ValueError(f"arrivals must be 'poisson' or 'constant', got {arrivals!r}")
    return t[t < duration_s]


class RequestSource:
    """A pool of DecisionRequests to cycle through (see module docstring)."""

    def __init__(self, requests: list[pb.DecisionRequest], *, id_prefix: str = "lg-") -> None:
        if not requests:
            raise ValueError("empty request pool")
        self.pool = requests
        self.id_prefix = id_prefix

    @classmethod
    def generated(cls, n: int = 2000, seed: int = 1, *, id_prefix: str = "lg-") -> RequestSource:
        from uwrt.demo.synth import generate
        return cls(generate(n, seed, id_prefix=id_prefix).requests, id_prefix=id_prefix)

    @classmethod
    def from_jsonl(cls, path: str, *, id_prefix: str = "lg-") -> RequestSource:
        from uwrt.runtime.jsonl import read_jsonl
        with open(path, encoding="utf-8") as fh:
            reqs = list(read_jsonl(fh))
        return cls(reqs, id_prefix=id_prefix)

    def request_id(self, tag: str, i: int) -> str:
        return f"{self.id_prefix}{tag}-{i}"

    def payloads(self, n: int, tag: str, start: int = 0) -> list[bytes]:
        """n serialized requests with ids `<prefix><tag>-<i>`, i = start .. start + n - 1."""
        out = []
        for i in range(start, start + n):
            r = self.pool[i % len(self.pool)]
            r.request_id = self.request_id(tag, i)
            out.append(r.SerializeToString())
        return out


def make_source(kind: str, pool: int = 2000, seed: int = 1, path: str | None = None,
                worker: int = 0) -> RequestSource | None:
    """kind "gen": `pool` generator applicants (seed offset per worker); "jsonl": the file at
    `path`; "none": no payloads (health / info RPCs)."""
    if kind == "none":
        return None
    if kind == "jsonl":
        if path is None:
            raise ValueError("a jsonl source needs a path")
        return RequestSource.from_jsonl(path, id_prefix=f"lg{os.getpid()}-")
    return RequestSource.generated(pool, seed + 7919 * worker, id_prefix=f"lg{os.getpid()}-")
