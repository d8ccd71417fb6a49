#!/usr/bin/env python3
"""CPU encoder backends per batch shape: torch (eager), torchscript, onnx (ORT): the MatMul
attention form at three optimization levels (onnx-none / onnx-ort / onnx-transformer) and the
fused MultiHeadAttention form with ORT's optimizations (onnx-mha, the default). Median and p99
microseconds per `encode` call, one thread each.

    python bench/encoder_cpu_bench.py [--bundle bundles/demo] [--calls 200] [--json out.json]

Shapes: generator batches (featurized synthetic applicants, their natural length mix) of 1, 8,
32, 64, 256 requests, and the single-bucket batches the server forms (each length bucket at
batch 1 and at the largest batch the default caps allow: uwrt.runtime.serving.warmup.warmup_shapes). Calls
alternate between backends (round robin per shape) so machine noise hits them alike; compare
backends as ratios within one run. Also checks that every backend's embeddings agree with
eager torch on each shape (max abs difference) and reports whether they are bit-identical:
per-shape routing between backends is only safe when they are.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from uwrt.bench.meta import git_sha  # noqa: E402
from uwrt.demo.synth import generate
from uwrt.runtime.bundle.bundle import load_bundle
from uwrt.runtime.encoders.onnx_encoder import OnnxEncoderBackend
from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
from uwrt.runtime.encoders.torchscript_encoder import TorchScriptEncoderBackend
from uwrt.runtime.featurize import Limits, featurize
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.warmup import warmup_batches


def shapes(bundle, n_gen: int, seed: int) -> list[tuple[str, object]]:
    """(label, PackedEvents) per benchmarked shape."""
    schema, ecfg = bundle.schema, bundle.encoder_config
    reqs = generate(max(n_gen, 256), seed, id_prefix="b-").requests
    out = []
    for bs in (1, 8, 32, 64, 256):
        batch, errors = featurize(reqs[:bs], schema, ecfg, Limits())
        assert not errors
        out.append((f"gen B={bs} T={int(batch.events.cu_seqlens[-1])}", batch.events))
    for reqs_b in warmup_batches(schema, ecfg.max_history, BatchingConfig()):
        batch, errors = featurize(reqs_b, schema, ecfg, Limits())
        assert not errors
        ev = batch.events
        out.append((f"bucket B={ev.batch_size} L={ev.max_len}", ev))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per backend and shape")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per backend and shape first")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    ap.add_argument("--backends", default="torch,torchscript,onnx-none,onnx-ort,onnx-transformer")
    ap.add_argument("--json", default=None, help="write rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    ecfg, state = bundle.encoder_config, bundle.encoder_state()
    t0 = time.perf_counter()
    make = {"torch": lambda: TorchEncoderBackend(ecfg, state),
            "torchscript": lambda: TorchScriptEncoderBackend(ecfg, state)}
    for opt in ("none", "ort", "transformer"):
        make[f"onnx-{opt}"] = (lambda o: lambda: OnnxEncoderBackend(ecfg, state, optimization=o, attention="matmul",
                                                                     intra_op_threads=args.threads))(opt)
    make["onnx-mha"] = lambda: OnnxEncoderBackend(ecfg, state, optimization="ort", attention="mha",
                                                  intra_op_threads=args.threads)
    backends = {}
    for name in args.backends.split(","):
        t = time.perf_counter()
        backends[name] = make[name]()
        print(f"# {name}: ready in {time.perf_counter() - t:.2f}s", file=sys.stderr)
    cases = shapes(bundle, 256, args.seed)
    rows = []
    print(f"{'shape':<26}" + "".join(f"{n:>24}" for n in backends) + "   (median / p99 us)")
    for label, ev in cases:
        ref = backends["torch"].encode(ev) if "torch" in backends else None
        times = {n: [] for n in backends}
        for be in backends.values():
            for _ in range(args.warmup):
                be.encode(ev)
        for _ in range(args.calls):
            for n, be in backends.items():
                t = time.perf_counter_ns()
                be.encode(ev)
                times[n].append((time.perf_counter_ns() - t) / 1000)
        line = f"{label:<26}"
        for n, be in backends.items():
            a = np.array(times[n])
            med, p99 = float(np.median(a)), float(np.percentile(a, 99))
            diff = None if ref is None else float(np.abs(be.encode(ev) - ref).max())
            rows.append({"backend": n, "shape": label, "batch": ev.batch_size, "tokens": int(ev.cu_seqlens[-1]),
                         "median_us": round(med, 1), "p99_us": round(p99, 1), "calls": args.calls,
                         "max_abs_diff_vs_torch": diff, "bit_identical_to_torch": diff == 0.0})
            line += f"{med:>14.0f} /{p99:>7.0f}"
        print(line, flush=True)
    meta = {"bench": "encoder_cpu_bench", "git": git_sha(), "bundle": bundle.bundle_id, "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "onnxruntime": __import__("onnxruntime").__version__, "total_s": round(time.perf_counter() - t0, 2)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
