"""The decision pipeline: featurize -> encoder -> trees -> policy -> DecisionResponse.

Transport-free: the offline scorer (`uwrt score`) and the gRPC server both call
`Pipeline.decide`. Each request is validated on its own; a bad one comes back as an
`InvalidRequest` at its position and never affects the others (batch invariance and isolation).

Thread safety: `decide` is not re-entrant (the torch encoder shares intra-op threads); call it
from one worker thread, as the server does.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from uwrt.runtime.bundle.bundle import Bundle, load_bundle
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.encoders.base import EncoderBackend
from uwrt.runtime.encoders.build import ENCODER_BACKENDS, build_encoder
from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.featurize import FeatureBatch, Limits, featurize
from uwrt.runtime.pb import pb
from uwrt.runtime.policy import ADVERSE, counteroffer_amount, outcome_for, score_for, top_reasons
from uwrt.runtime.trees.base import Explainer, TreeExplainer, TreeStage, load_booster
from uwrt.runtime.trees.build import build_trees

log = logging.getLogger("uwrt.pipeline")


@dataclass
class StageTimes:
    """Microseconds spent per stage on one batch."""
    featurize_us: int = 0
    encode_us: int = 0
    trees_us: int = 0
    policy_us: int = 0       # policy and responses, reasons included
    reasons_us: int = 0      # of which TreeSHAP reasons (0 when none were computed)


def _us(t0: int) -> int:
    return (time.perf_counter_ns() - t0) // 1000


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-margin))


class Pipeline:
    """A loaded bundle with its encoder backend, tree stage and explainer."""

    def __init__(self, bundle: Bundle, *, encoder: EncoderBackend | None = None, trees: TreeStage | None = None,
                 limits: Limits = Limits(), tree_threads: int = 1, encoder_backend: str | None = None,
                 config: RuntimeConfig | None = None) -> None:
        """`encoder` given: used as is. Otherwise built from `config` (encoder_backend,
        encoder_device, fallback, onnx knobs; default RuntimeConfig()), `encoder_backend`
        overriding config's backend name."""
        self.bundle = bundle
        self.schema = bundle.schema
        self.encoder_config = bundle.encoder_config
        self.policy = bundle.policy
        self.limits = limits
        if encoder is None:
            cfg = config or RuntimeConfig()
            if encoder_backend is not None and encoder_backend != cfg.encoder_backend:
                if encoder_backend not in ENCODER_BACKENDS:
                    raise ValueError(f"unknown encoder backend {encoder_backend!r}; "
                                     f"choose one of {sorted(ENCODER_BACKENDS)}")
                cfg = dataclasses.replace(cfg, encoder_backend=encoder_backend)
            encoder = build_encoder(bundle, cfg)
        self.encoder = encoder
        self.trees: TreeStage
        self.explainer: Explainer
        self.tree_report: dict[str, Any]
        if trees is None:
            self.trees, self.explainer, self.tree_report = build_trees(bundle, config or RuntimeConfig(),
                                                                       tree_threads=tree_threads)
        else:
            # bytes verified against the manifest
            booster = load_booster(bundle.tree_model_bytes(), nthread=tree_threads)
            self.trees, self.explainer, self.tree_report = trees, TreeExplainer(booster), {"reasons": "xgboost"}
        self.identity = bundle.identity()
        # every response starts as a copy of this (model identity, path): one CopyFrom instead of
        # a constructor with keywords plus a CopyFrom of the identity (~2.5 vs ~6 us a response)
        self._template = pb.DecisionResponse(path=pb.MODEL)
        self._template.model.CopyFrom(self.identity)
        self.reason_codes = self.schema.reason_codes
        # observability hooks (runtime/serving/observe.py): where reasons are computed, and a
        # callback per decided batch with the exact model rows (metrics, drift, Explain's cache)
        self.inline_reasons = (config or RuntimeConfig()).reasons == "inline"
        self._template.reasons_mode = pb.REASONS_INLINE if self.inline_reasons else pb.REASONS_DEFERRED
        self.on_batch: Callable[[FeatureBatch, np.ndarray, list[pb.DecisionResponse], StageTimes], None] | None = None
        if self.trees.num_features != len(self.schema.features):
            raise ValueError(f"tree stage expects {self.trees.num_features} features, "
                             f"schema has {len(self.schema.features)}")

    @classmethod
    def from_dir(cls, path, **kw) -> Pipeline:
        """Load (and verify) the bundle at `path`, with `config`'s require_signature / trusted_keys."""
        return cls(load_bundle(path, config=kw.get("config")), **kw)

    @property
    def degraded(self) -> bool:
        """True while the encoder serves on its fallback (runtime/encoders/fallback.py)."""
        return bool(getattr(self.encoder, "degraded", False))

    def encoder_stats(self) -> dict[str, object]:
        """The encoder's counters (fallbacks, failures) if it keeps any."""
        stats = getattr(self.encoder, "stats", None)
        return dict(stats()) if callable(stats) else {}

    def tree_stats(self) -> dict[str, object]:
        """Tree stage and reasons: paths, routing (crossover points), fallbacks; for GetModelInfo."""
        out: dict[str, object] = {"reasons": self.tree_report.get("reasons", "xgboost"),
                                  "reasons_fallbacks": getattr(self.explainer, "fallbacks", 0)}
        describe, stats = getattr(self.trees, "describe", None), getattr(self.trees, "stats", None)
        if callable(describe):
            d = describe()
            out.update(paths=",".join(d.get("paths", [])), crossovers=" ".join(
                f"b>={c['from_batch']}:{c['path']}" for c in d.get("crossovers", [])), calibrated=d.get("calibrated"))
        if callable(stats):
            st = stats()
            out.update(fallbacks=st.get("fallbacks", 0), failures=sum(st.get("failures", {}).values()),
                       disabled=",".join(st.get("disabled", {})))
        if self.tree_report.get("failures"):
            out["build_failures"] = "; ".join(f"{k}: {v}" for k, v in self.tree_report["failures"].items())
        return out

    def calibrate_trees(self, batches: list[list[pb.DecisionRequest]], batch_sizes=None) -> None:
        """Time the tree paths at each batch size on rows made from `batches` (the warm-up
        requests through featurize and the encoder), so routing uses this machine's crossovers."""
        calibrate = getattr(self.trees, "calibrate", None)
        if not callable(calibrate):
            return
        rows = []
        for reqs in batches:
            batch, _ = featurize(reqs, self.schema, self.encoder_config, self.limits)
            if batch.batch_size:
                rows.append(self.model_rows(batch, self.encoder.encode(batch.events)))
        if rows:
            kw = {} if batch_sizes is None else {"batch_sizes": batch_sizes}
            calibrate(np.concatenate(rows), **kw)

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
            responses = self._respond(requests, batch, rows, margin, times)
            times.policy_us = _us(t0)
            total_us = _us(t_start)
            for r, resp in zip(batch.index, responses, strict=True):
                tm = resp.timing
                tm.featurize_us, tm.encode_us, tm.trees_us = times.featurize_us, times.encode_us, times.trees_us
                tm.policy_us, tm.total_us = times.policy_us, total_us
                results[r] = resp
            if self.on_batch is not None:     # observability hook (runtime/serving/observe.py)
                self.on_batch(batch, rows, responses, times)
        return results  # type: ignore[return-value]

    def _respond(self, requests: list[pb.DecisionRequest], batch: FeatureBatch, rows: np.ndarray,
                 margin: np.ndarray, times: StageTimes | None = None) -> list[pb.DecisionResponse]:
        pd = sigmoid(margin).tolist()
        policy, template = self.policy, self._template
        outcomes = [outcome_for(p, policy) for p in pd]
        adverse = [j for j, o in enumerate(outcomes) if o in ADVERSE]
        out = []
        for j, r in enumerate(batch.index):
            resp = pb.DecisionResponse()
            resp.CopyFrom(template)
            resp.request_id = batch.request_ids[j]
            resp.outcome = outcomes[j]
            resp.probability_of_default = pd[j]
            resp.score = score_for(pd[j], policy)
            if batch.warnings[j]:
                resp.warnings.extend(batch.warnings[j])
            if outcomes[j] == pb.COUNTEROFFER:
                resp.counteroffer_amount_minor = counteroffer_amount(requests[r].purchase.amount_minor, policy)
            out.append(resp)
        if adverse and self.inline_reasons:
            t0 = time.perf_counter_ns()
            contribs = self.explainer.contributions(rows[adverse])
            for k, j in enumerate(adverse):
                out[j].reasons.extend(top_reasons(contribs[k, :-1], self.reason_codes, self.policy))
            if times is not None:
                times.reasons_us = _us(t0)
        return out


def prepare_bundle_caches(path, cfg: RuntimeConfig | None = None) -> str:
    """Build the default configuration's derived artifacts into the bundle's cache/ (compiled
    tree library and TreeSHAP, exported ONNX encoder) so the first `uwrt serve` does not compile.
    Returns a one-line summary. The cache is outside the digest; a stale or corrupt entry is
    detected and rebuilt on load anyway."""
    t0 = time.perf_counter()
    p = Pipeline.from_dir(path, config=cfg or RuntimeConfig())
    return (f"caches ready in {time.perf_counter() - t0:.1f}s: encoder {p.encoder.name}, trees {p.trees.name} "
            f"({', '.join(p.tree_report.get('built', []))}), reasons {p.tree_report.get('reasons')}")
