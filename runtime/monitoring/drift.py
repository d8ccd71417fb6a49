"""Population stability index (PSI) of the score, each tabular feature and the embedding norm
against the model's development sample.

    build time:  development rows --MonitoringStats.compute--> monitoring.json in the bundle
                 (per variable: decile edges, the sample's proportion in each bin; outcome mix)
    serving:     each decided batch --bin_rows--> DriftWindow (last drift_window_s seconds, at most
                 drift_window_n decisions) --snapshot--> counts --psi--> gauges
    offline:     `uwrt drift --bundle DIR --input requests.jsonl` (the same functions)

PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over the bins, e the development sample's proportions and
a the window's. Bins: the development sample's deciles (np.quantile at 0.1 .. 0.9; tied edges
merge, so a discrete feature may have fewer than 10 bins), bin i = (edge[i-1], edge[i]], the last
one open above (NaN counts there). Empty bins are smoothed by adding SMOOTHING (0.5) to every
bin's count on both sides before taking proportions. Reading (rules of thumb, Siddiqi): < 0.10
stable, 0.10-0.25 moderate shift, > 0.25 significant shift. PSI of n samples from an unchanged
population is about (bins - 1) / n on average, so small windows read high: below
`drift_min_decisions` the server reports NaN.

Thread safety: MonitoringStats and VariableStats are immutable; DriftWindow's add/snapshot may be
called from different threads (a lock guards the ring).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uwrt.runtime.bundle.bundle import Bundle
from uwrt.runtime.errors import BundleError
from uwrt.runtime.pb import pb

__all__ = ["MONITORING_FILE", "MODERATE", "SIGNIFICANT", "MonitoringStats", "VariableStats", "DriftWindow",
           "decile_edges", "psi", "reading", "load_stats", "drift_report", "OUTCOMES"]

MONITORING_FILE = "monitoring.json"
FORMAT = "uwrt-monitoring"
FORMAT_VERSION = 1
N_BINS = 10
SMOOTHING = 0.5
MODERATE, SIGNIFICANT = 0.10, 0.25
SCORE, EMBEDDING_NORM = "score", "embedding_norm"
#: decision outcomes in the order the window counts them (pb.Outcome values 1..4)
OUTCOMES = ("APPROVE", "DECLINE", "COUNTEROFFER", "REVIEW")
_OUTCOME_INDEX = np.full(8, len(OUTCOMES), np.int8)
for _i, _name in enumerate(OUTCOMES):
    _OUTCOME_INDEX[pb.Outcome.Value(_name)] = _i


def decile_edges(x: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Inner bin edges at the sample's quantiles 1/n .. (n-1)/n, NaN ignored; tied edges merge and an
    edge at the sample's maximum is dropped (its bin above would be empty), so no bin is empty in
    the sample itself."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.zeros(0)
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    return edges[edges < x.max()]


def proportions(counts: Sequence[int] | np.ndarray, alpha: float = SMOOTHING) -> np.ndarray:
    """Smoothed proportions: (count + alpha) / (n + alpha * bins), never zero."""
    c = np.asarray(counts, np.float64)
    return (c + alpha) / (c.sum() + alpha * c.size)


def psi(expected: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """PSI of observed bin `counts` against `expected` proportions (same bins; smoothed)."""
    e = np.asarray(expected, np.float64)
    a = proportions(counts)
    if e.shape != a.shape:
        raise ValueError(f"expected has {e.size} bins, counts {a.size}")
    return float(np.sum((a - e) * np.log(a / e)))


def reading(value: float) -> str:
    """'stable' (< 0.10), 'moderate' (0.10-0.25), 'significant' (> 0.25) or 'n/a' (NaN)."""
    if not math.isfinite(value):
        return "n/a"
    return "stable" if value < MODERATE else ("moderate" if value <= SIGNIFICANT else "significant")


@dataclass(frozen=True)
class VariableStats:
    """One monitored variable: its bin edges and the development sample's (smoothed) proportions."""
    name: str
    kind: str                          # "score" | "feature" | "embedding_norm"
    edges: tuple[float, ...]
    expected: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("score", "feature", "embedding_norm"):
            raise ValueError(f"{self.name}: kind must be score, feature or embedding_norm, got {self.kind!r}")
        e = np.asarray(self.edges, np.float64)
        if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
            raise ValueError(f"{self.name}: edges must be finite and strictly increasing")
        p = np.asarray(self.expected, np.float64)
        if p.size != e.size + 1 or np.any(p <= 0) or abs(p.sum() - 1.0) > 1e-6:
            raise ValueError(f"{self.name}: expected must hold {e.size + 1} positive proportions summing to 1")

    @property
    def bins(self) -> int:
        return len(self.expected)

    def bin(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each value (int8): the number of edges strictly below it; NaN -> last bin."""
        return np.searchsorted(np.asarray(self.edges), values, side="left").astype(np.int8)

    @classmethod
    def from_sample(cls, name: str, kind: str, x: np.ndarray, n_bins: int = N_BINS) -> VariableStats:
        x = np.asarray(x, np.float64)
        edges = tuple(float(v) for v in decile_edges(x, n_bins))
        counts = np.bincount(np.searchsorted(np.asarray(edges), x, side="left"), minlength=len(edges) + 1)
        return cls(name, kind, edges, tuple(float(v) for v in proportions(counts)))


@dataclass(frozen=True)
class MonitoringStats:
    """The development sample's statistics a bundle carries in monitoring.json.

    `variables`: the score, then each tabular feature (feature-schema order), then the embedding
    norm. `outcomes`: the sample's outcome mix under the bundle's policy. `n`: sample size;
    `source`: what the sample was."""
    variables: tuple[VariableStats, ...]
    outcomes: Mapping[str, float]
    n: int
    source: str

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variables]

    @property
    def max_bins(self) -> int:
        return max(v.bins for v in self.variables)

    @property
    def feature_names(self) -> list[str]:
        return [v.name for v in self.variables if v.kind == "feature"]

    @classmethod
    def compute(cls, *, tabular: np.ndarray, embedding: np.ndarray, scores: np.ndarray, outcomes: Sequence[int],
                feature_names: Sequence[str], source: str, n_bins: int = N_BINS) -> MonitoringStats:
        """Statistics of a development sample: `tabular` [N, T] (the model's tabular block, in
        schema order, named by `feature_names`), `embedding` [N, E], `scores` [N] (policy scores),
        `outcomes` [N] (pb.Outcome values)."""
        tab = np.asarray(tabular, np.float64)
        n = tab.shape[0]
        if n < 10 * n_bins:
            raise ValueError(f"a development sample of {n} rows is too small for {n_bins} bins "
                             f"(need at least {10 * n_bins}; a few thousand is usual)")
        if tab.shape[1] != len(feature_names):
            raise ValueError(f"tabular has {tab.shape[1]} columns, feature_names {len(feature_names)}")
        vs = [VariableStats.from_sample(SCORE, "score", np.asarray(scores, np.float64), n_bins)]
        vs += [VariableStats.from_sample(name, "feature", tab[:, j], n_bins) for j, name in enumerate(feature_names)]
        vs.append(VariableStats.from_sample(EMBEDDING_NORM, "embedding_norm", embedding_norm(embedding), n_bins))
        oc = np.bincount(_OUTCOME_INDEX[np.asarray(outcomes, np.int64)], minlength=len(OUTCOMES) + 1)[:len(OUTCOMES)]
        mix = {name: float(c) / max(1, n) for name, c in zip(OUTCOMES, oc, strict=True)}
        return cls(tuple(vs), mix, n, source)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "n": self.n, "source": self.source,
                "smoothing": SMOOTHING, "outcomes": dict(self.outcomes),
                "variables": [{"name": v.name, "kind": v.kind, "edges": list(v.edges), "expected": list(v.expected)}
                              for v in self.variables]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MonitoringStats:
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} document (format {d.get('format')!r}, "
                             f"version {d.get('format_version')!r})")
        vs = tuple(VariableStats(str(v["name"]), str(v["kind"]), tuple(float(x) for x in v["edges"]),
                                 tuple(float(x) for x in v["expected"])) for v in d["variables"])
        kinds = [v.kind for v in vs]
        if not vs or kinds[0] != "score" or kinds[-1] != "embedding_norm" or set(kinds[1:-1]) - {"feature"}:
            raise ValueError("variables must be the score, then features, then the embedding norm")
        return cls(vs, {str(k): float(v) for k, v in d["outcomes"].items()}, int(d["n"]), str(d.get("source", "")))

    def check_schema(self, tabular_names: Sequence[str]) -> None:
        """Raise ValueError unless the feature variables are exactly the schema's tabular columns."""
        if self.feature_names != list(tabular_names):
            raise ValueError(f"{MONITORING_FILE} monitors features {self.feature_names}, but the feature schema's "
                             f"tabular columns are {list(tabular_names)}")

    @functools.cached_property
    def _edge_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Every variable's edges in one [V, max edges] matrix, padded with +inf, and each one's
        edge count (the last bin's index)."""
        k = max(len(v.edges) for v in self.variables)
        e = np.full((len(self.variables), max(k, 1)), np.inf)
        for i, v in enumerate(self.variables):
            e[i, :len(v.edges)] = v.edges
        return e, np.array([len(v.edges) for v in self.variables], np.int64)

    def bin_rows(self, rows: np.ndarray, n_tabular: int, scores: np.ndarray) -> np.ndarray:
        """int8 [B, V]: each row's bin per variable, all variables at once (the server calls this
        per batch: a few numpy calls instead of two per variable). `rows`: the model rows [B, F]
        (tabular block first, then the embedding), as the tree stage saw them. Equal to
        `bin_rows_reference` (tests/runtime/test_drift.py)."""
        x = np.empty((rows.shape[0], len(self.variables)), np.float64)
        x[:, 0] = scores
        x[:, 1:n_tabular + 1] = rows[:, :n_tabular]
        x[:, -1] = embedding_norm(rows[:, n_tabular:])
        edges, last = self._edge_matrix
        out = (edges[None, :, :] < x[:, :, None]).sum(axis=2)     # edges strictly below; +inf pads never are
        nan = np.isnan(x)
        if nan.any():
            out = np.where(nan, last[None, :], out)               # NaN -> the last bin, as VariableStats.bin
        return out.astype(np.int8)

    def bin_rows_reference(self, rows: np.ndarray, n_tabular: int, scores: np.ndarray) -> np.ndarray:
        """bin_rows one variable at a time with VariableStats.bin (the reference)."""
        out = np.empty((rows.shape[0], len(self.variables)), np.int8)
        out[:, 0] = self.variables[0].bin(scores)
        for j in range(n_tabular):
            out[:, j + 1] = self.variables[j + 1].bin(rows[:, j])
        out[:, -1] = self.variables[-1].bin(embedding_norm(rows[:, n_tabular:]))
        return out


def embedding_norm(embedding: np.ndarray) -> np.ndarray:
    """L2 norm of each embedding row, in float64."""
    return np.linalg.norm(np.asarray(embedding, np.float64), axis=1)


def outcome_index(outcomes: Sequence[int]) -> np.ndarray:
    """pb.Outcome values -> index into OUTCOMES (int8; anything else -> len(OUTCOMES))."""
    return _OUTCOME_INDEX[np.asarray(outcomes, np.int64)]


def load_stats(bundle: Bundle) -> MonitoringStats | None:
    """The bundle's monitoring.json (re-hashed against the manifest), or None when it has none.
    Raises BundleError when it is present but unreadable or does not fit the schema."""
    entry = bundle.manifest["files"].get(MONITORING_FILE)
    if entry is None:
        return None
    try:
        data = (bundle.path / MONITORING_FILE).read_bytes()
    except OSError as e:
        raise BundleError(f"{MONITORING_FILE}: cannot read: {e}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{MONITORING_FILE}: SHA-256 does not match the manifest: tampered or corrupt")
    try:
        stats = MonitoringStats.from_dict(json.loads(data))
        stats.check_schema([f.name for f in bundle.schema.features if f.source != "embedding"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{MONITORING_FILE}: {e}") from None
    return stats


class DriftWindow:
    """The recent decisions' bins: at most `capacity` decisions, none older than `window_s`.

    A ring of int8 bins [capacity, V] with arrival times; `add` per batch (O(batch)), `snapshot`
    recounts the live part (O(capacity), meant for a few times a minute)."""

    def __init__(self, stats: MonitoringStats, *, capacity: int, window_s: float) -> None:
        self.stats = stats
        self.capacity, self.window_s = capacity, window_s
        self.v, self.k = len(stats.variables), stats.max_bins
        self._bins = np.zeros((capacity, self.v), np.int8)
        self._outcome = np.zeros(capacity, np.int8)
        self._t = np.full(capacity, -np.inf)
        self._head = 0
        self._lock = threading.Lock()

    def add(self, bins: np.ndarray, outcomes: np.ndarray, now_s: float) -> None:
        n = bins.shape[0]
        if n > self.capacity:
            bins, outcomes, n = bins[-self.capacity:], outcomes[-self.capacity:], self.capacity
        with self._lock:
            h = self._head
            first = min(n, self.capacity - h)
            self._bins[h:h + first] = bins[:first]
            self._outcome[h:h + first] = outcomes[:first]
            self._t[h:h + first] = now_s
            if first < n:
                self._bins[:n - first] = bins[first:]
                self._outcome[:n - first] = outcomes[first:]
                self._t[:n - first] = now_s
            self._head = (h + n) % self.capacity

    def snapshot(self, now_s: float) -> tuple[np.ndarray, np.ndarray, int]:
        """(bin counts [V, max_bins], outcome counts [len(OUTCOMES)], decisions) in the window."""
        with self._lock:
            live = self._t >= now_s - self.window_s
            bins = self._bins[live]
            outcome = self._outcome[live]
        n = bins.shape[0]
        flat = bins.astype(np.int64) + np.arange(self.v, dtype=np.int64) * self.k
        counts = np.bincount(flat.ravel(), minlength=self.v * self.k).reshape(self.v, self.k)
        oc = np.bincount(outcome.astype(np.int64), minlength=len(OUTCOMES) + 1)[:len(OUTCOMES)]
        return counts, oc, n


def drift_report(stats: MonitoringStats, counts: np.ndarray, outcome_counts: np.ndarray, n: int,
                 *, min_decisions: int = 1) -> dict[str, Any]:
    """PSI per variable (NaN below `min_decisions`), its reading, and the outcome mix against the
    development sample's. `counts` [V, >= bins]: bin counts per variable, in stats' order."""
    enough = n >= min_decisions
    out: dict[str, Any] = {"decisions": int(n), "variables": {}, "outcomes": {}}
    for i, v in enumerate(stats.variables):
        value = psi(v.expected, counts[i, :v.bins]) if enough else float("nan")
        out["variables"][v.name] = {"kind": v.kind, "psi": value, "reading": reading(value)}
    total = max(1, int(np.sum(outcome_counts)))
    for name, c in zip(OUTCOMES, outcome_counts, strict=True):
        out["outcomes"][name] = {"share": float(c) / total if n else float("nan"),
                                 "expected": float(stats.outcomes.get(name, 0.0))}
    return out


def load_stats_from_dir(path: str) -> MonitoringStats | None:
    """monitoring.json of the bundle directory `path`, checked against its manifest (digest of the
    manifest, SHA-256 of the file, features = the schema's tabular columns), without loading the
    rest of the bundle (the supervisor of several workers; each worker verifies the whole bundle).
    None when the bundle has none."""
    import pathlib

    from uwrt.runtime.bundle.bundle import compute_digest
    root = pathlib.Path(path)
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"manifest.json: {e}") from None
    if compute_digest(m) != m.get("bundle_digest"):
        raise BundleError("manifest.json: bundle_digest mismatch")
    entry = m.get("files", {}).get(MONITORING_FILE)
    if entry is None:
        return None
    data = (root / MONITORING_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{MONITORING_FILE}: SHA-256 does not match the manifest: tampered or corrupt")
    stats = MonitoringStats.from_dict(json.loads(data))
    stats.check_schema([f["name"] for f in m["feature_schema"]["features"] if f["source"] != "embedding"])
    return stats
