"""What a server process observes, in one place: the hooks the request path calls and the 1 Hz
sync that turns the runtime's own counters into metrics.

    handlers (event loop), at each RPC's end: rpc_done(method, code, t0, response)
        -> request duration + count (per method, status), queue wait; tracing.finish if sampled
    Pipeline.decide (model thread), per decided batch: on_batch(batch, rows, responses, times)
        -> stage times, batch size and tokens, outcomes; the batch's rows and scores queued for the
           drift window; recent decisions (Explain); tracing.on_batch
    sync thread (uwrt-metrics-sync, 1 Hz): batcher counters (shed, deadline-expired, cancelled),
        queue depth, in-flight, encoder fallbacks and degraded, tree routing and fallbacks,
        reasons fallbacks, explain cache size, the queued batches binned into the drift window
        (all at once), drift window counts and PSI (every DRIFT_EVERY_S),
        then flushes the accumulators into prometheus_client (runtime/serving/metrics.py)

Metrics off (`metrics_port = 0`): nothing above is observed and no drift window is kept; the
recent-decisions cache (Explain by id) and tracing are separate knobs. The hook is installed
after warm-up, so warm-up batches are never counted.

Thread safety: rpc_done on the loop; on_batch on the model thread; sync on its own thread (it only
reads the batcher's and stages' counters and the drift window's snapshot).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.errors import BundleError
from uwrt.runtime.featurize import FeatureBatch
from uwrt.runtime.monitoring.drift import (
    OUTCOMES,
    DriftWindow,
    MonitoringStats,
    drift_report,
    load_stats,
    outcome_index,
)
from uwrt.runtime.pb import pb
from uwrt.runtime.pipeline import Pipeline, StageTimes
from uwrt.runtime.serving.explain import RecentDecisions

__all__ = ["Observer"]

log = logging.getLogger("uwrt.observe")

DRIFT_EVERY_S = 5.0
_OUTCOME_NAME = {v: k for k, v in pb.Outcome.items()}


#: the decision records' idempotency counts exported as uwrt_records_idempotency_total{result}
IDEMPOTENCY_COUNTS = ("replays", "conflicts", "waits", "wait_timeouts", "errors_recorded")


class Observer:
    """The observing side of one ServingRuntime. `batcher`: for its counters and queue."""

    def __init__(self, pipe: Pipeline, cfg: RuntimeConfig, batcher: Any, *, worker: int = 0,
                 tracing: Any = None) -> None:
        self.pipe, self.cfg, self.batcher = pipe, cfg, batcher
        self.metrics_on = cfg.metrics_port != 0
        self.m = None
        if self.metrics_on:
            from uwrt.runtime.serving.metrics import server_metrics
            self.m = server_metrics()
        self.cache = RecentDecisions(cfg.explain_cache_size) if cfg.explain_cache_size else None
        self.tracing = tracing
        self.n_tabular = sum(f.source != "embedding" for f in pipe.schema.features)
        self.drift_status = "off: metrics are off (metrics_port = 0)"
        self.stats: MonitoringStats | None = None
        self.window: DriftWindow | None = None
        if self.metrics_on:
            try:
                self.stats = load_stats(pipe.bundle)
            except BundleError as e:
                log.error("drift monitoring off: %s", e)
                self.drift_status = f"off: {e}"
            else:
                if self.stats is None:
                    self.drift_status = ("off: the bundle has no monitoring.json (rebuild it with build-demo, or "
                                         "`uwrt bundle create --monitoring-sample`)")
                    log.warning("drift monitoring %s", self.drift_status)
                else:
                    self.window = DriftWindow(self.stats, capacity=cfg.drift_window_n, window_s=cfg.drift_window_s)
                    self.drift_status = (f"on: {len(self.stats.variables)} variables, window {cfg.drift_window_s:g}s / "
                                         f"{cfg.drift_window_n} decisions, development sample n={self.stats.n}")
        self._report: dict[str, Any] | None = None
        self._audit: Any = None
        self._drift_pending: list[tuple[np.ndarray, list[float], list[Any], float]] = []
        self._deltas: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_drift = 0.0
        if self.m is not None:
            self._init_metrics()

    # ------------------------------------------------------------------ hooks

    @property
    def active(self) -> bool:
        return self.m is not None or self.cache is not None or self.tracing is not None

    def install(self) -> None:
        """After warm-up: hook the pipeline and start the sync thread."""
        if self.active:
            self.pipe.on_batch = self.on_batch
        if self.m is not None and self._thread is None:
            self._baseline()
            self._thread = threading.Thread(target=self._sync_loop, name="uwrt-metrics-sync", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self.pipe.on_batch = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.m is not None:
            self.sync()
        if self.tracing is not None:
            self.tracing.shutdown()

    def rpc_done(self, method: str, code: str, t0_ns: int, resp: pb.DecisionResponse | None = None,
                 parent: Any = None) -> None:
        """At an RPC's end (per message on DecideStream): `code` the gRPC status name; `parent`:
        the client's trace context (tracing.Parent, from `trace_parent`)."""
        end = time.perf_counter_ns()
        m = self.m
        if m is not None:
            m.rpc(method, code).observe((end - t0_ns) * 1e-9)
            if resp is not None:
                m.queue.observe(resp.timing.queue_us * 1e-6)
        if self.tracing is not None and resp is not None:
            self.tracing.finish(method, resp, t0_ns, end, parent)

    def trace_parent(self, context: Any) -> Any:
        """The client's trace context of a call (tracing.Parent), None when tracing is off (the
        metadata is then not even read) or the call carries none."""
        if self.tracing is None:
            return None
        return self.tracing.parent_of(context.invocation_metadata())

    def on_batch(self, batch: FeatureBatch, rows: np.ndarray, responses: list[pb.DecisionResponse],
                 times: StageTimes) -> None:
        """Model thread, once per decided batch (the model rows exactly as the trees saw them)."""
        m = self.m
        if m is not None:
            st = m.stage
            st["featurize"].observe(times.featurize_us * 1e-6)
            st["encode"].observe(times.encode_us * 1e-6)
            st["trees"].observe(times.trees_us * 1e-6)
            st["policy"].observe(times.policy_us * 1e-6)
            if times.reasons_us:
                st["reasons"].observe(times.reasons_us * 1e-6)
            st["batch"].observe((times.featurize_us + times.encode_us + times.trees_us + times.policy_us) * 1e-6)
            m.batch_size.observe(len(responses))
            m.batch_tokens.observe(batch.events.n_tokens)
            outcomes = [r.outcome for r in responses]
            for o in set(outcomes):
                m.outcome_counter(_OUTCOME_NAME.get(o, "OUTCOME_UNSPECIFIED")).inc(outcomes.count(o))
            if self.window is not None:
                # binned by the sync thread, many batches at once (list.append is atomic)
                self._drift_pending.append((rows, [r.score for r in responses], outcomes, time.monotonic()))
        if self.cache is not None:
            self.cache.put_batch(batch.request_ids, rows, responses)
        if self.tracing is not None:
            self.tracing.on_batch(responses, times)

    # ------------------------------------------------------------------ hot reload, records, shadow

    def swap(self, old: Pipeline, new: Pipeline) -> None:
        """Hot reload (ServingRuntime.swap, on the loop): observe `new` from its first batch. The
        bundle info series switches, the drift window restarts on the new bundle's monitoring.json
        (another model's scores are not comparable), and the runtime counters count the new
        pipeline's from now. The batch still running on `old` is not observed."""
        old.on_batch = None
        self.pipe = new
        self.n_tabular = sum(f.source != "embedding" for f in new.schema.features)
        if self.active:
            new.on_batch = self.on_batch
        m = self.m
        if m is None:
            return
        self._drift_pending = []
        self.window, self.stats, self._report = None, None, None
        try:
            self.stats = load_stats(new.bundle)
        except BundleError as e:
            log.error("drift monitoring off after reload: %s", e)
            self.drift_status = f"off: {e}"
        else:
            if self.stats is None:
                self.drift_status = "off: the reloaded bundle has no monitoring.json"
            else:
                self.window = DriftWindow(self.stats, capacity=self.cfg.drift_window_n,
                                          window_s=self.cfg.drift_window_s)
                self.drift_status = (f"on: {len(self.stats.variables)} variables (reloaded bundle), window "
                                     f"{self.cfg.drift_window_s:g}s / {self.cfg.drift_window_n} decisions")
        m.bundle_info.clear()
        m.drift_bins.clear()
        self._init_metrics()
        d = self._deltas
        enc = new.encoder_stats()
        d["enc_fail"].last = float(enc.get("primary_failures", 0) or 0)  # type: ignore[arg-type]
        d["enc_fb"].last = float(enc.get("fallback_batches", 0) or 0)  # type: ignore[arg-type]
        d["reasons_fb"].last = float(getattr(new.explainer, "fallbacks", 0))
        d["paths"] = {}
        trees_stats = getattr(new.trees, "stats", None)
        if callable(trees_stats):
            ts = trees_stats()
            for path, n in ts.get("calls", {}).items():
                d["paths"][path] = m.delta(m.tree_path.labels(path), float(n))
            d["tree_fb"].last = float(ts.get("fallbacks", 0))
        else:
            d["batches0"] = float(self.batcher.stats()["batches"])

    def attach_audit(self, audit: Any) -> None:
        """Decision records (runtime/serving/audit.py): records written, fsyncs and write failures
        as counters, from its running totals at each sync."""
        m = self.m
        if m is None:
            return
        s = audit.stats()
        self._audit = audit
        self._deltas["records"] = m.delta(m.records_written, float(s.get("records", 0)))
        self._deltas["fsyncs"] = m.delta(m.records_fsyncs, float(s.get("fsyncs", 0)))
        self._deltas["rec_fail"] = m.delta(m.records_failures, float(s.get("failures", 0)))
        for k in IDEMPOTENCY_COUNTS:
            self._deltas[f"idem_{k}"] = m.delta(m.records_idempotency.labels(k), float(s.get(k, 0)))

    def attach_reloader(self, reloader: Any) -> None:
        """Hot reload (runtime/serving/reload.py) reports through its metrics hook: reloads by
        result. (The bundle info series follows `swap`.)"""
        m = self.m
        if m is None:
            return

        def hook(name: str, labels: str, value: float) -> None:
            if name == "uwrt_reloads_total":
                m.reloads.labels(labels.partition("=")[2]).inc(value)
        reloader.metrics_hook = hook

    def attach_shadow(self, shadow: Any) -> None:
        """The challenger (runtime/serving/shadow.py) reports through its metrics hook: outcome
        agreement counts and the |score difference| histogram (its own thread, off the hot path)."""
        m = self.m
        if m is None:
            return

        def hook(name: str, labels: str, value: float) -> None:
            if name == "uwrt_shadow_decisions_total":
                kv = dict(x.split("=", 1) for x in labels.split(",") if x)
                m.shadow_decisions.labels(kv.get("champion", ""), kv.get("challenger", "")).inc(value)
            elif name == "uwrt_shadow_score_abs_diff":
                m.shadow_score_diff.observe(value)
        shadow.metrics_hook = hook

    # ------------------------------------------------------------------ sync

    def _init_metrics(self) -> None:
        m = self.m
        assert m is not None
        ident = self.pipe.identity
        m.bundle_info.labels(ident.bundle_id, ident.bundle_digest, ident.encoder_version, ident.tree_version,
                             ident.feature_schema_version, ident.policy_version).set(1)
        failures = self.pipe.tree_report.get("failures", {}) or {}
        m.parity_failures.set(sum(1 for v in failures.values() if "parity" in str(v).lower()
                                  or "disagree" in str(v).lower()))
        m.drift_enabled.set(1 if self.window is not None else 0)
        d = self._deltas
        d["shed"], d["expired"], d["cancelled"] = m.delta(m.shed), m.delta(m.deadline_expired), m.delta(m.cancelled)
        d["enc_fail"], d["enc_fb"] = m.delta(m.encoder_failures), m.delta(m.encoder_fallbacks)
        d["tree_fb"], d["reasons_fb"] = m.delta(m.tree_fallbacks), m.delta(m.reasons_fallbacks)
        d["paths"] = {}
        if m.drift_expected_share is not None and self.stats is not None:
            for name in OUTCOMES:
                m.drift_expected_share.labels(name).set(self.stats.outcomes.get(name, 0.0))

    def _baseline(self) -> None:
        """Counters kept by the runtime count from serving on: warm-up (and tree calibration) is not
        traffic."""
        d, m = self._deltas, self.m
        assert m is not None
        s = self.batcher.stats()
        for key, total in (("shed", s["rejected"]), ("expired", s["expired"]), ("cancelled", s["cancelled"])):
            d[key].last = float(total)
        d["batches0"] = float(s["batches"])
        enc = self.pipe.encoder_stats()
        d["enc_fail"].last = float(enc.get("primary_failures", 0) or 0)  # type: ignore[arg-type]
        d["enc_fb"].last = float(enc.get("fallback_batches", 0) or 0)  # type: ignore[arg-type]
        d["reasons_fb"].last = float(getattr(self.pipe.explainer, "fallbacks", 0))
        trees_stats = getattr(self.pipe.trees, "stats", None)
        if callable(trees_stats):
            ts = trees_stats()
            for path, n in ts.get("calls", {}).items():
                d["paths"][path] = m.delta(m.tree_path.labels(path), float(n))
            d["tree_fb"].last = float(ts.get("fallbacks", 0))

    def _sync_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                log.exception("metrics sync failed")

    def sync(self) -> None:
        """Counters and gauges from the runtime's state, drift (every DRIFT_EVERY_S), then flush."""
        m = self.m
        if m is None:
            return
        d = self._deltas
        s = self.batcher.stats()
        d["shed"].to(s["rejected"])
        d["expired"].to(s["expired"])
        d["cancelled"].to(s["cancelled"])
        queued = int(s["queued"])
        running = len(self.batcher._inflight) if self.batcher._inflight is not None else 0
        m.queue_depth.set(queued)
        m.inflight.set(queued + running)
        enc = self.pipe.encoder_stats()
        d["enc_fail"].to(float(enc.get("primary_failures", 0) or 0))  # type: ignore[arg-type]
        d["enc_fb"].to(float(enc.get("fallback_batches", 0) or 0))  # type: ignore[arg-type]
        m.degraded.set(1 if self.pipe.degraded else 0)
        trees_stats = getattr(self.pipe.trees, "stats", None)
        if callable(trees_stats):
            ts = trees_stats()
            for path, n in ts.get("calls", {}).items():
                if path not in d["paths"]:
                    d["paths"][path] = m.delta(m.tree_path.labels(path))
                d["paths"][path].to(n)
            d["tree_fb"].to(ts.get("fallbacks", 0))
        else:       # one forced path: every batch took it
            name = self.pipe.trees.name
            if name not in d["paths"]:
                d["paths"][name] = m.delta(m.tree_path.labels(name))
            d["paths"][name].to(s["batches"] - d.get("batches0", 0.0))
        d["reasons_fb"].to(getattr(self.pipe.explainer, "fallbacks", 0))
        audit = self._audit
        if audit is not None:
            a = audit.stats()
            d["records"].to(float(a.get("records", 0)))
            d["fsyncs"].to(float(a.get("fsyncs", 0)))
            d["rec_fail"].to(float(a.get("failures", 0)))
            for k in IDEMPOTENCY_COUNTS:
                d[f"idem_{k}"].to(float(a.get(k, 0)))
        m.explain_cache.set(len(self.cache) if self.cache is not None else 0)
        now = time.monotonic()
        if self.window is not None:
            self._bin_pending()          # every second: the pending list stays small
        if self.window is not None and now - self._last_drift >= DRIFT_EVERY_S:
            self._last_drift = now
            self._sync_drift(now)
        m.flush()

    def _bin_pending(self) -> None:
        """Bin the batches decided since the last call, in one call, into the drift window (each
        batch with its own decision time)."""
        stats, window = self.stats, self.window
        assert stats is not None and window is not None
        pending, self._drift_pending = self._drift_pending, []
        if not pending:
            return
        bins = stats.bin_rows(np.concatenate([p[0] for p in pending]), self.n_tabular,
                              np.fromiter((s for p in pending for s in p[1]), np.float64))
        oc = outcome_index([o for p in pending for o in p[2]])
        start = 0
        for rows, _, _, t in pending:
            end = start + rows.shape[0]
            window.add(bins[start:end], oc[start:end], t)
            start = end

    def _sync_drift(self, now: float) -> None:
        m, stats, window = self.m, self.stats, self.window
        assert m is not None and stats is not None and window is not None
        self._bin_pending()
        counts, oc, n = window.snapshot(now)
        m.drift_n.set(n)
        for i, v in enumerate(stats.variables):
            for b in range(v.bins):
                m.drift_bins.labels(v.name, str(b)).set(int(counts[i, b]))
        for name, c in zip(OUTCOMES, oc, strict=True):
            m.drift_outcomes.labels(name).set(int(c))
        rep = drift_report(stats, counts, oc, n, min_decisions=self.cfg.drift_min_decisions)
        self._report = rep
        if m.drift_psi is not None and m.drift_share is not None:
            for name, r in rep["variables"].items():
                m.drift_psi.labels(name).set(r["psi"])
            for name, r in rep["outcomes"].items():
                m.drift_share.labels(name).set(r["share"])

    # ------------------------------------------------------------------ GetModelInfo

    def info(self) -> Mapping[str, Any]:
        """GetModelInfo settings (JSON-ready values: strings, numbers)."""
        from uwrt.runtime.serving import metrics as metrics_mod
        mode = "off" if self.m is None else ("multiprocess" if metrics_mod.is_multiprocess() else "single")
        out: dict[str, Any] = {"metrics.mode": mode, "drift.status": self.drift_status,
                               "tracing.sample_ratio": self.tracing.ratio if self.tracing is not None else 0.0,
                               "metrics.pid": os.getpid()}
        if self.tracing is not None:
            out["tracing.sampled"] = self.tracing.sampled
        rep = self._report
        if rep is not None:
            out["drift.window_decisions"] = int(rep["decisions"])
            worst = max(rep["variables"].items(), key=lambda kv: -1.0 if math.isnan(kv[1]["psi"]) else kv[1]["psi"])
            out["drift.max_psi"] = f"{worst[0]}={worst[1]['psi']:.4f} ({worst[1]['reading']})"
            score = rep["variables"]["score"]["psi"]
            out["drift.psi.score"] = None if math.isnan(score) else round(score, 4)
        return out
