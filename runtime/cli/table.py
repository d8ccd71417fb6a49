"""The decision table that `uwrt decide` and `uwrt score` print for a person (`--json` gives
machines the DecisionResponse JSON lines instead).

    request_id  outcome      PD      score  total_us  reasons                  warnings
    cli-0       APPROVE      0.0213    687      2313  -                        -
    cli-3       DECLINE      0.4120    541      2710  DELINQUENCY,UTILIZATION  FEATURE_IMPUTED(bureau_score,income)

Column widths come from the rows printed (so four reasons never push the columns out of
line); the warnings column is last and says which feature or how many events each warning
concerns, from `Warning.detail`. Pure functions of the responses; thread safe.
"""
from __future__ import annotations

from collections.abc import Sequence

from uwrt.runtime.pb import pb

__all__ = ["format_decisions", "warnings_text"]


def warnings_text(resp: pb.DecisionResponse) -> str:
    """Warnings grouped by code, each with its details: `FEATURE_IMPUTED(bureau_score,income)`,
    `HISTORY_TRUNCATED(kept the newest 128 of 300 events)`; "-" when there are none."""
    grouped: dict[str, list[str]] = {}
    for w in resp.warnings:
        details = grouped.setdefault(pb.WarningCode.Name(w.code), [])
        if w.detail and w.detail not in details:
            details.append(w.detail)
    return "; ".join(f"{code}({','.join(d)})" if d else code for code, d in grouped.items()) or "-"


def format_decisions(responses: Sequence[pb.DecisionResponse], *, times: bool = True) -> list[str]:
    """The header and one line per response. The time column (`total_us`: each response's
    `timing.total_us`, the server-side time of that request) appears when `times` and some
    response carries one (`uwrt score` passes False: offline, it is the whole batch's time)."""
    timed = times and any(r.timing.total_us for r in responses)
    head = ("request_id", "outcome", "PD", "score") + (("total_us",) if timed else ()) + ("reasons", "warnings")
    rows = [head]
    for r in responses:
        rows.append((r.request_id, pb.Outcome.Name(r.outcome), f"{r.probability_of_default:.4f}", f"{r.score:.0f}")
                    + ((str(r.timing.total_us),) if timed else ())
                    + (",".join(x.code for x in r.reasons) or "-", warnings_text(r)))
    widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
    right = {"PD", "score", "total_us"}
    out = []
    for row in rows:
        cells = [c.rjust(w) if h in right else c.ljust(w)
                 for c, w, h in zip(row[:-1], widths[:-1], head[:-1], strict=True)]
        out.append("  ".join(cells + [row[-1]]).rstrip())
    return out
