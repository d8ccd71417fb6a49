"""Typed descriptions of what a bundle contains: feature schema, encoder config, policy.

All are frozen dataclasses with `to_dict` / `from_dict` so the bundle manifest (JSON) is the
single source of truth. Thread safety: immutable values, safe to share across threads.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uwrt.runtime.pb import pb

#: Valid event types: every EventType except UNSPECIFIED. Ids are the proto enum numbers.
EVENT_TYPE_IDS: tuple[int, ...] = tuple(
    v.number for v in pb.EventType.DESCRIPTOR.values if v.number != 0)
#: Size of the encoder's event-type embedding table (index 0 is unused / masked token).
N_EVENT_TYPES: int = max(EVENT_TYPE_IDS) + 1

SOURCES = ("applicant", "purchase", "embedding")

#: Per-event numeric inputs of the encoder, in column order (see uwrt.runtime.featurize).
EVENT_NUMERIC_FEATURES = (
    "signed_log_amount",   # sign(type direction) * log1p(amount in major units)
    "log_gap_days",        # log1p(days since the previous, older event); 0 for the oldest
    "log_age_days",        # log1p(days between the event and as_of)
    "dpd_scaled",          # days_past_due / 90, clipped to [0, 4]
    "installment_scaled",  # installment_index / 4, clipped to [0, 4]
)

#: Derived purchase features (source "purchase"), in order.
PURCHASE_FEATURES = (
    "purchase_log_amount",     # log1p(amount in major units)
    "purchase_installments",   # installments
    "purchase_product",        # Product enum number
    "purchase_mcc_bucket",     # mcc // 1000 (MCC range family)
)


@dataclass(frozen=True)
class FeatureSpec:
    """One column of the tree stage's input row."""
    name: str
    source: str                      # "applicant" | "purchase" | "embedding"
    impute_value: float = 0.0        # used when an applicant feature is absent
    reason_code: str = ""            # the reason group this column's contribution joins
    min_value: float | None = None   # optional validity range for applicant features
    max_value: float | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"feature {self.name!r}: source must be one of {SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class FeatureSchema:
    """The tree stage's input row: applicant features, purchase features, then embedding."""
    version: str
    features: tuple[FeatureSpec, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature schema has duplicate names")
        order = [SOURCES.index(f.source) for f in self.features]
        if order != sorted(order):
            raise ValueError("feature schema must list applicant, then purchase, then embedding features")
        purchase = tuple(f.name for f in self.features if f.source == "purchase")
        if purchase and purchase != PURCHASE_FEATURES:
            raise ValueError(f"purchase features must be exactly {PURCHASE_FEATURES}, got {purchase}")

    @functools.cached_property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @functools.cached_property
    def applicant(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.source == "applicant")

    @functools.cached_property
    def n_purchase(self) -> int:
        return sum(f.source == "purchase" for f in self.features)

    @functools.cached_property
    def embedding_dim(self) -> int:
        return sum(f.source == "embedding" for f in self.features)

    @functools.cached_property
    def reason_codes(self) -> list[str]:
        return [f.reason_code for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "features": [dataclasses.asdict(f) for f in self.features]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        return cls(version=d["version"], features=tuple(FeatureSpec(**f) for f in d["features"]))

    @classmethod
    def build(cls, version: str, applicant: list[FeatureSpec], embedding_dim: int,
              *, purchase_reason: str = "PURCHASE", embedding_reason: str = "REPAYMENT_HISTORY") -> FeatureSchema:
        """Schema with the standard purchase block and `embedding_dim` embedding columns."""
        feats = list(applicant)
        feats += [FeatureSpec(n, "purchase", 0.0, purchase_reason) for n in PURCHASE_FEATURES]
        feats += [FeatureSpec(f"emb_{i}", "embedding", 0.0, embedding_reason) for i in range(embedding_dim)]
        return cls(version=version, features=tuple(feats))


@dataclass(frozen=True)
class EncoderConfig:
    """Sequence encoder hyper-parameters (pre-LayerNorm Transformer over packed events)."""
    version: str = "enc-1"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    emb_dim: int = 32              # pooled embedding size fed to the trees
    type_emb_dim: int = 8
    mcc_buckets: int = 128         # hashed MCC vocabulary
    mcc_emb_dim: int = 16
    max_history: int = 128         # newest events kept per request
    n_numeric: int = len(EVENT_NUMERIC_FEATURES)
    n_event_types: int = N_EVENT_TYPES
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every encoder weight this config needs (the state dict of
        `uwrt.runtime.encoders.torch_encoder.SequenceEncoder`; a test keeps the two equal)."""
        d, f = self.d_model, self.d_ff
        out: dict[str, tuple[int, ...]] = {
            "type_emb.weight": (self.n_event_types + 1, self.type_emb_dim),
            "mcc_emb.weight": (self.mcc_buckets, self.mcc_emb_dim),
            "in_proj.weight": (d, self.type_emb_dim + self.mcc_emb_dim + self.n_numeric),
            "in_proj.bias": (d,),
        }
        for i in range(self.n_layers):
            p = f"layers.{i}."
            out.update({p + "ln1.weight": (d,), p + "ln1.bias": (d,),
                        p + "qkv.weight": (3 * d, d), p + "qkv.bias": (3 * d,),
                        p + "out.weight": (d, d), p + "out.bias": (d,),
                        p + "ln2.weight": (d,), p + "ln2.bias": (d,),
                        p + "fc1.weight": (f, d), p + "fc1.bias": (f,),
                        p + "fc2.weight": (d, f), p + "fc2.bias": (d,)})
        out.update({"final_ln.weight": (d,), "final_ln.bias": (d,),
                    "pool.weight": (self.emb_dim, 2 * d), "pool.bias": (self.emb_dim,)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder config keys: {sorted(unknown)}")
        return cls(**d)


def check_state_dict(cfg: EncoderConfig, state: Mapping[str, Any]) -> None:
    """Raise ValueError unless `state` (name -> torch tensor or numpy array) holds exactly the
    weights `cfg` needs, with the right shapes and no NaN/inf."""
    want = cfg.weight_shapes()
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"encoder weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [f"{k}: {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
    if bad:
        raise ValueError("encoder weight shapes do not match the config: " + "; ".join(bad[:5]))
    nonfinite = [k for k, v in state.items() if not np.isfinite(_as_float_array(v)).all()]
    if nonfinite:
        raise ValueError(f"encoder weights contain NaN/inf: {nonfinite[:5]}")


def _as_float_array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):            # a torch tensor; torch itself is not imported here
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float64)


@dataclass(frozen=True)
class Policy:
    """Thresholds on probability of default (PD) -> outcome, score scaling and reason texts.

    pd <= approve_max_pd: APPROVE; <= counteroffer_max_pd: COUNTEROFFER (for
    counteroffer_amount_ratio of the amount); <= review_max_pd: REVIEW; else DECLINE.
    score = score_offset + score_pdo / ln 2 * ln((1 - pd) / pd)  (higher is safer).
    """
    version: str = "policy-1"
    approve_max_pd: float = 0.08
    counteroffer_max_pd: float = 0.15
    review_max_pd: float = 0.20
    counteroffer_amount_ratio: float = 0.5
    score_offset: float = 600.0
    score_pdo: float = 50.0
    max_reasons: int = 4
    reason_texts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.approve_max_pd <= self.counteroffer_max_pd <= self.review_max_pd < 1.0:
            raise ValueError("policy thresholds must satisfy 0 < approve <= counteroffer <= review < 1")
        if not 0.0 < self.counteroffer_amount_ratio < 1.0:
            raise ValueError("counteroffer_amount_ratio must be in (0, 1)")
        if not 1 <= self.max_reasons <= 4:
            raise ValueError("max_reasons must be 1..4 (Regulation B: more than four is not helpful)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(**d)
