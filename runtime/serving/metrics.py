"""Prometheus metrics: the named metric objects, cheap accumulators in front of them, and the
/metrics endpoint (prometheus_client; nothing here writes the exposition format by hand).

    hot path (loop / model thread) --observe: bisect + add under a lock (~0.5 us)--> FastHistogram
        --flush (1 Hz sync thread, and before every in-process scrape)--> prometheus_client
        Histogram / Counter --> registry() --> /metrics (start_http: its own thread)

One process (`workers = 1`): the metrics live in this process's `registry()` and `uwrt serve`
serves them on `metrics_port`. Several (`workers = N`): the supervisor creates a private
directory and starts every worker with PROMETHEUS_MULTIPROC_DIR pointing at it, so each worker's
metrics are mmap'd files (prometheus_client's multiprocess mode: counters and histograms summed
over workers, dead workers' included; gauges per their `multiprocess_mode`); the supervisor serves
one scrape over all of them (`supervisor_registry`: MultiProcessCollector plus the pooled drift
PSI), marks a dead worker's live gauges gone (`mark_process_dead`) and removes the directory
when it exits.

Why accumulators: prometheus_client's Histogram.observe scans the buckets in Python (8 us per
call with 44 buckets measured here, 13 us in multiprocess mode, where every bucket increment is an
mmap write); `FastHistogram` bisects into a local count array and adds the counts to the
Histogram once a second, so a scrape is at most ~1 s behind the hot path (exact in one process:
the endpoint flushes before it collects). tests/runtime/serving/test_metrics.py checks that
flushed histograms equal the same values observed one by one.

Other modules register their own metrics with `registry=metrics.registry()` (the same names and
conventions: `uwrt_` prefix, `_seconds`, `_total`; in multiprocess mode a Gauge needs a
`multiprocess_mode`), or observe through `FastHistogram`.

Thread safety: every function and method may be called from any thread.
"""
from __future__ import annotations

import bisect
import glob
import http.server
import importlib.metadata
import logging
import math
import os
import platform
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from uwrt.runtime import __version__
from uwrt.runtime.serving.ports import PortUnavailable, format_address

__all__ = ["LATENCY_BUCKETS_S", "registry", "is_multiprocess", "FastHistogram", "ServerMetrics", "server_metrics",
           "start_http", "supervisor_registry", "mark_dead", "SupervisorMetrics", "METRIC_NAMES"]

log = logging.getLogger("uwrt.metrics")

#: 50 us .. 1 s, ten buckets per decade (each bound 1.26x the last): a p99 in single-digit
#: milliseconds is read to within about 13% (histogram_quantile interpolates inside a bucket)
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(float(f"{50e-6 * 10 ** (k / 10):.3g}") for k in range(44)) + (1.0,)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2 ** k) for k in range(0, 16))
STAGES = ("featurize", "encode", "trees", "reasons", "policy", "batch")
FLUSH_S = 1.0

