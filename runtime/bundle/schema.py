"""Typed descriptions of what a bundle contains: feature schema, encoder config, policy.

All are frozen dataclasses with `to_dict` / `from_dict` so the bundle manifest (JSON) is the
single source of truth. Thread safety: immutable values, safe to share across threads.
"""
from __future__ import annotations

import dataclasses
import functools
import math
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


#: Products a request may name (every Product but UNSPECIFIED), by enum name.
PRODUCT_NAMES: tuple[str, ...] = tuple(v.name for v in pb.Product.DESCRIPTOR.values if v.number != 0)
#: Hard caps no bundle can exceed.
MAX_INSTALLMENTS = 360
MAX_CURRENCY_EXPONENT = 4            # ISO 4217 minor-unit exponents are 0, 2, 3 or 4 (CLF, UYW)
#: 2000-01-01T00:00:00Z: the default earliest as_of (see RequestLimits.as_of_min_unix_s).
AS_OF_MIN_DEFAULT_UNIX_S = 946_684_800


@dataclass(frozen=True)
class RequestLimits:
    """What a bundle's model accepts in a request, beyond each applicant feature's own range.

    Part of the feature schema (manifest `feature_schema.limits`); a schema without it (bundles
    built before it existed) gets these defaults, chosen to be conservative: USD only, amounts
    0.01-100,000, the standard installment counts, as_of from 2000-01-01 to one hour past the
    server's clock, no required features, at most half the applicant features imputed.

    * `currencies`: (ISO 4217 code, minor-unit exponent) pairs the model was trained on. A
      request in another currency is refused: amounts are never converted, so a model trained
      on USD must not score JPY (whose minor unit is the yen itself, exponent 0, not 1/100).
      All listed currencies must share one exponent, so an amount in minor units means the
      same magnitude for every accepted currency (the model's amount features are computed
      from minor units).
    * `amount_min_major` / `amount_max_major`: the purchase amount range in major units
      (dollars, not cents), inclusive.
    * `installments`: (Product name, min, max) for every product the bundle decides; a product
      not listed is refused. PAY_IN_4 is 4, PAY_IN_FULL_30 is 1, MONTHLY a range.
    * `as_of_min_unix_s`: the earliest decision time accepted. Absolute, not relative to the
      clock, because replayed and backtesting decisions legitimately carry past as_of values;
      it only catches garbage (0, small integers, a unit mix-up) and dates before any data the
      model could have been trained on.
    * `as_of_max_future_s`: how far past the server's clock an as_of may be (clock skew
      allowance between the caller and the server). Larger is refused: a decision cannot be
      taken in the future, and a milli- or microsecond timestamp lands here.
    * `required_features`: applicant features that must be present (never imputed).
    * `max_imputed_share`: most applicant features (as a share of them all) that may be
      imputed in one request; more is refused rather than decided on the population medians.
    """
    currencies: tuple[tuple[str, int], ...] = (("USD", 2),)
    amount_min_major: float = 0.01
    amount_max_major: float = 100_000.0
    installments: tuple[tuple[str, int, int], ...] = (("MONTHLY", 2, 60), ("PAY_IN_4", 4, 4),
                                                      ("PAY_IN_FULL_30", 1, 1))
    as_of_min_unix_s: int = AS_OF_MIN_DEFAULT_UNIX_S
    as_of_max_future_s: int = 3600
    required_features: tuple[str, ...] = ()
    max_imputed_share: float = 0.5

    def __post_init__(self) -> None:
        # sorted by name: the canonical order (the manifest is written with sorted keys)
        object.__setattr__(self, "currencies", tuple(sorted((str(c), int(e)) for c, e in self.currencies)))
        object.__setattr__(self, "installments",
                           tuple(sorted((str(p), int(lo), int(hi)) for p, lo, hi in self.installments)))
        object.__setattr__(self, "required_features", tuple(str(f) for f in self.required_features))
        if not self.currencies:
            raise ValueError("limits.currencies must list at least one currency")
        for code, exp in self.currencies:
            if not is_currency_code(code):
                raise ValueError(f"limits.currencies: {code!r} is not an ISO 4217 code (3 letters A-Z)")
            if not 0 <= exp <= MAX_CURRENCY_EXPONENT:
                raise ValueError(f"limits.currencies[{code!r}]: minor-unit exponent must be "
                                 f"0..{MAX_CURRENCY_EXPONENT}, got {exp}")
        if len({c for c, _ in self.currencies}) != len(self.currencies):
            raise ValueError("limits.currencies lists a currency twice")
        if len({e for _, e in self.currencies}) != 1:
            raise ValueError("limits.currencies must share one minor-unit exponent (amounts are not converted), "
                             f"got {dict(self.currencies)}")
        lo, hi = float(self.amount_min_major), float(self.amount_max_major)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"limits: need 0 < amount_min_major <= amount_max_major (finite), got {lo}, {hi}")
        if self.amount_range_minor()[0] > self.amount_range_minor()[1]:
            raise ValueError("limits: the amount range holds no whole minor unit")
        object.__setattr__(self, "amount_min_major", lo)
        object.__setattr__(self, "amount_max_major", hi)
        if not self.installments:
            raise ValueError("limits.installments must list at least one product")
        for prod, a, b in self.installments:
            if prod not in PRODUCT_NAMES:
                raise ValueError(f"limits.installments: unknown product {prod!r} (one of {PRODUCT_NAMES})")
            if not 1 <= a <= b <= MAX_INSTALLMENTS:
                raise ValueError(f"limits.installments[{prod!r}]: need 1 <= min <= max <= {MAX_INSTALLMENTS}, "
                                 f"got [{a}, {b}]")
        if len({p for p, _, _ in self.installments}) != len(self.installments):
            raise ValueError("limits.installments lists a product twice")
        for name, least in (("as_of_min_unix_s", 1), ("as_of_max_future_s", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"limits.{name} must be an integer >= {least}, got {v!r}")
        share = float(self.max_imputed_share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"limits.max_imputed_share must be in [0, 1], got {share}")
        object.__setattr__(self, "max_imputed_share", share)

    @property
    def currency_exponent(self) -> int:
        """The minor-unit exponent every accepted currency shares."""
        return self.currencies[0][1]

    def amount_range_minor(self) -> tuple[int, int]:
        """The inclusive purchase amount range in minor units (whole units inside the major range)."""
        scale = 10 ** self.currency_exponent
        # round first: 0.01 * 100 is 1.0000000000000002 in binary floating point
        return (math.ceil(round(float(self.amount_min_major) * scale, 6)),
                math.floor(round(float(self.amount_max_major) * scale, 6)))

    def to_dict(self) -> dict[str, Any]:
        return {"currencies": dict(self.currencies), "amount_min_major": self.amount_min_major,
                "amount_max_major": self.amount_max_major,
                "installments": {p: [a, b] for p, a, b in self.installments},
                "as_of_min_unix_s": self.as_of_min_unix_s, "as_of_max_future_s": self.as_of_max_future_s,
                "required_features": list(self.required_features), "max_imputed_share": self.max_imputed_share}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestLimits:
        """From the JSON form (`to_dict`); keys left out take the defaults, unknown keys are refused."""
        if not isinstance(d, Mapping):
            raise ValueError("limits must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown limits keys: {sorted(unknown)} (known: {sorted(known)})")
        kw: dict[str, Any] = dict(d)
        if "currencies" in kw:
            if not isinstance(kw["currencies"], Mapping):
                raise ValueError('limits.currencies must be an object like {"USD": 2}')
            kw["currencies"] = tuple((c, _int(e, f"limits.currencies[{c!r}]")) for c, e in kw["currencies"].items())
        if "installments" in kw:
            inst = kw["installments"]
            if not isinstance(inst, Mapping) or not all(isinstance(v, (list, tuple)) and len(v) == 2
                                                        for v in inst.values()):
                raise ValueError('limits.installments must be an object like {"MONTHLY": [3, 24]}')
            kw["installments"] = tuple((p, _int(v[0], f"limits.installments[{p!r}]"),
                                        _int(v[1], f"limits.installments[{p!r}]")) for p, v in inst.items())
        if "required_features" in kw:
            if not isinstance(kw["required_features"], (list, tuple)):
                raise ValueError("limits.required_features must be a list of feature names")
            kw["required_features"] = tuple(kw["required_features"])
        for name in ("amount_min_major", "amount_max_major", "max_imputed_share"):
            if name in kw and (isinstance(kw[name], bool) or not isinstance(kw[name], (int, float))):
                raise ValueError(f"limits.{name} must be a number, got {kw[name]!r}")
        return cls(**kw)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    return v


def is_currency_code(code: str) -> bool:
    """Three ASCII capital letters (str.isalpha/isupper also accept 'ÄÖÜ')."""
    return len(code) == 3 and all("A" <= ch <= "Z" for ch in code)


@dataclass(frozen=True)
class FeatureSchema:
    """The tree stage's input row: applicant features, purchase features, then embedding; and
    the request limits (`RequestLimits`) the model's training data supports."""
    version: str
    features: tuple[FeatureSpec, ...]
    limits: RequestLimits = RequestLimits()

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
        applicant = {f.name for f in self.features if f.source == "applicant"}
        unknown = [n for n in self.limits.required_features if n not in applicant]
        if unknown:
            raise ValueError(f"limits.required_features names features that are not applicant features: {unknown}")

    def __hash__(self) -> int:
        # computed once: featurize looks its per-schema plans up by schema on every request, and
        # hashing ~50 FeatureSpecs each time cost more than the rest of the lookup
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.version, self.features, self.limits))

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
        return {"version": self.version, "features": [dataclasses.asdict(f) for f in self.features],
                "limits": self.limits.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        """From the JSON form; a schema without "limits" (older bundles) gets RequestLimits' defaults."""
        unknown = set(d) - {"version", "features", "limits"}
        if unknown:
            raise ValueError(f"unknown feature schema keys: {sorted(unknown)}")
        limits = RequestLimits.from_dict(d["limits"]) if "limits" in d else RequestLimits()
        return cls(version=d["version"], features=tuple(FeatureSpec(**f) for f in d["features"]), limits=limits)

    @classmethod
    def build(cls, version: str, applicant: list[FeatureSpec], embedding_dim: int,
              *, purchase_reason: str = "PURCHASE", embedding_reason: str = "REPAYMENT_HISTORY",
              limits: RequestLimits | None = None) -> FeatureSchema:
        """Schema with the standard purchase block and `embedding_dim` embedding columns."""
        feats = list(applicant)
        feats += [FeatureSpec(n, "purchase", 0.0, purchase_reason) for n in PURCHASE_FEATURES]
        feats += [FeatureSpec(f"emb_{i}", "embedding", 0.0, embedding_reason) for i in range(embedding_dim)]
        return cls(version=version, features=tuple(feats), limits=limits or RequestLimits())


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
