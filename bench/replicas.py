"""bench/replicas.py: what the HAProxy balancer costs, and how failover behaves, measured.

    python bench/replicas.py [--bundle bundles/demo] [--rates 200,400] [--concurrency 8] [--duration 8]
                             [--rounds 3] [--out bench/results/replicas] [--no-failover]

Topology (loopback, this machine): three `uwrt serve` replicas r1..r3 and three HAProxy instances
(deploy/haproxy/uwrt.cfg.in, per-request logging off) in front of {r1}, {r1, r2} and {r1, r2, r3}.
Configurations: `direct` (r1, no balancer), `lb-1`, `lb-2`, `lb-3`. r1 is the same process in all
four, so direct vs lb-1 isolates the balancer. Every round runs every configuration once, in a
rotated order; each run is a 1 s unrecorded warm-up, one open-loop step per rate (uwrt.bench.loadgen:
Poisson arrivals, latency from the intended send time) and one closed-loop step (`--concurrency`
requests in flight: throughput). Per step: the loadgen row (rates, p50/p99/p99.9, errors, the
generator's CPU) plus the CPU per request of the configuration's replicas and balancer, read from
/proc. The summary gives medians and [min, max] over the rounds. On a 2-core machine more replicas
add no capacity: the numbers show the balancer's cost; replicas that are not in a configuration
still answer its neighbours' health checks (a few per second: negligible, not counted).

Failover (on lb-3, after the sweep; a client without retries, so every failure is visible):
SIGKILL of r3 under load (failed requests, time until the balancer has r3 DOWN), a restart of r3
(process start -> SERVING -> UP in the balancer), and a drain of r3 under load (balancer first, then
SIGTERM: failed requests, time to drain), and `--sigterm-trials` plain SIGTERMs of r3 under load with
no balancer drain first (failed requests per trial).

Writes replicas.json (meta + every step + failover) and replicas.md (the tables) under --out.
A command-line program: one topology, one step at a time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.cluster import Balancer, HAProxySettings, Replica, free_port, serve_flags  # noqa: E402
from uwrt.bench import loadgen  # noqa: E402
from uwrt.bench.loadgen import StepSpec, cpus  # noqa: E402
from uwrt.bench.loadgen.traffic import RequestSource  # noqa: E402

CONFIGS = ("direct", "lb-1", "lb-2", "lb-3")


def proc_cpu_s(pids: list[int]) -> float:
    return sum(cpus.proc_cpu_s(p) for p in pids)


def _rotated(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


class Topology:
    def __init__(self, bundle: str, workdir: pathlib.Path, serve_args: tuple[str, ...]) -> None:
        if "--model-info-exposure" in serve_flags():     # batch_counts reads the full GetModelInfo
            serve_args = ("--model-info-exposure", "full", *serve_args)
        self.replicas = [Replica(f"r{i}", bundle, free_port(), serve_args=serve_args, log_path=workdir / f"r{i}.log")
                         for i in (1, 2, 3)]
        settings = HAProxySettings(log_level="notice")
        self.lbs = {f"lb-{n}": Balancer([(r.name, r.target) for r in self.replicas[:n]], workdir=workdir / f"lb-{n}",
                                        settings=settings) for n in (1, 2, 3)}

    def start(self) -> None:
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_serving(600)
        for lb in self.lbs.values():
            lb.start(wait_up_s=60)

    def stop(self) -> None:
        for lb in self.lbs.values():
            lb.stop()
        for r in self.replicas:
            try:
                r.terminate(30)
            except subprocess.TimeoutExpired:
                pass

    def target(self, config: str) -> str:
        return self.replicas[0].target if config == "direct" else self.lbs[config].target

    def pids(self, config: str) -> list[int]:
        if config == "direct":
            return [self.replicas[0].pid]                                   # type: ignore[list-item]
        n = int(config.split("-")[1])
        lb = self.lbs[config]
        return [r.pid for r in self.replicas[:n]] + [lb.proc.pid]          # type: ignore[list-item,union-attr]


def batch_counts(replicas: list[Replica]) -> tuple[int, int]:
    """(requests, batches) summed over `replicas`, read from each one's GetModelInfo directly."""
    import grpc

    from uwrt.runtime.pb import pb, pb_grpc
    req = bat = 0
    for r in replicas:
        with grpc.insecure_channel(r.target) as ch:
            s = pb_grpc.UnderwritingStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).settings
        req, bat = req + int(s["stats.requests"]), bat + int(s["stats.batches"])
    return req, bat


