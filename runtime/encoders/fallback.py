"""GPU -> CPU fallback at run time: `FallbackEncoder(primary, fallback)`.

An EncoderBackend that runs `primary` (the GPU encoder) and, when a call fails (CUDA error, out
of memory, a kernel failure: any exception), logs it with its traceback (logger
"uwrt.fallback"), counts it, marks the runtime degraded and retries the same batch on
`fallback` (a CPU encoder), so the requests of the failed batch are still answered (the
batcher's deadline checks apply to the retried batch like to any other). Once degraded it
keeps using the fallback: a GPU that failed once (a sticky CUDA error leaves the context
unusable) is not retried on live traffic, unless `reprobe_s` > 0: then at most once per
`reprobe_s` seconds one batch tries the primary again (a failure costs that batch one more
retry on the fallback) and a success leaves degraded mode (logged, counted as a recovery).

Neither path is hidden: `degraded`, `name` (e.g. "onnx (fallback from triton)") and `stats()`
(counters) feed GetModelInfo; a failure of the fallback too is raised (the batch fails).

Thread safety: `encode` is meant for the single model worker thread (the backends it wraps are
not re-entrant); `stats()`, `degraded` and `name` may be read from any thread (a lock guards
the counters).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from uwrt.runtime.encoders.base import EncoderBackend
from uwrt.runtime.featurize import PackedEvents

log = logging.getLogger("uwrt.fallback")


class FallbackEncoder:
    """`primary` with `fallback` standing by; see the module docstring."""

    def __init__(self, primary: EncoderBackend, fallback: EncoderBackend, *, reprobe_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if reprobe_s < 0:
            raise ValueError(f"reprobe_s must be >= 0, got {reprobe_s}")
        self.primary, self.fallback = primary, fallback
        self.reprobe_s = reprobe_s
        self._clock = clock
        self._lock = threading.Lock()
        self._degraded = False
        self._degraded_at = 0.0
        self._last_try = 0.0
        self._counts = {"primary_batches": 0, "fallback_batches": 0, "primary_failures": 0,
                        "retried_batches": 0, "recoveries": 0, "fallback_failures": 0}
        self._last_error = ""

    # -- state ----------------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        with self._lock:
            return self._degraded

    @property
    def name(self) -> str:
        with self._lock:
            if self._degraded:
                return f"{self.fallback.name} (fallback from {self.primary.name})"
            return self.primary.name

    def stats(self) -> dict[str, object]:
        """Counters and state, for GetModelInfo and logs."""
        with self._lock:
            out: dict[str, object] = dict(self._counts)
            out["degraded"] = self._degraded
            out["last_error"] = self._last_error
            out["primary"], out["fallback"] = self.primary.name, self.fallback.name
        for key, be in (("primary_stats", self.primary), ("fallback_stats", self.fallback)):
            st = getattr(be, "stats", None)
            if callable(st):
                out[key] = st()
        return out

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    # -- the backend ----------------------------------------------------------------------------

    def warmup(self) -> None:
        """Warm both: the primary's own warm-up (CUDA-graph capture) if it has one, and the
        fallback's, so that a failover does not pay first-call costs. A primary that fails to
        warm up raises: start-up fails loudly instead of serving degraded from the start."""
        for be in (self.primary, self.fallback):
            w = getattr(be, "warmup", None)
            if callable(w):
                w()

    def encode(self, events: PackedEvents) -> np.ndarray:
        now = self._clock()
        with self._lock:
            use_primary = not self._degraded or (self.reprobe_s > 0 and now - self._last_try >= self.reprobe_s)
            was_degraded = self._degraded
            if use_primary:
                self._last_try = now
        if use_primary:
            try:
                out = self.primary.encode(events)
            except Exception as e:  # noqa: BLE001 - any GPU failure: log, count, degrade, retry on CPU
                self._primary_failed(e, events, was_degraded)
            else:
                with self._lock:
                    self._counts["primary_batches"] += 1
                    if was_degraded:
                        self._degraded = False
                        self._counts["recoveries"] += 1
                if was_degraded:
                    log.warning("encoder %s recovered after %.1fs degraded: leaving the %s fallback",
                                self.primary.name, now - self._degraded_at, self.fallback.name)
                return out
            self._count("retried_batches")
        try:
            out = self.fallback.encode(events)
        except Exception:
            self._count("fallback_failures")
            log.exception("fallback encoder %s failed too (batch of %d)", self.fallback.name, events.batch_size)
            raise
        self._count("fallback_batches")
        return out

    def _primary_failed(self, e: BaseException, events: PackedEvents, was_degraded: bool) -> None:
        with self._lock:
            self._counts["primary_failures"] += 1
            self._last_error = f"{type(e).__name__}: {e}"[:500]
            self._degraded = True
            if not was_degraded:
                self._degraded_at = self._clock()
        if was_degraded:
            log.warning("encoder %s re-probe failed (%s): staying on %s", self.primary.name, self._last_error,
                        self.fallback.name)
        else:
            log.error("encoder %s failed on a batch of %d (%d tokens): DEGRADED, retrying the batch and "
                      "serving on %s from now on%s", self.primary.name, events.batch_size,
                      int(events.cu_seqlens[-1]), self.fallback.name,
                      f" (re-probing every {self.reprobe_s:g}s)" if self.reprobe_s else "", exc_info=e)
