#!/usr/bin/env python3
"""Exact TreeSHAP and margin latency: xgboost vs the generated-C native path (runtime/trees/native.py).

    PYTHONPATH=. python bench/shap_bench.py [--bundle bundles/demo] [--json bench/results/shap_bench.json]

Models: the demo bundle's trees, and a synthetic 500-tree depth-6 96-feature model trained here
(seeded; cached with --synthetic-cache) to show how cost scales. Rows: normal values with 10%
NaN (the cost of both paths does not depend on the values: SHAP visits every node, the native
walk is a fixed number of steps). One thread everywhere (xgboost nthread=1).

Reported, per model: microseconds per call (median / p99) of
  * margins: xgboost `inplace_predict` vs native `predict_margin` at batch 1, 8, 32, 64, 256;
  * SHAP: `TreeExplainer.contributions` (xgboost pred_contribs, incl. its DMatrix, as the
    pipeline calls it) vs `NativeExplainer.contributions` at batch 1, 8, 32, plus the calls an
    adverse share of a 32-row batch costs (3, 6, 10 rows = ~10/20/30% adverse).
The two paths alternate call by call so machine noise hits both alike; compare them as ratios
within one run. Build/compile time is reported apart (warm-up is not timed).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import xgboost as xgb

from uwrt.bench.meta import git_sha  # noqa: E402
from uwrt.runtime.bundle.bundle import load_bundle
from uwrt.runtime.trees.base import TreeExplainer, load_booster
from uwrt.runtime.trees.native import build_native


def synthetic_model(cache: str | None) -> xgb.Booster:
    if cache and os.path.exists(cache):
        return load_booster(cache)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20000, 96)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nansum(x[:, :8], 1) - np.nan_to_num(x[:, 9]) * np.isnan(x[:, 10]) + rng.normal(size=20000) > 0)
    b = xgb.train({"max_depth": 6, "objective": "binary:logistic", "eta": 0.05, "nthread": os.cpu_count() or 1,
                   "seed": 7}, xgb.DMatrix(x, y.astype(np.float32), missing=np.nan), 500)
    if cache:
        b.save_model(cache)
    b.set_param({"nthread": 1})
    return b


def timed_pair(fa, fb, repeats: int) -> tuple[list[int], list[int]]:
    """Alternate fa/fb `repeats` times each (after one warm-up each); ns per call."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fa()
        t1 = time.perf_counter_ns()
        fb()
        t2 = time.perf_counter_ns()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return ta, tb


def stats_us(ns: list[int]) -> dict:
    a = np.asarray(ns, np.float64) / 1e3
    return {"median_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)), "n": len(ns)}


def bench_model(name: str, booster: xgb.Booster, cache_dir: str, args) -> list[dict]:
    t0 = time.perf_counter()
    stage, explainer = build_native(booster, [cache_dir], progress=lambda s: None)
    build_s = time.perf_counter() - t0
    ref = TreeExplainer(booster)
    F = stage.num_features
    rng = np.random.default_rng(11)
    x = rng.normal(size=(256, F)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    rows = [{"model": name, "kind": "build", "seconds": round(build_s, 2), "built": stage.library.built,
             "trees": stage.num_trees, "features": F, "parity": stage.parity,
             "shap_mode": explainer.mode, "shap_table_bytes": explainer.table_bytes}]
    for b in (1, 8, 32, 64, 256):
        xb = x[:b]
        reps = args.repeats if b <= 64 else max(50, args.repeats // 4)
        tn, tx = timed_pair(functools.partial(stage.predict_margin, xb),
                            functools.partial(booster.inplace_predict, xb, predict_type="margin", missing=np.nan), reps)
        rows.append({"model": name, "kind": "margin", "batch": b, "native": stats_us(tn), "xgboost": stats_us(tx)})
    for b in (1, 3, 6, 8, 10, 32):
        xb = x[:b]
        tn, tx = timed_pair(functools.partial(explainer.contributions, xb), functools.partial(ref.contributions, xb),
                            args.shap_repeats if b <= 10 else max(5, args.shap_repeats // 3))
        rows.append({"model": name, "kind": "shap", "batch": b, "native": stats_us(tn), "xgboost": stats_us(tx)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | what | batch | native median / p99 us | xgboost median / p99 us | native us/row "
           "| xgboost us/row | speed-up |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "build":
            continue
        n, x, b = r["native"], r["xgboost"], r["batch"]
        out.append(f"| {r['model']} | {r['kind']} | {b} | {n['median_us']:.1f} / {n['p99_us']:.1f} | "
                   f"{x['median_us']:.1f} / {x['p99_us']:.1f} | {n['median_us'] / b:.1f} | {x['median_us'] / b:.1f} | "
                   f"{x['median_us'] / n['median_us']:.1f}x |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--repeats", type=int, default=400, help="margin calls per path and batch size")
    ap.add_argument("--shap-repeats", type=int, default=30, help="SHAP calls per path and batch size")
    ap.add_argument("--synthetic-cache", default=None, help="save/load the synthetic model here")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="native build cache (default: a temp dir, i.e. cold build)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="uwrt-shap-bench-")
    cache_dir = args.cache_dir or tmp.name
    bundle = load_bundle(args.bundle)
    models = [("demo", load_booster(bundle.tree_model_bytes(), nthread=1))]
    if not args.no_synthetic:
        models.append(("synthetic-500x6x96", synthetic_model(args.synthetic_cache)))
    rows = []
    for name, b in models:
        rows += bench_model(name, b, cache_dir, args)
        print(f"# {name}: done", file=sys.stderr, flush=True)
    meta = {"git": git_sha(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "xgboost": xgb.__version__, "numpy": np.__version__, "bundle": args.bundle}
    for r in rows:
        if r["kind"] == "build":
            print(f"build {r['model']}: {r['trees']} trees, {r['features']} features, {r['seconds']} s "
                  f"(compiled: {r['built']}), SHAP mode {r['shap_mode']} ({r['shap_table_bytes']} B table); "
                  f"parity {r['parity']}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
