"""The Explain RPC: the full grouped TreeSHAP attribution of a decision, off the decision path.

    Explain(request_id) --RecentDecisions (this worker's last explain_cache_size decisions:
                          the exact model row, outcome, PD, score)--+
    Explain(request)   --featurize + encode (+ trees) again---------+--> explain thread (nice +10,
                          at most explain_max_queue waiting, deadline min(client, explain_timeout_s))
                          --> TreeSHAP [F + 1] --> every reason group, every feature, top reasons

Priority: the explain thread runs at a lower scheduling priority than the event loop and the
model thread (Linux per-thread nice +10), so on a busy core Decide's threads win; its queue is
bounded (RESOURCE_EXHAUSTED beyond) and its deadline is its own (DEADLINE_EXCEEDED; a call still
waiting for the thread is dropped, one already computing finishes and is discarded).

By request id: the decision must have been made by the worker process that answers (one gRPC
channel reaches one worker: send Explain on the Decide's channel) within its last
`explain_cache_size` decisions; otherwise NOT_FOUND, and the full request must be sent. Decision
records (a durable store of each decision's model row) are what makes this work across workers
and restarts; until then the cache is in memory only.

For a full request the encoder runs on the explain thread when it is re-entrant (ONNX Runtime),
else on the model thread between batches.

Thread safety: RecentDecisions is locked; ExplainService.explain runs on the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any

import grpc
import numpy as np

from uwrt.runtime.errors import InvalidRequest, UwrtError
from uwrt.runtime.featurize import featurize
from uwrt.runtime.pb import pb
from uwrt.runtime.pipeline import Pipeline, sigmoid
from uwrt.runtime.policy import group_contributions, outcome_for, score_for, top_reasons

__all__ = ["RecentDecisions", "ExplainService", "ExplainNotFound", "ExplainBusy", "ExplainTimeout", "explain_row"]

log = logging.getLogger("uwrt.explain")

EXPLAIN_NICE = 10


class ExplainNotFound(UwrtError):
    code = grpc.StatusCode.NOT_FOUND


class ExplainBusy(UwrtError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ExplainTimeout(UwrtError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RecentDecisions:
    """The last `capacity` decisions by request id: (model row float32 [F], outcome, PD, score).
    A repeated request id keeps its newest decision. Thread safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: collections.OrderedDict[str, tuple[np.ndarray, int, float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def put_batch(self, request_ids: list[str], rows: np.ndarray, responses: list[pb.DecisionResponse]) -> None:
        items = [(rid, rows[j].copy(), r.outcome, r.probability_of_default, r.score)
                 for j, (rid, r) in enumerate(zip(request_ids, responses, strict=True))]
        d = self._d
        with self._lock:
            for rid, row, o, p, s in items:
                d[rid] = (row, o, p, s)
                d.move_to_end(rid)
            while len(d) > self.capacity:
                d.popitem(last=False)

    def get(self, request_id: str) -> tuple[np.ndarray, int, float, float] | None:
        with self._lock:
            return self._d.get(request_id)


def explain_row(pipe: Pipeline, row: np.ndarray, *, decided: tuple[int, float, float] | None = None,
                request_id: str = "", source: str) -> pb.ExplainResponse:
    """The ExplainResponse for one model row [F] (TreeSHAP on this thread). `decided`: the
    decision's (outcome, PD, score) as made; else computed from the tree stage's margin."""
    x = np.ascontiguousarray(row, np.float32)[None, :]
    contribs = np.asarray(pipe.explainer.contributions(x), np.float64)[0]
    feats, base = contribs[:-1], float(contribs[-1])
    outcome: int
    if decided is None:
        margin = float(pipe.trees.predict_margin(x)[0])
        pd = float(sigmoid(np.array([margin]))[0])
        outcome, score = int(outcome_for(pd, pipe.policy)), score_for(pd, pipe.policy)
    else:
        outcome, pd, score = decided
        margin = base + float(feats.sum())
    resp = pb.ExplainResponse(request_id=request_id, probability_of_default=pd, score=score, base_margin=base,
                              margin=margin, source=source)
    resp.outcome = outcome      # type: ignore[assignment]
    resp.model.CopyFrom(pipe.identity)
    resp.reasons.extend(top_reasons(feats, pipe.reason_codes, pipe.policy))
    grouped = group_contributions(feats, pipe.reason_codes)
    texts = pipe.policy.reason_texts
    for code, v in sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0])):
        resp.groups.add(code=code, text=texts.get(code, code), contribution=v)
    for f, value, c in zip(pipe.schema.features, x[0].tolist(), feats.tolist(), strict=True):
        resp.features.add(name=f.name, value=value, contribution=c, reason_code=f.reason_code)
    return resp


