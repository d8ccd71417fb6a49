"""The challenger (shadow) model: a second bundle that scores a sampled share of decided
requests after their responses went out, never in their way.

    writer thread, after a batch's records are durable and its responses released:
        offer(items, responses) --sampled by request digest (shadow_share)--> bounded queue
        (shadow_queue batches; full: dropped, counted)
    shadow thread (own, nice 19): skips a batch while the champion has requests queued
        (dropped, counted), else challenger Pipeline.decide --> KIND_SHADOW records (the
        challenger's response, the champion's outcome and score) --> agreement counts

Agreement: outcome confusion counts (champion x challenger) and a histogram of |score
difference|, in GetModelInfo settings `shadow.*`. METRICS HOOK: `metrics_hook(name, labels,
value)` is called for each count change when set; the observability work's metrics API plugs in
there (until then GetModelInfo is the only export). The offline version of the same analysis:
`uwrt audit replay DIR --bundle CHALLENGER`.

Caveat: the shadow thread shares the process's GIL and core with serving; its priority and the
skip-while-busy rule keep it out of the way, not its Python work off the GIL (its cost on the
champion's latency is not measured yet: README, Decision records).
Thread safety: `offer` from the writer thread, `stats` from the loop (reads counters).
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from uwrt.runtime.pb import pb, rec
from uwrt.runtime.pipeline import Pipeline
from uwrt.runtime.records.log import varint
from uwrt.runtime.serving.audit import Audit, AuditItem, _fb, _fv

__all__ = ["Shadow", "sampled", "SCORE_DIFF_EDGES"]

log = logging.getLogger("uwrt.shadow")

SCORE_DIFF_EDGES = (0.5, 1, 2, 5, 10, 20, 50, 100)


def sampled(digest: bytes, share: float) -> bool:
    """Whether a request (by its digest) is in the shadow sample: the same request always is or is not."""
    return share > 0 and int.from_bytes(digest[:8], "big") < share * 2.0 ** 64


class Shadow:
    def __init__(self, pipeline: Pipeline, audit: Audit, *, share: float, queue_batches: int, profile: str,
                 busy: Callable[[], bool]) -> None:
        self.pipeline = pipeline
        self.audit = audit
        self.share = share
        self.profile = profile
        self.busy = busy
        self.q: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.counts: Counter[str] = Counter()
        self.confusion: Counter[tuple[int, int]] = Counter()
        self.diff_hist = [0] * (len(SCORE_DIFF_EDGES) + 1)
        self.metrics_hook: Callable[[str, str, float], None] | None = None
        self._batch = 0
        self._thread = threading.Thread(target=self._run, name="uwrt-shadow", daemon=True)
        self._thread.start()

    def offer(self, items: list[AuditItem], responses: list[pb.DecisionResponse]) -> None:
        pick = [(it, r) for it, r in zip(items, responses, strict=True) if sampled(it.digest, self.share)]
        if not pick:
            return
        self.counts["offered"] += len(pick)
        try:
            self.q.put_nowait(pick)
        except queue.Full:
            self.counts["dropped_queue_full"] += len(pick)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        while True:
            pick = self.q.get()
            if pick is None:
                return
            if self.busy():
                self.counts["dropped_busy"] += len(pick)
                continue
            try:
                self._score(pick)
            except Exception:  # noqa: BLE001 - the challenger never affects serving
                self.counts["failed"] += len(pick)
                log.exception("shadow model failed on a batch of %d", len(pick))

    def _score(self, pick: list[tuple[AuditItem, pb.DecisionResponse]]) -> None:
        res = self.pipeline.decide([it.req for it, _ in pick])
        self._batch += 1
        p = self.pipeline
        ctx = (_fb(14, self.profile.encode()) + _fb(15, p.encoder.name.encode()) + _fb(16, p.trees.name.encode())
               + _fv(17, int(p.degraded)) + _fv(19, len(pick)))
        bodies = []
        for (it, champ), r in zip(pick, res, strict=True):
            if not isinstance(r, pb.DecisionResponse):
                self.counts["invalid_for_challenger"] += 1
                continue
            self.counts["scored"] += 1
            self.confusion[(champ.outcome, r.outcome)] += 1
            d = abs(r.score - champ.score)
            b = next((k for k, e in enumerate(SCORE_DIFF_EDGES) if d <= e), len(SCORE_DIFF_EDGES))
            self.diff_hist[b] += 1
            if champ.outcome == r.outcome:
                self.counts["agree"] += 1
            if self.metrics_hook is not None:
                self.metrics_hook("uwrt_shadow_decisions_total", f"champion={pb.Outcome.Name(champ.outcome)},"
                                  f"challenger={pb.Outcome.Name(r.outcome)}", 1.0)
                self.metrics_hook("uwrt_shadow_score_abs_diff", "", d)
            extra = _fv(22, champ.outcome) + varint(23 << 3 | 1) + struct.pack("<d", champ.score)
            bodies.append(self.audit.decision_body(rec.KIND_SHADOW, it, None, r.SerializeToString(), ctx, extra))
        if bodies:
            self.audit.log.submit(bodies, None)

    def stats(self) -> dict[str, Any]:
        ident = self.pipeline.identity
        out = {"shadow.bundle_id": ident.bundle_id, "shadow.bundle_digest": ident.bundle_digest,
               "shadow.share": self.share, "shadow.queued": self.q.qsize()}
        for k in ("offered", "scored", "agree", "dropped_queue_full", "dropped_busy", "failed",
                  "invalid_for_challenger"):
            out[f"shadow.{k}"] = self.counts[k]
        for (a, b), n in sorted(self.confusion.items()):
            out[f"shadow.confusion.{pb.Outcome.Name(a)}.{pb.Outcome.Name(b)}"] = n
        for j, n in enumerate(self.diff_hist):
            le = f"le_{SCORE_DIFF_EDGES[j]:g}" if j < len(SCORE_DIFF_EDGES) else f"gt_{SCORE_DIFF_EDGES[-1]:g}"
            out[f"shadow.score_abs_diff.{le}"] = n
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self.q.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)


def attach_shadow(rt: Any, cfg: Any, build: Callable[[Any, str], Pipeline]) -> Shadow | None:
    """With shadow_bundle and records on: load and warm the challenger, hook it to the records."""
    if not cfg.shadow_bundle:
        return None
    if rt.audit is None:
        log.warning("shadow_bundle %s ignored: the challenger's decisions go to the decision log, and records_dir "
                    "is empty", cfg.shadow_bundle)
        return None
    pipe = build(cfg, cfg.shadow_bundle)
    rt.warm_up(pipeline=pipe)
    sh = Shadow(pipe, rt.audit, share=cfg.shadow_share, queue_batches=cfg.shadow_queue, profile=rt.profile,
                busy=lambda: bool(rt.batcher._queue))
    rt.audit.on_decided = sh.offer
    rt.info_sources.append(sh.stats)
    log.info("shadow: challenger %s (%s) scores %.1f%% of decided requests", pipe.identity.bundle_id,
             pipe.identity.bundle_digest[:12], 100 * cfg.shadow_share)
    return sh
