"""bench/records_cost.py: what decision records cost on the hot path, measured with uwrt bench's
load generator against records off in the same run.

    python bench/records_cost.py [--bundle bundles/demo] [--rates 200,400] [--duration 20] [--rounds 3]
                                 [--records-root DIR] [--no-reload] [--out bench/results/records_cost.json]

Four `uwrt serve --workers 1 --pin-workers off` servers run side by side (loopback, port 0), one
loaded at a time:

    off             no records_dir (no log, no idempotency)
    fsync           records_durability = fsync (the default): a batch's responses wait for fdatasync
    interval        records_durability = interval (records_interval_ms 10)
    fsync-noidem    fsync with idempotency_window_s = 0: the log without the SQLite index

Every round runs every configuration once, in a rotated order: a 1 s unrecorded warm-up, then
one open-loop step per rate (uwrt.bench.loadgen, the engine of `uwrt bench`: Poisson arrivals,
latency from the intended send time, unique request ids so nothing is a replay). Per step: the
loadgen row (p50/p99/p99.9, errors) plus the server's CPU per request read from /proc around the
step, and the deltas of the server's `records.*` counters (GetModelInfo: records, writes,
fsyncs). The summary gives medians and [min, max] over the rounds.

Then (unless --no-reload) two SIGHUP reloads of the fsync server during one open-loop step at the
first rate: failed requests, and `reload.reloads` before and after. Finally `uwrt audit verify`
of every log directory.

The log directories go under --records-root (default: a new directory in /var/tmp, which must be
a real disk: fsync on tmpfs costs nothing). Writes one JSON file (meta with `uptime`, `top` and
the commit, every step, the summary, the reload test). A command-line program.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from uwrt.bench import loadgen  # noqa: E402
from uwrt.bench.loadgen import StepSpec  # noqa: E402
from uwrt.bench.loadgen.cpus import proc_cpu_s  # noqa: E402
from uwrt.bench.loadgen.traffic import RequestSource  # noqa: E402
from uwrt.bench.servers import ServerProcess, server_command  # noqa: E402

CONFIGS = ("off", "fsync", "interval", "fsync-noidem")


def serve_flags(config: str, root: pathlib.Path) -> str:
    base = "--workers 1 --pin-workers off"
    d = root / config
    if config == "off":
        return base
    if config == "fsync":
        return f"{base} --records-dir {d} --records-durability fsync"
    if config == "interval":
        return f"{base} --records-dir {d} --records-durability interval --records-interval-ms 10"
    if config == "fsync-noidem":
        return f"{base} --records-dir {d} --records-durability fsync --idempotency-window-s 0"
    raise ValueError(config)


def settings(target: str) -> dict[str, str]:
    import grpc

    from uwrt.runtime.pb import pb, pb_grpc
    with grpc.insecure_channel(target) as ch:
        return dict(pb_grpc.UnderwritingStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).settings)


def _num(s: dict[str, str], k: str) -> float:
    try:
        return float(s[k])
    except (KeyError, ValueError):
        return float("nan")


def run_step(srv: ServerProcess, target: str, config: str, spec: StepSpec, source) -> dict:
    pid = srv.proc.pid
    s0 = settings(target)
    load0, c0 = os.getloadavg()[0], proc_cpu_s(pid)
    row = loadgen.run_step(target, spec, source)
    c1, load1 = proc_cpu_s(pid), os.getloadavg()[0]
    s1 = settings(target)
    n = row["completed"]
    row.update(config=config, server_cpu_us_per_req=1e6 * (c1 - c0) / n if n else None, loadavg_1m=[load0, load1])
    for k in ("records", "writes", "fsyncs", "replays"):
        row[f"records_{k}"] = _num(s1, f"records.{k}") - _num(s0, f"records.{k}")
    b = _num(s1, "stats.batches") - _num(s0, "stats.batches")
    row["server_mean_batch"] = (_num(s1, "stats.requests") - _num(s0, "stats.requests")) / b if b > 0 else None
    row["records_mean_fsync_us"] = _num(s1, "records.mean_fsync_us")
    return row


def _rotated(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


def _print(r: dict) -> None:
    print(f"  {r['config']:13} {r['target_rps']:5.0f} rps: ok/s {r['completed_rps']:6.1f}  p50 {r['p50_ms']:6.2f}  "
          f"p99 {r['p99_ms']:6.2f} ms  errors {r['error_count']}  cpu/req {r['server_cpu_us_per_req'] or 0:6.0f} us  "
          f"batch {r['server_mean_batch'] or 0:4.2f}  records {r['records_records']:.0f} "
          f"fsyncs {r['records_fsyncs']:.0f}  load {r['loadavg_1m'][1]:.1f}", flush=True)


def _med(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(rows: list[dict], rates: list[float], configs: tuple[str, ...] = CONFIGS) -> list[dict]:
    out = []
    for rate in rates:
        for config in configs:
            rs = [r for r in rows if r["config"] == config and r["target_rps"] == rate]
            out.append({"config": config, "rate": rate, "rounds": len(rs),
                        "p50_ms": _med([r["p50_ms"] for r in rs]), "p99_ms": _med([r["p99_ms"] for r in rs]),
                        "cpu_us_per_req": _med([r["server_cpu_us_per_req"] for r in rs]),
                        "errors": sum(r["error_count"] for r in rs),
                        "records_per_fsync": _med([r["records_records"] / r["records_fsyncs"] for r in rs
                                                   if r["records_fsyncs"] and r["records_fsyncs"] > 0]),
                        "mean_batch": _med([r["server_mean_batch"] for r in rs])})
    return out


def _fmt(d: dict, nd: int = 2) -> str:
    if d["median"] is None:
        return "-"
    return f"{d['median']:.{nd}f} [{d['min']:.{nd}f}, {d['max']:.{nd}f}]"


def table(summary: list[dict]) -> list[str]:
    lines = ["| rate | config | p50 ms | p99 ms | server CPU us/req | records/fsync | mean batch | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['rate']:.0f} | {s['config']} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | "
                     f"{_fmt(s['cpu_us_per_req'], 0)} | {_fmt(s['records_per_fsync'], 1)} | {_fmt(s['mean_batch'])} | "
                     f"{s['errors']} |")
    return lines


def reload_under_load(srv: ServerProcess, target: str, rate: float, duration: float, source) -> dict:
    s0 = settings(target)
    res: dict = {}

    def load() -> None:
        res["row"] = loadgen.run_step(target, StepSpec(rate=rate, duration_s=duration, timeout_s=2.0, seed=99,
                                                       tag="reload"), source)

    t = threading.Thread(target=load)
    t.start()
    hups = []
    for at in (0.25 * duration, 0.6 * duration):
        time.sleep(max(0.0, at - (hups[-1] if hups else 0.0)))
        os.kill(srv.proc.pid, signal.SIGHUP)
        hups.append(at)
    t.join()
    deadline = time.monotonic() + 120
    while True:          # the second reload may still be preparing when the step ends
        s1 = settings(target)
        if int(s1.get("reload.reloads", "0")) + int(s1.get("reload.refused", "0")) >= \
                int(s0.get("reload.reloads", "0")) + 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    row = res["row"]
    return {"rate": rate, "duration_s": duration, "sighups": 2, "sent": row["sent"], "completed": row["completed"],
            "errors": row["errors"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "max_ms": row["max_ms"],
            "reloads_before": s0.get("reload.reloads"), "reloads_after": s1.get("reload.reloads"),
            "refused_after": s1.get("reload.refused"), "last": s1.get("reload.last")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "bundles" / "demo"))
    p.add_argument("--rates", default="200,400", help="open-loop rates, requests/s (default 200,400)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per step (default 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records-root", default="", help="where the logs go (default: a new dir in /var/tmp)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations to run (default {','.join(CONFIGS)})")
    p.add_argument("--no-reload", action="store_true", help="skip the reload-under-load step (needs fsync)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "records_cost.json"))
    args = p.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    configs = tuple(c for c in args.configs.split(",") if c)
    if not set(configs) <= set(CONFIGS):
        p.error(f"--configs: choose from {', '.join(CONFIGS)}")
    root = pathlib.Path(args.records_root or tempfile.mkdtemp(prefix="uwrt-records-cost-", dir="/var/tmp"))
    fs = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout.splitlines()[-1:]
    meta = dict(loadgen.machine_meta(), command=sys.argv, bundle=args.bundle, rates=rates, duration_s=args.duration,
                rounds=args.rounds, configs=configs, records_root=str(root), records_fs=fs,
                uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                top=subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()[:15])
    print(f"logs under {root} ({fs}); {meta['uptime']}", flush=True)
    source = RequestSource.generated(2000, 1, id_prefix="rc-")
    servers: dict[str, ServerProcess] = {}
    targets: dict[str, str] = {}
    rows: list[dict] = []
    rel = None
    try:
        for c in configs:
            srv = ServerProcess("uwrt", server_command("uwrt", args.bundle, serve_flags(c, root)), 600)
            servers[c] = srv
            targets[c] = srv.target
            print(f"{c}: serving on {targets[c]} (pid {srv.proc.pid})", flush=True)
        for rnd in range(args.rounds):
            for c in _rotated(configs, rnd):
                loadgen.run_step(targets[c], StepSpec(rate=100, duration_s=1.0, tag=f"w{rnd}{c}"), source)
                for rate in rates:
                    spec = StepSpec(rate=rate, duration_s=args.duration, timeout_s=1.0, seed=rnd + 1,
                                    tag=f"r{rnd}-{c}-{rate:g}")
                    rows.append(dict(run_step(servers[c], targets[c], c, spec, source), round=rnd))
                    _print(rows[-1])
        if not args.no_reload and "fsync" in configs:
            rel = reload_under_load(servers["fsync"], targets["fsync"], rates[0], args.duration, source)
            print(f"reload under load: {json.dumps(rel)}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    verify = {}
    for c in (c for c in configs if c != "off"):
        r = subprocess.run([sys.executable, "-m", "uwrt.runtime.cli", "audit", "verify", str(root / c)],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        verify[c] = {"rc": r.returncode, "last": (r.stdout.strip().splitlines() or [""])[-1]}
    meta["loadavg_end"] = os.getloadavg()
    meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    summary = summarize(rows, rates, configs)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "steps": rows, "summary": summary, "reload": rel, "verify": verify},
                              indent=1, default=str))
    print("\n".join(table(summary)))
    print(f"verify: {verify}")
    if not args.records_root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