#: every metric uwrt exports (README "Operating uwrt" lists each; a test checks a live scrape)
METRIC_NAMES: dict[str, str] = {
    "uwrt_request_duration_seconds": "histogram",
    "uwrt_requests_total": "counter",
    "uwrt_queue_wait_seconds": "histogram",
    "uwrt_stage_duration_seconds": "histogram",
    "uwrt_batch_size": "histogram",
    "uwrt_batch_tokens": "histogram",
    "uwrt_decisions_total": "counter",
    "uwrt_shed_total": "counter",
    "uwrt_deadline_expired_total": "counter",
    "uwrt_cancelled_total": "counter",
    "uwrt_queue_depth": "gauge",
    "uwrt_inflight_requests": "gauge",
    "uwrt_degraded": "gauge",
    "uwrt_encoder_primary_failures_total": "counter",
    "uwrt_encoder_fallback_batches_total": "counter",
    "uwrt_tree_path_batches_total": "counter",
    "uwrt_tree_fallbacks_total": "counter",
    "uwrt_reasons_fallbacks_total": "counter",
    "uwrt_parity_gate_failures": "gauge",
    "uwrt_bundle_info": "gauge",
    "uwrt_build_info": "gauge",
    "uwrt_explain_cache_entries": "gauge",
    "uwrt_drift_enabled": "gauge",
    "uwrt_drift_window_decisions": "gauge",
    "uwrt_drift_window_bin_decisions": "gauge",
    "uwrt_drift_window_outcome_decisions": "gauge",
    "uwrt_drift_psi": "gauge",
    "uwrt_drift_outcome_share": "gauge",
    "uwrt_drift_expected_outcome_share": "gauge",
    "uwrt_reloads_total": "counter",
}
#: only when the feature is on: decision records (records_dir), the challenger (shadow_bundle)
CONDITIONAL_METRIC_NAMES: dict[str, str] = {
    "uwrt_records_written_total": "counter",
    "uwrt_records_fsyncs_total": "counter",
    "uwrt_records_write_failures_total": "counter",
    "uwrt_records_idempotency_total": "counter",
    "uwrt_shadow_decisions_total": "counter",
    "uwrt_shadow_score_abs_diff": "histogram",
}
#: only with several workers (the supervisor's own)
SUPERVISOR_METRIC_NAMES: dict[str, str] = {"uwrt_workers": "gauge", "uwrt_worker_restarts_total": "counter",
                                           "uwrt_worker_cpu_seconds_total": "counter"}

# no `_created` series beside every counter and histogram: half the series, nothing an operator reads
prometheus_client.disable_created_metrics()

_lock = threading.Lock()
_registry: CollectorRegistry | None = None
_server_metrics: ServerMetrics | None = None


def is_multiprocess() -> bool:
    """True when this process writes its metrics to PROMETHEUS_MULTIPROC_DIR (a supervised worker;
    decided by prometheus_client when it is first imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def registry() -> CollectorRegistry:
    """This process's registry: uwrt's metrics and anything else registered with it. In one
    process it is what /metrics serves (plus the process collector); in a supervised worker its
    metrics reach the supervisor's scrape through the multiprocess files."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = CollectorRegistry(auto_describe=True)
            if not is_multiprocess():
                prometheus_client.ProcessCollector(registry=_registry)
                prometheus_client.GCCollector(registry=_registry)
        return _registry


class FastHistogram:
    """A Histogram child (labels fixed) observed through a local count array.

    `observe(v)`: bisect into the bounds and add under a lock (no prometheus_client call); `flush()`
    adds the accumulated counts and sum to the Histogram (and `count_to`, a Counter child counting
    the same events, if given). Bucket semantics are the Histogram's: bucket i counts values
    <= bound i (the first such bound). Thread safe."""

    def __init__(self, child: Any, bounds: Iterable[float], count_to: Any = None) -> None:
        self.child = child
        self.bounds = [float(b) for b in bounds]
        if self.bounds[-1] != math.inf:
            self.bounds.append(math.inf)
        if len(child._buckets) != len(self.bounds):
            raise ValueError(f"histogram has {len(child._buckets)} buckets, bounds {len(self.bounds)}")
        self.count_to = count_to
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._n = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.bounds, v)
        with self._lock:
            self._counts[i] += 1
            self._sum += v
            self._n += 1

    def observe_many(self, vs: Iterable[float]) -> None:
        b = self.bounds
        idx = [(bisect.bisect_left(b, v), v) for v in vs]
        with self._lock:
            for i, v in idx:
                self._counts[i] += 1
                self._sum += v
            self._n += len(idx)

    def flush(self) -> None:
        with self._lock:
            if not self._n:
                return
            counts, s, n = self._counts, self._sum, self._n
            self._counts, self._sum, self._n = [0] * len(self.bounds), 0.0, 0
        # prometheus_client stores non-cumulative bucket values and sums them when collected
        # (Histogram._metric_init / _child_samples); pinned in requirements/cpu.txt, checked by
        # test_fast_histogram_matches_observe
        for i, c in enumerate(counts):
            if c:
                self.child._buckets[i].inc(c)
        self.child._sum.inc(s)
        if self.count_to is not None:
            self.count_to.inc(n)


