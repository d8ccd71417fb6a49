"""Hot reload: a new bundle replaces the serving one without dropping a request.

    trigger (SIGHUP, or Admin.Reload when admin_enabled) --> prepare on a background thread:
        load + verify the bundle (signature rules as at start-up), build the pipeline (compiled
        tree library, ONNX export: caches), warm every batch shape, parity-check it
    --> commit on the event loop: the next batch runs on the new pipeline; the batch running
        now finishes on the old one. Any failing step refuses the bundle with a logged reason
        and the old one keeps serving.

Parity check (`parity_check`): every warm-up batch is decided as a batch and, for a sample of
its requests, one request at a time: outcomes must match and probabilities agree within 1e-6
(the batch invariance every serving path keeps), every probability finite in [0, 1].

With workers (runtime/serving/supervisor.py) the supervisor runs a two-phase round
(`ReloadRound`): every serving worker prepares; only when all report the same digest does it
tell them to commit, else all abort (nothing switches). Then the supervisor serves that bundle:
a worker restarted later loads it and is checked against its digest.

Thread safety: `prepare` runs on its own thread and touches only the new pipeline (and reads
the runtime's configuration); `commit` on the event loop; `ReloadRound` is the supervisor's
single-threaded state.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.pb import admin_pb, pb
from uwrt.runtime.pipeline import Pipeline
from uwrt.runtime.serving.warmup import warmup_batches
from uwrt.runtime.serving.workers import digest_matches

__all__ = ["Prepared", "ReloadRefused", "prepare", "parity_check", "LocalReloader", "ReloadRound"]

log = logging.getLogger("uwrt.reload")

PARITY_SAMPLE = 4          # requests per warm-up batch also decided alone
PARITY_TOL = 1e-6


class ReloadRefused(Exception):
    """The new bundle failed a step; the message says which and why."""


@dataclass
class Prepared:
    pipeline: Pipeline
    timings: list[tuple[int, int, float]]
    bundle: str
    seconds: float

    @property
    def digest(self) -> str:
        return self.pipeline.identity.bundle_digest


def parity_check(pipe: Pipeline, batches: list[list[pb.DecisionRequest]]) -> int:
    """Raise ReloadRefused unless each batch's decisions match the same requests decided alone."""
    checked = 0
    for batch in batches:
        together = pipe.decide(batch)
        for k, req in enumerate(batch[:PARITY_SAMPLE]):
            alone = pipe.decide([req])[0]
            a, b = together[k], alone
            if isinstance(a, InvalidRequest) or isinstance(b, InvalidRequest):
                bad = a if isinstance(a, InvalidRequest) else b
                raise ReloadRefused(f"parity: golden request {req.request_id} rejected: {bad}")
            pd = a.probability_of_default
            if not (math.isfinite(pd) and 0.0 <= pd <= 1.0):
                raise ReloadRefused(f"parity: probability {pd} for golden request {req.request_id}")
            if a.outcome != b.outcome or abs(pd - b.probability_of_default) > PARITY_TOL:
                raise ReloadRefused(f"parity: golden request {req.request_id} decided {pb.Outcome.Name(a.outcome)} "
                                    f"{pd:.9f} in a batch of {len(batch)} but {pb.Outcome.Name(b.outcome)} "
                                    f"{b.probability_of_default:.9f} alone")
            checked += 1
    return checked


def prepare(rt: Any, build: Callable[[Any, str], Pipeline], bundle: str, expected_digest: str = "") -> Prepared:
    """Blocking (a background thread): the new pipeline, verified, compiled, warm, parity-checked.
    `rt` is the ServingRuntime (its configuration and warm-up); `build(cfg, bundle)` loads a
    pipeline as the server does at start-up."""
    t0 = time.perf_counter()
    try:
        pipe = build(rt.cfg, bundle)
    except Exception as e:  # noqa: BLE001 - every failure refuses the bundle with its reason
        raise ReloadRefused(f"load: {type(e).__name__}: {e}") from e
    digest = pipe.identity.bundle_digest
    if expected_digest and not digest_matches(expected_digest, digest):
        raise ReloadRefused(f"digest: {bundle} has bundle digest {digest[:12]}, {expected_digest} was required")
    if rt.cfg.bundle_digest and not digest_matches(rt.cfg.bundle_digest, digest) and not expected_digest:
        raise ReloadRefused(f"digest: bundle_digest = {rt.cfg.bundle_digest} pins the served bundle; {bundle} has "
                            f"{digest[:12]} (give the new digest with the reload to change it)")
    try:
        timings = rt.warm_up(pipeline=pipe)
    except Exception as e:  # noqa: BLE001
        raise ReloadRefused(f"warm-up: {type(e).__name__}: {e}") from e
    batches = list(warmup_batches(pipe.schema, pipe.encoder_config.max_history, rt.cfg.batching))
    n = parity_check(pipe, batches)
    dt = time.perf_counter() - t0
    log.info("reload: bundle %s (%s) prepared in %.1fs: verified, compiled, %d batch shapes warm, %d parity checks",
             pipe.identity.bundle_id, digest[:12], dt, len(batches), n)
    return Prepared(pipe, timings, bundle, dt)