def _lower_priority() -> None:
    try:
        tid = threading.get_native_id()         # Linux: this thread only; relative to the process's nice
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + EXPLAIN_NICE))
    except (OSError, AttributeError) as e:
        log.warning("explain thread: cannot lower its priority (%s); it competes with Decide as an equal", e)


class ExplainService:
    """Explain calls for one server process. `model_executor`: the model thread's executor (runs
    the encoder for a full request when the encoder is not re-entrant)."""

    def __init__(self, pipe: Pipeline, cache: RecentDecisions | None, *, timeout_s: float, max_queue: int,
                 model_executor: concurrent.futures.Executor) -> None:
        self.pipe, self.cache = pipe, cache
        self.timeout_s, self.max_queue = timeout_s, max_queue
        self.model_executor = model_executor
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uwrt-explain",
                                                              initializer=_lower_priority)
        self.waiting = 0
        self.stats = {"explained": 0, "not_found": 0, "busy": 0, "timeouts": 0}

    async def explain(self, req: pb.ExplainRequest, time_remaining_s: float | None) -> pb.ExplainResponse:
        which = req.WhichOneof("target")
        if which is None:
            raise InvalidRequest("target", "set request_id (a recent decision) or request (a full DecisionRequest)")
        if which == "request_id":
            if not req.request_id:
                raise InvalidRequest("request_id", "must not be empty")
            hit = self.cache.get(req.request_id) if self.cache is not None else None
            if hit is None:
                self.stats["not_found"] += 1
                raise ExplainNotFound(
                    f"request_id {req.request_id!r}: not among this worker's recent decisions (pid {os.getpid()}, "
                    f"last {self.cache.capacity if self.cache else 0} kept; a decision is kept by the worker that "
                    "made it: call Explain on the Decide's channel, or send the full request)")
            job: Any = (self._from_row, hit, req.request_id)
        else:
            job = (self._from_request, req.request)
        if self.waiting >= self.max_queue:
            self.stats["busy"] += 1
            raise ExplainBusy(f"explain queue is full ({self.max_queue} calls waiting)")
        timeout = self.timeout_s if time_remaining_s is None else min(self.timeout_s, time_remaining_s)
        t_in = time.perf_counter_ns()
        self.waiting += 1
        fut = asyncio.get_running_loop().run_in_executor(self.executor, self._run, t_in, job)
        try:
            resp = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.stats["timeouts"] += 1
            raise ExplainTimeout(f"explain did not finish within {timeout:.3f}s") from None
        finally:
            self.waiting -= 1
        self.stats["explained"] += 1
        return resp

    def _run(self, t_in: int, job: tuple) -> pb.ExplainResponse:
        t0 = time.perf_counter_ns()
        resp: pb.ExplainResponse = job[0](*job[1:])
        resp.queue_us = (t0 - t_in) // 1000
        resp.compute_us = (time.perf_counter_ns() - t0) // 1000
        return resp

    def _from_row(self, hit: tuple[np.ndarray, int, float, float], request_id: str) -> pb.ExplainResponse:
        row, outcome, pd, score = hit
        return explain_row(self.pipe, row, decided=(outcome, pd, score), request_id=request_id, source="recent")

    def _from_request(self, request: pb.DecisionRequest) -> pb.ExplainResponse:
        p = self.pipe
        batch, errors = featurize([request], p.schema, p.encoder_config, p.limits)
        if errors:
            raise errors[0]
        if getattr(type(p.encoder), "reentrant", False):
            emb = p.encoder.encode(batch.events)
        else:       # not safe beside the model thread: run it there, between batches
            emb = self.model_executor.submit(p.encoder.encode, batch.events).result()
        rows = p.model_rows(batch, emb)
        return explain_row(p, rows[0], request_id=request.request_id, source="request")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict[str, int]:
        out = {f"explain.{k}": int(v) for k, v in self.stats.items()}
        out["explain.cache_entries"] = len(self.cache) if self.cache is not None else 0
        return out