class _Delta:
    """A Counter fed from a running total kept elsewhere (batcher, encoder, tree stage stats).
    `baseline` (the total when serving starts) is not counted: warm-up is not traffic."""

    def __init__(self, child: Any, baseline: float = 0.0) -> None:
        self.child, self.last = child, baseline

    def to(self, total: float) -> None:
        if total > self.last:
            self.child.inc(total - self.last)
        self.last = max(self.last, total)


class ServerMetrics:
    """Every metric a decision server exports, created once per process (`server_metrics()`).

    Hot path: `rpc(method, code)` -> a FastHistogram for the end-to-end time (its count also
    feeds uwrt_requests_total); `queue` (per decided request), `stage[...]`, `batch_size`,
    `batch_tokens` (per batch). Everything else is set by the 1 Hz sync (runtime/serving/observe.py)."""

    def __init__(self, reg: CollectorRegistry) -> None:
        mp = is_multiprocess()
        self.multiprocess = mp
        L = LATENCY_BUCKETS_S
        self.request_duration = Histogram("uwrt_request_duration_seconds", "Server time per RPC (per message on "
                                          "DecideStream), from the handler's start to its response or error, by "
                                          "method and gRPC status", ["method", "code"], buckets=L, registry=reg)
        self.requests = Counter("uwrt_requests", "RPCs (DecideStream: messages) by method and gRPC status",
                                ["method", "code"], registry=reg)
        self.queue_wait = Histogram("uwrt_queue_wait_seconds", "Time a decided request waited in the batching "
                                    "queue, from arrival to its batch's dispatch", buckets=L, registry=reg)
        self.stage_duration = Histogram("uwrt_stage_duration_seconds", "Time per batch in each pipeline stage "
                                        "(reasons: only batches that computed TreeSHAP reasons; batch: the whole "
                                        "pipeline call)", ["stage"], buckets=L, registry=reg)
        self.batch_size_h = Histogram("uwrt_batch_size", "Requests per batch", buckets=BATCH_SIZE_BUCKETS,
                                      registry=reg)
        self.batch_tokens_h = Histogram("uwrt_batch_tokens", "History (encoder) tokens per batch",
                                        buckets=TOKEN_BUCKETS, registry=reg)
        self.decisions = Counter("uwrt_decisions", "Decisions by outcome", ["outcome"], registry=reg)
        self.shed = Counter("uwrt_shed", "Requests refused with RESOURCE_EXHAUSTED by admission (queue full or "
                            "predicted wait over max_queue_delay_us)", registry=reg)
        self.deadline_expired = Counter("uwrt_deadline_expired", "Requests failed with DEADLINE_EXCEEDED by the "
                                        "batcher before running (at admission or while queued)", registry=reg)
        self.cancelled = Counter("uwrt_cancelled", "Queued requests removed because their client went away",
                                 registry=reg)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Gauge:
            kw: dict[str, Any] = {"multiprocess_mode": mode} if mp else {}
            return Gauge(name, doc, list(labels), registry=reg, **kw)

        self.queue_depth = gauge("uwrt_queue_depth", "Requests queued, not yet dispatched (sampled each second)")
        self.inflight = gauge("uwrt_inflight_requests", "Requests queued or in a running batch (sampled each second)")
        self.degraded = gauge("uwrt_degraded", "1 while the encoder serves on its fallback (GPU failed)",
                              mode="livemax")
        self.encoder_failures = Counter("uwrt_encoder_primary_failures", "Batches the primary (GPU) encoder "
                                        "failed", registry=reg)
        self.encoder_fallbacks = Counter("uwrt_encoder_fallback_batches", "Batches encoded by the fallback "
                                         "encoder", registry=reg)
        self.tree_path = Counter("uwrt_tree_path_batches", "Batches per tree-stage path (routing)", ["path"],
                                 registry=reg)
        self.tree_fallbacks = Counter("uwrt_tree_fallbacks", "Batches a tree path failed and the next path "
                                      "served", registry=reg)
        self.reasons_fallbacks = Counter("uwrt_reasons_fallbacks", "Batches whose reasons fell back from the "
                                         "compiled TreeSHAP to xgboost", registry=reg)
        self.parity_failures = gauge("uwrt_parity_gate_failures", "Tree paths refused at load by the parity gate "
                                     "against xgboost", mode="livemax")
        self.bundle_info = gauge("uwrt_bundle_info", "The bundle served (value 1)",
                                 ("bundle_id", "bundle_digest", "encoder_version", "tree_version",
                                  "feature_schema_version", "policy_version"), mode="livemax")
        self.build_info = gauge("uwrt_build_info", "uwrt and its main components' versions (value 1)",
                                ("version", "python", "grpcio", "protobuf", "onnxruntime", "xgboost", "numpy"),
                                mode="livemax")
        self.explain_cache = gauge("uwrt_explain_cache_entries", "Recent decisions kept for Explain by request id")
        self.drift_enabled = gauge("uwrt_drift_enabled", "1 when the bundle carries monitoring.json (drift gauges "
                                   "are computed), 0 otherwise", mode="livemax")
        self.drift_n = gauge("uwrt_drift_window_decisions", "Decisions in the drift window")
        self.drift_bins = gauge("uwrt_drift_window_bin_decisions", "Decisions in the drift window per variable "
                                "and bin (bins: the development sample's deciles)", ("variable", "bin"))
        self.drift_outcomes = gauge("uwrt_drift_window_outcome_decisions", "Decisions in the drift window by "
                                    "outcome", ("outcome",))
        # PSI and shares: computed here in one process; with workers the supervisor computes them
        # from every worker's window counts (pooled), so workers do not export them
        self.drift_psi: Gauge | None = None
        self.drift_share: Gauge | None = None
        self.drift_expected_share: Gauge | None = None
        if not mp:
            self.drift_psi = Gauge("uwrt_drift_psi", "Population stability index of each variable's drift window "
                                   "against the development sample (NaN below drift_min_decisions)",
                                   ["variable"], registry=reg)
            self.drift_share = Gauge("uwrt_drift_outcome_share", "Outcome shares in the drift window",
                                     ["outcome"], registry=reg)
            self.drift_expected_share = Gauge("uwrt_drift_expected_outcome_share", "Outcome shares of the "
                                              "development sample", ["outcome"], registry=reg)

        # decision records and the challenger (created always, exported once they have a sample)
        self.records_written = Counter("uwrt_records_written", "Decision records written to the decision log",
                                       registry=reg)
        self.records_fsyncs = Counter("uwrt_records_fsyncs", "fdatasync calls of the decision log", registry=reg)
        self.records_failures = Counter("uwrt_records_write_failures", "Decision log writes that failed",
                                        registry=reg)
        self.records_idempotency = Counter("uwrt_records_idempotency", "Idempotency events by result: replays "
                                           "(a stored decision sent again), conflicts (ALREADY_EXISTS), waits "
                                           "(a duplicate waited for the first), wait_timeouts, errors_recorded",
                                           ["result"], registry=reg)
        self.reloads = Counter("uwrt_reloads", "Hot reloads by result (ok, refused)", ["result"], registry=reg)
        for result in ("ok", "refused"):
            self.reloads.labels(result)
        self.shadow_decisions = Counter("uwrt_shadow_decisions", "Requests the challenger (shadow) bundle scored, by "
                                        "the champion's and the challenger's outcome", ["champion", "challenger"],
                                        registry=reg)
        self.shadow_score_diff = Histogram("uwrt_shadow_score_abs_diff", "|challenger score - champion score| per "
                                           "shadow-scored request (score points)",
                                           buckets=(0.5, 1, 2, 5, 10, 20, 50, 100), registry=reg)

        self._rpc: dict[tuple[str, str], FastHistogram] = {}
        self._rpc_lock = threading.Lock()
        self.queue = FastHistogram(self.queue_wait, L)
        self.stage = {s: FastHistogram(self.stage_duration.labels(s), L) for s in STAGES}
        self.batch_size = FastHistogram(self.batch_size_h, BATCH_SIZE_BUCKETS)
        self.batch_tokens = FastHistogram(self.batch_tokens_h, TOKEN_BUCKETS)
        self._outcomes: dict[str, Any] = {}
        self._flushers: list[Callable[[], None]] = []
        self.build_info.labels(**build_labels()).set(1)

    def rpc(self, method: str, code: str) -> FastHistogram:
        """The end-to-end accumulator of (method, gRPC status name); created on first use."""
        h = self._rpc.get((method, code))
        if h is None:
            with self._rpc_lock:
                h = self._rpc.get((method, code))
                if h is None:
                    h = FastHistogram(self.request_duration.labels(method, code), LATENCY_BUCKETS_S,
                                      count_to=self.requests.labels(method, code))
                    self._rpc[(method, code)] = h
        return h

    def add_flusher(self, fn: Callable[[], None]) -> None:
        """Run `fn` on every flush (before a scrape in one process, and once a second)."""
        self._flushers.append(fn)

    def flush(self) -> None:
        for h in (*list(self._rpc.values()), self.queue, *self.stage.values(), self.batch_size, self.batch_tokens):
            h.flush()
        for fn in list(self._flushers):
            try:
                fn()
            except Exception:  # noqa: BLE001 - a broken flusher must not stop the others or the scrape
                log.exception("metrics flusher %r failed", fn)

    def outcome_counter(self, outcome: str) -> Any:
        c = self._outcomes.get(outcome)
        if c is None:
            c = self._outcomes[outcome] = self.decisions.labels(outcome)
        return c

    def delta(self, child: Any, baseline: float = 0.0) -> _Delta:
        return _Delta(child, baseline)


