"""What the load generator itself costs: CPU microseconds per request and achieved rate of each
engine (and h2load for reference) against the no-model echo server, Decide and the health RPC.

    python -m uwrt.bench.generator_cost [--rates 500,1000,2000] [--reps 3] [--duration 8]
        [--engines native,python,h2load] [--client-cpus 0] [--server-cpus 1] [--timeout-ms 5000]
        [--json bench/results/generator_cost.json]

One echo server (uwrt.bench.echo_server) is started pinned to --server-cpus; this process (and so
the generators it starts) is pinned to --client-cpus. Every (rate, rpc, engine) cell runs --reps
times, the cells interleaved round robin within each rep so that a burst of other load on the
shared machine spreads over all of them. Per run: the generator's CPU per request (the engine's
own accounting: the native binary's getrusage, the Python engine's os.times; h2load's from
RUSAGE_CHILDREN), achieved send and completion rates, p50/p99, late sends, the echo server's CPU
share, and the machine's other load during the run (all CPU time on the machine from /proc/stat
minus the generator's and the server's, as a share of the cores). Prints medians and ranges and
writes every run to --json.

h2load (Debian's nghttp2-client) is the reference it is compared against; its rate mode sends
`--rps` per connection in bursts, one body for every request, latency from the actual send, and
counts gRPC errors as HTTP 200, so only its CPU and rates are comparable (perf notes).

Thread safety: a command-line program.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from uwrt.bench import loadgen
from uwrt.bench.loadgen import StepSpec
from uwrt.bench.loadgen.cpus import format_cpus, parse_cpus, pin_process, proc_cpu_s, process_cpus
from uwrt.bench.loadgen.traffic import make_source
from uwrt.bench.servers import ServerProcess, server_command

RPCS = ("decide", "health")
PATHS = {"decide": "/uwrt.v1.Underwriting/Decide", "health": "/grpc.health.v1.Health/Check"}


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_h2load(target: str, rpc: str, rate: float, duration_s: float, body: bytes) -> dict:
    """h2load at `rate` requests/s (rate/100 connections x 100 requests/s each) for duration_s."""
    conns = max(1, round(rate / 100))
    n = int(rate * duration_s)
    with tempfile.NamedTemporaryFile(suffix=".bin") as fh:
        fh.write(body)
        fh.flush()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        out = subprocess.run(["h2load", "-n", str(n), "-c", str(conns), "--rps", str(rate / conns),
                              "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", fh.name,
                              f"http://{target}{PATHS[rpc]}"],
                             capture_output=True, text=True, timeout=duration_s * 3 + 60)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out.stdout)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out.stdout)
    ok = int(done.group(2)) if done else 0
    return dict(engine="h2load", rpc=rpc, target_rps=rate, achieved_rps=float(m.group(2)) if m else None,
                completed_rps=ok / float(m.group(1)) if m else None, sent=n, completed=ok,
                client_cpu_us_per_req=1e6 * cpu / max(n, 1), client_cpu_pct=100 * cpu / wall, wall_s=wall,
                p50_ms=None, p99_ms=None, late_share=None, fell_behind=None, h2load_connections=conns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uwrt.bench.generator_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="500,1000,2000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--engines", default="native,python,h2load")
    ap.add_argument("--rpcs", default=",".join(RPCS))
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--timeout-ms", type=float, default=5000.0,
                    help="deadline from the intended send (default 5000: on a loaded machine a late answer should "
                         "still be an answer, so every run does the same work per request)")
    ap.add_argument("--arrivals", default="poisson", choices=["poisson", "constant"])
    ap.add_argument("--client-cpus", default="0")
    ap.add_argument("--fifo", action="store_true", help="the native engine under SCHED_FIFO (root)")
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--json", default="bench/results/generator_cost.json")
    args = ap.parse_args(argv)
    rates = loadgen.parse_list(args.rates, float)
    engines = [e for e in args.engines.split(",") if e]
    rpcs = [r for r in args.rpcs.split(",") if r]
    if "h2load" in engines and not shutil.which("h2load"):
        print("h2load not found (Debian: apt-get install -y nghttp2-client); skipping it", file=sys.stderr)
        engines.remove("h2load")
    client, server_cpus = parse_cpus(args.client_cpus), parse_cpus(args.server_cpus)
    srv = ServerProcess("echo", server_command("echo", ""), 60, cpus=server_cpus)
    pin_process(0, client)
    src = make_source("gen", pool=2000, seed=1)
    pool_body = src.pool[0].SerializeToString()
    bodies = {"decide": b"\x00" + len(pool_body).to_bytes(4, "big") + pool_body, "health": b"\x00\x00\x00\x00\x00"}
    runs: list[dict] = []
    k = 0
    try:
        for eng in ("native", "python"):          # warm both paths of the server once
            if eng in engines:
                loadgen.run_step(srv.target, StepSpec(rate=200, duration_s=1.0, engine=eng, tag=f"w{eng}"), src)
        for rep in range(args.reps):
            for rate in rates:
                for rpc in rpcs:
                    for eng in engines:
                        k += 1
                        b0, s0 = machine_busy_s(), proc_cpu_s(srv.pid)
                        if eng == "h2load":
                            row = run_h2load(srv.target, rpc, rate, args.duration, bodies[rpc])
                        else:
                            spec = StepSpec(rate=rate, duration_s=args.duration, rpc=rpc, engine=eng,
                                            connections=args.connections, arrivals=args.arrivals, tag=f"g{k}",
                                            seed=k, timeout_s=args.timeout_ms / 1e3,
                                            fifo=args.fifo and eng == "native")
                            row = loadgen.run_step(srv.target, spec, src if rpc == "decide" else None)
                        busy, srv_cpu = machine_busy_s() - b0, proc_cpu_s(srv.pid) - s0
                        gen_cpu = row["client_cpu_us_per_req"] * row["sent"] / 1e6
                        row.update(rep=rep, server_cpu_s=srv_cpu, machine_busy_s=busy,
                                   other_load_cores=max(0.0, busy - gen_cpu - srv_cpu) / row["wall_s"],
                                   client_cpus=format_cpus(process_cpus()),
                                   server_cpus=format_cpus(srv.cpus_used()))
                        runs.append(row)
                        print(f"rep {rep} {rate:6.0f} {rpc:6s} {eng:7s} sent/s {row['achieved_rps']:7.1f} "
                              f"ok/s {row['completed_rps'] or 0:7.1f} cpu us/req {row['client_cpu_us_per_req']:6.1f} "
                              f"late {row['late_share'] if row['late_share'] is not None else float('nan'):.3f} "
                              f"other load {row['other_load_cores']:.2f} cores", flush=True)
                        time.sleep(0.5)
    finally:
        srv.stop()
    print("\n| rpc | target rps | engine | CPU us/request, median (range) | sent/s median (range) "
          "| completed/s median | late > 1 ms, median | other load, cores (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for rpc in rpcs:
        for rate in rates:
            for eng in engines:
                rs = [r for r in runs if r["rpc"] == rpc and r["target_rps"] == rate and r["engine"] == eng]
                cpu = [r["client_cpu_us_per_req"] for r in rs]
                sent = [r["achieved_rps"] for r in rs if r["achieved_rps"] is not None]
                done = [r["completed_rps"] for r in rs if r["completed_rps"] is not None]
                late = [r["late_share"] for r in rs if r["late_share"] is not None]
                other = [r["other_load_cores"] for r in rs]
                print(f"| {rpc} | {rate:.0f} | {eng} | {statistics.median(cpu):.0f} ({min(cpu):.0f}-{max(cpu):.0f}) "
                      f"| {statistics.median(sent):.0f} ({min(sent):.0f}-{max(sent):.0f}) "
                      f"| {statistics.median(done):.0f} | "
                      f"{(f'{100 * statistics.median(late):.1f}%' if late else '-')} "
                      f"| {statistics.median(other):.2f} |")
    meta = dict(loadgen.machine_meta(), command=sys.argv, rates=rates, reps=args.reps, duration_s=args.duration,
                engines=engines, rpcs=rpcs, connections=args.connections, arrivals=args.arrivals,
                timeout_ms=args.timeout_ms, fifo=args.fifo,
                client_cpus=format_cpus(client), server_cpus=format_cpus(server_cpus),
                h2load=subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
                if "h2load" in engines else None)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(loadgen.json_safe(dict(meta=meta, runs=runs)), fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
