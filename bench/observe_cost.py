"""CPU cost of the observability hooks per request, in process: what metrics on and tracing on add
to a decision, measured directly (process CPU time of the hook calls, every thread of the process
included: the span processor's export thread too), next to the pipeline's own CPU per request.

    python -m uwrt.bench.observe_cost --bundle bundles/demo --batches 1,4,16 --reps 2000 --rounds 3

For each batch size: real batches are decided once (pipe.decide) and their rows, responses and
stage times captured; then, round-robin over configurations and repeated `--rounds` times, each
configuration's hooks run `--reps` times on those batches exactly as the server calls them
(`Observer.on_batch` per batch on the model thread's side, `Observer.rpc_done` per request, the
1 Hz sync's other work is per second, not per request, and left out; its drift binning, done for
every batch since the last sync at once, is inside the timed region). The baseline is the
same loop with every hook off (`metrics_port = 0`, no tracing, no Explain cache): the Observer's
`active` check. The denominator: the pipeline's CPU per request at that batch size (pipe.decide),
and, for the whole server, the CPU per request measured by `bench/profile_server.py` in the same
session (bench/RESULTS.md "Observability cost"). Output: a table; `--json` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from uwrt.bench.meta import git_sha


class _Call:
    """A unary call's context as the handler sees it: a typical client's metadata, no traceparent."""

    METADATA = (("user-agent", "grpc-python/1.85.1 grpc-c/50.0.0 (linux; chttp2)"), ("x-request-source", "engine-7"))

    def invocation_metadata(self) -> tuple:
        return self.METADATA


_CALL = _Call()


def _capture(pipe, reqs) -> list[tuple[Any, Any, list, Any]]:
    got: list[tuple[Any, Any, list, Any]] = []
    pipe.on_batch = lambda batch, rows, responses, times: got.append((batch, rows, responses, times))
    try:
        pipe.decide(reqs)
    finally:
        pipe.on_batch = None
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--batches", default="1,4,16", help="batch sizes")
    ap.add_argument("--reps", type=int, default=2000, help="hook calls per batch size per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from uwrt.demo.synth import generate
    from uwrt.runtime.config import RuntimeConfig
    from uwrt.runtime.pipeline import Pipeline
    from uwrt.runtime.serving.observe import Observer
    from uwrt.runtime.serving.tracing import Tracing, build_exporter

    base_cfg = RuntimeConfig(explain_cache_size=0, metrics_port=0)
    pipe = Pipeline.from_dir(args.bundle, config=base_cfg)
    pool = generate(256, 5, id_prefix="oc-").requests

    class _Batcher:          # the sync thread is not run here; Observer only needs the attribute
        def stats(self):
            return {"rejected": 0, "expired": 0, "cancelled": 0, "batches": 0, "queued": 0}
        _inflight = None

    def observer(metrics: bool, ratio: float, cache: int = 0) -> Observer:
        cfg = RuntimeConfig(explain_cache_size=cache, metrics_port=9464 if metrics else 0)
        tr = Tracing(ratio, build_exporter("none")) if ratio > 0 else None
        return Observer(pipe, cfg, _Batcher(), tracing=tr)

    configs: dict[str, tuple[Any, ...]] = {
        "off": (False, 0.0), "metrics": (True, 0.0), "trace-1%": (False, 0.01), "trace-100%": (False, 1.0),
        "metrics+trace-1%": (True, 0.01), "explain-cache": (False, 0.0, 4096), "defaults": (True, 0.0, 4096)}
    observers = {name: observer(*c) for name, c in configs.items()}
    has_parent = hasattr(Observer, "trace_parent")       # older checkouts (PYTHONPATH) do not read it
    rows: list[dict] = []
    for bs in [int(x) for x in args.batches.split(",")]:
        reqs = pool[:bs]
        t0 = time.process_time()
        n_pipe = max(1, 200 // bs)
        for _ in range(n_pipe):
            pipe.decide(reqs)
        pipe_us = 1e6 * (time.process_time() - t0) / (n_pipe * bs)
        captured = _capture(pipe, reqs)
        samples: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for name, obs in observers.items():           # round robin
                t0 = time.process_time()
                for _ in range(args.reps):
                    for batch, r, responses, times in captured:
                        if obs.active:
                            obs.on_batch(batch, r, responses, times)
                        for resp in responses:
                            start = time.perf_counter_ns()
                            # as Server.Decide: the client's trace context is read when tracing is on
                            parent = obs.trace_parent(_CALL) if has_parent else None
                            obs.rpc_done("Decide", "OK", start, resp, *(() if parent is None else (parent,)))
                if obs.window is not None:
                    obs._bin_pending()                       # the sync thread's share: binning for drift
                if obs.tracing is not None:
                    obs.tracing.provider.force_flush()       # the export thread's work counts too
                samples[name].append(1e6 * (time.process_time() - t0) / (args.reps * bs))
        base = statistics.median(samples["off"])
        for name, s in samples.items():
            med = statistics.median(s)
            rows.append({"batch": bs, "config": name, "us_per_req": med, "min": min(s), "max": max(s),
                         "added_us_per_req": med - base, "pipeline_us_per_req": pipe_us,
                         "added_pct_of_pipeline": 100 * (med - base) / pipe_us})
    print(f"{'batch':>5} {'config':<18} {'us/req':>8} {'[min..max]':>16} {'added us/req':>13} "
          f"{'pipeline us/req':>16} {'added %':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['config']:<18} {r['us_per_req']:>8.2f} {r['min']:>7.2f}..{r['max']:<7.2f} "
              f"{r['added_us_per_req']:>13.2f} {r['pipeline_us_per_req']:>16.0f} {r['added_pct_of_pipeline']:>7.2f}%")
    for obs in observers.values():
        if obs.tracing is not None:
            obs.tracing.shutdown()
    if args.json:
        with open(args.json, "w") as fh:
            meta = {"commit": git_sha(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg": open("/proc/loadavg").read().split()[:3]}
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
