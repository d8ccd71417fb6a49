"""A log-linear latency histogram with microsecond resolution (HdrHistogram's layout, our code).

Values are non-negative integers (microseconds in the load generator). Values below
2**precision_bits are counted exactly; above, each power-of-two range [2**k, 2**(k+1)) is split
into 2**(precision_bits - 1) equal buckets, so a recorded value is known to within a relative
error of 2**-(precision_bits - 1) (0.1% with the default 11 bits; exact below 2.048 ms).
Memory is fixed (about 340 KB of int64 counts for values up to 2**50 us) and recording is O(1),
so a step of millions of requests costs the same as a step of ten.

`percentile(q)` uses the nearest-rank definition (numpy's method="inverted_cdf"): the smallest
recorded value v with at least ceil(q/100 * n) samples <= v; the answer is the highest value
equivalent to v's bucket (as HdrHistogram reports), clamped to the exact recorded max, so it
never understates a latency. min, max, sum and count are exact.

Histograms merge (`add`) and travel between processes as plain dicts (`to_dict`/`from_dict`,
sparse: only non-empty buckets), which is how the multi-process load generator combines workers.

Thread safety: none; one writer at a time (the generator records from its event loop thread).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["Histogram"]


class Histogram:
    """Counts of non-negative integer values in log-linear buckets (see module docstring)."""

    def __init__(self, precision_bits: int = 11, max_bits: int = 50) -> None:
        if not 2 <= precision_bits <= 20 or max_bits <= precision_bits or max_bits > 62:
            raise ValueError("need 2 <= precision_bits <= 20 and precision_bits < max_bits <= 62")
        self.p = precision_bits
        self.max_bits = max_bits
        self.half = 1 << (precision_bits - 1)
        self.counts = np.zeros((1 << precision_bits) + (max_bits - precision_bits) * self.half, np.int64)
        self.count = 0
        self.total = 0          # exact sum of recorded values
        self.min = None         # exact, None while empty
        self.max = None

    # ---- bucket arithmetic -------------------------------------------------------------------
    def index_of(self, values: np.ndarray) -> np.ndarray:
        """Bucket index of each value (int64 array >= 0, < 2**max_bits)."""
        v = np.asarray(values, np.int64)
        # bit_length via frexp is exact for values < 2**53
        bl = np.frexp(v.astype(np.float64))[1].astype(np.int64)
        shift = np.maximum(bl - self.p, 0)
        small = shift == 0
        top = v >> shift                                  # in [half, 2*half) when shift > 0
        idx = (1 << self.p) + (shift - 1) * self.half + (top - self.half)
        return np.where(small, v, idx)

    def bucket_bounds(self, idx: int) -> tuple[int, int]:
        """[lo, hi] (inclusive) of the values that land in bucket idx."""
        if idx < (1 << self.p):
            return idx, idx
        k, r = divmod(idx - (1 << self.p), self.half)
        shift = k + 1
        lo = (self.half + r) << shift
        return lo, lo + (1 << shift) - 1

    # ---- recording -----------------------------------------------------------------------------
    def record(self, value: int, n: int = 1) -> None:
        """Count `value` n times."""
        v = int(value)
        if v < 0 or v >= 1 << self.max_bits:
            raise ValueError(f"value {v} outside [0, 2**{self.max_bits})")
        if v < (1 << self.p):
            i = v
        else:
            shift = v.bit_length() - self.p
            i = (1 << self.p) + (shift - 1) * self.half + ((v >> shift) - self.half)
        self.counts[i] += n
        self.count += n
        self.total += v * n
        self.min = v if self.min is None else min(self.min, v)
        self.max = v if self.max is None else max(self.max, v)

    def record_many(self, values) -> None:
        """Count every value of an array (vectorised)."""
        v = np.asarray(values, np.int64).reshape(-1)
        if v.size == 0:
            return
        if v.min() < 0 or v.max() >= 1 << self.max_bits:
            raise ValueError(f"values outside [0, 2**{self.max_bits})")
        np.add.at(self.counts, self.index_of(v), 1)
        self.count += int(v.size)
        self.total += int(v.sum())
        lo, hi = int(v.min()), int(v.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def add(self, other: Histogram) -> None:
        """Merge another histogram of the same layout into this one."""
        if (other.p, other.max_bits) != (self.p, self.max_bits):
            raise ValueError("histograms of different layouts")
        self.counts += other.counts
        self.count += other.count
        self.total += other.total
        for attr, f in (("min", min), ("max", max)):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(self, attr, b if a is None else a if b is None else f(a, b))

    # ---- queries ---------------------------------------------------------------------------------
    def percentile(self, q: float) -> float:
        """Nearest-rank q-th percentile (0 < q <= 100); NaN when empty."""
        if not 0 <= q <= 100:
            raise ValueError("q must be in [0, 100]")
        if self.count == 0:
            return float("nan")
        if q == 0:
            return float(self.min)
        return self._at_rank(max(1, math.ceil(q / 100.0 * self.count - 1e-9)))

    def _at_rank(self, rank: int) -> float:
        """The value of the rank-th smallest sample (1-based), bucket-high, clamped to max."""
        cum = np.cumsum(self.counts)
        idx = int(np.searchsorted(cum, rank))
        return float(min(self.bucket_bounds(idx)[1], self.max))

    def percentile_with_failures(self, q: float, failures: int) -> float:
        """Nearest-rank percentile where `failures` extra samples rank above everything (+inf):
        the latency a caller sees when a failed request counts as never answered."""
        n = self.count + failures
        if n == 0:
            return float("nan")
        rank = max(1, math.ceil(q / 100.0 * n - 1e-9))
        if rank > self.count:
            return math.inf
        return self._at_rank(rank)

    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    # ---- transport -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        nz = np.flatnonzero(self.counts)
        return dict(p=self.p, max_bits=self.max_bits, idx=nz.tolist(), n=self.counts[nz].tolist(),
                    count=self.count, total=self.total, min=self.min, max=self.max)

    @classmethod
    def from_dict(cls, d: dict) -> Histogram:
        h = cls(d["p"], d["max_bits"])
        h.counts[np.asarray(d["idx"], np.int64)] = np.asarray(d["n"], np.int64)
        h.count, h.total, h.min, h.max = d["count"], d["total"], d["min"], d["max"]
        return h
