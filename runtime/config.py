"""Runtime configuration: every knob, its default and its meaning, in one place.

Precedence, lowest first: the defaults below < the deployment profile's values (when a profile
resolver is given, as `uwrt serve` does: runtime/profiles.py) < a TOML file (`--config FILE`) <
environment variables `UWRT_<NAME>` (`UWRT_BATCHING_MAX_WAIT_US` for nested fields) <
command-line flags (`--max-wait-us`, same names with dashes). The defaults are the production
defaults (the CPU profile's values); README's "Configuration" table documents each.
Thread safety: frozen values.

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
import itertools
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchingConfig:
    """Every batching knob with its production default. Thread safety: frozen value."""
    #: Most requests in one batch.
    max_batch_size: int = 32
    #: Most history (encoder) tokens in one batch: the sum of each member's tokens. A single
    #: request with more tokens than this is dispatched alone.
    max_batch_tokens: int = 4096
    #: Longest the oldest queued request waits for company while the worker is free (0 = send
    #: whatever is queued as soon as the worker frees, Triton's default).
    max_wait_us: int = 1000
    #: Queued (not yet dispatched) requests beyond this are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 256
    #: A request that would wait longer than this (predicted by the cost model from the work
    #: already queued and running) is refused with RESOURCE_EXHAUSTED: load is shed before
    #: latency collapses. A request whose deadline that wait already makes unreachable gets
    #: DEADLINE_EXCEEDED at once.
    max_queue_delay_us: int = 50_000
    #: Token-count bucket edges (strictly increasing). A batch only holds requests of its head's
    #: bucket, so similar lengths run together: bucket i = tokens in (edge[i-1], edge[i]], and
    #: one last bucket for tokens above the last edge.
    length_buckets: tuple[int, ...] = (8, 32, 128)
    #: Safety margin before a deadline: a batch is sent once waiting longer would leave less than
    #: this between its predicted end and a member's deadline. Covers cost-model error and the
    #: event loop's timer lateness (~1 ms with the default epoll selector).
    deadline_margin_us: int = 1000
    #: Priority aging: a queued request gains one priority level per this many microseconds
    #: waited (0 = off: strict priorities, lower levels can starve under sustained load).
    priority_aging_us: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "length_buckets":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, got {v!r}")
        if self.max_batch_size < 1 or self.max_batch_tokens < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size, max_batch_tokens and max_queue must be >= 1")
        edges = tuple(self.length_buckets)
        if any(not isinstance(e, int) or e < 1 for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"length_buckets must be strictly increasing positive integers, got {edges!r}")
        object.__setattr__(self, "length_buckets", edges)


AUTH_CHOICES = ("none", "token", "mtls", "any")
MODEL_INFO_EXPOSURE_CHOICES = ("minimal", "full")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, authentication and what the server exposes (runtime/serving/security.py; README:
    Security). Thread safety: frozen value."""
    #: Server certificate chain (PEM file). With tls_key: serve TLS only (no plaintext port).
    #: Empty = plaintext (fine on loopback; not for a network).
    tls_cert: str = ""
    #: The server certificate's private key (PEM file; keep it readable by the server user only).
    tls_key: str = ""
    #: CA bundle (PEM) for client certificates: non-empty = mutual TLS, every client must present
    #: a certificate signed by it (the handshake fails otherwise). Needs tls_cert/tls_key.
    tls_client_ca: str = ""
    #: Who may call: "none" (anyone who reaches the port; the loopback dev default), "token"
    #: (`authorization: Bearer <token>` metadata, token hashes in auth_file), "mtls" (the
    #: verified client certificate's identity, listed in auth_file; needs tls_client_ca) or "any"
    #: (either). With auth on, health stays open; Decide/DecideStream need the role "decide",
    #: priority > 0 is honoured only with "priority", the full GetModelInfo and reflection need
    #: "introspect", every other method (admin) needs "admin". Required for production.
    auth: str = "none"
    #: Callers file (TOML, README: Security): for each caller a name, roles, and a token_sha256
    #: and/or an mtls_identity. Never plaintext tokens. Not group/world writable.
    auth_file: str = ""
    #: Server reflection (grpcurl discovery). Off by default (production exposure); with auth
    #: on it also needs the role "introspect".
    reflection: bool = False
    #: GetModelInfo for callers without the role "introspect": "minimal" (identity, profile,
    #: backends, max_history, degraded: no file paths, thresholds, imputation values, settings or
    #: counters) or "full" (everything, to every caller allowed to call it). Callers with
    #: "introspect" (auth on) always get the full answer.
    model_info_exposure: str = "minimal"

    def __post_init__(self) -> None:
        if self.auth not in AUTH_CHOICES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_CHOICES)}; got {self.auth!r}")
        if self.model_info_exposure not in MODEL_INFO_EXPOSURE_CHOICES:
            raise ValueError(f"model_info_exposure must be one of {', '.join(MODEL_INFO_EXPOSURE_CHOICES)}; "
                             f"got {self.model_info_exposure!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (both PEM files, or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth in ("mtls",) and not self.tls_client_ca:
            raise ValueError("auth = mtls needs tls_client_ca (the CA that signs client certificates)")
        if self.auth != "none" and not self.auth_file:
            raise ValueError(f"auth = {self.auth} needs auth_file (the callers file)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class TransportConfig:
    """Connection, stream and RPC limits of the gRPC server (runtime/serving/limits.py; README:
    Security). Each process of `uwrt serve --workers N` applies them on its own. Thread safety:
    frozen value."""
    #: Most RPCs one server process runs at once (every method, health and streams included);
    #: beyond it a call is refused at once with RESOURCE_EXHAUSTED before its request is read.
    #: 0 = unlimited. Bounds memory: up to this many requests of max_request_bytes can be held.
    max_concurrent_rpcs: int = 1024
    #: Most concurrent RPCs (HTTP/2 streams) on one connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    #: a client queues the rest locally. 0 = gRPC's default (unlimited).
    max_concurrent_streams: int = 1024
    #: Most client connections one server process accepts; more are closed at once. 0 = unlimited.
    max_connections: int = 1000
    #: Close a connection with no RPC for this long (GOAWAY; clients reconnect when needed).
    #: 0 = never.
    max_connection_idle_s: float = 300.0
    #: Close every connection after this long (GOAWAY, +-10% jitter), so clients reconnect and
    #: spread again over the worker processes (a restarted worker only gets new connections) and
    #: over replicas behind a balancer. 0 = never.
    max_connection_age_s: float = 600.0
    #: After max_connection_age_s, RPCs in flight get this long to finish (a DecideStream open
    #: longer is cut and must be reopened).
    max_connection_age_grace_s: float = 30.0
    #: Ping a connection idle this long to detect a dead client (its streams are then cancelled
    #: and their queued requests dropped). 0 = never.
    keepalive_time_s: float = 60.0
    #: A keepalive ping unanswered for this long closes the connection.
    keepalive_timeout_s: float = 20.0
    #: Keepalive enforcement: a client pinging more often than this (without data) gets GOAWAY
    #: (too_many_pings) after two strikes; stops ping floods while allowing sane client keepalives.
    keepalive_min_client_interval_s: float = 10.0
    #: Accept client keepalive pings on connections with no RPC (clients that keep idle channels
    #: alive through NATs and balancers); they still obey keepalive_min_client_interval_s.
    keepalive_permit_without_calls: bool = True
    #: Per DecideStream: most requests read but not yet handed to gRPC to send (queued, computing
    #: or waiting to be written). At the bound the server stops reading that stream until
    #: responses can be written, so HTTP/2 flow control pushes back on the client: one that writes
    #: and never reads costs at most this many decisions plus what its own HTTP/2 receive window
    #: holds (its memory, its choice: ~300 responses at 64 KiB; C-core clients grow it to a few MB
    #: by BDP probing, ~19k responses measured).
    stream_max_pending: int = 128

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative number, got {v!r}")
        if self.stream_max_pending < 1 or self.keepalive_timeout_s <= 0:
            raise ValueError("stream_max_pending >= 1 and keepalive_timeout_s > 0 are required")


def pow2_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, then max_batch_size: the batch sizes the batcher can
    form, as CUDA-graph batch buckets and as the tree router's calibration sizes."""
    out, n = [], 1
    while n < max_batch_size:
        out.append(n)
        n *= 2
    return tuple(out + [max_batch_size])


def token_buckets(max_history: int, b: BatchingConfig) -> tuple[int, ...]:
    """Powers of two from 16 below the most tokens a batch can hold, then that cap
    (min(max_batch_tokens, max_batch_size * max_history), at least max_history: a request
    longer than max_batch_tokens is dispatched alone)."""
    cap = max(max_history, min(b.max_batch_tokens, b.max_batch_size * max_history))
    out, n = [], 16
    while n < cap:
        out.append(n)
        n *= 2
    return tuple(out + [cap])


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
    #: Largest serialized request accepted (bytes); larger is INVALID_ARGUMENT naming `request`
    #: (checked on the raw bytes, before parsing). gRPC itself refuses messages more than 64 KiB
    #: above it (RESOURCE_EXHAUSTED) before they reach Python, so a huge request costs no memory.
    max_request_bytes: int = 1 << 20
    #: Deployment profile: "cpu", "gpu" or "auto" (gpu when CUDA is usable, else cpu; the reason
    #: is logged). A profile sets defaults for the device, backends, threads and batching knobs
    #: (README: Deployment profiles); a config file, UWRT_* variables and flags override them.
    #: An explicit "gpu" without usable CUDA exits non-zero at start-up. `uwrt serve` only.
    profile: str = "auto"
    #: Device the encoder runs on: "cpu" or "cuda" (set by the profile).
    encoder_device: str = "cpu"
    #: Encoder implementation: "onnx" (ONNX Runtime; the CPU default, fastest measured on CPU),
    #: "torchscript" (one TorchScript graph), "torch" (eager; bit-identical to torchscript) or
    #: "triton" (fused GPU kernels with CUDA graphs; the gpu profile's). All release the GIL
    #: for the forward except "torch"; onnx agrees with torch within 1e-5.
    encoder_backend: str = "onnx"
    #: CPU encoder that takes over when the GPU encoder fails while serving (the batch is retried
    #: on it, the runtime reports degraded); empty = no fallback (a GPU failure fails the batch).
    #: Only used when encoder_device is not "cpu".
    fallback_encoder_backend: str = ""
    #: After a GPU failure, retry the GPU encoder on a batch at most once per this many seconds
    #: and leave degraded mode when it succeeds (0 = stay on the fallback until restarted).
    fallback_reprobe_s: float = 0.0
    #: ONNX Runtime graph optimizations: "ort" (ORT_ENABLE_ALL at session creation: Gelu and
    #: MatMul+Add fusions, constant folding), "transformer" (also onnxruntime.transformers'
    #: offline optimizer: fuses nothing beyond "ort" on this graph, measured) or "none".
    onnx_optimization: str = "ort"
    #: ONNX attention form: "mha" (ORT's fused MultiHeadAttention contrib op per length bucket;
    #: fastest measured) or "matmul" (standard ONNX MatMul + Softmax, for other runtimes).
    onnx_attention: str = "mha"
    #: ONNX Runtime intra-op threads (0 = ORT's default: one per core).
    onnx_intra_op_threads: int = 1
    #: ONNX Runtime inter-op threads (the graph runs sequentially, so 1 is enough).
    onnx_inter_op_threads: int = 1
    #: Directory for the exported ONNX encoder; empty = the bundle's cache/onnx, or
    #: ~/.cache/uwrt/onnx ($XDG_CACHE_HOME) when that is read-only or untrusted (README: Security).
    onnx_cache_dir: str = ""
    #: Tree stage path. "auto": each batch goes to the path measured fastest for its size at
    #: warm-up, among the paths whose margins are bit-identical to xgboost's ("native", our
    #: generated C layout, and "xgboost" inplace_predict), so a score never depends on which path
    #: its batch size chose. "all": the same routing over every path, TL2cgen and ONNX Runtime
    #: included (they agree within 1e-6 in probability, not to the bit). Or one forced path:
    #: "native", "tl2cgen", "xgboost", "onnx". GetModelInfo's tree_backend is this value. Always on the CPU.
    tree_path: str = "auto"
    #: Where compiled tree libraries are cached; empty = the bundle's cache/native, then
    #: $UWRT_CACHE_DIR or ~/.cache/uwrt/native (first writable and trusted). Compiled once,
    #: authenticated on load (README: Security).
    tree_cache_dir: str = ""
    #: Reason codes for adverse outcomes from exact TreeSHAP: "native" (compiled, ~50 us a row on
    #: the demo model; falls back to xgboost, logged and counted, if it cannot be built) or
    #: "xgboost" (pred_contribs: milliseconds a row). Both give the same top-4 reasons (tested).
    reasons_path: str = "native"
    #: torch intra-op threads for the CPU encoder (0 = leave torch's default).
    torch_threads: int = 1
    #: xgboost threads per tree-stage call (1: latency; the encoder owns the other core).
    tree_threads: int = 1
    #: Refuse a bundle unless its manifest.sig holds a valid Ed25519 signature by one of
    #: trusted_keys (`uwrt bundle sign`). Recommended for production: anyone who can write the
    #: bundle directory can otherwise serve a forged manifest with recomputed digests. Off by
    #: default so a freshly built demo bundle serves; needs trusted_keys.
    require_signature: bool = False
    #: Trusted bundle-signing public keys: comma-separated PEM files (`uwrt bundle keygen`),
    #: kept outside the bundle. A signature present in a bundle is always verified; these decide
    #: whether its signer is trusted.
    trusted_keys: str = ""
    #: Requests per pipeline call in offline scoring (`uwrt score`).
    score_batch_size: int = 64
    #: Seconds SIGTERM/SIGINT waits for queued and in-flight requests before exiting.
    grace_s: float = 10.0
    #: Seconds the server keeps serving after SIGTERM/SIGINT has turned its health NOT_SERVING,
    #: before it refuses new RPCs: the time a load balancer needs to see the change and stop
    #: routing here (its health-check interval x the failures it needs). 0 = refuse at once (a
    #: plain process or Kubernetes, whose preStop sleep does this job). Behind HAProxy or a
    #: health-checking client, set it above the check interval (deploy/cluster.py does).
    drain_delay_s: float = 0.0
    #: Server processes behind the port (`uwrt serve`): "auto" or N >= 1. "auto" = one per CPU in
    #: the process's affinity set (`os.sched_getaffinity`) with the cpu profile, 1 with the gpu
    #: profile (one CUDA context and one set of CUDA graphs per process would compete for one
    #: GPU; the GPU batches instead). 1 = one in-process server whose port is exclusive; N > 1 =
    #: a supervisor process and N worker processes sharing the port through SO_REUSEPORT (README:
    #: Serving). The kernel balances connections, not requests: clients need several channels.
    workers: str = "auto"
    #: Pin each worker process to its own core: "auto" (pin when workers > 1 and there are at
    #: least as many usable cores as workers), "on" (pin, round robin when there are fewer cores
    #: than workers) or "off". A pinned worker runs the encoder, trees and ONNX/torch with one
    #: thread each.
    pin_workers: str = "auto"
    #: Seconds a worker process may take from spawn to SERVING (imports, bundle load, warm-up)
    #: before the supervisor kills it (at start-up: start-up fails; later: a failed restart).
    worker_start_timeout_s: float = 300.0
    #: Delay before restarting a crashed worker; doubles with each consecutive failure of the same
    #: worker, up to 60 s, and resets once a worker has served for 60 s.
    restart_backoff_s: float = 1.0
    #: Expected bundle digest (hex SHA-256, or a prefix of at least 12 hex digits, as the logs
    #: print it). Non-empty: a bundle with another digest is refused at start-up (exit 2) and a
    #: restarted worker that loads one is refused. Empty: the digest recorded in the bundle's
    #: manifest.json when `uwrt serve` starts.
    bundle_digest: str = ""
    #: Where `uwrt serve` runs each batch: "thread" (one model worker thread: the loop keeps
    #: accepting and expiring meanwhile, at two thread wake-ups per batch) or "inline" (on the event
    #: loop's thread: no hand-off, fewer context switches, but nothing is accepted or expired while a
    #: batch computes, so unary batches come out smaller). Measured (bench/RESULTS.md "Lean request
    #: path"): inline saved CPU on DecideStream, thread held unary p99 better.
    batch_runner: str = "thread"
    #: After warm-up, `uwrt serve` moves every object alive then (bundle, model, sessions) out of the
    #: garbage collector's reach with gc.freeze() ("freeze"), or leaves the collector as is ("none").
    gc_after_warmup: str = "freeze"
    #: Python GC thresholds (gen0, gen1, gen2) `uwrt serve` sets after warm-up; empty = leave
    #: Python's (700, 10, 10). Larger gen0 thresholds mean fewer but longer pauses: at 7000 one
    #: young collection took ~2-7 ms on the loaded dev VM, a p99 hazard (bench/RESULTS.md).
    gc_threshold: tuple[int, ...] = ()
    #: Prometheus metrics port (`uwrt serve`; README: Operating uwrt): an HTTP endpoint serving
    #: /metrics from its own thread (with workers: from the supervisor, every worker's samples in
    #: one scrape). 0 = metrics off (nothing is observed).
    metrics_port: int = 9464
    #: Address the metrics endpoint listens on; empty = the same as `host`.
    metrics_host: str = ""
    #: Share of decisions traced with OpenTelemetry (one span per request, child spans per stage;
    #: README: Operating uwrt). A call carrying a client's W3C `traceparent` joins that trace and
    #: its sampled flag decides instead. 0 = tracing off (no per-request work).
    trace_sample_ratio: float = 0.0
    #: Where sampled spans go: "otlp" (OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT, default
    #: localhost:4317; needs the optional requirements/otlp.txt), "console" (JSON on stderr) or
    #: "none" (spans built, then dropped: to measure tracing's own cost).
    trace_exporter: str = "otlp"
    #: Drift windows (README: Operating uwrt): the population stability index is computed over the
    #: decisions of the last this many seconds ...
    drift_window_s: float = 3600.0
    #: ... and at most this many of the newest decisions (per worker process).
    drift_window_n: int = 20000
    #: Fewest decisions in a drift window before PSI is reported (fewer: the PSI gauges read NaN;
    #: PSI on small samples is noise).
    drift_min_decisions: int = 500
    #: Where Decide computes reason codes: "inline" (TreeSHAP for adverse outcomes inside Decide,
    #: the default) or "explain" (Decide returns no reasons and says so in `reasons_mode`; the
    #: Explain RPC computes them off the hot path, for bundles whose TreeSHAP is costly).
    reasons: str = "inline"
    #: Recent decisions kept per worker for Explain by request id (model row, outcome, PD); 0 =
    #: none (Explain then needs the full request).
    explain_cache_size: int = 4096
    #: Longest an Explain call may take (its own deadline; a shorter client deadline wins).
    explain_timeout_s: float = 2.0
    #: Explain calls queued for the explain thread beyond this are refused with RESOURCE_EXHAUSTED.
    explain_max_queue: int = 32
    #: Directory of the decision log (audit log) and the idempotency index (README: Decision
    #: records); empty = no log and no idempotency. One writer directory per server process (w0,
    #: w1, ...) and one index.sqlite shared by the processes of this host.
    records_dir: str = ""
    #: When a decision's record counts as written: "fsync" (a batch's records are fdatasync'ed
    #: before its responses are released; batches queued meanwhile share one fsync) or "interval"
    #: (responses are released after the write; fdatasync at most every records_interval_ms, so a
    #: power loss can lose the last interval's records; a process crash loses none).
    records_durability: str = "fsync"
    #: With records_durability = "interval": the most milliseconds between two fdatasyncs.
    records_interval_ms: int = 10
    #: What a record keeps of the request: "full" (the request itself) or "digest" (its SHA-256
    #: and as_of only, for deployments that keep payloads elsewhere).
    records_payload: str = "full"
    #: A log segment is sealed (trailer with count and SHA-256) and the next one begun past this
    #: many bytes.
    records_segment_bytes: int = 64 << 20
    #: ... or when it is this many seconds old and holds a record.
    records_segment_s: float = 3600.0
    #: Idempotency window, seconds: a request id decided within it gets its stored decision back
    #: (path REPLAY); the same id with another request is ALREADY_EXISTS. 0 = off. Needs
    #: records_dir (the log is the index's source of truth).
    idempotency_window_s: float = 86400.0
    #: Longest a request waits for another request with the same id that is being decided (then
    #: UNAVAILABLE, safe to retry); its deadline bounds it too.
    idempotency_wait_s: float = 5.0
    #: Register the Admin service (Reload) on the server's port. Off by default: anyone who can
    #: reach the port could otherwise switch the model. With auth on, its methods need the role
    #: "admin" (README: Security).
    admin_enabled: bool = False
    #: Challenger (shadow) bundle directory: scores a sampled share of decided requests after
    #: their responses are sent, on its own lowest-priority thread; its decisions go to the
    #: decision log marked shadow. Empty = none.
    shadow_bundle: str = ""
    #: Share of decided requests the challenger scores, 0 to 1 (chosen by request digest, so a
    #: request is always in or out).
    shadow_share: float = 0.0
    #: Most batches waiting for the challenger; a batch beyond it is dropped and counted.
    shadow_queue: int = 8
    #: Dynamic batching (see runtime/serving/batching.py).
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: TLS, authentication, exposure (README: Security).
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Connection, stream and RPC limits (README: Security).
    transport: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        for name in ("max_request_events", "max_request_bytes", "score_batch_size", "tree_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads < 0 or not 0 <= self.port <= 65535 or self.grace_s < 0 or self.drain_delay_s < 0:
            raise ValueError("torch_threads >= 0, 0 <= port <= 65535, grace_s >= 0 and drain_delay_s >= 0 are required")
        for name, allowed in (("profile", PROFILE_CHOICES), ("encoder_backend", ENCODER_BACKEND_CHOICES),
                              ("onnx_optimization", ("none", "ort", "transformer")),
                              ("onnx_attention", ("mha", "matmul")),
                              ("tree_path", TREE_PATH_CHOICES),
                              ("reasons_path", REASONS_PATH_CHOICES),
                              ("batch_runner", ("inline", "thread")),
                              ("gc_after_warmup", ("freeze", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.fallback_encoder_backend not in ("",) + ENCODER_BACKEND_CHOICES:
            raise ValueError(f"fallback_encoder_backend must be empty or one of {', '.join(ENCODER_BACKEND_CHOICES)}; "
                             f"got {self.fallback_encoder_backend!r}")
        if self.encoder_device != "cpu" and not self.encoder_device.startswith("cuda"):
            raise ValueError(f"encoder_device must be 'cpu' or 'cuda[:N]', got {self.encoder_device!r}")
        if self.onnx_intra_op_threads < 0 or self.onnx_inter_op_threads < 0 or self.fallback_reprobe_s < 0:
            raise ValueError("onnx_*_threads >= 0 and fallback_reprobe_s >= 0 are required")
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) >= 1):
            raise ValueError(f"workers must be 'auto' or an integer >= 1, got {self.workers!r}")
        if self.pin_workers not in PIN_WORKERS_CHOICES:
            raise ValueError(f"pin_workers must be one of {', '.join(PIN_WORKERS_CHOICES)}; got {self.pin_workers!r}")
        if self.worker_start_timeout_s <= 0 or self.restart_backoff_s < 0:
            raise ValueError("worker_start_timeout_s > 0 and restart_backoff_s >= 0 are required")
        if self.bundle_digest and not re.fullmatch(r"[0-9a-f]{12,64}", self.bundle_digest):
            raise ValueError(f"bundle_digest must be 12 to 64 lowercase hex digits, got {self.bundle_digest!r}")
        if self.require_signature and not self.trusted_key_paths():
            raise ValueError("require_signature needs trusted_keys (comma-separated public key files)")
        if not 0 <= self.metrics_port <= 65535 or not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError("0 <= metrics_port <= 65535 and 0 <= trace_sample_ratio <= 1 are required")
        for name, allowed in (("reasons", ("inline", "explain")), ("trace_exporter", ("otlp", "console", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.drift_window_s <= 0 or self.drift_window_n < 1 or self.drift_min_decisions < 1:
            raise ValueError("drift_window_s > 0, drift_window_n >= 1 and drift_min_decisions >= 1 are required")
        if self.explain_cache_size < 0 or self.explain_timeout_s <= 0 or self.explain_max_queue < 1:
            raise ValueError("explain_cache_size >= 0, explain_timeout_s > 0 and explain_max_queue >= 1 are required")
        if self.records_durability not in ("fsync", "interval") or self.records_payload not in ("full", "digest"):
            raise ValueError("records_durability must be fsync or interval, records_payload full or digest; got "
                             f"{self.records_durability!r}, {self.records_payload!r}")
        if (self.records_interval_ms < 1 or self.records_segment_bytes < 4096 or self.records_segment_s < 0
                or self.idempotency_window_s < 0 or self.idempotency_wait_s < 0):
            raise ValueError("records_interval_ms >= 1, records_segment_bytes >= 4096, records_segment_s, "
                             "idempotency_window_s and idempotency_wait_s >= 0 are required")
        if not 0.0 <= self.shadow_share <= 1.0 or self.shadow_queue < 1:
            raise ValueError(f"shadow_share must be in [0, 1] and shadow_queue >= 1, got {self.shadow_share}, "
                             f"{self.shadow_queue}")
        if self.gc_threshold and (len(self.gc_threshold) != 3 or any(t < 0 for t in self.gc_threshold)):
            raise ValueError(f"gc_threshold must be empty or three non-negative integers, got {self.gc_threshold!r}")
        if self.security.auth in ("token", "any") and not self.security.tls and not is_loopback(self.host):
            raise ValueError(f"auth = {self.security.auth} on {self.host} without TLS would send bearer tokens in "
                             "the clear: set tls_cert and tls_key (or listen on a loopback address)")

    def trusted_key_paths(self) -> tuple[str, ...]:
        """trusted_keys split on commas, blanks dropped."""
        return tuple(p.strip() for p in self.trusted_keys.split(",") if p.strip())

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, config_file: str | None = None, *, env: typing.Mapping[str, str] | None = None,
             profile_resolver: Callable[[str], tuple[str, Mapping[str, Any]]] | None = None,
             **overrides: Any) -> RuntimeConfig:
        """Defaults < [profile] < TOML file < UWRT_* environment < overrides (None values are ignored).

        Overrides use flat names: top-level fields by name, nested ones by their own name
        (`max_wait_us=...` sets batching.max_wait_us) or as `batching_max_wait_us`.
        `profile_resolver(requested name) -> (resolved name, {dotted knob: value})` layers a
        deployment profile (runtime/profiles.py) under the file; the result's `profile` is the
        resolved name."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as fh:
                values = tomllib.load(fh)
            _check_keys(cls, values, config_file)
        for _, typ, path in _leaves(cls):
            key = "UWRT_" + "_".join(path).upper()
            if key in env:
                _put(values, path, _parse(env[key], typ, key))
        for k, v in overrides.items():
            if v is None:
                continue
            path = _resolve(cls, k)
            _put(values, path, v)
        if profile_resolver is not None:
            name, settings = profile_resolver(values.get("profile", cls.profile))
            layered: dict[str, Any] = {}
            for dotted, v in settings.items():
                _put(layered, _resolve(cls, dotted.replace(".", "_")), v)
            values = _merge(layered, values)
            values["profile"] = name
        return _build(cls, values)

    def apply_threads(self) -> None:
        """Set torch's intra-op thread count (process-wide)."""
        if self.torch_threads:
            import torch
            torch.set_num_threads(self.torch_threads)

    def to_dict(self) -> dict[str, Any]:
        """Every knob as nested plain values (JSON-serialisable; `from_dict` inverts it). The
        supervisor hands its resolved configuration to worker processes this way."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RuntimeConfig:
        """The configuration `to_dict` wrote (no file, environment or profile is consulted)."""
        return _build(cls, dict(values))

    def flat(self) -> dict[str, Any]:
        """Every knob as 'name' / 'batching.name' -> its value as a JSON-ready Python value (str,
        int, float, bool; a tuple becomes a list), for GetModelInfo (which sends each one as JSON
        text) and logs."""
        out: dict[str, Any] = {}
        for _, _, path in _leaves(type(self)):
            v: Any = self
            for p in path:
                v = getattr(v, p)
            out[".".join(path)] = list(v) if isinstance(v, tuple) else v
        return out


def is_loopback(host: str) -> bool:
    """Is `host` (a listen address) a loopback address or "localhost"?"""
    import ipaddress
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


PROFILE_CHOICES = ("auto", "cpu", "gpu")
ENCODER_BACKEND_CHOICES = ("onnx", "torchscript", "torch", "triton")
TREE_PATH_CHOICES = ("auto", "all", "native", "tl2cgen", "xgboost", "onnx")
REASONS_PATH_CHOICES = ("native", "xgboost")
PIN_WORKERS_CHOICES = ("auto", "on", "off")
#: knobs typed str that also take a TOML integer (`workers = 2`)
_INT_AS_STR = frozenset({"workers"})


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, nested tables merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


@functools.cache
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
        elif f.name in _INT_AS_STR and isinstance(v, int) and not isinstance(v, bool):
            kw[f.name] = str(v)
        else:
            if not isinstance(v, t):
                raise ValueError(f"configuration {f.name}: expected {t.__name__}, got {v!r}")
            kw[f.name] = v
    return cls(**kw)
