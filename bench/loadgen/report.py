"""Reporting: a step's summary row (`summarize`), the pass/fail test of a sweep (`meets`), the
one-line table (`HEADER`, `format_row`), CSV (`write_csv`, nested fields flattened) and JSON
(`write_json`: {meta, steps}, NaN -> null, inf -> "inf"), and the machine provenance every
result carries (`machine_meta`). Plots: `uwrt.bench.plot.plot_latency_vs_rate` over the rows.

A row holds: target and achieved send rate, completed rate, p50/p90/p99/p99.9/max/mean over
successful responses, `p99_all_ms` (a failed or unsent request counts as never answered),
errors by gRPC status name, late sends and send lag, server-side stage means and p99s joined
from each response's `timing` (NaN where the engine or server gave none), the adverse-outcome
share with the mean policy_us of adverse vs other responses, the mean batch size (from the
server's counters), the generator's CPU share and CPU microseconds per request, the server's
CPU share, and `fell_behind` (more than 1% of sends over 1 ms late, or any unsent).

Thread safety: pure functions (the writers write only their own file).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
from typing import Any

import grpc

from uwrt.bench.loadgen.accounting import FELL_BEHIND_LATE_SHARE, STAGES, StepRaw, StepSpec
from uwrt.bench.meta import git_sha

__all__ = ["summarize", "meets", "HEADER", "format_row", "flat_row", "write_csv", "write_json", "json_safe",
           "machine_meta"]


def _ms(us: float) -> float:
    return us / 1e3 if not (isinstance(us, float) and math.isnan(us)) else float("nan")


def summarize(spec: StepSpec, raw: StepRaw, *, batches: tuple[int, int] | None = None,
              server_cpu_s: float = float("nan"), procs: int = 1) -> dict:
    """The step's row: every number a report needs (JSON-ready; NaN where undefined)."""
    dur = spec.duration_s
    send_s = max(dur, raw.send_span_s)   # a generator that fell behind took longer to send the step
    closed = spec.concurrency > 0
    n_err = sum(raw.errors.values())
    lat = raw.lat
    row: dict[str, Any] = dict(
        mode="closed" if closed else "open", rpc=spec.rpc, arrivals=None if closed else spec.arrivals,
        concurrency=spec.concurrency if closed else None, target_rps=None if closed else float(spec.rate),
        duration_s=dur, procs=procs, connections=1 if spec.rpc == "stream" else spec.connections,
        scheduled=raw.scheduled, sent=raw.sent, achieved_rps=raw.sent / send_s,
        send_span_s=raw.send_span_s,
        completed=raw.ok, completed_rps=raw.ok / dur, error_count=n_err, errors=dict(sorted(raw.errors.items())),
        error_share=n_err / raw.sent if raw.sent else 0.0, unsent=raw.unsent, late_sends=raw.late,
        late_share=raw.late / raw.sent if raw.sent else 0.0,
        lag_p99_ms=_ms(raw.lag.percentile(99)), lag_max_ms=_ms(float(raw.lag.max)) if raw.lag.count else float("nan"),
        p50_ms=_ms(lat.percentile(50)), p90_ms=_ms(lat.percentile(90)), p99_ms=_ms(lat.percentile(99)),
        p999_ms=_ms(lat.percentile(99.9)), max_ms=_ms(float(lat.max)) if lat.count else float("nan"),
        mean_ms=_ms(lat.mean()), p99_all_ms=_ms(lat.percentile_with_failures(99, n_err + raw.unsent)),
        server_mean_us={k: raw.stages[k].mean() for k in STAGES},
        server_p99_us={k: raw.stages[k].percentile(99) for k in STAGES},
        mean_batch_size=(batches[0] / batches[1]) if batches and batches[1] else None,
        adverse_share=raw.adverse / raw.ok if raw.ok and raw.stages["total_us"].count else None,
        policy_us_adverse=raw.policy_us_adverse / raw.adverse if raw.adverse else None,
        policy_us_other=(raw.policy_us_other / (raw.stages["total_us"].count - raw.adverse)
                         if raw.stages["total_us"].count > raw.adverse else None),
        client_cpu_pct=100 * raw.cpu_s / raw.wall_s if raw.wall_s else float("nan"),
        client_cpu_us_per_req=1e6 * raw.cpu_s / raw.sent if raw.sent else float("nan"),
        server_cpu_pct=100 * server_cpu_s / raw.wall_s if raw.wall_s else float("nan"),
        wall_s=raw.wall_s)
    row["fell_behind"] = (not closed) and bool(raw.unsent or raw.late > FELL_BEHIND_LATE_SHARE * max(raw.sent, 1))
    return row


def meets(row: dict, p99_limit_ms: float) -> bool:
    """The step held the latency limit: p99 counting failures as unanswered, and the generator
    kept its schedule (a fell-behind step proves nothing)."""
    return (not row["fell_behind"]) and row["p99_all_ms"] <= p99_limit_ms


HEADER = (f"{'target':>7} {'sent/s':>7} {'ok/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>8} {'max':>8}"
          f" {'batch':>5} {'queue':>6} {'enc':>6} {'trees':>6} {'srv':>6} {'cli%':>5} {'us/req':>6}  errors")


def _cell(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_row(r: dict) -> str:
    f = _cell
    s = r["server_mean_us"]
    target = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target_rps']:.0f}"
    err = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    line = (f"{target:>7} {r['achieved_rps']:>7.1f} {r['completed_rps']:>7.1f} {f(r['p50_ms'], '7.3f')} "
            f"{f(r['p90_ms'], '7.3f')} {f(r['p99_ms'], '7.3f')} {f(r['p999_ms'], '8.3f')} {f(r['max_ms'], '8.3f')} "
            f"{f(r['mean_batch_size'], '5.2f')} {f(s['queue_us'], '6.0f')} {f(s['encode_us'], '6.0f')} "
            f"{f(s['trees_us'], '6.0f')} {f(s['total_us'], '6.0f')} {f(r['client_cpu_pct'], '5.0f')} "
            f"{f(r['client_cpu_us_per_req'], '6.0f')}  {err}")
    if r.get("series", "model") != "model":
        line += f"  <{r['series']}>"
    if r["fell_behind"]:
        line += (f"  [GENERATOR FELL BEHIND: sent {r['achieved_rps']:.0f}/s of {r['target_rps']:.0f}/s, "
                 f"{r['late_share']:.1%} late > 1 ms, lag p99 {r['lag_p99_ms']:.1f} ms, {r['unsent']} unsent]")
    return line


def flat_row(r: dict) -> dict:
    """A CSV-friendly copy: nested dicts become prefixed columns, errors one 'CODE:n;...' cell."""
    out = {}
    for k, v in r.items():
        if k == "errors":
            out[k] = ";".join(f"{c}:{n}" for c, n in v.items())
        elif isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    import csv
    flat = [flat_row(r) for r in rows]
    cols: list[str] = []
    for fr in flat:
        cols += [c for c in fr if c not in cols]
    _mkdir_for(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)


def _mkdir_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    _mkdir_for(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(dict(meta=meta, steps=rows)), fh, indent=1)




def machine_meta() -> dict:
    return dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), git=git_sha(),
                platform=platform.platform(), cpu_count=os.cpu_count(), python=platform.python_version(),
                grpc=grpc.__version__)

