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
    src = p.add_argument_group("traffic")
    src.add_argument("--input", default=None, help="requests JSONL instead of generator traffic")
    src.add_argument("--pool", type=int, default=2000, help="distinct generator applicants (default 2000)")
    src.add_argument("--seed", type=int, default=1)
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, help="write {meta, steps} JSON here")
    out.add_argument("--csv", default=None, help="write one CSV row per step here")
    out.add_argument("--plot", default=None, help="write a latency-vs-rate PNG here (needs matplotlib)")
    out.add_argument("--label", default=None, help="series name in the JSON and plot (default: the target)")
    out.add_argument("--server-pid", type=int, default=None, help="report this process's CPU use per step")
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
    sweep = SweepSpec(p99_limit_ms=args.p99_limit_ms, search=args.search, search_start=args.search_start,
                      search_steps=args.search_steps, warmup_s=args.warmup)
    if args.concurrency:
        sweep.concurrencies = parse_list(args.concurrency, int)
    elif args.rates:
        sweep.rates = parse_list(args.rates, float)
    elif not args.search:
        sweep.rates = [args.rate if args.rate is not None else 100.0]
    base = StepSpec(rate=(sweep.rates or [sweep.search_start])[0], duration_s=args.duration, arrivals=args.arrivals,
                    rpc=rpc, timeout_s=args.timeout_ms / 1e3, seed=args.seed, connections=args.connections)
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
    settings = None
    try:
        settings = asyncio.run(probe(args.target, metadata))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uwrt bench -> {args.target}: {rpc}, {args.procs} generator process(es), "
          f"{'closed loop' if sweep.concurrencies else args.arrivals + ' arrivals'}, {args.duration:g}s per step",
          flush=True)
    print(HEADER, flush=True)
    rows = run_sweep(args.target, base, sweep, source, procs=args.procs, src_args=src_args, metadata=metadata,
                     server_pid=args.server_pid, progress=not args.quiet,
                     on_row=lambda r: print(format_row(r), flush=True))
    if any(r["fell_behind"] for r in rows):
        print("WARNING: the generator fell behind its schedule in some steps (late sends / unsent): their latencies "
              "are not the server's alone; use --procs or a lower rate", flush=True)
    if sweep.search:
        best = max_rate_meeting(rows, args.p99_limit_ms)
        print(f"highest rate with p99 <= {args.p99_limit_ms:g} ms: "
              f"{'none of the tried rates' if best is None else f'{best:.0f} requests/s'}", flush=True)
    meta = dict(machine_meta(), target=args.target, label=args.label or args.target, command=sys.argv,
                rpc=rpc, arrivals=args.arrivals, duration_s=args.duration, warmup_s=args.warmup,
                timeout_ms=args.timeout_ms, seed=args.seed, procs=args.procs, connections=args.connections,
                input=args.input, pool=args.pool,
                p99_limit_ms=args.p99_limit_ms, late_threshold_ms=LATE_S * 1e3,
                server_settings={k: v for k, v in (settings or {}).items() if not k.startswith("stats.")})
    if args.json:
        write_json(args.json, meta, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        from uwrt.bench.plot import plot_latency_vs_rate
        plot_latency_vs_rate({meta["label"]: rows}, args.plot, p99_limit_ms=args.p99_limit_ms)
    return 0


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


