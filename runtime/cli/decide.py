"""`uwrt decide`: send requests to a running server and print the decisions.

    uwrt decide --target 127.0.0.1:50051 --n 10            # generated applicants, human table
    uwrt decide --target HOST:PORT --input requests.jsonl --json
    uwrt decide --target HOST:PORT --n 100 --stream         # one bidirectional stream
    uwrt decide --target HOST:PORT --n 1000 --connections 8 # unary calls over 8 connections

Unary calls go round-robin over `--connections` channels, each its own TCP connection (a
server with several processes sharing one port balances connections, not requests, so one
connection would reach one process only). `--stream` uses one stream on one connection.

Exit code 0 when every request got a decision, 1 when some failed (each failure is printed
with its gRPC status), 2 when the server cannot be reached or the input cannot be read.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import grpc

from uwrt.runtime.cli.table import format_decisions
from uwrt.runtime.jsonl import read_jsonl, to_json_line
from uwrt.runtime.pb import pb, pb_grpc

DEFAULT_CONNECTIONS = 4


def _requests(args: argparse.Namespace) -> list[pb.DecisionRequest]:
    if args.input:
        with contextlib.nullcontext(sys.stdin) if args.input == "-" else open(args.input, encoding="utf-8") as fh:
            return list(read_jsonl(fh))
    from uwrt.demo.synth import generate
    return generate(args.n, args.seed, id_prefix=args.id_prefix).requests


def open_channels(target: str, n: int) -> list[grpc.Channel]:
    """`n` channels to `target`, each on its own connection: a channel-local subchannel pool
    keeps gRPC from sharing one connection between channels with the same arguments."""
    return [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


def cmd_decide(args: argparse.Namespace) -> int:
    if args.connections < 1 or args.concurrency < 1:
        print("error: --connections and --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        reqs = _requests(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels = open_channels(args.target, 1 if args.stream else max(1, min(args.connections, len(reqs))))
    try:
        try:
            grpc.channel_ready_future(channels[0]).result(timeout=args.connect_timeout_s)
        except grpc.FutureTimeoutError:
            print(f"error: cannot reach a server at {args.target} within {args.connect_timeout_s}s", file=sys.stderr)
            return 2
        stubs = [pb_grpc.UnderwritingStub(ch) for ch in channels]
        timeout = args.timeout_ms / 1000.0
        results: list[tuple[str, pb.DecisionResponse | None, str]] = []
        if args.stream:
            for resp in stubs[0].DecideStream(iter(reqs), timeout=max(timeout, 1.0) * max(1, len(reqs))):
                if resp.HasField("error"):
                    results.append((resp.request_id, None, f"{resp.error.code}: {resp.error.message}"))
                else:
                    results.append((resp.request_id, resp, ""))
        else:
            futures: list[tuple[str, Any]] = []
            for i, r in enumerate(reqs):        # round-robin over the connections
                futures.append((r.request_id, stubs[i % len(stubs)].Decide.future(r, timeout=timeout)))
                if len(futures) - len(results) >= args.concurrency:
                    _collect(futures, results, upto=len(futures) - args.concurrency + 1)
            _collect(futures, results, upto=len(futures))
    finally:
        for ch in channels:
            ch.close()
    ok = [resp for _, resp, _ in results if resp is not None]
    for rid, resp, err in results:
        if resp is None:
            print(f"error: {rid}: {err}", file=sys.stderr)
    if args.json:
        for resp in ok:
            print(to_json_line(resp))
    else:
        print("\n".join(format_decisions(ok)))
    n_bad = len(results) - len(ok)
    print(f"{len(ok)} of {len(reqs)} decided", file=sys.stderr)
    return 1 if n_bad else 0


def _collect(futures, results, *, upto: int) -> None:
    while len(results) < upto:
        rid, fut = futures[len(results)]
        try:
            results.append((rid, fut.result(), ""))
        except grpc.RpcError as e:
            results.append((rid, None, f"{e.code().name}: {e.details()}"))


def register(sub) -> None:
    d = sub.add_parser("decide", help="send requests to a running server and print decisions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--target", required=True, help="server address HOST:PORT")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--input", help="requests JSONL ('-' for stdin)")
    src.add_argument("--n", type=int, default=10, help="generate N applicants (default 10)")
    d.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    d.add_argument("--id-prefix", default="cli-", help="generated request id prefix (default 'cli-')")
    d.add_argument("--json", action="store_true", help="print DecisionResponse JSON lines instead of a table")
    d.add_argument("--stream", action="store_true", help="use one DecideStream instead of unary calls")
    d.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                   help=f"connections that unary calls are spread over, round-robin (default {DEFAULT_CONNECTIONS}; "
                        "never more than there are requests)")
    d.add_argument("--concurrency", type=int, default=8, help="unary calls in flight (default 8)")
    d.add_argument("--timeout-ms", type=float, default=1000.0, help="per-request deadline (default 1000 ms)")
    d.add_argument("--connect-timeout-s", type=float, default=5.0, help="wait this long for the server (default 5 s)")
    d.set_defaults(func=cmd_decide)