def server_metrics() -> ServerMetrics:
    """The process's ServerMetrics (created on first call, registered in `registry()`)."""
    global _server_metrics
    reg = registry()
    with _lock:
        if _server_metrics is None:
            _server_metrics = ServerMetrics(reg)
        return _server_metrics


def build_labels() -> dict[str, str]:
    def ver(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "none"
    ort = ver("onnxruntime")
    return {"version": __version__, "python": platform.python_version(), "grpcio": ver("grpcio"),
            "protobuf": ver("protobuf"), "onnxruntime": ort if ort != "none" else ver("onnxruntime-gpu"),
            "xgboost": ver("xgboost-cpu") if ver("xgboost") == "none" else ver("xgboost"), "numpy": ver("numpy")}


# ------------------------------------------------------------------------------------------------
# the endpoint

class _FlushingRegistry:
    """Collects `reg` after running `before()` (one process: flush the accumulators first)."""

    def __init__(self, reg: Any, before: Callable[[], None] | None) -> None:
        self.reg, self.before = reg, before

    def collect(self):
        if self.before is not None:
            try:
                self.before()
            except Exception:  # noqa: BLE001 - serve what there is
                log.exception("flush before scrape failed")
        return self.reg.collect()


def start_http(port: int, host: str, reg: Any, *, before: Callable[[], None] | None = None
               ) -> tuple[http.server.HTTPServer, threading.Thread]:
    """Serve /metrics for `reg` on host:port from a daemon thread (prometheus_client's server).
    Raises PortUnavailable when the address cannot be bound. Stop with `server.shutdown()`."""
    addr = format_address(host, port)
    try:
        srv, thread = prometheus_client.start_http_server(port, addr=host.strip("[]") or "0.0.0.0",
                                                          registry=_FlushingRegistry(reg, before))
    except OSError as e:
        raise PortUnavailable(f"cannot serve metrics on {addr}: {e.strerror or e}. Pick another --metrics-port "
                              "(0 turns metrics off)") from None
    thread.name = "uwrt-metrics-http"
    return srv, thread


# ------------------------------------------------------------------------------------------------
# several workers: the supervisor's view

class SupervisorMetrics:
    """The supervisor's own metrics (worker states, restarts), in its own registry."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.workers = Gauge("uwrt_workers", "Worker processes by state", ["state"], registry=reg)
        self.restarts = Counter("uwrt_worker_restarts", "Worker processes restarted after exiting", registry=reg)
        self._restarts = 0

    def update(self, states: Iterable[str], restarts: int) -> None:
        counts: dict[str, int] = {s: 0 for s in ("new", "starting", "loaded", "serving", "backoff", "draining",
                                                 "exited")}
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        for s, n in counts.items():
            self.workers.labels(s).set(n)
        if restarts > self._restarts:
            self.restarts.inc(restarts - self._restarts)
            self._restarts = restarts


class _WorkerCpu(Collector):
    """uwrt_worker_cpu_seconds_total{worker}: each live worker's CPU time (user + system, every
    thread) from /proc at scrape time; a restarted worker starts again from 0 (a counter reset)."""

    def __init__(self, pids: Callable[[], list[tuple[int, int]]]) -> None:
        self.pids = pids

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        fam = CounterMetricFamily("uwrt_worker_cpu_seconds", "CPU seconds (user + system) of each live worker "
                                  "process", labels=["worker"])
        tck = os.sysconf("SC_CLK_TCK")
        for index, pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            fam.add_metric([str(index)], (int(f[11]) + int(f[12])) / tck)
        return [fam]


class _PooledDrift(Collector):
    """uwrt_drift_psi and the outcome shares over every worker's window counts (the multiprocess
    gauges summed over live workers), from the bundle's monitoring.json."""

    def __init__(self, mp: multiprocess.MultiProcessCollector, stats: Any, min_decisions: int) -> None:
        self.mp, self.stats, self.min_decisions = mp, stats, min_decisions

    def collect(self):
        from uwrt.runtime.monitoring.drift import OUTCOMES, drift_report
        stats = self.stats
        index = {v.name: i for i, v in enumerate(stats.variables)}
        counts = np.zeros((len(stats.variables), stats.max_bins), np.int64)
        outcomes = np.zeros(len(OUTCOMES), np.int64)
        n = 0
        for fam in self.mp.collect():
            if fam.name == "uwrt_drift_window_bin_decisions":
                for s in fam.samples:
                    i = index.get(s.labels.get("variable", ""))
                    if i is not None:
                        counts[i, int(s.labels["bin"])] += int(s.value)
            elif fam.name == "uwrt_drift_window_outcome_decisions":
                for s in fam.samples:
                    if s.labels.get("outcome") in OUTCOMES:
                        outcomes[OUTCOMES.index(s.labels["outcome"])] += int(s.value)
            elif fam.name == "uwrt_drift_window_decisions":
                n += int(sum(s.value for s in fam.samples))
        rep = drift_report(stats, counts, outcomes, n, min_decisions=self.min_decisions)
        g = GaugeMetricFamily("uwrt_drift_psi", "Population stability index of each variable's drift window "
                              "(pooled over workers) against the development sample (NaN below "
                              "drift_min_decisions)", labels=["variable"])
        for name, r in rep["variables"].items():
            g.add_metric([name], r["psi"])
        share = GaugeMetricFamily("uwrt_drift_outcome_share", "Outcome shares in the drift window (pooled)",
                                  labels=["outcome"])
        expected = GaugeMetricFamily("uwrt_drift_expected_outcome_share", "Outcome shares of the development "
                                     "sample", labels=["outcome"])
        for name, r in rep["outcomes"].items():
            share.add_metric([name], r["share"])
            expected.add_metric([name], r["expected"])
        return [g, share, expected]


