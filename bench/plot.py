"""Latency-vs-rate plots (PNG) of load-generator sweeps, for people. Headless (matplotlib Agg).

    python -m uwrt.bench.plot OUT.png RUN.json [RUN2.json ...]      # one series per `uwrt bench --json` file

`plot_latency_vs_rate({label: rows}, path, p99_limit_ms=10)`: p99 (solid, with markers) and p50
(dashed) against the target rate, log latency axis, one colour per server, the p99 limit as a
horizontal line. A step whose failures push p99 past "unanswered" (p99_all_ms = inf) is drawn at
the top edge with an x marker; a step where the generator fell behind is drawn hollow.

Thread safety: builds its own Figure (no pyplot global state); safe to call from any thread.
"""
from __future__ import annotations

import json
import math
import sys

__all__ = ["plot_latency_vs_rate"]


def plot_latency_vs_rate(series: dict[str, list[dict]], path: str, *, p99_limit_ms: float | None = 10.0,
                         title: str = "Latency vs offered rate (latency from intended send time)") -> str:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    finite = [r.get("p99_ms") for rows in series.values() for r in rows]
    finite = [v for v in finite if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    top = max(finite + [p99_limit_ms or 1.0]) * 1.5
    for k, (label, rows) in enumerate(series.items()):
        rows = sorted((r for r in rows if r.get("target_rps")), key=lambda r: r["target_rps"])
        if not rows:
            continue
        color = f"C{k}"
        x = [r["target_rps"] for r in rows]
        p99 = [_val(r.get("p99_all_ms"), top) for r in rows]
        p50 = [_val(r.get("p50_ms"), top) for r in rows]
        ax.plot(x, p99, "-", color=color, label=f"{label} p99")
        ax.plot(x, p50, "--", color=color, alpha=0.7, label=f"{label} p50")
        for r, xv, yv in zip(rows, x, p99, strict=True):
            failed = not math.isfinite(_num(r.get("p99_all_ms")))
            ax.plot([xv], [yv], "x" if failed else "o", color=color,
                    markerfacecolor="none" if r.get("fell_behind") else color)
    if p99_limit_ms:
        ax.axhline(p99_limit_ms, color="grey", lw=1, ls=":", label=f"p99 limit {p99_limit_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.text(0.99, 0.01, "x: >1% failed (p99 counts failures as unanswered); hollow: generator fell behind",
             ha="right", fontsize=6, color="grey")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _num(v) -> float:
    if v in ("inf", None):
        return math.inf if v == "inf" else math.nan
    return float(v)


def _val(v, top: float) -> float:
    x = _num(v)
    return top if not math.isfinite(x) else x


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    series = {}
    for p in argv[1:]:
        with open(p, encoding="utf-8") as fh:
            doc = json.load(fh)
        series[doc["meta"].get("label") or p] = doc["steps"]
    plot_latency_vs_rate(series, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
