"""The `uwrt bench` command line: `add_arguments`, `cmd_bench`, `register` (adds `bench` to the
uwrt CLI's subparsers; runtime/cli/main.py calls `uwrt.bench.loadgen.register`) and `main`
(`python -m uwrt.bench.loadgen`). The help text is the package's docstring.

Targets are loopback only (the generator shares the machine with the server by design; a remote
target would measure a network nobody documented). Exit codes: 0 done, 2 bad arguments or no
server at the target.

Thread safety: a command-line program.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from uwrt.bench.loadgen.accounting import LATE_S, StepSpec
from uwrt.bench.loadgen.cpus import format_cpus, parse_cpus, pin_process, process_cpus
from uwrt.bench.loadgen.native import choose_engine
from uwrt.bench.loadgen.report import HEADER, format_row, machine_meta, write_csv, write_json
from uwrt.bench.loadgen.step import SweepSpec, max_rate_meeting, run_sweep
from uwrt.bench.loadgen.traffic import make_source
from uwrt.bench.loadgen.transports import probe

__all__ = ["add_arguments", "parse_list", "cmd_bench", "register", "main"]

DEFAULT_CONNECTIONS = 4


def _doc() -> str:
    from uwrt.bench import loadgen
    return loadgen.__doc__ or ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="server address HOST:PORT (loopback only)")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=None, help="one open-loop step at this many requests/s")
    load.add_argument("--rates", default=None, help="sweep: comma-separated requests/s, one step each")
    load.add_argument("--concurrency", default=None,
                      help="closed loop: N requests in flight (comma-separated list: one step each)")
    load.add_argument("--search", action="store_true",
                      help="find the highest rate whose p99 (failures count as unanswered) stays <= --p99-limit-ms")
    load.add_argument("--p99-limit-ms", type=float, default=10.0, help="latency limit for --search (default 10)")
    load.add_argument("--search-start", type=float, default=100.0,
                      help="first rate of --search (doubles until it fails)")
    load.add_argument("--search-steps", type=int, default=4,
                      help="bisection steps after the first failure (default 4)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step (default 10)")
    load.add_argument("--warmup", type=float, default=2.0, help="unreported warm-up seconds at the first step's load")
    load.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    load.add_argument("--timeout-ms", type=float, default=1000.0, help="deadline, from the intended send time")
    load.add_argument("--stream", action="store_true",
                      help="send over one DecideStream per process instead of unary Decide")
    load.add_argument("--rpc", choices=["decide", "health", "info"], default="decide",
                      help="health/info: cheap RPCs that measure the generator's own ceiling")
    load.add_argument("--procs", type=int, default=1, help="generator processes (split the load; default 1)")
    load.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                      help=f"TCP connections the unary requests are spread over, round robin (default "
                           f"{DEFAULT_CONNECTIONS}; the kernel balances a multi-process server per connection)")
    load.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                      help="gRPC metadata on every call (e.g. application=NAME for a Ray Serve proxy)")
    eng = p.add_argument_group("engine, pinning and the floor")
    eng.add_argument("--engine", choices=["auto", "native", "python"], default="auto",
                     help="native: the C generator (open-loop unary; `make bench-native`); python: grpc.aio; "
                          "auto (default): native when built and the step is open-loop unary, else python")
    eng.add_argument("--client-fifo", action="store_true",
                     help="native engine: run it SCHED_FIFO (root) so it sends on time on a busy machine; pin it "
                          "away from the server (--client-cpus), it preempts whatever shares its core")
    eng.add_argument("--client-cpus", default=None, metavar="LIST",
                     help="pin the generator (this process, its workers, the native binary) to these CPUs, e.g. 0")
    eng.add_argument("--server-cpus", default=None, metavar="LIST",
                     help="pin the server to these CPUs, e.g. 1: the --server-pid process's threads now, and the "
                          "echo server --floor starts (or start the server with `taskset -c LIST`)")
    eng.add_argument("--floor", action="store_true",
                     help="after every rate also run the transport floor at that rate (health RPC and a no-model "
                          "Decide against an echo server this command starts): rows with series floor-*")
    src = p.add_argument_group("traffic")
    src.add_argument("--input", default=None, help="requests JSONL instead of generator traffic")
    src.add_argument("--pool", type=int, default=2000, help="distinct generator applicants (default 2000)")
    src.add_argument("--seed", type=int, default=1)
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, help="write {meta, steps} JSON here")
    out.add_argument("--csv", default=None, help="write one CSV row per step here")
    out.add_argument("--plot", default=None, help="write a latency-vs-rate PNG here (needs matplotlib)")
    out.add_argument("--label", default=None, help="series name in the JSON and plot (default: the target)")
    out.add_argument("--server-pid", type=int, default=None,
                     help="report this process's CPU use and CPUs per step")
    out.add_argument("--quiet", action="store_true", help="no live progress line")
    out.add_argument("--allow-remote", action="store_true", help=argparse.SUPPRESS)


def parse_list(s: str, conv) -> list:
    try:
        return [conv(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: not a comma-separated list of numbers: {s!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    host = args.target.rsplit(":", 1)[0]
    if not args.allow_remote and host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        print(f"error: only loopback targets are allowed, got {args.target}", file=sys.stderr)
        return 2
    modes = sum(x is not None and x is not False
                for x in (args.rate, args.rates, args.concurrency, args.search or None))
    if modes > 1:
        print("error: give one of --rate, --rates, --concurrency, --search", file=sys.stderr)
        return 2
    rpc = "stream" if args.stream else args.rpc
    if args.stream and args.rpc != "decide":
        print("error: --stream sends DecideStream; it cannot be combined with --rpc", file=sys.stderr)
        return 2
    if args.connections < 1:
        print("error: --connections must be >= 1", file=sys.stderr)
        return 2
    try:
        client_cpus = parse_cpus(args.client_cpus) if args.client_cpus else None
        server_cpus = parse_cpus(args.server_cpus) if args.server_cpus else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if server_cpus and not (args.server_pid or args.floor):
        print("error: --server-cpus pins the --server-pid process (and the --floor echo server); give --server-pid, "
              "or start the server with `taskset -c LIST`", file=sys.stderr)
        return 2
    if args.floor and (args.search or args.concurrency):
        print("error: --floor runs with listed rates (--rate / --rates), not --search or --concurrency",
              file=sys.stderr)
        return 2
    engine, why = choose_engine(args.engine, rpc="stream" if args.stream else args.rpc,
                                closed=bool(args.concurrency), procs=args.procs)
    if engine is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if why:
        print(f"uwrt bench: using the Python engine: {why}", file=sys.stderr, flush=True)
    if args.client_fifo and engine != "native":
        print("error: --client-fifo is for the native engine", file=sys.stderr)
        return 2
    sweep = SweepSpec(p99_limit_ms=args.p99_limit_ms, search=args.search, search_start=args.search_start,
                      search_steps=args.search_steps, warmup_s=args.warmup)
    if args.concurrency:
        sweep.concurrencies = parse_list(args.concurrency, int)
    elif args.rates:
        sweep.rates = parse_list(args.rates, float)
    elif not args.search:
        sweep.rates = [args.rate if args.rate is not None else 100.0]
    base = StepSpec(rate=(sweep.rates or [sweep.search_start])[0], duration_s=args.duration, arrivals=args.arrivals,
                    rpc=rpc, timeout_s=args.timeout_ms / 1e3, seed=args.seed, connections=args.connections,
                    engine=engine, fifo=args.client_fifo)
    metadata = tuple(tuple(kv.split("=", 1)) for kv in args.metadata)
    if any(len(kv) != 2 for kv in metadata):
        print("error: --metadata takes KEY=VALUE", file=sys.stderr)
        return 2
    src_args = dict(kind="none") if rpc in ("health", "info") else (
        dict(kind="jsonl", path=args.input) if args.input else dict(kind="gen", pool=args.pool, seed=args.seed))
    try:
        source = make_source(**src_args) if args.procs <= 1 else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if client_cpus:
        pin_process(0, client_cpus)                 # workers and the native binary inherit it
    if server_cpus and args.server_pid:
        pin_process(args.server_pid, server_cpus)
    settings = None
    try:
        settings = asyncio.run(probe(args.target, metadata))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    floor = None
    if args.floor:
        from uwrt.bench.loadgen.floor import Floor
        try:
            floor = Floor(server_cpus, procs=args.procs if engine == "python" else 1, src_args=src_args)
        except (RuntimeError, OSError) as e:
            print(f"error: cannot start the echo server for --floor: {e}", file=sys.stderr)
            return 2
    try:
        rows = _sweep(args, base, sweep, source, src_args, metadata, floor)
    finally:
        if floor:
            floor.close()
    meta = dict(machine_meta(), target=args.target, label=args.label or args.target, command=sys.argv,
                rpc=rpc, engine=engine, client_fifo=args.client_fifo, arrivals=args.arrivals,
                duration_s=args.duration, warmup_s=args.warmup,
                timeout_ms=args.timeout_ms, seed=args.seed, procs=args.procs, connections=args.connections,
                input=args.input, pool=args.pool, p99_limit_ms=args.p99_limit_ms, late_threshold_ms=LATE_S * 1e3,
                client_cpus=format_cpus(process_cpus()), server_pid=args.server_pid,
                server_cpus=format_cpus(process_cpus(args.server_pid)) if args.server_pid else None,
                floor_target=floor.target if floor else None,
                server_settings={k: v for k, v in (settings or {}).items() if not k.startswith("stats.")})
    if args.json:
        write_json(args.json, meta, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        from uwrt.bench.plot import plot_latency_vs_rate
        series: dict[str, list[dict]] = {}
        for r in rows:
            name = meta["label"] if r.get("series", "model") == "model" else f"{meta['label']} {r['series']}"
            series.setdefault(name, []).append(r)
        plot_latency_vs_rate(series, args.plot, p99_limit_ms=args.p99_limit_ms)
    return 0


def _sweep(args, base: StepSpec, sweep: SweepSpec, source, src_args: dict, metadata: tuple, floor) -> list[dict]:
    """Run the sweep, printing the table as it goes; returns its rows."""
    print(f"uwrt bench -> {args.target}: {base.rpc}, {base.engine} engine, "
          f"{args.procs if base.engine == 'python' else 1} generator process(es), {base.connections} connection(s), "
          f"{'closed loop' if sweep.concurrencies else args.arrivals + ' arrivals'}, {args.duration:g}s per step"
          + (f"; floor: echo server on {floor.target}" if floor else ""), flush=True)
    print(HEADER, flush=True)
    progress = not args.quiet
    rows = run_sweep(args.target, base, sweep, source, procs=args.procs, src_args=src_args, metadata=metadata,
                     server_pid=args.server_pid, progress=progress,
                     on_row=lambda r: print(format_row(r), flush=True),
                     floor=(lambda spec: floor.steps(spec, source, progress=progress)) if floor else None)
    if any(r["fell_behind"] for r in rows):
        print("WARNING: the generator fell behind its schedule in some steps (late sends / unsent): their latencies "
              "are not the server's alone; use --engine native (--client-fifo on a busy machine), pin the generator "
              "and the server apart, or a lower rate", flush=True)
    if sweep.search:
        best = max_rate_meeting(rows, args.p99_limit_ms)
        print(f"highest rate with p99 <= {args.p99_limit_ms:g} ms: "
              f"{'none of the tried rates' if best is None else f'{best:.0f} requests/s'}", flush=True)
    return rows


def register(sub) -> None:
    """Add `bench` to the uwrt CLI's subparsers."""
    b = sub.add_parser("bench", help="load-test a running server (open/closed loop, sweeps, p99 search)",
                       description=_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(b)
    b.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uwrt.bench.loadgen", description=_doc(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