def supervisor_registry(path: str, *, drift_stats: Any = None, min_decisions: int = 1
                        ) -> tuple[CollectorRegistry, SupervisorMetrics]:
    """The one scrape of `uwrt serve --workers N`: every worker's metrics from the multiprocess
    directory `path`, the pooled drift PSI (when the bundle has monitoring stats), and the
    supervisor's own metrics and process collector."""
    reg = CollectorRegistry()
    mp = multiprocess.MultiProcessCollector(None, path=path)
    reg.register(mp)
    if drift_stats is not None:
        reg.register(_PooledDrift(mp, drift_stats, min_decisions))
    prometheus_client.ProcessCollector(registry=reg)
    return reg, SupervisorMetrics(reg)


def mark_dead(path: str, pid: int) -> None:
    """A worker exited: drop its live gauges (queue depth, in-flight, drift windows) from the
    scrape; its counters and histograms stay in the sums."""
    multiprocess.mark_process_dead(pid, path)


def multiprocess_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.db")))


def sample_values(text: str) -> Mapping[str, float]:      # pragma: no cover - convenience for operators' scripts
    """{'name{labels}': value} from an exposition text (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def check_port(host: str, port: int) -> None:
    """Fail fast (PortUnavailable, naming the metrics port) when host:port cannot be listened on."""
    from uwrt.runtime.serving.ports import check_free
    try:
        check_free(host, port)
    except PortUnavailable as e:
        raise PortUnavailable(f"metrics port: {e} (--metrics-port picks another, 0 turns metrics off)") from None


def single_process_endpoint(host: str, port: int) -> http.server.HTTPServer:
    """`uwrt serve` with one process: /metrics for this process's registry, flushed before each
    scrape. Returns the server (`shutdown()` stops it)."""
    m = server_metrics()
    srv, _ = start_http(port, host, registry(), before=m.flush)
    log.info("metrics on http://%s/metrics (this process)", format_address(host, srv.server_port))
    return srv


class SupervisorEndpoint:
    """The metrics side of `uwrt serve --workers N` (runtime/serving/supervisor.py): a private
    multiprocess directory under the supervisor's 0700 temporary directory (every worker is started
    with PROMETHEUS_MULTIPROC_DIR pointing at it; removed with that directory at exit), one
    /metrics endpoint over all workers, and the worker gauges."""

    def __init__(self, tmpdir: str, host: str, port: int, *, bundle: str, min_decisions: int) -> None:
        self.dir = os.path.join(tmpdir, "metrics")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.host, self.port = host, port
        stats = None
        try:
            from uwrt.runtime.monitoring.drift import load_stats_from_dir
            stats = load_stats_from_dir(bundle)
        except Exception as e:  # noqa: BLE001 - the workers log the same problem; the scrape goes on
            log.error("pooled drift PSI off: %s", e)
        self.registry, self.sup = supervisor_registry(self.dir, drift_stats=stats, min_decisions=min_decisions)
        self.http: http.server.HTTPServer | None = None

    def env(self) -> dict[str, str]:
        return {"PROMETHEUS_MULTIPROC_DIR": self.dir}

    def start(self) -> None:
        self.http, _ = start_http(self.port, self.host, self.registry)
        log.info("metrics on http://%s/metrics (every worker; multiprocess directory %s)",
                 format_address(self.host, self.http.server_port), self.dir)

    def worker_exited(self, pid: int) -> None:
        try:
            mark_dead(self.dir, pid)
        except OSError as e:
            log.warning("metrics: cannot mark worker %d dead: %s", pid, e)

    def update(self, states: Iterable[str], restarts: int) -> None:
        self.sup.update(states, restarts)

    def watch_cpu(self, pids: Callable[[], list[tuple[int, int]]]) -> None:
        """Export each worker's CPU seconds; `pids()` -> [(worker index, pid)] of the live ones."""
        self.registry.register(_WorkerCpu(pids))

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