def run_step(topo: Topology, config: str, spec: StepSpec, source) -> dict:
    pids = topo.pids(config)
    lb_pid = [] if config == "direct" else pids[-1:]
    reps = topo.replicas[:1] if config == "direct" else topo.replicas[:int(config.split("-")[1])]
    b0 = batch_counts(reps)
    load0, c0, l0 = os.getloadavg()[0], proc_cpu_s(pids), proc_cpu_s(lb_pid)
    row = loadgen.run_step(topo.target(config), spec, source)
    c1, l1, load1 = proc_cpu_s(pids), proc_cpu_s(lb_pid), os.getloadavg()[0]
    b1 = batch_counts(reps)
    n = row["completed"]
    row.update(config=config, server_cpu_us_per_req=1e6 * (c1 - c0) / n if n else None,
               balancer_cpu_us_per_req=1e6 * (l1 - l0) / n if n and lb_pid else None,
               replicas_mean_batch=(b1[0] - b0[0]) / (b1[1] - b0[1]) if b1[1] > b0[1] else None,
               loadavg_1m=[load0, load1])
    return row


def sweep(topo: Topology, args, source) -> list[dict]:
    rows = []
    for rnd in range(args.rounds):
        for config in _rotated(CONFIGS, rnd):
            loadgen.run_step(topo.target(config), StepSpec(rate=100, duration_s=1.0, tag=f"w{rnd}{config}"), source)
            for rate in args.rates:
                spec = StepSpec(rate=rate, duration_s=args.duration, timeout_s=1.0, seed=rnd + 1,
                                tag=f"r{rnd}-{config}-{rate:g}")
                rows.append(dict(run_step(topo, config, spec, source), round=rnd, kind="open"))
                _print(rows[-1])
            spec = StepSpec(rate=None, concurrency=args.concurrency, duration_s=args.duration, timeout_s=1.0,
                            seed=rnd + 1, tag=f"c{rnd}-{config}")
            rows.append(dict(run_step(topo, config, spec, source), round=rnd, kind="closed"))
            _print(rows[-1])
    return rows


def _print(r: dict) -> None:
    what = f"{r['target_rps']:.0f} rps" if r["kind"] == "open" else f"c={r['concurrency']}"
    print(f"round {r['round']} {r['config']:>6} {what:>8}: {r['completed_rps']:7.1f}/s p50 {r['p50_ms']:6.2f} "
          f"p99 {r['p99_ms']:7.2f} ms errors {r['errors'] or '-'} server {r['server_cpu_us_per_req'] or 0:6.0f} us/req "
          f"(balancer {r['balancer_cpu_us_per_req'] or 0:4.0f}) batch {r['replicas_mean_batch'] or 0:5.2f} "
          f"load {r['loadavg_1m'][0]:.1f}", flush=True)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _med(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]" if len(xs) > 1 else f"{xs[0]:.2f}"


def _errs(rows: list[dict]) -> str:
    total: dict[str, int] = {}
    for r in rows:
        for k, v in r["errors"].items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "0"


