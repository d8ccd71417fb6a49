#!/usr/bin/env python3
"""Tree-stage latency per path and batch size, median and p99, in one run; crossover points.

    python bench/trees_bench.py [--bundle bundles/demo] [--batch-sizes 1,8,32,64,256]
                                [--iters 300] [--json out.json] [--no-realistic] [--quantize]

Paths: xgboost inplace_predict (reference), Treelite GTIL, tl2cgen Predictor + DMatrix, the
TL2cgen library called directly (ctypes, branch-annotated on half of the input rows unless
--no-annotate; the unannotated build is timed too as tl2cgen_noannot; --quantize adds a
quantize=1 build), T2's native batch layout (runtime/trees/native.py, if present), ONNX Runtime,
and the routed stage (`tree_path = "all"`: calibrated in this process over native/tl2cgen/xgboost/onnx).

Input rows: realistic model rows (synthetic requests -> featurize -> encoder -> the exact rows
the tree stage sees) unless --no-realistic (then the parity golden set: NaN/inf heavy, not
representative of timing). Each batch is a different window of those rows. Paths are timed
interleaved (random order each iteration) so machine noise and cache warmth hit them alike;
compare only within one run. Every path is first checked against xgboost (max probability difference).
Compile/load time is reported apart.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uwrt.bench.meta import git_sha
from uwrt.runtime.bundle.bundle import load_bundle  # noqa: E402
from uwrt.runtime.trees.base import XGBoostTreeStage, load_booster  # noqa: E402
from uwrt.runtime.trees.cache import default_cache_dirs  # noqa: E402
from uwrt.runtime.trees.paths import GTILStage, ONNXTreeStage, TL2cgenPredictorStage  # noqa: E402
from uwrt.runtime.trees.router import DEFAULT_BATCH_SIZES, RoutedTreeStage  # noqa: E402
from uwrt.runtime.trees.tl2cgen import CompiledTreeStage, compile_tl2cgen, golden_rows, xgboost_margin  # noqa: E402


def realistic_rows(bundle_path: str, n: int, seed: int) -> np.ndarray:
    """The exact float32 rows the pipeline hands the tree stage, for n synthetic requests."""
    from uwrt.demo.synth import generate
    from uwrt.runtime.featurize import featurize
    from uwrt.runtime.pipeline import Pipeline
    pipe = Pipeline.from_dir(bundle_path)
    reqs = generate(n, seed, id_prefix="tb-").requests
    out = []
    for s in range(0, n, 64):
        batch, _errors = featurize(reqs[s:s + 64], pipe.schema, pipe.encoder_config, pipe.limits)
        out.append(pipe.model_rows(batch, pipe.encoder.encode(batch.events)))
    return np.ascontiguousarray(np.concatenate(out), np.float32)


def max_depth(booster) -> int:
    """Deepest leaf over all trees (edges from the root), from the model JSON."""
    trees = json.loads(bytes(booster.save_raw("json")))["learner"]["gradient_booster"]["model"]["trees"]
    deepest = 0
    for t in trees:
        left, right = t["left_children"], t["right_children"]
        stack = [(0, 0)]
        while stack:
            node, d = stack.pop()
            if left[node] == -1:
                deepest = max(deepest, d)
            else:
                stack += [(left[node], d + 1), (right[node], d + 1)]
    return deepest


def sigmoid(m):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-m))


def time_paths(stages: list, rows: np.ndarray, b: int, iters: int, warmup: int = 5) -> dict[str, list[int]]:
    n = len(rows)
    starts = [(i * 7919 * b) % max(1, n - b + 1) for i in range(iters + warmup)]
    batches = [rows[s:s + b] if s + b <= n else rows[np.arange(s, s + b) % n] for s in starts]
    for x in batches[:warmup]:
        for st in stages:
            st.predict_margin(x)
    samples: dict[str, list[int]] = {st.name: [] for st in stages}
    clock = time.perf_counter_ns
    order_rng = np.random.default_rng(b)
    for x in batches[warmup:]:
        # a fresh random order each iteration: paths sharing code (tl2cgen, its Predictor, the
        # routed stage) must not always run right after each other with a warm i-cache
        for j in order_rng.permutation(len(stages)):
            st = stages[j]
            t0 = clock()
            st.predict_margin(x)
            samples[st.name].append(clock() - t0)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--batch-sizes", default="1,8,32,64,256")
    ap.add_argument("--iters", type=int, default=300, help="timed calls per path at batch 1 (fewer for big batches)")
    ap.add_argument("--rows", type=int, default=1024, help="realistic rows to generate")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-realistic", action="store_true", help="time on the golden set instead")
    ap.add_argument("--no-annotate", action="store_true", help="no tl2cgen branch annotation")
    ap.add_argument("--quantize", action="store_true", help="also time a quantize=1 tl2cgen build")
    ap.add_argument("--cache-dir", default=None, help="compile cache (default: bundle cache/, then user cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    bundle = load_bundle(args.bundle)
    booster = load_booster(bundle.tree_model_bytes(), nthread=1)
    cache_dirs = [args.cache_dir] if args.cache_dir else default_cache_dirs(bundle.path)
    model = json.loads(booster.save_config())["learner"]
    info = {"trees": booster.num_boosted_rounds(), "features": booster.num_features(),
            "max_depth": max_depth(booster),
            "objective": model["objective"]["name"]}

    rows_kind = "golden"
    rows = golden_rows(booster)
    if not args.no_realistic:
        try:
            t0 = time.perf_counter()
            rows = realistic_rows(args.bundle, args.rows, args.seed)
            rows_kind = f"realistic ({len(rows)} synthetic requests, {time.perf_counter() - t0:.1f} s to make)"
        except Exception as e:  # noqa: BLE001 - the bench still runs on the golden set
            print(f"# realistic rows unavailable ({type(e).__name__}: {e}); timing on the golden set", file=sys.stderr)
    ann = None if args.no_annotate or rows_kind == "golden" else rows[: len(rows) // 2]

    setup: dict[str, dict] = {}
    stages = [XGBoostTreeStage(booster)]
    t0 = time.perf_counter()
    stages.append(GTILStage(booster))
    setup["gtil"] = {"load_s": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    lib = compile_tl2cgen(booster, cache_dirs, training_rows=ann, progress=lambda m: print(f"# {m}", file=sys.stderr))
    setup["tl2cgen"] = {"load_s": round(time.perf_counter() - t0, 3), "cache_hit": not lib.cached.built,
                        "compile_s": lib.cached.meta.get("build_seconds"), "cache_dir": str(lib.cached.cache_dir),
                        "params": lib.params, "annotated": ann is not None, "parity": lib.parity}
    stages.append(TL2cgenPredictorStage(lib))
    direct = CompiledTreeStage(lib)
    stages.append(direct)
    if ann is not None:  # the same library without branch annotation, to show what annotation buys
        plain = compile_tl2cgen(booster, cache_dirs, progress=lambda m: print(f"# {m}", file=sys.stderr))
        stages.append(CompiledTreeStage(plain, name="tl2cgen_noannot"))
    if args.quantize:
        qlib = compile_tl2cgen(booster, cache_dirs, training_rows=ann, quantize=True, check_parity=False,
                               progress=lambda m: None)
        stages.append(CompiledTreeStage(qlib, name="tl2cgen_quantize"))
    native = None
    try:
        from uwrt.runtime.trees.native import build_native
        t0 = time.perf_counter()
        native, _explainer = build_native(booster, cache_dirs, progress=lambda m: print(f"# {m}", file=sys.stderr))
        setup["native"] = {"load_s": round(time.perf_counter() - t0, 3)}
        stages.append(native)
    except ImportError as e:
        print(f"# native path unavailable: {e}", file=sys.stderr)
    t0 = time.perf_counter()
    onnx = ONNXTreeStage(booster)
    setup["onnx"] = {"load_s": round(time.perf_counter() - t0, 3)}
    stages.append(onnx)

    routed_inner = [s for s in (native, direct, stages[0], onnx) if s is not None]
    routed = RoutedTreeStage(routed_inner, reference="xgboost", label="all")   # tree_path = "all"
    t0 = time.perf_counter()
    routed.calibrate(rows, sorted(set(DEFAULT_BATCH_SIZES) | set(sizes)))
    setup["all"] = {"calibrate_s": round(time.perf_counter() - t0, 3), "crossovers": routed.crossovers()}
    stages.append(routed)

    # parity on the timing rows and the golden set
    parity = {}
    check = np.concatenate([rows[:512], golden_rows(booster)])
    want = sigmoid(xgboost_margin(booster, check))
    for st in stages:
        parity[st.name] = float(np.max(np.abs(sigmoid(st.predict_margin(check)) - want)))

    results = []
    for b in sizes:
        iters = max(30, min(args.iters, int(args.iters * 8 / b)))
        samples = time_paths(stages, rows, b, iters)
        for name, v in samples.items():
            a = np.asarray(v) / 1e3
            results.append({"path": name, "batch": b, "median_us": round(float(np.median(a)), 2),
                            "p99_us": round(float(np.percentile(a, 99)), 2), "n": len(a)})

    meta = {"bench": "trees", "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_sha(), "machine": f"{platform.machine()} {os.cpu_count()} cpus ({platform.node()})",
            "python": platform.python_version(), "versions": _versions(), "bundle": str(args.bundle),
            "model": info, "rows": rows_kind, "setup": setup, "parity_max_prob_diff": parity,
            "routing": routed.describe()}
    print_table(results, sizes, [st.name for st in stages], meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    return 0


def _versions() -> dict:
    import onnxruntime
    import tl2cgen
    import treelite
    import xgboost
    return {"xgboost": xgboost.__version__, "treelite": treelite.__version__, "tl2cgen": tl2cgen.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def print_table(results: list[dict], sizes: list[int], names: list[str], meta: dict) -> None:
    cell = {(r["path"], r["batch"]): r for r in results}
    print(f"\nTree stage latency, us median / p99 ({meta['model']['trees']} trees depth {meta['model']['max_depth']}, "
          f"{meta['model']['features']} features; rows: {meta['rows']}; commit {meta['commit']}; {meta['date']})\n")
    print("| path | " + " | ".join(f"b={b}" for b in sizes) + " | max prob diff |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{cell[n, b]['median_us']:.1f} / {cell[n, b]['p99_us']:.1f}" for b in sizes)
              + f" | {meta['parity_max_prob_diff'][n]:.2g} |")
    singles = [n for n in names if n != "all"]
    print("\n| b | best single path | its median | all (routed) median | all / best | xgboost / direct tl2cgen |")
    print("|---|---|---|---|---|---|")
    for b in sizes:
        best = min(singles, key=lambda n: cell[n, b]["median_us"])
        r, m = cell["all", b]["median_us"], cell[best, b]["median_us"]
        print(f"| {b} | {best} | {m:.1f} | {r:.1f} | {r / m:.2f} | "
              f"{cell['xgboost', b]['median_us'] / cell['tl2cgen', b]['median_us']:.1f}x |")
    print(f"\nrouter crossovers (calibrated here): {meta['routing']['crossovers']}")
    print(f"setup: {json.dumps(meta['setup'], default=str)}")


if __name__ == "__main__":
    raise SystemExit(main())
