"""What untrusted caches cost at start-up: loading a bundle's pipeline with its caches usable
("warm") against rebuilding them ("rebuild": the bundle's cache/ was filled at build time by
another user, so the server skips it and rebuilds into its own cache dir).

    python bench/cache_startup.py --bundle bundles/demo --repeats 3 --json bench/results/cache_startup.json

Each measurement is a fresh interpreter (a real start) that loads the bundle and builds the
encoder (ONNX export or cache hit) and the tree stage (native compile + TreeSHAP, or cache hits)
as `Pipeline.from_dir` does with the default configuration, timing each step (wall) and the
process's CPU including its children (the C compiler). The two configurations alternate
(round-robin) so machine load affects both alike; medians and min-max are reported.

"rebuild" copies the bundle to a temporary directory and makes its cache/ untrusted: owned by
another user (uid 65534) when run as root, else left with the builder's key under a fresh
state directory (then the entries fail their MAC instead). Both make the server rebuild.
Thread safety: a script; run one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uwrt.bench.meta import git_sha  # noqa: E402

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from uwrt.runtime.bundle.bundle import load_bundle
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.encoders.build import build_encoder
from uwrt.runtime.trees.build import build_trees
from uwrt.runtime.encoders import onnx_encoder
from uwrt.runtime.trees.cache import cache_stats
t_import = time.perf_counter()
cfg = RuntimeConfig()
b = load_bundle(sys.argv[1], config=cfg)
t_load = time.perf_counter()
enc = build_encoder(b, cfg)
t_enc = time.perf_counter()
stage, explainer, report = build_trees(b, cfg)
t_trees = time.perf_counter()
ru_s, ru_c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"import_s": t_import - t0, "load_bundle_s": t_load - t_import, "encoder_s": t_enc - t_load,
                  "trees_s": t_trees - t_enc, "total_s": t_trees - t0,
                  "cpu_s": ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime,
                  "encoder_source": getattr(enc, "source", None), "trees_built": report.get("built"),
                  "reasons": report.get("reasons"), "onnx_cache": onnx_encoder.cache_stats(),
                  "native_cache": cache_stats()}))
"""


def run_child(bundle: pathlib.Path, env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], env=env, capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"child failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def foreign_copy(src: pathlib.Path, dst: pathlib.Path) -> str:
    """Copy the bundle with its cache/ made untrusted; returns how."""
    shutil.copytree(src, dst, symlinks=True)
    cache = dst / "cache"
    if os.geteuid() == 0:
        for p in [cache, *cache.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        return "bundle cache/ owned by uid 65534"
    return "bundle cache/ built under another key (fresh state dir)"


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="bundles/demo", help="bundle with caches built (uwrt build-demo does)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    bundle = pathlib.Path(args.bundle).resolve()
    if not (bundle / "cache").is_dir():
        print(f"error: {bundle}/cache is missing: build the bundle with `uwrt build-demo` first", file=sys.stderr)
        return 2
    base_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    rows: dict[str, list[dict]] = {"warm": [], "rebuild": []}
    how = ""
    with tempfile.TemporaryDirectory(prefix="uwrt-cache-startup-") as tmp:
        t = pathlib.Path(tmp)
        # the server's own state and user cache, warmed once
        warm_env = dict(base_env, UWRT_STATE_DIR=str(t / "state"), XDG_CACHE_HOME=str(t / "xdg"),
                        UWRT_CACHE_DIR=str(t / "user"))
        warm_bundle = t / "warm-bundle"
        foreign_copy(bundle, warm_bundle)      # same starting point as "rebuild"; warmed below
        run_child(warm_bundle, warm_env)
        for i in range(args.repeats):
            for mode in ("rebuild", "warm"):
                if mode == "warm":
                    res = run_child(warm_bundle, warm_env)
                else:
                    d = t / f"rebuild-{i}"
                    how = foreign_copy(bundle, d / "bundle")
                    env = dict(base_env, UWRT_STATE_DIR=str(d / "state"), XDG_CACHE_HOME=str(d / "xdg"),
                               UWRT_CACHE_DIR=str(d / "user"))
                    res = run_child(d / "bundle", env)
                rows[mode].append(res)
                print(f"{mode:8s} #{i + 1}: total {res['total_s']:.1f} s (encoder {res['encoder_s']:.1f} s "
                      f"[{res['encoder_source']}], trees {res['trees_s']:.1f} s), cpu {res['cpu_s']:.1f} s",
                      flush=True)
    out = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_sha(),
                    "bundle": str(bundle), "repeats": args.repeats, "untrusted_cache": how,
                    "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()},
           "summary": {mode: {k: summary([r[k] for r in rs]) for k in
                              ("total_s", "encoder_s", "trees_s", "load_bundle_s", "import_s", "cpu_s")}
                       for mode, rs in rows.items()},
           "runs": rows}
    for mode, s in out["summary"].items():
        print(f"{mode:8s} median total {s['total_s']['median']:.1f} s ({s['total_s']['min']:.1f}-"
              f"{s['total_s']['max']:.1f}), encoder {s['encoder_s']['median']:.1f} s, trees "
              f"{s['trees_s']['median']:.1f} s, cpu {s['cpu_s']['median']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
