"""Runtime configuration: every knob, its default and its meaning, in one place.

Precedence, lowest first: the defaults below < a TOML file (`--config FILE`) < environment
variables `UWRT_<NAME>` (`UWRT_BATCHING_MAX_WAIT_US` for nested fields) < command-line flags
(`--max-wait-us`, same names with dashes). The defaults are the production defaults; README's
"Configuration" table documents each. Thread safety: frozen values.

Example TOML file::

    port = 50051
    torch_threads = 1
    [batching]
    max_batch_size = 32
    max_wait_us = 1000
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from runtime.batching import BatchingConfig


@dataclass(frozen=True)
class RuntimeConfig:
    #: Address to listen on. 127.0.0.1 keeps a fresh server private; use 0.0.0.0 / [::] to serve others.
    host: str = "127.0.0.1"
    #: gRPC port (0 = pick a free port; the server prints it).
    port: int = 50051
    #: Bundle directory to serve; empty = the demo bundle at bundles/demo (built on first use).
    bundle: str = ""
    #: Most history events a request may carry; more is INVALID_ARGUMENT. Distinct from the
    #: bundle's max_history (the model's window), which truncates with a warning.
    max_request_events: int = 512
    #: Largest serialized request accepted (bytes); larger is INVALID_ARGUMENT.
    max_request_bytes: int = 1 << 20
    #: CPU encoder implementation: "torchscript" (one compiled graph; releases the GIL for the
    #: whole forward, so the server's event loop does not slow it down) or "torch" (eager).
    #: Both give bit-identical embeddings.
    encoder_backend: str = "torchscript"
    #: torch intra-op threads for the CPU encoder (0 = leave torch's default).
    torch_threads: int = 1
    #: xgboost threads per tree-stage call (1: latency; the encoder owns the other core).
    tree_threads: int = 1
    #: Requests per pipeline call in offline scoring (`uwrt score`).
    score_batch_size: int = 64
    #: Seconds SIGTERM/SIGINT waits for queued and in-flight requests before exiting.
    grace_s: float = 10.0
    #: Dynamic batching (see runtime/batching.py).
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        for name in ("max_request_events", "max_request_bytes", "score_batch_size", "tree_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads < 0 or not 0 <= self.port <= 65535 or self.grace_s < 0:
            raise ValueError("torch_threads >= 0, 0 <= port <= 65535 and grace_s >= 0 are required")

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, config_file: str | None = None, *, env: typing.Mapping[str, str] | None = None,
             **overrides: Any) -> "RuntimeConfig":
        """Defaults < TOML file < UWRT_* environment < overrides (None values are ignored).

        Overrides use flat names: top-level fields by name, nested ones by their own name
        (`max_wait_us=...` sets batching.max_wait_us) or as `batching_max_wait_us`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as fh:
                values = tomllib.load(fh)
            _check_keys(cls, values, config_file)
        for name, typ, path in _leaves(cls):
            key = "UWRT_" + "_".join(path).upper()
            if key in env:
                _put(values, path, _parse(env[key], typ, key))
        for k, v in overrides.items():
            if v is None:
                continue
            path = _resolve(cls, k)
            _put(values, path, v)
        return _build(cls, values)

    def apply_threads(self) -> None:
        """Set torch's intra-op thread count (process-wide)."""
        if self.torch_threads:
            import torch
            torch.set_num_threads(self.torch_threads)

    def flat(self) -> dict[str, str]:
        """Every knob as 'name' / 'batching.name' -> value string (for GetModelInfo and logs)."""
        out = {}
        for name, _, path in _leaves(type(self)):
            v: Any = self
            for p in path:
                v = getattr(v, p)
            out[".".join(path)] = str(v)
        return out


def knobs() -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, doc) for every knob; docs are the `#:` comments above each
    field, so the source is the one place they are written (CLI help and README use them)."""
    out = []
    default = RuntimeConfig()
    for name, typ, path in _leaves(RuntimeConfig):
        owner: Any = RuntimeConfig if len(path) == 1 else _hints(RuntimeConfig)[path[0]]
        v: Any = default
        for p in path:
            v = getattr(v, p)
        out.append((".".join(path), typ, v, _field_docs(owner).get(name, "")))
    return out


def _field_docs(cls) -> dict[str, str]:
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", s)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        if not s.startswith("#"):
            pending = []
    return docs


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    # Cached: get_type_hints compiles the string annotations, and CPython 3.11.7's AST
    # constructor is not thread safe (gh-106905: a spurious "AST constructor recursion depth
    # mismatch" SystemError when two threads compile at once).
    return typing.get_type_hints(cls)


def _leaves(cls, prefix: tuple[str, ...] = ()):
    """(name, type, path) for every scalar field, nested dataclasses flattened."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, prefix + (f.name,))
        else:
            yield f.name, t, prefix + (f.name,)


def _resolve(cls, key: str) -> tuple[str, ...]:
    leaves = list(_leaves(cls))
    for _, _, path in leaves:
        if key == "_".join(path):
            return path
    matches = [path for name, _, path in leaves if name == key]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"unknown configuration knob {key!r}")


def _put(values: dict, path: tuple[str, ...], v: Any) -> None:
    d = values
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = v


def _parse(text: str, typ: Any, key: str) -> Any:
    try:
        if typ is bool:
            return text.strip().lower() in ("1", "true", "yes", "on")
        if typing.get_origin(typ) is tuple:
            return tuple(int(x) for x in text.split(",") if x.strip())
        return typ(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a valid {getattr(typ, '__name__', typ)}") from None


def _check_keys(cls, values: dict, where: str, prefix: str = "") -> None:
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k not in known:
            raise ValueError(f"{where}: unknown configuration key {prefix + k!r}")
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ValueError(f"{where}: [{prefix + k}] must be a table")
            _check_keys(hints[k], v, where, prefix + k + ".")


def _build(cls, values: dict) -> Any:
    hints = _hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            kw[f.name] = _build(t, v)
        elif typing.get_origin(t) is tuple:
            kw[f.name] = tuple(v)
        elif t is float and isinstance(v, int):
            kw[f.name] = float(v)
        else:
            if not isinstance(v, t):
                raise ValueError(f"configuration {f.name}: expected {t.__name__}, got {v!r}")
            kw[f.name] = v
    return cls(**kw)
