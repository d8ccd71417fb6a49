"""`uwrt drift`: the population stability index of a request file against the bundle's development
sample, offline (the same statistics and functions the server's drift gauges use:
runtime/monitoring/drift.py); and `development_stats`, which `uwrt bundle create
--monitoring-sample` uses to compute a bundle's monitoring.json from a sample of requests.

Requests are scored by the bundle's pipeline exactly as `uwrt score` does; invalid requests are
skipped and counted. Thread safety: one command per process.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator

import numpy as np

from uwrt.runtime.errors import BundleError
from uwrt.runtime.monitoring.drift import (
    MODERATE,
    SIGNIFICANT,
    MonitoringStats,
    drift_report,
    load_stats,
    outcome_index,
)
from uwrt.runtime.pb import pb

__all__ = ["register", "cmd_drift", "development_stats", "score_rows"]


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = sub.add_parser("drift", help="PSI of a request file against the bundle's development sample",
                       description="Score the requests with the bundle and report the population stability index "
                                   "(PSI) of the score, each tabular feature and the embedding norm against the "
                                   "development sample the bundle carries (monitoring.json; 10 bins on its deciles, "
                                   "empty bins smoothed), and the outcome mix. Reading: < 0.10 stable, 0.10-0.25 "
                                   "moderate, > 0.25 significant. The server exports the same as uwrt_drift_psi. "
                                   "Exit 2 when the bundle has no monitoring.json; with --fail-above, exit 1 when "
                                   "any PSI is above it.")
    d.add_argument("--bundle", required=True, help="bundle directory")
    d.add_argument("--input", required=True, help="requests JSONL ('-' for stdin)")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    d.add_argument("--fail-above", type=float, default=None, metavar="PSI",
                   help=f"exit 1 if any variable's PSI exceeds this (e.g. {SIGNIFICANT})")
    d.add_argument("--score-batch-size", type=int, default=64, help="requests per pipeline call (default 64)")
    d.set_defaults(func=cmd_drift)
    return d


def score_rows(pipe, requests: list[pb.DecisionRequest], batch_size: int = 64
               ) -> Iterator[tuple[np.ndarray, list[pb.DecisionResponse]]]:
    """(model rows [B, F], responses) per pipeline batch of the valid requests (invalid ones skipped)."""
    got: list[tuple[np.ndarray, list[pb.DecisionResponse]]] = []
    pipe.on_batch = lambda batch, rows, responses, times: got.append((rows, responses))
    try:
        for s in range(0, len(requests), batch_size):
            pipe.decide(requests[s:s + batch_size])
            yield from got
            got.clear()
    finally:
        pipe.on_batch = None


def development_stats(pipe, requests: list[pb.DecisionRequest], *, source: str) -> MonitoringStats:
    """monitoring.json statistics of a development sample of requests, scored by `pipe`."""
    rows, scores, outcomes = [], [], []
    for r, resp in score_rows(pipe, requests):
        rows.append(r)
        scores += [x.score for x in resp]
        outcomes += [x.outcome for x in resp]
    if not rows:
        raise ValueError("no valid request in the development sample")
    x = np.concatenate(rows)
    n_tab = sum(f.source != "embedding" for f in pipe.schema.features)
    return MonitoringStats.compute(tabular=x[:, :n_tab], embedding=x[:, n_tab:], scores=np.asarray(scores),
                                   outcomes=outcomes, feature_names=pipe.schema.names[:n_tab], source=source)


def cmd_drift(args: argparse.Namespace) -> int:
    from uwrt.runtime.config import RuntimeConfig
    from uwrt.runtime.jsonl import read_jsonl
    from uwrt.runtime.pipeline import Pipeline
    cfg = RuntimeConfig(score_batch_size=args.score_batch_size)
    cfg.apply_threads()
    pipe = Pipeline.from_dir(args.bundle, config=cfg)
    try:
        stats = load_stats(pipe.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stats is None:
        print(f"error: {args.bundle} has no monitoring.json (no development sample statistics): rebuild it with "
              "`uwrt build-demo`, or `uwrt bundle create ... --monitoring-sample FILE`", file=sys.stderr)
        return 2
    try:
        with (open(args.input, encoding="utf-8") if args.input != "-" else sys.stdin) as fh:
            requests = list(read_jsonl(fh))
    except (OSError, ValueError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 2
    n_tab = sum(f.source != "embedding" for f in pipe.schema.features)
    counts = np.zeros((len(stats.variables), stats.max_bins), np.int64)
    oc = np.zeros(4, np.int64)
    n = 0
    for rows, resp in score_rows(pipe, requests, args.score_batch_size):
        bins = stats.bin_rows(rows, n_tab, np.array([r.score for r in resp]))
        for i in range(bins.shape[1]):
            counts[i] += np.bincount(bins[:, i], minlength=stats.max_bins)[:stats.max_bins]
        oc += np.bincount(outcome_index([r.outcome for r in resp]), minlength=5)[:4]
        n += len(resp)
    rep = drift_report(stats, counts, oc, n)
    rep.update(bundle_id=pipe.identity.bundle_id, input=args.input, requests=len(requests), invalid=len(requests) - n,
               development_sample={"n": stats.n, "source": stats.source},
               thresholds={"moderate": MODERATE, "significant": SIGNIFICANT})
    if args.json:
        print(json.dumps(rep, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    else:
        print(f"{n} decisions from {args.input} ({len(requests) - n} invalid) against the development sample "
              f"(n={stats.n}: {stats.source})")
        print(f"{'variable':<24} {'PSI':>8}  reading")
        for name, r in sorted(rep["variables"].items(), key=lambda kv: -kv[1]["psi"]):
            print(f"{name:<24} {r['psi']:>8.4f}  {r['reading']}")
        print("outcome mix (window vs development sample): " + ", ".join(
            f"{k} {v['share']:.3f} vs {v['expected']:.3f}" for k, v in rep["outcomes"].items()))
    worst = max((r["psi"] for r in rep["variables"].values()), default=0.0)
    return 1 if args.fail_above is not None and worst > args.fail_above else 0
