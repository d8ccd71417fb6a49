"""The decision table of `uwrt decide` / `uwrt score`: columns stay aligned whatever the reasons
and warnings, warnings name the feature they concern."""
from __future__ import annotations

import numpy as np

from uwrt.runtime.cli.table import format_decisions, warnings_text
from uwrt.runtime.pb import pb

CODES = ["DELINQUENCY", "UTILIZATION", "REPAYMENT_HISTORY", "INCOME", "CREDIT_AGE", "INQUIRIES"]


def random_response(rng: np.random.Generator, i: int, *, timed: bool = True) -> pb.DecisionResponse:
    r = pb.DecisionResponse(request_id=f"req-{i}-" + "x" * int(rng.integers(0, 12)),
                            outcome=int(rng.integers(1, 5)), probability_of_default=float(rng.random()),
                            score=float(rng.uniform(300, 850)))
    for code in rng.choice(CODES, size=int(rng.integers(0, 5)), replace=False):
        r.reasons.add(code=str(code), text="t", contribution=float(rng.random()))
    for _ in range(int(rng.integers(0, 4))):
        r.warnings.add(code=pb.FEATURE_IMPUTED, detail=f"feature_{int(rng.integers(0, 20))}")
    if rng.random() < 0.3:
        r.warnings.add(code=pb.HISTORY_TRUNCATED, detail="kept the newest 128 of 300 events")
    if timed:
        r.timing.total_us = int(rng.integers(1, 10**6))
    return r


def test_columns_stay_aligned(rng):
    resps = [random_response(rng, i) for i in range(40)]
    resps[0].ClearField("reasons")
    resps[0].reasons.add(code="A_VERY_LONG_REASON_CODE_NAME")
    for c in CODES[:3]:
        resps[0].reasons.add(code=c)                     # four long reasons: the widest cell
    lines = format_decisions(resps)
    assert len(lines) == 41 and lines[0].split()[:5] == ["request_id", "outcome", "PD", "score", "total_us"]
    start = lines[0].index("warnings")
    for line, resp in zip(lines[1:], resps, strict=True):
        assert line[:start].endswith("  ") and line[start:] == warnings_text(resp)   # the last column starts together
        reasons = ",".join(x.code for x in resp.reasons) or "-"
        assert line[lines[0].index("reasons"):start].rstrip() == reasons
        assert line[:lines[0].index("total_us") + len("total_us")].endswith(str(resp.timing.total_us))


def test_warnings_name_their_feature(rng):
    r = random_response(rng, 0)
    r.ClearField("warnings")
    for name in ("bureau_score", "income", "bureau_score"):
        r.warnings.add(code=pb.FEATURE_IMPUTED, detail=name)
    r.warnings.add(code=pb.EMPTY_HISTORY, detail="no events")
    assert warnings_text(r) == "FEATURE_IMPUTED(bureau_score,income); EMPTY_HISTORY(no events)"
    assert warnings_text(pb.DecisionResponse()) == "-"


def test_offline_responses_have_no_server_time_column(rng):
    lines = format_decisions([random_response(rng, i, timed=False) for i in range(5)])
    assert "total_us" not in lines[0] and len(lines) == 6
    assert "total_us" not in format_decisions([random_response(rng, 0)], times=False)[0]
    assert format_decisions([]) == ["request_id  outcome  PD  score  reasons  warnings"]
