"""`uwrt bench`: load generator for a running Underwriting server, free of coordinated omission.

    uwrt bench --target 127.0.0.1:50051 --rate 1000 --duration 30 [--json OUT] [--csv OUT]
    uwrt bench --target HOST:PORT --rates 200,500,1000,1500 --duration 20      # sweep, one line a step
    uwrt bench --target HOST:PORT --rates 500,1000 --floor                     # + the transport floor per rate
    uwrt bench --target HOST:PORT --rate 1000 --client-cpus 0 --server-cpus 1 --server-pid PID   # pinned
    uwrt bench --target HOST:PORT --search --p99-limit-ms 10                   # highest rate with p99 <= 10 ms
    uwrt bench --target HOST:PORT --concurrency 16 --duration 10               # closed loop, 16 in flight
    uwrt bench --target HOST:PORT --rate 500 --stream                          # DecideStream instead of unary
    uwrt bench --target HOST:PORT --rate 3000 --rpc health                     # the generator's own ceiling
    python -m uwrt.bench.loadgen ...                                           # the same, without the CLI

Engines (`--engine`, default auto). `native`: a C program over libnghttp2 (`make bench-native`;
uwrt.bench.loadgen.native) sends open-loop unary steps from the schedule and payloads Python
computed, at ~40-100 us of CPU per request instead of the Python engine's ~400-750 (measured
on the 2-core VM, bench/RESULTS.md), so the generator takes far less of a shared machine from
the server. `python`: grpc.aio, every mode
(closed loop, DecideStream, `--procs`). `auto`: native when it is built and the step is
open-loop unary, else python with a notice saying why. Both engines fill the same rows.

Traffic: generator applicants (`--pool N --seed S`) or `--input requests.jsonl`, pre-serialized,
each with a unique request id. Open loop (default): a seeded schedule of intended send times,
Poisson (default) or constant arrivals, the same for both engines, kept whatever the server does.
The Python engine's ticker thread (time.sleep, ~0.1 ms precise; asyncio timers round to whole ms)
hands every due request to the grpc.aio client at its intended time; the native engine sleeps in
epoll until the next one. Closed loop (`--concurrency N`, Python): N requests in flight, each
sent as soon as the previous one of its slot answers (intended = actual send time). Unary
requests go round robin over `--connections` TCP connections (default 4: a server of several
processes sharing a port is balanced by the kernel per connection, not per request).

Latency runs from each request's INTENDED send time to its response, so the client's own lag and
the server's queueing are both charged (no coordinated omission). Deadlines (`--timeout-ms`)
also count from the intended time; a request whose deadline passed before it could be sent is
"unsent". A send more than 1 ms after its intended time is "late"; a step where more than 1% of
sends were late, or any was unsent, is flagged GENERATOR FELL BEHIND, and the achieved send
rate is printed next to the target. Latencies go into microsecond-resolution log-linear
histograms (`uwrt.bench.hist`, <= 0.1% error above 2 ms, exact below).

Per step: target and achieved rate, completed rate, p50/p90/p99/p99.9/max over successful
responses (and `p99_all_ms`, where a failed request counts as never answered), errors by gRPC
status name (the native engine reads grpc-status from the trailers and names transport failures:
UNAVAILABLE_CONNECT, UNAVAILABLE_CONN_LOST, UNAVAILABLE_GOAWAY, RST_STREAM_<code>), the
server-side breakdown joined per request from each response's `timing` (queue / featurize /
encode / trees / policy / total: mean and p99; absent for RPCs without one), the share of adverse
outcomes (DECLINE / COUNTEROFFER, the only ones that compute TreeSHAP reasons) with the mean
policy_us of adverse vs other responses, the mean batch size
(GetModelInfo `stats.requests` / `stats.batches` deltas, when the server has them), late sends
and send lag, the generator's own CPU per request, the engine, and the CPUs the generator and
(given `--server-pid`) the server ran on. A live progress line runs on stderr. Output: a table on
stdout, `--json` ({meta, steps}) and `--csv` (one row per step) for machines, `--plot` a
latency-vs-rate PNG for people (uwrt.bench.plot).

The floor (`--floor`): after each rate, the same step against a no-model echo server this
command starts (uwrt.bench.echo_server): the health RPC and Decide, rows with `series`
floor-health / floor-echo, so every rate shows what the model path adds to what gRPC and the
machine cost. Pinning: `--client-cpus` pins the generator, `--server-cpus` the `--server-pid`
process and the echo server, so they do not share a core.

`--procs K` (Python engine) splits the schedule over K worker processes (Poisson r/K each, or
constant r/K with phases i/K: together exactly the requested arrival process) and merges their
histograms.

Thread safety: `run_step` owns one event loop (and the Python engine one ticker thread) per call;
a `Recorder` is written from its loop thread only. Library entry points: `run_step`, `run_sweep`,
`summarize`.

Modules (each with its own docstring): `traffic` (payload sources, arrival schedules),
`accounting` (StepSpec, StepRaw, Recorder, record_arrays), `transports` (grpc.aio unary / stream,
GetModelInfo), `drivers` (the Python engine's open- and closed-loop drivers), `pyengine` (one
process's step, worker processes), `native` (the native engine's driver), `step` (a step with
progress and server counters, sweeps), `floor` (the echo server and floor steps), `report`
(summary rows, table, CSV/JSON), `cpus` (CPU accounting, pinning), `cli` (`uwrt bench`).
"""
from __future__ import annotations

from uwrt.bench.loadgen.accounting import FELL_BEHIND_LATE_SHARE, LATE_S, STAGES, Recorder, StepRaw, StepSpec, clock
from uwrt.bench.loadgen.cli import add_arguments, cmd_bench, main, parse_list, register
from uwrt.bench.loadgen.drivers import drive_closed, drive_open
from uwrt.bench.loadgen.native import choose_engine, run_native_step
from uwrt.bench.loadgen.pyengine import WorkerPool, run_step_async
from uwrt.bench.loadgen.report import (
    HEADER,
    flat_row,
    format_row,
    json_safe,
    machine_meta,
    meets,
    summarize,
    write_csv,
    write_json,
)
from uwrt.bench.loadgen.step import Progress, SweepSpec, max_rate_meeting, run_step, run_sweep
from uwrt.bench.loadgen.traffic import RequestSource, make_source, schedule
from uwrt.bench.loadgen.transports import ADVERSE_OUTCOMES, StreamTransport, UnaryTransport, probe

__all__ = ["StepSpec", "StepRaw", "Recorder", "STAGES", "LATE_S", "FELL_BEHIND_LATE_SHARE", "clock",
           "RequestSource", "make_source", "schedule", "choose_engine", "run_native_step", "UnaryTransport",
           "StreamTransport", "ADVERSE_OUTCOMES", "probe", "drive_open", "drive_closed", "run_step_async",
           "WorkerPool", "Progress", "run_step", "SweepSpec", "run_sweep", "max_rate_meeting", "summarize", "meets",
           "HEADER", "format_row", "flat_row", "write_csv", "write_json", "json_safe", "machine_meta",
           "add_arguments", "parse_list", "cmd_bench", "register", "main"]
