#!/usr/bin/env python3
"""Offline scoring throughput of the CPU pipeline, per batch size, with a per-stage breakdown.

    python bench/offline_score.py --bundle bundles/demo [--n 2000] [--repeats 5] [--json out.json]

Generates `--n` requests with the synthetic generator (seed fixed), then for each batch size
scores all of them `--repeats` times through `Pipeline.decide` (one warm-up pass first, not
reported) and prints median and min-max of requests/s, plus the median share of time per stage
(featurize / encode / trees / policy incl. reasons). Noisy shared machine: read the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from uwrt.bench.meta import git_sha
from uwrt.demo.synth import generate
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pipeline import Pipeline, StageTimes


def run(pipe: Pipeline, reqs: list, bs: int) -> tuple[float, dict[str, int]]:
    stages = dict(featurize_us=0, encode_us=0, trees_us=0, policy_us=0)
    t0 = time.perf_counter()
    for s in range(0, len(reqs), bs):
        st = StageTimes()
        pipe.decide(reqs[s:s + bs], st)
        for k in stages:
            stages[k] += getattr(st, k)
    return len(reqs) / (time.perf_counter() - t0), stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--batch-sizes", default="1,8,32,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    cfg = RuntimeConfig.load(torch_threads=args.torch_threads)
    cfg.apply_threads()
    pipe = Pipeline.from_dir(args.bundle, tree_threads=cfg.tree_threads)
    reqs = generate(args.n, args.seed, id_prefix="bench-").requests
    rows = []
    print(f"{'batch':>5} {'req/s median':>12} {'min-max':>15}  featurize encode trees policy(+reasons)")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        run(pipe, reqs[: min(len(reqs), 4 * bs)], bs)               # warm-up
        rates, shares = [], []
        for _ in range(args.repeats):
            rate, st = run(pipe, reqs, bs)
            tot = sum(st.values()) or 1
            rates.append(rate)
            shares.append({k: v / tot for k, v in st.items()})
        share = {k: statistics.median(s[k] for s in shares) for k in shares[0]}
        rows.append({"batch_size": bs, "rps_median": statistics.median(rates), "rps_min": min(rates),
                     "rps_max": max(rates), "stage_share": share})
        print(f"{bs:>5} {statistics.median(rates):>12.0f} {min(rates):>7.0f}-{max(rates):<7.0f}  "
              + "  ".join(f"{share[k]:.0%}" for k in ("featurize_us", "encode_us", "trees_us", "policy_us")))
    meta = {"date": time.strftime("%Y-%m-%d"), "git": git_sha(), "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "bundle": pipe.identity.bundle_id, "n": args.n, "repeats": args.repeats}
    print(json.dumps(meta), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
