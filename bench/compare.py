"""bench/compare: uwrt vs the naive server vs the Ray Serve peer, and the transport floor, through
the same sweep.

    bench/compare [--bundle bundles/demo] [--servers uwrt,naive,ray,echo,health] [--rates 100,200,...]
                  [--duration 8] [--common-rate 1000] [--p99-limit-ms 10] [--out bench/results/compare]
                  [--engine auto|native|python] [--connections 4] [--client-cpus 0 --server-cpus 1]

Each server is started as a subprocess, one at a time (`uwrt serve --port 0`,
`python -m uwrt.bench.naive_server`, `python -m uwrt.bench.ray_peer`, and for the floor
`python -m uwrt.bench.echo_server`), waited for until it prints its "... serving on HOST:PORT"
line (each prints it only once warm and answering), then driven by the load generator
(uwrt.bench.loadgen: open loop, Poisson arrivals by default, unary Decide, latency from the
intended send time, warm-up first) through the same rates, then stopped with SIGTERM. The floor
is two "servers": `echo` (Decide against the no-model echo server) and `health` (the health RPC
against it), so the table shows the model paths next to what gRPC and the machine cost.
With `--server-cpus` every server starts pinned to those CPUs (inherited at fork) and with
`--client-cpus` the generator runs on its own; every row records the CPUs each side used.
A server whose last two steps failed badly (p99 counting failures > `--give-up-factor` x the
limit) skips the higher rates of the sweep, except the common rate, which every server runs.
After the sweep the boundary between the highest passing and the lowest failing rate is
bisected `--refine` times.

Measures per server: the highest rate whose p99 (failures counted as unanswered, generator on
schedule) stays <= the limit ("max rate at p99 <= 10 ms"), and p50 / p99 / errors / mean batch
at the common rate. Writes, under --out: compare.md (the table, with the settings), compare.csv,
compare.json (meta + every step of every server) and compare.png (latency vs rate, all servers).

Thread safety: a command-line program; one server and one sweep at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

from uwrt.bench import loadgen
from uwrt.bench.loadgen import StepSpec
from uwrt.bench.loadgen.cpus import format_cpus, parse_cpus, pin_process, process_cpus
from uwrt.bench.loadgen.native import choose_engine
from uwrt.bench.servers import ServerProcess, server_command

DEFAULT_RATES = "100,200,300,500,750,1000,1250,1500,2000"


NAMES = ("uwrt", "naive", "ray", "echo", "health")   # echo, health: the transport floor (one echo server)


def command_of(name: str, args) -> list[str]:
    if name in ("echo", "health"):
        return server_command("echo", args.bundle, args.echo_args)
    return server_command(name, args.bundle, getattr(args, f"{name}_args"))


def run_server(name: str, args, rates: list[float]) -> dict:
    """Start one server, sweep it, stop it; returns {name, target, rows, max_rate, common, ...}."""
    cmd = command_of(name, args)
    print(f"\n== {name}: {shlex.join(cmd)}", flush=True)
    t_start = time.monotonic()
    srv = ServerProcess(name, cmd, args.start_timeout_s, cpus=args.server_cpu_list)
    start_s = time.monotonic() - t_start
    print(f"   ready on {srv.target} after {start_s:.0f}s", flush=True)
    try:
        import asyncio
        server_settings = {k: v for k, v in (asyncio.run(loadgen.probe(srv.target, ())) or {}).items()
                           if not k.startswith("stats.")}
    except ConnectionError:
        server_settings = {}
    rpc = "health" if name == "health" else "decide"
    base = StepSpec(rate=rates[0], duration_s=args.duration, arrivals=args.arrivals, timeout_s=args.timeout_ms / 1e3,
                    seed=args.seed, rpc=rpc, connections=args.connections, engine=args.engine_used)
    src_args = dict(kind="none") if rpc == "health" else dict(kind="gen", pool=args.pool, seed=args.seed)
    source = loadgen.make_source(**src_args) if args.procs <= 1 else None
    rows: list[dict] = []
    limit = args.p99_limit_ms
    print(loadgen.HEADER, flush=True)

    def show(r: dict) -> None:
        print(loadgen.format_row(r), flush=True)

    try:
        give_up, bad_in_a_row = False, 0
        plan = sorted(set(rates) | {args.common_rate})
        # one sweep call per rate keeps the warm-up once and lets us stop early
        pool = loadgen.WorkerPool(args.procs, srv.target, src_args) if args.procs > 1 and base.engine == "python" \
            else None
        try:
            if args.warmup > 0:
                loadgen.run_step(srv.target, StepSpec(**{**base.__dict__, "rate": plan[0], "duration_s": args.warmup,
                                                        "tag": "warm"}), source, pool=pool, progress=not args.quiet,
                                 label=f"{name} warm-up")
            k = 0

            def step(rate: float) -> dict:
                nonlocal k
                k += 1
                spec = StepSpec(**{**base.__dict__, "rate": rate, "tag": f"{name}{k}", "seed": args.seed + k})
                r = loadgen.run_step(srv.target, spec, source, pool=pool, procs=args.procs, server_pid=srv.proc.pid,
                                     progress=not args.quiet, label=f"{name} {rate:.0f} rps")
                r["meets_limit"] = loadgen.meets(r, limit)
                if name in ("echo", "health"):
                    r["series"] = f"floor-{name}"
                rows.append(r)
                show(r)
                time.sleep(args.pause)
                return r

            for rate in plan:
                if give_up and rate != args.common_rate:
                    continue
                r = step(rate)
                bad_in_a_row = bad_in_a_row + 1 if _num(r["p99_all_ms"]) > args.give_up_factor * limit else 0
                give_up = bad_in_a_row >= 2
            # bisect between the highest passing and the lowest failing rate
            for _ in range(args.refine):
                ok = [r["target_rps"] for r in rows if r["meets_limit"]]
                lo = max(ok) if ok else None
                bad = [r["target_rps"] for r in rows if not r["meets_limit"] and (lo is None or r["target_rps"] > lo)]
                if lo is None or not bad:
                    break
                hi = min(bad)
                if hi - lo <= max(10.0, 0.05 * lo):
                    break
                step(float(round((lo + hi) / 2)))
        finally:
            if pool:
                pool.close()
    finally:
        code = srv.stop()
        print(f"   {name} stopped (exit {code})", flush=True)
    common = next((r for r in rows if r["target_rps"] == args.common_rate), None)
    return dict(name=name, command=srv.cmd, target=srv.target, start_s=start_s, exit_code=code,
                settings=srv.settings_line, server_settings=server_settings, rows=rows,
                max_rate=loadgen.max_rate_meeting(rows, limit), common=common)


def _num(v) -> float:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    return float(v)


def _fmt(v, spec: str = ".2f") -> str:
    x = _num(v)
    return "n/a" if math.isnan(x) else ("∞ (>1% failed)" if math.isinf(x) else format(x, spec))


def table(results: list[dict], args) -> tuple[str, list[dict]]:
    """The markdown table and its CSV rows."""
    naive = next((r for r in results if r["name"] == "naive"), None)
    lines = [f"| server | max rate at p99 <= {args.p99_limit_ms:g} ms | vs naive | p50 ms @ {args.common_rate:.0f} rps "
             f"| p99 ms @ {args.common_rate:.0f} rps | completed/s | errors | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    csv_rows = []
    for res in results:
        c = res["common"] or {}
        ratio = (res["max_rate"] / naive["max_rate"]) if naive and naive["max_rate"] and res["max_rate"] else None
        err = ", ".join(f"{k} {v}" for k, v in (c.get("errors") or {}).items()) or "0"
        mr = f"{res['max_rate']:.0f}" if res["max_rate"] else f"< {min(r['target_rps'] for r in res['rows']):.0f}"
        lines.append(f"| {res['name']} | {mr} | {'-' if ratio is None else f'{ratio:.1f}x'} | {_fmt(c.get('p50_ms'))} "
                     f"| {_fmt(c.get('p99_all_ms'))} | {_fmt(c.get('completed_rps'), '.0f')} | {err} "
                     f"| {_fmt(c.get('mean_batch_size'))} |")
        csv_rows.append(dict(server=res["name"], max_rate_at_limit=res["max_rate"], p99_limit_ms=args.p99_limit_ms,
                             vs_naive=ratio, common_rate=args.common_rate, p50_ms=c.get("p50_ms"),
                             p99_ms=c.get("p99_ms"), p99_all_ms=c.get("p99_all_ms"),
                             completed_rps=c.get("completed_rps"), error_count=c.get("error_count"),
                             mean_batch_size=c.get("mean_batch_size")))
    return "\n".join(lines), csv_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--servers", default=",".join(NAMES),
                    help="comma-separated subset of uwrt,naive,ray,echo,health (echo / health: Decide / the health "
                         "RPC against the no-model echo server, the transport floor)")
    ap.add_argument("--rates", default=DEFAULT_RATES, help=f"sweep rates (default {DEFAULT_RATES})")
    ap.add_argument("--common-rate", type=float, default=1000.0, help="every server runs this rate (default 1000)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per step (default 8)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--pause", type=float, default=0.5)
    ap.add_argument("--refine", type=int, default=2, help="bisection steps at the p99 boundary (default 2)")
    ap.add_argument("--give-up-factor", type=float, default=10.0,
                    help="skip higher rates after two steps whose p99 exceeds this many times the limit (default 10)")
    ap.add_argument("--p99-limit-ms", type=float, default=10.0)
    ap.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    ap.add_argument("--timeout-ms", type=float, default=1000.0)
    ap.add_argument("--procs", type=int, default=1, help="load generator processes (python engine; default 1)")
    ap.add_argument("--engine", choices=["auto", "native", "python"], default="auto",
                    help="load generator engine (as uwrt bench; auto: native when built)")
    ap.add_argument("--connections", type=int, default=4, help="TCP connections per step (default 4)")
    ap.add_argument("--client-cpus", default=None, metavar="LIST", help="pin the load generator to these CPUs")
    ap.add_argument("--server-cpus", default=None, metavar="LIST", help="start every server pinned to these CPUs")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--uwrt-args", default="", help="extra `uwrt serve` flags")
    ap.add_argument("--naive-args", default="", help="extra uwrt.bench.naive_server flags")
    ap.add_argument("--ray-args", default="", help="extra uwrt.bench.ray_peer flags")
    ap.add_argument("--echo-args", default="", help="extra uwrt.bench.echo_server flags")
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default="bench/results/compare", help="output directory")
    ap.add_argument("--quiet", action="store_true", help="no live progress line")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not names or any(n not in NAMES for n in names):
        ap.error("--servers takes a comma-separated subset of " + ",".join(NAMES))
    if not os.path.exists(os.path.join(args.bundle, "manifest.json")) and set(names) - {"echo", "health"}:
        ap.error(f"no bundle at {args.bundle} (build it: uwrt build-demo --out {args.bundle})")
    try:
        client_cpus = parse_cpus(args.client_cpus) if args.client_cpus else None
        args.server_cpu_list = parse_cpus(args.server_cpus) if args.server_cpus else None
    except ValueError as e:
        ap.error(str(e))
    args.engine_used, why = choose_engine(args.engine, rpc="decide", closed=False, procs=args.procs)
    if args.engine_used is None:
        ap.error(why)
    if why:
        print(f"bench/compare: using the Python engine: {why}", file=sys.stderr, flush=True)
    if client_cpus:
        pin_process(0, client_cpus)
    rates = loadgen.parse_list(args.rates, float)
    t0 = time.monotonic()
    results = []
    for n in names:
        try:
            results.append(run_server(n, args, rates))
        except (RuntimeError, OSError) as e:
            print(f"error: {n}: {e}", file=sys.stderr)
            results.append(dict(name=n, error=str(e), rows=[], max_rate=None, common=None, settings="",
                                command=command_of(n, args)))
    ok = [r for r in results if r["rows"]]
    md, csv_rows = table(ok, args)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(loadgen.machine_meta(), command=sys.argv, bundle=args.bundle, rates=rates, duration_s=args.duration,
                warmup_s=args.warmup, arrivals=args.arrivals, timeout_ms=args.timeout_ms, procs=args.procs,
                engine=args.engine_used, connections=args.connections, client_cpus=format_cpus(process_cpus()),
                server_cpus=format_cpus(args.server_cpu_list) if args.server_cpu_list else None,
                common_rate=args.common_rate, p99_limit_ms=args.p99_limit_ms, wall_s=time.monotonic() - t0)
    settings = "\n".join(f"* {r['name']}: `{shlex.join(r['command'])}` {r.get('settings', '')}" for r in results)
    errors = "\n".join(f"* {r['name']} FAILED: {r['error']}" for r in results if r.get("error"))
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as fh:
        fh.write(f"{md}\n\n{meta['date']}, commit {meta['git']}, {meta['platform']}, {meta['cpu_count']} CPUs; "
                 f"load generator on the same machine ({args.engine_used} engine, "
                 f"{args.procs if args.engine_used == 'python' else 1} process(es), {args.connections} connection(s), "
                 f"CPUs {meta['client_cpus']}; servers on CPUs {meta['server_cpus'] or 'any'}), "
                 f"{args.arrivals} arrivals, {args.duration:g}s steps, deadline {args.timeout_ms:g} ms from the "
                 f"intended send time.\n\n"
                 f"{settings}\n{errors}\n")
    loadgen.write_csv(os.path.join(args.out, "compare.csv"), csv_rows)
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as fh:
        json.dump(loadgen.json_safe(dict(meta=meta, servers=results)), fh, indent=1)
    png = os.path.join(args.out, "compare.png")
    try:
        from uwrt.bench.plot import plot_latency_vs_rate
        plot_latency_vs_rate({r["name"]: r["rows"] for r in ok}, png, p99_limit_ms=args.p99_limit_ms,
                             title=f"{' vs '.join(names)}: latency vs offered rate ({meta['git']})")
    except ImportError as e:
        print(f"warning: no plot ({e}); pip install -r requirements/bench.txt", file=sys.stderr)
    print("\n" + md)
    print(f"\nwrote {args.out}/compare.md, compare.csv, compare.json, compare.png in {meta['wall_s']:.0f}s")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
