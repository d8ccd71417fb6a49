"""The native engine: open-loop unary steps sent by a small C program (`bench/native/h2gen.c`,
over libnghttp2, built by `make bench-native` into build/bench/h2gen), driven from Python.

Division of labour. Python computes everything a step is made of, with the same code as the
Python engine: the schedule (`traffic.schedule`, the same seeded generator and seed, so both
engines send a step at the same intended times) and the payload set (the source's requests,
serialized and framed for gRPC: 0x00, 4-byte big-endian length, message). It writes them to a
temporary directory, runs the binary (pinned to `--client-cpus` by the binary itself, so no
Python thread is ever on those cores during the step), and reads back one record per request:
intended, sent and completion times (ns from the step's start), the gRPC status, and the
server-side `timing` and outcome parsed from the DecisionResponse. `accounting.record_arrays`
turns those into the same StepRaw the Python engine fills, so rows, tables, CSV and JSON are
the same; `engine` says which engine made a row.

Request ids: bodies rotate through the pool (request i sends pool request i % pool size), but
every request gets its own id: each body carries a fixed-width placeholder `<prefix><tag>-0000000000`
that the binary overwrites with i (zero-padded) as it copies the body out, so ids never repeat
within a step (tags differ between steps, the prefix carries the pid). The server treats the
request id as an idempotency key; unique ids keep a replay cache, if one is ever added, out of
the measurement.

What the binary cannot see is absent, never invented: server-side stage times exist only for
Decide responses it parsed (health/info rows have none: NaN -> null in JSON, "-" in the table).

`StepSpec.fifo` (`uwrt bench --client-fifo`) runs the binary under SCHED_FIFO priority 1 (needs
root): on a machine busy with other work a sleeping generator otherwise wakes up to tens of ms
late (measured at load average 15-19: 45-47% of sends > 1 ms late vs 0.0-0.1% with it,
bench/RESULTS.md). It uses a few
percent of a core, but it preempts whatever shares its core, so pin it away from the server.

CPU: the binary's own user + system time from its start of sending to its last completion
(getrusage), plus this process's CPU while it waited (near zero): the generator's cost per
request. Building the payloads and reading the records back happen outside that window, as
for the Python engine's payload building.

Thread safety: `run_native_step` is a blocking call; run it off the event loop.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zlib

import numpy as np

from uwrt.bench.loadgen.accounting import StepRaw, StepSpec, record_arrays
from uwrt.bench.loadgen.cpus import cpu_s, format_cpus
from uwrt.bench.loadgen.traffic import RequestSource, schedule
from uwrt.bench.loadgen.transports import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
BINARY = os.path.join(ROOT, "build", "bench", "h2gen")
ID_WIDTH = 10                  # digits of the per-request counter in a native request id
NO_ID = 0xFFFFFFFF
RECORD = np.dtype([("intended_ns", "<i8"), ("sent_ns", "<i8"), ("done_ns", "<i8"), ("timing", "<u4", (6,)),
                   ("status", "<u2"), ("flags", "u1"), ("conn", "u1")])
BUILD_HINT = ("the native engine is not built: run `make bench-native` (needs cc, pkg-config and Debian's "
              "libnghttp2-dev)")

__all__ = ["binary", "unavailable_reason", "choose_engine", "native_request_id", "encode_bodies", "run_native_step",
           "BUILD_HINT"]


def binary() -> str | None:
    """The h2gen executable ($UWRT_H2GEN, else build/bench/h2gen), or None when absent."""
    path = os.environ.get("UWRT_H2GEN") or BINARY
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def unavailable_reason(spec: StepSpec | None = None) -> str | None:
    """Why the native engine cannot run this step (None: it can)."""
    if spec is not None:
        if spec.concurrency > 0:
            return "the native engine is open loop only (closed loop --concurrency runs on the Python engine)"
        if spec.rpc == "stream":
            return "the native engine sends unary RPCs only (--stream runs on the Python engine)"
    return None if binary() else BUILD_HINT


def choose_engine(requested: str, *, rpc: str, closed: bool, procs: int) -> tuple[str | None, str | None]:
    """(engine, notice): "python" or "native" for `--engine auto|native|python`, with the reason
    when auto fell back to python; (None, error) when an explicit "native" cannot run."""
    if requested == "python":
        return "python", None
    limits = []
    if closed:
        limits.append("closed loop (--concurrency) runs on the Python engine")
    if rpc == "stream":
        limits.append("--stream runs on the Python engine")
    if procs > 1:
        limits.append("--procs splits the Python engine; the native engine is one process")
    missing = None if binary() else BUILD_HINT
    if requested == "native":
        why = "; ".join(limits + ([missing] if missing else []))
        return ("native", None) if not why else (None, f"--engine native: {why}")
    if limits or missing:
        return "python", "; ".join(limits + ([missing] if missing else []))
    return "native", None


def native_request_id(source: RequestSource, tag: str, i: int) -> str:
    """The request id the native engine gives request i of a step with this tag."""
    return f"{source.id_prefix}{tag}-{i:0{ID_WIDTH}d}"


def encode_bodies(source: RequestSource | None, n: int, tag: str) -> bytes:
    """The --bodies file: u32 count, then per body u32 length, u32 id offset, u32 id width and the
    gRPC-framed message. At most `n` bodies (the step's request count), at least one; with no
    source, one empty message (health / info)."""
    out = []
    if source is None:
        msgs = [(b"", NO_ID)]
    else:
        msgs = []
        placeholder = native_request_id(source, tag, 0)
        for k in range(max(1, min(n, len(source.pool)))):
            r = source.pool[k]
            rid, r.request_id = r.request_id, placeholder
            m = r.SerializeToString()
            r.request_id = rid                    # the pool is left as it was
            pos = m.find(placeholder.encode())
            if m[:1] != b"\x0a" or pos != 2:      # field 1 (request_id) first, one-byte length
                raise ValueError("cannot place the request id in the serialized request")
            msgs.append((m, 5 + pos + len(placeholder) - ID_WIDTH))
    out.append(len(msgs).to_bytes(4, "little"))
    for m, id_off in msgs:
        framed = b"\x00" + len(m).to_bytes(4, "big") + m
        out += [len(framed).to_bytes(4, "little"), id_off.to_bytes(4, "little"),
                (ID_WIDTH if id_off != NO_ID else 0).to_bytes(4, "little"), framed]
    return b"".join(out)


def run_native_step(target: str, spec: StepSpec, source: RequestSource | None, *, metadata: tuple = (),
                    client_cpus: list[int] | None = None, progress: bool = False, label: str = "",
                    keep_dir: str | None = None) -> tuple[StepRaw, dict]:
    """Run one open-loop step on the native engine; (StepRaw, details) where details has the
    binary's summary (connections, reconnects, GOAWAYs, the CPUs it ran on), the schedule it
    used and, with keep_dir, where its files are."""
    why = unavailable_reason(spec)
    if why:
        raise RuntimeError(why)
    exe = binary()
    assert exe is not None
    rng = np.random.default_rng([spec.seed, 0, zlib.crc32(spec.tag.encode())])   # as the Python engine's worker 0
    offs = schedule(spec.rate, spec.duration_s, spec.arrivals, rng, 0.0)
    offs_ns = np.round(offs * 1e9).astype("<i8")
    tag = f"{spec.tag}w0"
    work = keep_dir or tempfile.mkdtemp(prefix="uwrt-h2gen-")
    try:
        os.makedirs(work, exist_ok=True)
        paths = {k: os.path.join(work, f"{k}.bin") for k in ("schedule", "bodies", "records")}
        offs_ns.tofile(paths["schedule"])
        with open(paths["bodies"], "wb") as fh:
            fh.write(encode_bodies(source, len(offs_ns), tag))
        cmd = [exe, "--target", target, "--schedule", paths["schedule"], "--bodies", paths["bodies"],
               "--out", paths["records"], "--path", METHODS[spec.rpc], "--connections", str(spec.connections),
               "--timeout-us", str(int(round(spec.timeout_s * 1e6))), "--duration-us", str(int(spec.duration_s * 1e6)),
               "--label", label or f"native {spec.rate:g} rps"]
        if spec.rpc == "decide":
            cmd.append("--parse-timing")
        for k, v in metadata:
            cmd += ["--metadata", f"{k}={v}"]
        if client_cpus:
            cmd += ["--cpus", format_cpus(client_cpus)]
        if progress:
            cmd.append("--progress")
        if spec.fifo:
            cmd.append("--fifo")
        c0 = cpu_s()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True, timeout=spec.duration_s + spec.timeout_s + 120)
        parent_cpu = cpu_s() - c0
        if proc.returncode != 0:
            raise RuntimeError(f"h2gen exited {proc.returncode}: {(proc.stderr or '').strip()[-2000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        recs = np.fromfile(paths["records"], dtype=RECORD)
        if len(recs) != len(offs_ns) or not np.array_equal(recs["intended_ns"], offs_ns):
            raise RuntimeError("h2gen's records do not match the schedule it was given")
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    names = {int(k): v for k, v in summary.pop("status_names").items()}
    raw = StepRaw()
    raw.scheduled = len(recs)
    record_arrays(raw, recs["intended_ns"], recs["sent_ns"], recs["done_ns"], recs["status"], names,
                  timing=recs["timing"], has_timing=(recs["flags"] & 1) > 0, adverse=(recs["flags"] & 2) > 0)
    raw.cpu_s = summary["cpu_user_s"] + summary["cpu_sys_s"] + parent_cpu
    raw.wall_s = summary["end_ns"] / 1e9
    sent = recs["sent_ns"][recs["sent_ns"] >= 0]
    raw.send_span_s = max(0.0, float(sent.max()) / 1e9) if len(sent) else 0.0
    details = dict(summary, parent_cpu_s=parent_cpu, offsets_ns=offs_ns, tag=tag, dir=keep_dir)
    return raw, details
