"""Runtime configuration: every knob, its default and its meaning, in one place.

CLI flags map 1:1 onto these fields (`--torch-threads` -> torch_threads); environment
variables are read only in `from_env`. The defaults are the production defaults.
Thread safety: frozen values.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeConfig:
    #: Most history events a request may carry; more is INVALID_ARGUMENT. Distinct from the
    #: bundle's max_history (the model's window), which truncates with a warning.
    max_request_events: int = 512
    #: torch intra-op threads for the CPU encoder (0 = leave torch's default).
    torch_threads: int = 1
    #: xgboost threads per tree-stage call (1: latency; the encoder owns the other core).
    tree_threads: int = 1
    #: Requests per pipeline call in offline scoring (`uwrt score`).
    score_batch_size: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, got {v!r}")
        if self.max_request_events < 1 or self.score_batch_size < 1 or self.tree_threads < 1:
            raise ValueError("max_request_events, score_batch_size and tree_threads must be >= 1")

    @classmethod
    def from_env(cls, **overrides) -> "RuntimeConfig":
        """Defaults, then UWRT_<FIELD> environment variables, then explicit overrides (non-None)."""
        vals = {}
        for f in dataclasses.fields(cls):
            env = os.environ.get(f"UWRT_{f.name.upper()}")
            if env is not None:
                vals[f.name] = int(env)
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)

    def apply_threads(self) -> None:
        """Set torch's intra-op thread count (process-wide)."""
        if self.torch_threads:
            import torch
            torch.set_num_threads(self.torch_threads)
