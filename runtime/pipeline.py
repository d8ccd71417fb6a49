"""The decision pipeline: featurize -> encoder -> trees -> policy -> DecisionResponse.

Transport-free: the offline scorer (`uwrt score`) and the gRPC server both call
`Pipeline.decide`. Each request is validated on its own; a bad one comes back as an
`InvalidRequest` at its position and never affects the others (batch invariance and isolation).

Thread safety: `decide` is not re-entrant (the torch encoder shares intra-op threads); call it
from one worker thread, as the server does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from runtime.bundle import Bundle, load_bundle
from runtime.encoder import EncoderBackend, TorchEncoderBackend
from runtime.encoder_script import TorchScriptEncoderBackend
from runtime.errors import InvalidRequest
from runtime.featurize import FeatureBatch, Limits, featurize
from runtime.pb import pb
from runtime.policy import ADVERSE, counteroffer_amount, outcome_for, score_for, top_reasons
from runtime.trees import TreeExplainer, TreeStage, XGBoostTreeStage, load_booster

log = logging.getLogger("uwrt.pipeline")


@dataclass
class StageTimes:
    """Microseconds spent per stage on one batch."""
    featurize_us: int = 0
    encode_us: int = 0
    trees_us: int = 0
    policy_us: int = 0


#: CPU encoder backends by name (RuntimeConfig.encoder_backend). Both compute the same numbers
#: (tested bit for bit); torchscript releases the GIL for the whole forward.
ENCODER_BACKENDS = {"torchscript": TorchScriptEncoderBackend, "torch": TorchEncoderBackend}


def _us(t0: int) -> int:
    return (time.perf_counter_ns() - t0) // 1000


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-margin))


class Pipeline:
    """A loaded bundle with its encoder backend, tree stage and explainer."""

    def __init__(self, bundle: Bundle, *, encoder: EncoderBackend | None = None, trees: TreeStage | None = None,
                 limits: Limits = Limits(), tree_threads: int = 1, encoder_backend: str = "torchscript") -> None:
        self.bundle = bundle
        self.schema = bundle.schema
        self.encoder_config = bundle.encoder_config
        self.policy = bundle.policy
        self.limits = limits
        booster = load_booster(bundle.tree_model_bytes(), nthread=tree_threads)  # bytes verified against the manifest
        if encoder is None:
            if encoder_backend not in ENCODER_BACKENDS:
                raise ValueError(f"unknown encoder backend {encoder_backend!r}; choose one of {sorted(ENCODER_BACKENDS)}")
            encoder = ENCODER_BACKENDS[encoder_backend](bundle.encoder_config, bundle.encoder_state())
        self.encoder = encoder
        self.trees = trees or XGBoostTreeStage(booster)
        self.explainer = TreeExplainer(booster)
        self.identity = bundle.identity()
        self.reason_codes = self.schema.reason_codes
        if self.trees.num_features != len(self.schema.features):
            raise ValueError(f"tree stage expects {self.trees.num_features} features, schema has {len(self.schema.features)}")

    @classmethod
    def from_dir(cls, path, **kw) -> "Pipeline":
        return cls(load_bundle(path), **kw)

    def model_rows(self, batch: FeatureBatch, emb: np.ndarray) -> np.ndarray:
        """The exact float32 rows [B, F] the tree stage sees (tabular block, then embedding)."""
        return np.concatenate([batch.tabular, emb.astype(np.float32)], axis=1)

    def decide(self, requests: list[pb.DecisionRequest], times: StageTimes | None = None
               ) -> list[pb.DecisionResponse | InvalidRequest]:
        """Score a batch. Result i answers requests[i]: a DecisionResponse or an InvalidRequest."""
        times = times if times is not None else StageTimes()
        t_start = time.perf_counter_ns()
        t0 = time.perf_counter_ns()
        batch, errors = featurize(requests, self.schema, self.encoder_config, self.limits)
        times.featurize_us = _us(t0)
        results: list[pb.DecisionResponse | InvalidRequest | None] = [None] * len(requests)
        for i, e in errors.items():
            results[i] = e
        if batch.batch_size:
            t0 = time.perf_counter_ns()
            emb = self.encoder.encode(batch.events)
            times.encode_us = _us(t0)
            t0 = time.perf_counter_ns()
            rows = self.model_rows(batch, emb)
            margin = self.trees.predict_margin(rows)
            times.trees_us = _us(t0)
            t0 = time.perf_counter_ns()
            responses = self._respond(requests, batch, rows, margin)
            times.policy_us = _us(t0)
            total_us = _us(t_start)
            for r, resp in zip(batch.index, responses):
                tm = resp.timing
                tm.featurize_us, tm.encode_us, tm.trees_us = times.featurize_us, times.encode_us, times.trees_us
                tm.policy_us, tm.total_us = times.policy_us, total_us
                results[r] = resp
        return results  # type: ignore[return-value]

    def _respond(self, requests: list[pb.DecisionRequest], batch: FeatureBatch, rows: np.ndarray,
                 margin: np.ndarray) -> list[pb.DecisionResponse]:
        pd = sigmoid(margin)
        outcomes = [outcome_for(float(p), self.policy) for p in pd]
        adverse = [j for j, o in enumerate(outcomes) if o in ADVERSE]
        contribs = self.explainer.contributions(rows[adverse]) if adverse else None
        out = []
        for j, r in enumerate(batch.index):
            resp = pb.DecisionResponse(
                request_id=batch.request_ids[j], outcome=outcomes[j], probability_of_default=float(pd[j]),
                score=score_for(float(pd[j]), self.policy), path=pb.MODEL)
            resp.model.CopyFrom(self.identity)
            resp.warnings.extend(batch.warnings[j])
            if outcomes[j] == pb.COUNTEROFFER:
                resp.counteroffer_amount_minor = counteroffer_amount(requests[r].purchase.amount_minor, self.policy)
            out.append(resp)
        for k, j in enumerate(adverse):
            out[j].reasons.extend(top_reasons(contribs[k, :-1], self.reason_codes, self.policy))
        return out