def summary(rows: list[dict], args) -> list[str]:
    out = ["| configuration | load | completed/s | p50 ms | p99 ms | server CPU us/req | of which balancer | "
           "mean batch | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        for kind, key in [("open", r) for r in args.rates] + [("closed", args.concurrency)]:
            sel = [r for r in rows if r["config"] == config and r["kind"] == kind
                   and (r["target_rps"] == key if kind == "open" else r["concurrency"] == key)]
            if not sel:
                continue
            label = f"{key:g} rps open" if kind == "open" else f"{key} in flight"
            out.append(f"| {config} | {label} | {_med([r['completed_rps'] for r in sel])} | "
                       f"{_med([r['p50_ms'] for r in sel])} | {_med([r['p99_ms'] for r in sel])} | "
                       f"{_med([r['server_cpu_us_per_req'] for r in sel])} | "
                       f"{_med([r['balancer_cpu_us_per_req'] for r in sel])} | "
                       f"{_med([r['replicas_mean_batch'] for r in sel])} | {_errs(sel)} |")
    return out


def _step_in_background(target: str, rate: float, duration_s: float, tag: str, source):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    spec = StepSpec(rate=rate, duration_s=duration_s, timeout_s=2.0, seed=99, tag=tag)
    return pool, pool.submit(loadgen.run_step, target, spec, source)


def failover(topo: Topology, rate: float, source, *, trials: int, sigterm_rate: float) -> dict:
    lb, r3 = topo.lbs["lb-3"], topo.replicas[2]
    res: dict = {"rate_rps": rate}
    # 1. SIGKILL under load
    pool, fut = _step_in_background(lb.target, rate, 8.0, "fo-kill", source)
    time.sleep(3.0)
    t_kill = time.monotonic()
    r3.kill()
    lb.wait_status("r3", "DOWN", 30)
    res["kill_to_down_s"] = time.monotonic() - t_kill
    row = fut.result()
    pool.shutdown()
    res["kill"] = {k: row[k] for k in ("sent", "completed", "errors", "p50_ms", "p99_ms", "max_ms")}
    # 2. restart: start -> SERVING -> UP
    t0 = time.monotonic()
    r3.start()
    r3.wait_serving(600)
    t_serving = time.monotonic()
    lb.wait_status("r3", "UP", 60)
    res["restart_start_to_serving_s"] = t_serving - t0
    res["restart_serving_to_up_s"] = time.monotonic() - t_serving
    # 3. drain under load: balancer first, then SIGTERM
    pool, fut = _step_in_background(lb.target, rate, 8.0, "fo-drain", source)
    time.sleep(3.0)
    t0 = time.monotonic()
    lb.drain("r3")
    t1 = time.monotonic()
    rc = r3.terminate(60)
    res["drain_balancer_s"], res["drain_sigterm_to_exit_s"], res["drain_exit_code"] = t1 - t0, time.monotonic() - t1, rc
    row = fut.result()
    pool.shutdown()
    res["drain"] = {k: row[k] for k in ("sent", "completed", "errors", "p50_ms", "p99_ms", "max_ms")}
    # 4. plain SIGTERM (no balancer drain first), repeated: what a `kill` without the procedure costs
    res["plain_sigterm"] = []
    for trial in range(trials):
        r3.start()
        lb.ready("r3")
        r3.wait_serving(600)
        lb.wait_status("r3", "UP", 60)
        pool, fut = _step_in_background(lb.target, sigterm_rate, 4.0, f"fo-term{trial}", source)
        time.sleep(2.0)
        sent_to_r3 = int(lb.servers()["r3"]["stot"])
        rc = r3.terminate(60)
        row = fut.result()
        pool.shutdown()
        res["plain_sigterm"].append({"exit_code": rc, "sent": row["sent"], "errors": row["errors"],
                                     "r3_requests_before": sent_to_r3})
        print(f"plain SIGTERM {trial}: {row['errors'] or 'no errors'}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "bundles" / "demo"))
    p.add_argument("--rates", default="100,200", help="open-loop rates, requests/s (default 100,200)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight (default 8)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per step (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--failover-rate", type=float, default=100.0, help="load during the failover steps (default 100)")
    p.add_argument("--sigterm-trials", type=int, default=10, help="plain-SIGTERM repetitions (default 10)")
    p.add_argument("--sigterm-rate", type=float, default=150.0, help="load during them, requests/s (default 150)")
    p.add_argument("--no-failover", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas"))
    p.add_argument("serve_args", nargs="*", help="extra `uwrt serve` flags for every replica (after --)")
    args = p.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",")]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(loadgen.machine_meta(), command=sys.argv, bundle=args.bundle, rates=args.rates,
                concurrency=args.concurrency, duration_s=args.duration, rounds=args.rounds,
                haproxy=subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
                settings=HAProxySettings().__dict__, serve_args=args.serve_args,
                top=subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()[:15])
    logs = pathlib.Path(tempfile.mkdtemp(prefix="uwrt-replicas-"))
    print(f"replica and balancer logs: {logs}", flush=True)
    topo = Topology(args.bundle, logs, tuple(args.serve_args))
    source = RequestSource.generated(2000, 1, id_prefix="rep-")
    try:
        print("starting 3 replicas and 3 balancers ...", flush=True)
        topo.start()
        rows = sweep(topo, args, source)
        fo = None if args.no_failover else failover(topo, args.failover_rate, source, trials=args.sigterm_trials,
                                                    sigterm_rate=args.sigterm_rate)
    finally:
        topo.stop()
    meta["loadavg_end"] = os.getloadavg()
    (out / "replicas.json").write_text(json.dumps(_json_safe({"meta": meta, "steps": rows, "failover": fo}), indent=1))
    md = [f"# Replicas behind HAProxy ({meta['date']}, {meta['git']})", "", *summary(rows, args), ""]
    if fo:
        md += ["Failover (lb-3, client without retries):", "", "```", json.dumps(fo, indent=1), "```"]
    (out / "replicas.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
