"""Batch-size routing over several tree stages, calibrated on this machine at warm-up.

No single tree path wins at every batch size (shared notes: the generated if-else code is
fastest for one row, xgboost's blocked predictor overtakes it from ~16-32 rows), and the
crossover depends on the model and the CPU. `RoutedTreeStage.calibrate` times every stage at
each batch size (interleaved, median of `repeats`), drops stages that fail or disagree with the
reference, and builds a routing table: batch size -> stages cheapest first. A batch size
between two measured ones is routed like the next larger measured size; above the largest,
like the largest. `predict_margin` dispatches through a precomputed list (O(1)); a stage that
raises is logged (logger "uwrt.trees") and counted, and the batch goes to the next stage, so a
broken path never loses a result (only if every stage raises does the call raise
BackendError). A stage that fails `disable_after` times in a row is taken out of routing.

`build_tree_stage` is the factory the runtime calls at bundle load: it compiles / loads every
requested path it can (a failed compile or parity gate is a logged, counted skip), and
returns one stage (the requested path itself when only one is named: an explicit request
that cannot be met raises) or a calibrated `RoutedTreeStage`, plus a report for logs and
GetModelInfo.

Thread safety: `predict_margin` may be called from several threads if every inner stage may
(the compiled paths and xgboost may; tl2cgen_predictor serialises itself); failure/fallback
counters are lock-protected (per-stage call counts are not: see `stats`); `calibrate` swaps the
routing table atomically but should run at warm-up, before traffic.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from uwrt.runtime.errors import BackendError

__all__ = ["DEFAULT_BATCH_SIZES", "RoutedTreeStage", "build_tree_stage", "KNOWN_PATHS"]

log = logging.getLogger("uwrt.trees")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNOWN_PATHS = ("native", "tl2cgen", "xgboost", "onnx", "gtil", "tl2cgen_predictor")
_PROB_TOL = 1e-6


def _sigmoid(m: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-m))


class RoutedTreeStage:
    """Dispatch each batch to the stage measured fastest for its size; fall back on errors.

    `stages` are in preference order (used as the route until `calibrate` runs, and to break
    ties). `label` is the stage's `name`: the `tree_path` value that asked for this routing
    ("auto" or "all"), so logs and GetModelInfo's tree_backend name what was configured (the
    paths it routes between are in `describe()["paths"]`). `clock` returns nanoseconds
    (injectable so tests are deterministic).
    """

    def __init__(self, stages: Sequence, *, reference: str | None = "xgboost",
                 clock: Callable[[], int] = time.perf_counter_ns, disable_after: int = 5, label: str = "auto") -> None:
        self.name = label
        if not stages:
            raise ValueError("RoutedTreeStage needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        nf = {s.num_features for s in stages}
        if len(nf) != 1:
            per_stage = dict(zip(names, (s.num_features for s in stages), strict=True))
            raise ValueError(f"stages disagree on num_features: {per_stage}")
        self.num_features = nf.pop()
        self.stages = list(stages)
        self.reference = reference if reference in names else None
        self._clock = clock
        self._disable_after = disable_after
        self._lock = threading.Lock()
        self._calls = {n: 0 for n in names}
        self._failures = {n: 0 for n in names}
        self._consecutive = {n: 0 for n in names}
        self._fallbacks = 0
        self._disabled: dict[str, str] = {}
        self._table: list[dict] = []
        self._routes: list[tuple] = [tuple(self.stages)]  # index = batch size (clamped); one route until calibrated
        self._calibrated = False

    # -------------------------------------------------------------------------------------
    # calibration

    def _time(self, stage, rows: np.ndarray) -> int:
        t0 = self._clock()
        stage.predict_margin(rows)
        return self._clock() - t0

    def calibrate(self, rows_sample: np.ndarray, batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
                  repeats: int = 50, *, warmup: int = 3, max_seconds: float = 10.0) -> list[dict]:
        """Measure every stage at every batch size on this machine and build the routing table.

        `rows_sample` [N, F] float32: representative rows (cycled to fill larger batches).
        Stages are timed interleaved (random order each repeat) so drift hits all alike;
        per batch size, at least 5 repeats and at most `repeats`, stopping early once
        `max_seconds / len(batch_sizes)` is spent. A stage that raises, or whose margins differ
        from the reference stage's by more than 1e-6 in probability, is dropped (logged,
        counted). Returns the table (also in `describe()`)."""
        rows_sample = np.ascontiguousarray(rows_sample, np.float32)
        if rows_sample.ndim != 2 or rows_sample.shape[1] != self.num_features or not len(rows_sample):
            raise ValueError(f"rows_sample must be [N>0, {self.num_features}], got {rows_sample.shape}")
        sizes = sorted({int(b) for b in batch_sizes if int(b) > 0})
        if not sizes:
            raise ValueError("batch_sizes must hold a positive size")
        live = [s for s in self.stages if s.name not in self._disabled]
        live = self._check_agreement(live, rows_sample[np.arange(max(sizes)) % len(rows_sample)])
        if not live:
            raise BackendError("no tree stage survived calibration")
        budget_ns = max_seconds / len(sizes) * 1e9
        table = []
        for b in sizes:
            x = rows_sample[np.arange(b) % len(rows_sample)]
            samples: dict[str, list[int]] = {s.name: [] for s in live}
            for s in live:
                for _ in range(warmup):
                    s.predict_margin(x)
            spent = 0
            order_rng = np.random.default_rng(b)
            for r in range(max(1, repeats)):
                for j in order_rng.permutation(len(live)):
                    s = live[j]
                    dt = self._time(s, x)
                    samples[s.name].append(dt)
                    spent += dt
                if r + 1 >= 5 and spent > budget_ns:
                    break
            med = {n: float(np.median(v)) / 1e3 for n, v in samples.items()}
            p90 = {n: float(np.percentile(v, 90)) / 1e3 for n, v in samples.items()}
            order = sorted(live, key=lambda s: (med[s.name], live.index(s)))
            table.append({"batch": b, "best": order[0].name, "order": [s.name for s in order],
                          "median_us": {n: round(v, 2) for n, v in med.items()},
                          "p90_us": {n: round(v, 2) for n, v in p90.items()}, "repeats": len(samples[live[0].name])})
        self._install(table, live)
        log.info("tree router calibrated: %s", self.crossovers())
        return table

    def _check_agreement(self, live: list, x: np.ndarray) -> list:
        outs, kept = {}, []
        for s in live:
            try:
                outs[s.name] = np.asarray(s.predict_margin(x), np.float64)
                kept.append(s)
            except Exception as e:  # noqa: BLE001 - any failure drops the path, loudly
                self._disable(s.name, f"raised during calibration: {type(e).__name__}: {e}")
        ref = self.reference if self.reference in outs else None
        if ref is None:
            return kept
        want = _sigmoid(outs[ref])
        good = []
        for s in kept:
            diff = float(np.max(np.abs(_sigmoid(outs[s.name]) - want))) if len(want) else 0.0
            if not diff <= _PROB_TOL:
                self._disable(s.name, f"disagrees with {ref} by {diff:.3g} in probability on the calibration rows")
            else:
                good.append(s)
        return good

    def _install(self, table: list[dict], live: list) -> None:
        by_name = {s.name: s for s in live}
        max_b = table[-1]["batch"]
        routes: list[tuple] = [()] * (max_b + 1)
        j = 0
        for b in range(max_b + 1):
            while table[j]["batch"] < b:
                j += 1
            routes[b] = tuple(by_name[n] for n in table[j]["order"])
        routes[0] = routes[1] if max_b >= 1 else routes[0]
        with self._lock:
            routes = [tuple(s for s in r if s.name not in self._disabled) for r in routes]
            self._table = table
            self._routes = routes  # one atomic swap; readers see the old or the new list
            self._calibrated = True

    def crossovers(self) -> list[dict]:
        """Compressed table: [{"from_batch": b, "path": name}, ...] in increasing b."""
        out: list[dict] = []
        for row in self._table:
            if not out or out[-1]["path"] != row["best"]:
                out.append({"from_batch": row["batch"], "path": row["best"]})
        return out

    # -------------------------------------------------------------------------------------
    # dispatch

    def route(self, batch: int) -> list[str]:
        """Stage names in the order a batch of this size tries them."""
        routes = self._routes
        return [s.name for s in routes[min(batch, len(routes) - 1)]]

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        # hot path: one list index, one call, one counter bump (< 1 us over the stage itself);
        # the input's shape is only checked when a stage raises (a bad input is not a stage failure)
        routes = self._routes
        n = len(rows)
        route = routes[n] if n < len(routes) else routes[-1]
        if not route:
            raise BackendError("no tree stage is enabled")
        first = route[0]
        try:
            out = first.predict_margin(rows)
        except Exception as e:  # noqa: BLE001 - fall back to the next path, loudly
            return self._fallback(rows, route, first, e)
        self._calls[first.name] += 1  # no lock on the hot path (a lock costs more than the rest)
        if self._consecutive[first.name]:
            with self._lock:
                self._consecutive[first.name] = 0
        return out

    def _fallback(self, rows: np.ndarray, route: tuple, first, err: Exception) -> np.ndarray:
        if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.shape[1] != self.num_features:
            got = getattr(rows, "shape", type(rows))
            raise ValueError(f"expected rows [B, {self.num_features}], got {got}") from err
        n = rows.shape[0]
        self._failed(first.name, err, n)
        last = err
        for stage in route[1:]:
            if stage.name in self._disabled:
                continue
            try:
                out = stage.predict_margin(rows)
            except Exception as e:  # noqa: BLE001
                last = e
                self._failed(stage.name, e, n)
                continue
            with self._lock:
                self._calls[stage.name] += 1
                self._consecutive[stage.name] = 0
                self._fallbacks += 1
            return out
        raise BackendError(f"every tree stage failed for a batch of {n} rows (last: {type(last).__name__}: {last})")

    def _failed(self, name: str, e: Exception, n: int) -> None:
        log.warning("tree stage %r failed on a batch of %d rows (%s: %s); falling back to the next path",
                    name, n, type(e).__name__, e)
        with self._lock:
            self._failures[name] += 1
            self._consecutive[name] += 1
            disable = self._consecutive[name] >= self._disable_after
        if disable:
            self._disable(name, f"{self._disable_after} consecutive failures, last {type(e).__name__}: {e}")

    def _disable(self, name: str, why: str) -> None:
        log.warning("tree stage %r taken out of routing: %s", name, why)
        with self._lock:
            self._disabled[name] = why
            self._routes = [tuple(s for s in r if s.name != name) for r in self._routes]  # atomic swap

    # -------------------------------------------------------------------------------------
    # reporting

    def stats(self) -> dict:
        """Counters: calls and failures per stage, fallbacks (batches served by a non-first
        choice), disabled stages with the reason. Thread safe; failures and fallbacks are exact,
        `calls` is bumped without a lock on the hot path and may miss a few under concurrency."""
        with self._lock:
            return {"calls": dict(self._calls), "failures": dict(self._failures), "fallbacks": self._fallbacks,
                    "disabled": dict(self._disabled)}

    def describe(self) -> dict:
        """For GetModelInfo / logs: stages, reference, calibrated table and crossover points."""
        return {"name": self.name, "paths": [s.name for s in self.stages], "reference": self.reference,
                "calibrated": self._calibrated, "crossovers": self.crossovers(), "table": list(self._table),
                "disabled": dict(self._disabled)}


# -----------------------------------------------------------------------------------------
# factory

def build_tree_stage(booster, bundle=None, *, paths: Sequence[str] = ("native", "tl2cgen", "xgboost", "onnx"),
                     cache_dirs: Sequence[str | os.PathLike] | None = None, training_rows: np.ndarray | None = None,
                     tree_threads: int = 1, progress: Callable[[str], None] | None = None,
                     calibration_rows: np.ndarray | None = None, calibrate: bool = True,
                     batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, repeats: int = 50, label: str = "auto"):
    """Build the tree stage for `booster` -> (stage, report).

    paths: any of KNOWN_PATHS, in preference order. One path -> that stage itself (an explicit
    request: failure raises BackendError). Several -> a RoutedTreeStage over those that could be
    built (failures: logged warning, counted in report["failures"]); calibrated on
    `calibration_rows` (else `training_rows`, else the parity golden set) unless
    `calibrate=False`. cache_dirs default: bundle `cache/native` then $UWRT_CACHE_DIR or
    ~/.cache/uwrt. `training_rows` feed tl2cgen's branch annotation. The report holds per-path
    build seconds, cache dirs used, parity results, failures, the routing table, and the
    NativeExplainer (key "native_explainer") when the native path was built. `label` names a
    RoutedTreeStage (the tree_path value: "auto" or "all").
    Thread safety: call once at load; compiles serialise on the cache's per-key lock.
    """
    from uwrt.runtime.trees.cache import default_cache_dirs
    from uwrt.runtime.trees.tl2cgen import compile_tl2cgen, golden_rows
    booster.set_param({"nthread": tree_threads})
    unknown = [p for p in paths if p not in KNOWN_PATHS]
    if unknown or not paths:
        raise ValueError(f"unknown tree path(s) {unknown or paths}; choose from {KNOWN_PATHS}")
    if cache_dirs is None:
        cache_dirs = default_cache_dirs(getattr(bundle, "path", None))
    report: dict = {"requested": list(paths), "built": [], "failures": {}, "paths": {},
                    "cache_dirs": [str(d) for d in cache_dirs]}
    stages = []
    compiled = None

    def tl2cgen_lib():
        nonlocal compiled
        if compiled is None:
            compiled = compile_tl2cgen(booster, cache_dirs, training_rows=training_rows, progress=progress)
        return compiled

    for p in paths:
        t0 = time.monotonic()
        try:
            info: dict = {}
            if p == "native":
                try:
                    tree_native = importlib.import_module("uwrt.runtime.trees.native")
                except ImportError as e:
                    log.info("tree path 'native' skipped: uwrt.runtime.trees.native is not available (%s)", e)
                    report["failures"][p] = f"not available: {e}"
                    continue
                stage, explainer = tree_native.build_native(booster, cache_dirs, progress=progress)
                report["native_explainer"] = explainer
                info = {"library": str(stage.library.path) if hasattr(stage, "library") else None,
                        "parity": getattr(stage, "parity", None)}
            elif p == "tl2cgen":
                from uwrt.runtime.trees.tl2cgen import CompiledTreeStage
                stage = CompiledTreeStage(tl2cgen_lib())
                info = stage.describe()
            elif p == "tl2cgen_predictor":
                from uwrt.runtime.trees.paths import TL2cgenPredictorStage
                stage = TL2cgenPredictorStage(tl2cgen_lib())
            elif p == "xgboost":
                from uwrt.runtime.trees.base import XGBoostTreeStage
                stage = XGBoostTreeStage(booster)
            elif p == "onnx":
                from uwrt.runtime.trees.paths import ONNXTreeStage
                stage = ONNXTreeStage(booster, threads=tree_threads)
            else:  # gtil
                from uwrt.runtime.trees.paths import GTILStage
                stage = GTILStage(booster)
        except Exception as e:  # noqa: BLE001 - any failure skips the path, loudly
            if len(paths) == 1:
                raise BackendError(f"tree path {p!r} was requested but cannot be built: {type(e).__name__}: {e}") from e
            log.warning("tree path %r skipped: %s: %s", p, type(e).__name__, e)
            report["failures"][p] = f"{type(e).__name__}: {e}"
            continue
        info["build_s"] = round(time.monotonic() - t0, 3)
        report["paths"][p] = info
        report["built"].append(p)
        stages.append(stage)
    if not stages:
        raise BackendError(f"no tree path could be built (requested {list(paths)}): {report['failures']}")
    if len(paths) == 1:
        return stages[0], report
    routed = RoutedTreeStage(stages, reference="xgboost", label=label)
    if calibrate:
        rows = calibration_rows if calibration_rows is not None else (
            training_rows if training_rows is not None else golden_rows(booster))
        t0 = time.monotonic()
        routed.calibrate(rows, batch_sizes, repeats)
        report["calibrate_s"] = round(time.monotonic() - t0, 3)
    report["routing"] = routed.describe()
    return routed, report