def run_in_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run `fn` on a new low-priority thread; the returned future (of the running loop) gets its result."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def body() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)   # serving threads come first
        except OSError:
            pass
        try:
            res: Any = fn()
            ok = True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            res, ok = e, False

        def settle() -> None:
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(res)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    threading.Thread(target=body, name="uwrt-reload", daemon=True).start()
    return fut


class LocalReloader:
    """Reloads one process's runtime (a single server, or one worker under the supervisor's round)."""

    def __init__(self, rt: Any, default_bundle: str, build: Callable[[Any, str], Pipeline]) -> None:
        self.rt = rt
        self.build = build
        self.default_bundle = default_bundle
        self.reloads = 0
        self.refused = 0
        self.last = ""
        #: METRICS HOOK (the observability work's exporter plugs in here): `metrics_hook(name,
        #: labels, value)`: `uwrt_reloads_total` with `result=ok|refused` per reload, and
        #: `uwrt_bundle_info` (value 1) with `bundle_id=...,bundle_digest=...` of the bundle now
        #: serving, at each commit. Called on the event loop.
        self.metrics_hook: Callable[[str, str, float], None] | None = None
        self._lock = asyncio.Lock()
        self._prepared: dict[str, Prepared] = {}

    async def prepare(self, bundle: str = "", expected_digest: str = "") -> Prepared:
        path = os.path.realpath(bundle or self.default_bundle)
        try:
            return await run_in_thread(lambda: prepare(self.rt, self.build, path, expected_digest))
        except ReloadRefused as e:
            self.refused += 1
            self.last = f"refused {path}: {e}"
            if self.metrics_hook is not None:
                self.metrics_hook("uwrt_reloads_total", "result=refused", 1.0)
            log.error("reload refused: %s: %s; still serving %s (%s)", path, e, self.rt.pipeline.identity.bundle_id,
                      self.rt.pipeline.identity.bundle_digest[:12])
            raise

    def commit(self, p: Prepared) -> None:
        old = self.rt.swap(p.pipeline, p.timings)
        self.reloads += 1
        self.default_bundle = p.bundle
        self.last = f"serving {p.pipeline.identity.bundle_id} ({p.digest[:12]}) from {p.bundle}"
        if self.metrics_hook is not None:
            self.metrics_hook("uwrt_reloads_total", "result=ok", 1.0)
            self.metrics_hook("uwrt_bundle_info", f"bundle_id={p.pipeline.identity.bundle_id},"
                              f"bundle_digest={p.digest}", 1.0)
        log.info("reload: now serving bundle %s (%s) from %s; batches already running finish on %s (%s)",
                 p.pipeline.identity.bundle_id, p.digest[:12], p.bundle, old.identity.bundle_id,
                 old.identity.bundle_digest[:12])

    async def reload(self, bundle: str = "", expected_digest: str = "") -> admin_pb.ReloadResponse:
        """Prepare and commit in this process (a single server)."""
        async with self._lock:
            try:
                p = await self.prepare(bundle, expected_digest)
            except ReloadRefused as e:
                return admin_pb.ReloadResponse(ok=False, message=str(e))
            self.commit(p)
            return admin_pb.ReloadResponse(ok=True, bundle_id=p.pipeline.identity.bundle_id, bundle_digest=p.digest,
                                           message=self.last, workers=1)

    def stats(self) -> dict[str, object]:
        return {"reloads": self.reloads, "refused": self.refused, "last": self.last}


@dataclass
class ReloadRound:
    """The supervisor's two-phase reload over its serving workers."""
    rid: int
    bundle: str
    expected: str
    workers: set[int]
    requester: tuple[int, int] | None          # (worker index, its request id) for Admin.Reload; None for SIGHUP
    started: float = field(default_factory=time.monotonic)
    prepared: dict[int, str] = field(default_factory=dict)     # worker -> digest
    failed: dict[int, str] = field(default_factory=dict)       # worker -> reason
    committed: set[int] = field(default_factory=set)
    phase: str = "prepare"                     # prepare | commit | done
    ok: bool = False
    message: str = ""
    digest: str = ""
    bundle_id: str = ""

    def on_prepared(self, w: int, digest: str, bundle_id: str) -> None:
        self.prepared[w] = digest
        self.bundle_id = bundle_id

    def on_failed(self, w: int, why: str) -> None:
        self.failed[w] = why

    def decide(self) -> str | None:
        """After the prepare phase: "commit" (every worker prepared the same digest), "abort", or
        None while waiting."""
        if self.phase != "prepare" or len(self.prepared) + len(self.failed) < len(self.workers):
            return None
        digests = set(self.prepared.values())
        if not self.failed and len(digests) == 1:
            self.phase, self.digest = "commit", digests.pop()
            return "commit"
        self.phase = "done"
        self.message = "; ".join(f"worker {w}: {why}" for w, why in sorted(self.failed.items())) or \
            f"workers prepared different bundles: {sorted(d[:12] for d in digests)}"
        return "abort"
