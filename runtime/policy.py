"""Policy: probability of default -> outcome, score, and adverse-action reasons.

Thread safety: pure functions of their arguments.
"""
from __future__ import annotations

import math

import numpy as np

from uwrt.runtime.bundle.schema import Policy
from uwrt.runtime.pb import pb


def outcome_for(pd: float, policy: Policy) -> pb.Outcome:
    """The pb.Outcome for a probability of default under the policy's thresholds."""
    if pd <= policy.approve_max_pd:
        return pb.APPROVE
    if pd <= policy.counteroffer_max_pd:
        return pb.COUNTEROFFER
    if pd <= policy.review_max_pd:
        return pb.REVIEW
    return pb.DECLINE


ADVERSE = frozenset({pb.DECLINE, pb.COUNTEROFFER})


def score_for(pd: float, policy: Policy) -> float:
    """Points on the policy's scale: offset + pdo/ln2 * ln(good:bad odds); higher is safer."""
    p = min(max(pd, 1e-9), 1 - 1e-9)
    return policy.score_offset + policy.score_pdo / math.log(2.0) * math.log((1.0 - p) / p)


def counteroffer_amount(amount_minor: int, policy: Policy) -> int:
    return int(math.floor(amount_minor * policy.counteroffer_amount_ratio))


def group_contributions(contribs: np.ndarray, reason_codes: list[str]) -> dict[str, float]:
    """Sum per-feature TreeSHAP contributions [F] (bias column excluded) by reason code."""
    out: dict[str, float] = {}
    for c, code in zip(contribs, reason_codes, strict=True):
        out[code] = out.get(code, 0.0) + float(c)
    return out


def top_reasons(contribs: np.ndarray, reason_codes: list[str], policy: Policy) -> list[pb.Reason]:
    """Up to policy.max_reasons reason groups pushing toward default (contribution > 0), strongest first.

    `contribs` is one row of TreeSHAP output without the bias column. Ties break by code so
    the order is deterministic.
    """
    grouped = group_contributions(contribs, reason_codes)
    positive = sorted(((v, k) for k, v in grouped.items() if v > 0.0), key=lambda t: (-t[0], t[1]))
    return [pb.Reason(code=k, text=policy.reason_texts.get(k, k), contribution=v)
            for v, k in positive[:policy.max_reasons]]
