"""ONNX Runtime encoder backend: the bundle's encoder as an ONNX graph, run by onnxruntime.

The graph is written node by node from the bundle's weights (`export_onnx`), with the same
math and the same packed/bucketed layout as `SequenceEncoder` / the TorchScript backend:

    inputs   type_ids [T] int64, mcc_ids [T] int64, numeric [T, n_numeric] float32,
             per length bucket L in (8, 16, ..., bucket_length(max_history)):
                 idx_L [Bk, L] int64 (gather ids), the key mask (attention "mha": mask_L [Bk, L]
                 int32, 1 = real token; "matmul": bias_L [Bk, 1, 1, L] float32, 0 / -inf),
                 valid_L [n_L] int64 (flat ids of the real tokens in [Bk * L]),
             inv [T] int64 (each token's row in the concatenated bucket outputs),
             seg [T] int64 (segment of each token), lens [B, 1] float32, starts [B] int64
    output   emb [B, emb_dim] float32

T and B (and every Bk, n_L) are dynamic axes; a bucket no segment falls into is fed empty
(Bk = 0). The host plans the buckets (`uwrt.kernels.reference.bucket_plan`) as the other backends
do, so a segment's attention never depends on its neighbours. Attention per bucket is either
ORT's fused `com.microsoft.MultiHeadAttention` with a key padding mask ("mha", the default:
fastest measured, bench/encoder_cpu_bench.py) or standard MatMul + Softmax + MatMul ("matmul").
Every linear layer pads its input to at least MIN_GEMM_ROWS rows inside the graph (batch invariance, as in
runtime/encoders/torch_encoder.py); GELU is the exact erf form, LayerNorm the ONNX LayerNormalization op.

Export cache: the .onnx file lives in the bundle's reserved `cache/onnx/` directory (or, when
that is read-only, owned by another user or group/world writable, `$XDG_CACHE_HOME/uwrt/onnx`,
default `~/.cache/uwrt/onnx`), named by a key over the encoder weights and config (the encoder
digest), EXPORT_VERSION, the opset and the optimization level; a JSON sidecar records the key,
the file's size and SHA-256, the bundle digest and `mac`, an HMAC under the server user's cache
key (runtime/bundle/cache_trust.py). An entry is used only if both files are regular files
owned by the server user and not group/world writable, the MAC verifies (this user exported it)
and the bytes read match the sidecar; those exact bytes go to ONNX Runtime. Anything else is
logged (logger "uwrt.encoder.onnx"), counted (`cache_stats()`) and re-exported; without a
usable cache key nothing is cached.

Optimization levels (`onnx_optimization`): "none" (ORT graph optimizations off), "ort"
(ORT_ENABLE_ALL: constant folding, Gelu / LayerNorm / MatMul+Add fusions at session creation),
"transformer" (additionally onnxruntime.transformers' offline optimizer, model_type "bert";
`fusion_report` lists what each level fuses). The attention is bucketed gathers + MatMul +
Softmax, which the optimizer's Attention fusion does not match (by design: its fused kernels
pad per batch, which would break batch invariance).

Thread safety: `OnnxEncoderBackend.encode` may be called from several threads (an ORT
InferenceSession's run is thread safe), but the serving worker calls it from one; ORT
releases the GIL for the whole run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from uwrt.kernels.reference import MIN_BUCKET, bucket_length, bucket_plan
from uwrt.runtime.bundle import cache_trust
from uwrt.runtime.bundle.schema import EncoderConfig, check_state_dict
from uwrt.runtime.encoders.torch_encoder import MIN_GEMM_ROWS
from uwrt.runtime.featurize import PackedEvents

log = logging.getLogger("uwrt.encoder.onnx")

#: Bump whenever the exported graph changes: it is part of the cache key.
EXPORT_VERSION = 3
OPSET = 17
OPTIMIZATION_LEVELS = ("none", "ort", "transformer")
CACHE_SUBDIR = "onnx"


def bucket_lengths(max_history: int) -> list[int]:
    """Every attention bucket length a segment of <= max_history tokens can land in."""
    out, L = [], MIN_BUCKET
    while L <= bucket_length(max(1, max_history)):
        out.append(L)
        L *= 2
    return out


# -- export --------------------------------------------------------------------------------------

class _Graph:
    """A tiny helper that names nodes and initializers while the graph is written."""

    def __init__(self) -> None:
        import onnx.helper as oh
        self.oh = oh
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        from onnx import numpy_helper
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.array(value, copy=True, order="C"), name))  # keeps 0-d
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs: Any) -> str:
        out = self.name(base or op_type.lower())
        self.nodes.append(self.oh.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        return out

    def unused_initializers(self) -> list[str]:
        """Initializers no node reads (ORT removes them with a warning at every session start)."""
        used = {i for n in self.nodes for i in n.input}
        return [t.name for t in self.inits if t.name not in used]


def _weights(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}


def export_onnx(cfg: EncoderConfig, state: Mapping[str, torch.Tensor], *, attention: str = "matmul") -> bytes:
    """The encoder as a serialized ONNX model (see the module docstring for its inputs).

    attention: "matmul" (MatMul + Softmax + MatMul per bucket, standard ONNX ops, any runtime) or
    "mha" (ORT's com.microsoft MultiHeadAttention per bucket with a key padding mask)."""
    import onnx
    from onnx import TensorProto
    check_state_dict(cfg, dict(state))
    w = _weights(state)
    g = _Graph()
    oh = g.oh
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731  (1-D)
    zero, one = g.const(i64(0), "zero"), g.const(i64(1), "one")            # [0], [1]
    min_rows = g.const(i64(MIN_GEMM_ROWS), "min_rows")

    def lin(x: str, prefix: str) -> str:
        """x [M, in] @ W^T + b with M padded to MIN_GEMM_ROWS (rows computed then dropped)."""
        wt = w[prefix + ".weight"].T.copy()               # [in, out]
        m = g.op("Slice", [g.op("Shape", [x]), zero, one], "rows")         # [M]
        pad = g.op("Max", [g.op("Sub", [min_rows, m]), zero])             # [max(16 - M, 0)]
        zshape = g.op("Concat", [pad, g.const(i64(wt.shape[0]))], axis=0)
        zeros = g.op("ConstantOfShape", [zshape], value=oh.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
        xp = g.op("Concat", [x, zeros], axis=0)
        y = g.op("Add", [g.op("MatMul", [xp, g.const(wt, prefix + ".wT")]),
                         g.const(w[prefix + ".bias"], prefix + ".b")])
        return g.op("Slice", [y, zero, m, zero])

    def ln(x: str, prefix: str) -> str:
        return g.op("LayerNormalization", [x, g.const(w[prefix + ".weight"]), g.const(w[prefix + ".bias"])],
                    axis=-1, epsilon=float(cfg.ln_eps))

    def gelu(x: str) -> str:                               # exact: 0.5 x (1 + erf(x / sqrt 2))
        e = g.op("Erf", [g.op("Div", [x, g.const(np.array(math.sqrt(2.0), np.float32))])])
        return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, g.const(np.array(1.0, np.float32))])]),
                            g.const(np.array(0.5, np.float32))])

    d, H, Dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    F = TensorProto.FLOAT
    inputs = [oh.make_tensor_value_info("type_ids", TensorProto.INT64, ["T"]),
              oh.make_tensor_value_info("mcc_ids", TensorProto.INT64, ["T"]),
              oh.make_tensor_value_info("numeric", F, ["T", cfg.n_numeric])]
    buckets = bucket_lengths(cfg.max_history)
    if attention not in ("matmul", "mha"):
        raise ValueError(f"attention must be 'matmul' or 'mha', got {attention!r}")
    for L in buckets:
        inputs += [oh.make_tensor_value_info(f"idx_{L}", TensorProto.INT64, [f"B{L}", L]),
                   (oh.make_tensor_value_info(f"bias_{L}", F, [f"B{L}", 1, 1, L]) if attention == "matmul" else
                    oh.make_tensor_value_info(f"mask_{L}", TensorProto.INT32, [f"B{L}", L])),
                   oh.make_tensor_value_info(f"valid_{L}", TensorProto.INT64, [f"N{L}"])]
    inputs += [oh.make_tensor_value_info("inv", TensorProto.INT64, ["T"]),
               oh.make_tensor_value_info("seg", TensorProto.INT64, ["T"]),
               oh.make_tensor_value_info("lens", F, ["B", 1]),
               oh.make_tensor_value_info("starts", TensorProto.INT64, ["B"])]

    x = g.op("Concat", [g.op("Gather", [g.const(w["type_emb.weight"]), "type_ids"]),
                        g.op("Gather", [g.const(w["mcc_emb.weight"]), "mcc_ids"]), "numeric"], axis=-1)
    x = lin(x, "in_proj")                                   # [T, d]
    flat_d = g.const(i64(-1, d))
    if attention == "matmul":      # only this form scales by hand (MultiHeadAttention does it inside)
        scale = g.const(np.array(1.0 / math.sqrt(Dh), np.float32), "scale")
        flat_hd = g.const(i64(-1, H, Dh))
    for li in range(cfg.n_layers):
        p = f"layers.{li}."
        if attention == "mha":
            qkv = g.op("Reshape", [lin(ln(x, p + "ln1"), p + "qkv"), g.const(i64(-1, 3, d))])   # [T, 3, d]
            q, k, v = (g.op("Gather", [qkv, g.const(np.array(j, np.int64))], axis=1) for j in range(3))  # [T, d]
            parts = []
            for L in buckets:
                qb, kb, vb = (g.op("Gather", [t, f"idx_{L}"]) for t in (q, k, v))              # [Bk, L, d]
                ob = g.op("MultiHeadAttention", [qb, kb, vb, "", f"mask_{L}"], domain="com.microsoft",
                          num_heads=H)                                                         # [Bk, L, d]
                parts.append(g.op("Gather", [g.op("Reshape", [ob, flat_d]), f"valid_{L}"]))    # [n_L, d]
        else:
            qkv = g.op("Reshape", [lin(ln(x, p + "ln1"), p + "qkv"), g.const(i64(-1, 3, H, Dh))])   # [T, 3, H, Dh]
            q, k, v = (g.op("Gather", [qkv, g.const(np.array(j, np.int64))], axis=1) for j in range(3))  # [T, H, Dh]
            parts = []
            for L in buckets:
                qb = g.op("Transpose", [g.op("Gather", [q, f"idx_{L}"])], perm=[0, 2, 1, 3])      # [Bk, H, L, Dh]
                kt = g.op("Transpose", [g.op("Gather", [k, f"idx_{L}"])], perm=[0, 2, 3, 1])      # [Bk, H, Dh, L]
                vb = g.op("Transpose", [g.op("Gather", [v, f"idx_{L}"])], perm=[0, 2, 1, 3])
                s = g.op("Add", [g.op("Mul", [g.op("MatMul", [qb, kt]), scale]), f"bias_{L}"])   # [Bk, H, L, L]
                ob = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vb])                          # [Bk, H, L, Dh]
                ob = g.op("Reshape", [g.op("Transpose", [ob], perm=[0, 2, 1, 3]), flat_hd])     # [Bk * L, H, Dh]
                parts.append(g.op("Gather", [ob, f"valid_{L}"]))                                # [n_L, H, Dh]
        cat = parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=0)                 # [T, H, Dh] / [T, d]
        a = g.op("Reshape", [g.op("Gather", [cat, "inv"]), flat_d])                          # [T, d]
        x = g.op("Add", [x, lin(a, p + "out")])
        x = g.op("Add", [x, lin(gelu(lin(ln(x, p + "ln2"), p + "fc1")), p + "fc2")])
    h = ln(x, "final_ln")                                                                  # [T, d]
    bshape = g.op("Concat", [g.op("Slice", [g.op("Shape", ["lens"]), g.const(i64(0)), g.const(i64(1))]),
                             g.const(i64(d))], axis=0)
    zeros_bd = g.op("ConstantOfShape", [bshape], value=oh.make_tensor("v", F, [1], [0.0]))
    total = g.op("ScatterND", [zeros_bd, g.op("Unsqueeze", ["seg", one]), h], reduction="add")  # [B, d]
    pooled = g.op("Concat", [g.op("Div", [total, "lens"]), g.op("Gather", [h, "starts"])], axis=-1)
    emb = lin(pooled, "pool")
    g.nodes.append(oh.make_node("Identity", [emb], ["emb"], name="emb_node"))
    graph = oh.make_graph(g.nodes, "uwrt_encoder", inputs,
                          [oh.make_tensor_value_info("emb", F, ["B", cfg.emb_dim])], initializer=g.inits)
    opsets = [oh.make_opsetid("", OPSET)] + ([oh.make_opsetid("com.microsoft", 1)] if attention == "mha" else [])
    model = oh.make_model(graph, opset_imports=opsets, producer_name="uwrt",
                          producer_version=str(EXPORT_VERSION))
    model.ir_version = 8
    unused = g.unused_initializers()
    if unused:        # ORT would warn at every start ("Removing initializer ..."): keep the graph clean
        raise AssertionError(f"export_onnx wrote initializers no node uses: {unused}")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def transformer_optimize(model_bytes: bytes, cfg: EncoderConfig) -> tuple[bytes, dict[str, int]]:
    """Run onnxruntime.transformers' offline optimizer (model_type "bert", fp32, no ORT pass) and
    return (the optimized model, its fused-operator counts)."""
    from onnxruntime.transformers.optimizer import optimize_model
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.onnx")
        pathlib.Path(src).write_bytes(model_bytes)
        opt = optimize_model(src, model_type="bert", num_heads=cfg.n_heads, hidden_size=cfg.d_model,
                             opt_level=0, use_gpu=False, only_onnxruntime=False)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        return opt.model.SerializeToString(), stats


def op_counts(model_bytes: bytes) -> dict[str, int]:
    import onnx
    m = onnx.load_from_string(model_bytes)
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def fusion_report(cfg: EncoderConfig, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What each optimization level does to the graph: operator counts before and after
    (ORT_ENABLE_ALL's counts come from the optimized model ORT writes)."""
    import onnxruntime as ort
    plain = export_onnx(cfg, state)
    opt, fused = transformer_optimize(plain, cfg)
    report: dict[str, Any] = {"exported": op_counts(plain), "transformer": op_counts(opt),
                              "transformer_fused": fused}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("ort", plain), ("transformer+ort", opt)):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = os.path.join(tmp, f"{name}.onnx")
            ort_session(model, so, ["CPUExecutionProvider"])
            report[name] = op_counts(pathlib.Path(so.optimized_model_filepath).read_bytes())
    return report


# -- ONNX Runtime's own log -----------------------------------------------------------------------

ort_log = logging.getLogger("uwrt.encoder.onnx.ort")

#: One line of ORT's default logger: optional ANSI colour, "<date> <time> [W:onnxruntime:<id>, <file:line> <func>]
#: <message>", colour reset.
_ORT_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\S+ \S+ \[([VIWEF]):onnxruntime:[^,\]]*,? ?([^\]]*)\] (.*?)(?:\x1b\[m)?$")
_ORT_LEVELS = {"V": logging.DEBUG, "I": logging.DEBUG, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_STDERR_LOCK = threading.Lock()


def ort_severity() -> int:
    """ORT's log severity for our "uwrt.encoder.onnx.ort" logger's level: 1 (info) when it is
    enabled for DEBUG (`uwrt -v`), else 2 (warnings and errors)."""
    return 1 if ort_log.isEnabledFor(logging.DEBUG) else 2


@contextlib.contextmanager
def ort_log_routed() -> Iterator[None]:
    """Route what ONNX Runtime prints on stderr (fd 2, from C++, in ANSI colour) through our logger
    while the block runs: each ORT line becomes one record of "uwrt.encoder.onnx.ort" at the
    matching level (W -> WARNING, E -> ERROR, I/V -> DEBUG), without the colour codes. Other text
    written to fd 2 meanwhile (another thread's) is passed through unchanged after the block.
    Used around session creation, where ORT reports what it did to the graph; process-wide
    (fd 2), so blocks are serialised by a lock."""
    with _STDERR_LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace")
        for line in text.splitlines():
            m = _ORT_LINE.match(line)
            if m:
                ort_log.log(_ORT_LEVELS[m.group(1)], "onnxruntime: %s (%s)", m.group(3), m.group(2).strip())
            elif line.strip():
                print(line, file=sys.stderr)


def ort_session(model: bytes, so: Any, providers: list[str]) -> Any:
    """An InferenceSession with ORT's log at `ort_severity()` and routed through our logger."""
    import onnxruntime as ort
    ort.set_default_logger_severity(ort_severity())
    so.log_severity_level = ort_severity()
    with ort_log_routed():
        return ort.InferenceSession(model, so, providers=providers)


# -- cache ---------------------------------------------------------------------------------------

def encoder_key(cfg: EncoderConfig, state: Mapping[str, torch.Tensor], optimization: str,
                attention: str = "matmul") -> str:
    """Cache key: SHA-256 over the export code version, opset, optimization level, attention
    form, the encoder config and every weight (name, dtype, shape, bytes): the encoder's own digest."""
    h = hashlib.sha256(f"uwrt-onnx v{EXPORT_VERSION} opset{OPSET} {optimization} {attention}\n".encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def user_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "uwrt" / CACHE_SUBDIR


def _writable_dir(path: pathlib.Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def cache_dir_for(bundle_path: os.PathLike | str | None, override: str = "") -> pathlib.Path | None:
    """Where exports are cached: `override` if given, else the bundle's cache/onnx, else the
    user cache dir: the first that is writable and trusted (owned by this user, not
    group/world writable; an untrusted one is skipped with a warning, counted). None if
    nothing qualifies: export in memory only."""
    cands = [pathlib.Path(override)] if override else []
    if bundle_path is not None and not override:
        cands.append(pathlib.Path(bundle_path) / "cache" / CACHE_SUBDIR)
    if not override:
        cands.append(user_cache_dir())
    for c in cands:
        if not _writable_dir(c):
            log.info("ONNX export cache: %s is not writable", c)
            continue
        why = cache_trust.untrusted_dir_reason(c)
        if why:
            log.warning("ONNX export cache: %s skipped: %s", c, why)
            _count("untrusted_dirs")
            cache_trust.count("untrusted_dirs")
            continue
        return c
    return None


_CACHE_LOCK = threading.Lock()        # one export at a time per process
_STATS_LOCK = threading.Lock()
_stats = {"hits": 0, "exports": 0, "rejected": 0, "untrusted": 0, "untrusted_dirs": 0, "uncached": 0}


def cache_stats() -> dict[str, int]:
    """Process-wide export-cache counters: hits, exports (written to a cache), rejected
    (entries refused: corrupt or untrusted), untrusted (of those, MAC or ownership), untrusted_dirs,
    uncached (exports not cached: no cache dir, no usable key, or a failed write). Thread safe."""
    with _STATS_LOCK:
        return dict(_stats)


def _count(name: str) -> None:
    with _STATS_LOCK:
        _stats[name] += 1


def _read_entry(model_path: pathlib.Path, meta_path: pathlib.Path, key: str, mac_key: bytes) -> bytes:
    """The cached model's bytes if the entry is trusted and intact; ValueError (UntrustedCacheFile
    for ownership/mode problems) naming the reason otherwise."""
    meta = json.loads(cache_trust.read_trusted_file(meta_path, 1 << 20))
    if not isinstance(meta, dict):
        raise ValueError("sidecar is not a JSON object")
    if not cache_trust.verify_meta(mac_key, meta):
        raise cache_trust.UntrustedCacheFile("sidecar MAC does not verify (exported by another user or key, "
                                             "or tampered)")
    if meta.get("key") != key:
        raise ValueError("sidecar is for another key")
    data = cache_trust.read_trusted_file(model_path)
    if meta.get("bytes") != len(data) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
        raise ValueError("digest mismatch")
    return data


def load_or_export(cfg: EncoderConfig, state: Mapping[str, torch.Tensor], *, cache_dir: pathlib.Path | None,
                   optimization: str = "ort", attention: str = "matmul", bundle_digest: str = "") -> tuple[bytes, str]:
    """The (possibly transformer-optimized) ONNX model bytes, from the cache when a valid entry
    exists; returns (bytes, how) with how in {"cache", "export", "export-uncached"}."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown ONNX optimization {optimization!r}; choose one of {OPTIMIZATION_LEVELS}")
    key = encoder_key(cfg, state, optimization, attention)

    def build() -> bytes:
        model = export_onnx(cfg, state, attention=attention)
        if optimization == "transformer":
            model, fused = transformer_optimize(model, cfg)
            log.info("ONNX transformer optimizer fused: %s", fused or "nothing")
        return model

    mac_key = None
    if cache_dir is not None:
        try:
            mac_key = cache_trust.cache_key()
        except cache_trust.CacheTrustError as e:
            log.error("ONNX export cache: %s; the export is not cached or reused", e)
            cache_trust.count("key_errors")
    if cache_dir is None or mac_key is None:
        _count("uncached")
        return build(), "export-uncached"
    model_path = cache_dir / f"encoder-{key[:24]}.onnx"
    meta_path = model_path.with_suffix(".json")
    with _CACHE_LOCK:
        if os.path.lexists(model_path) or os.path.lexists(meta_path):
            try:
                data = _read_entry(model_path, meta_path, key, mac_key)
                _count("hits")
                return data, "cache"
            except (OSError, ValueError) as e:   # json.JSONDecodeError and UntrustedCacheFile are ValueErrors
                log.warning("ONNX export cache entry %s rejected, corrupt or untrusted (%s): re-exporting",
                            model_path, e)
                _count("rejected")
                if isinstance(e, cache_trust.UntrustedCacheFile):
                    _count("untrusted")
                    cache_trust.count("untrusted_entries")
        data = build()
        meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "export_version": EXPORT_VERSION, "opset": OPSET, "optimization": optimization, "attention": attention,
                "bundle_digest": bundle_digest}
        meta["mac"] = cache_trust.sign_meta(mac_key, meta)
        try:
            for path, payload in ((model_path, data), (meta_path, json.dumps(meta, indent=1).encode())):
                fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")    # mode 0600
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                os.replace(tmp, path)                     # atomic: readers see old or new, never half
        except OSError as e:
            log.warning("ONNX export cache: cannot write %s (%s); using the export uncached", model_path, e)
            _count("uncached")
            return data, "export-uncached"
        log.info("ONNX export cached at %s", model_path)
        _count("exports")
        return data, "export"


# -- the backend ---------------------------------------------------------------------------------

def onnx_feed(events: PackedEvents, buckets: list[int]) -> dict[str, np.ndarray]:
    """The graph's inputs for one packed batch (host-side bucket plan, as the TorchScript path)."""
    cu = np.asarray(events.cu_seqlens, dtype=np.int64)
    starts, lens = cu[:-1], np.diff(cu)
    plan = {idx.shape[1]: (idx, ok) for idx, ok in bucket_plan(cu)}
    feed: dict[str, np.ndarray] = {"type_ids": np.ascontiguousarray(events.type_ids, np.int64),
                                   "mcc_ids": np.ascontiguousarray(events.mcc_ids, np.int64),
                                   "numeric": np.ascontiguousarray(events.numeric, np.float32)}
    dest = []
    for L in buckets:
        idx, ok = plan.pop(L, (np.zeros((0, L), np.int64), np.zeros((0, L), bool)))
        feed[f"idx_{L}"] = np.ascontiguousarray(idx, np.int64)
        feed[f"bias_{L}"] = np.where(ok, np.float32(0), np.float32(-np.inf)).astype(np.float32)[:, None, None, :]
        feed[f"mask_{L}"] = ok.astype(np.int32)
        feed[f"valid_{L}"] = np.flatnonzero(ok.reshape(-1)).astype(np.int64)
        dest.append(idx[ok])
    if plan:
        raise ValueError(f"segments longer than the exported buckets allow (bucket {sorted(plan)}; "
                         f"exported up to {buckets[-1]})")
    order = np.concatenate(dest)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order), dtype=np.int64)
    feed["inv"] = inv
    feed["seg"] = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    feed["lens"] = lens.astype(np.float32)[:, None]
    feed["starts"] = starts.astype(np.int64)
    return feed


class FeedBuilder:
    """The graph's inputs for one packed batch, built with as few numpy operations as possible:
    the serving path's replacement for `onnx_feed` (which stays as the reference; tested equal).

    Only the inputs the session declares are built (the mask for "mha", the bias for "matmul");
    the inputs of the length buckets no segment falls into are built once and reused (read-only
    empty arrays); each segment's bucket comes from one vectorised expression instead of a Python
    call per segment, and the buckets present are found with one bincount.

    Thread safety: `feed` allocates its outputs per call and only reads the shared empties, so
    calls may run concurrently."""

    def __init__(self, buckets: list[int], input_names: set[str] | frozenset[str]) -> None:
        self.buckets = list(buckets)
        self.names = frozenset(input_names)
        self.want_mask = any(f"mask_{L}" in self.names for L in self.buckets)
        self.want_bias = any(f"bias_{L}" in self.names for L in self.buckets)
        self.arange = {L: np.arange(L, dtype=np.int64) for L in self.buckets}
        self.empty: dict[int, dict[str, np.ndarray]] = {}
        for L in self.buckets:
            e = {f"idx_{L}": np.zeros((0, L), np.int64), f"valid_{L}": np.zeros(0, np.int64)}
            if self.want_mask:
                e[f"mask_{L}"] = np.zeros((0, L), np.int32)
            if self.want_bias:
                e[f"bias_{L}"] = np.zeros((0, 1, 1, L), np.float32)
            for a in e.values():
                a.flags.writeable = False
            self.empty[L] = {k: v for k, v in e.items() if k in self.names}
        self.log2 = {L: L.bit_length() - 1 for L in self.buckets}

    def feed(self, events: PackedEvents) -> dict[str, np.ndarray]:
        cu = np.asarray(events.cu_seqlens, dtype=np.int64)
        starts, lens = cu[:-1], np.diff(cu)
        if len(lens) and int(lens.min()) < 1:
            raise ValueError("every segment needs at least one token")
        # bucket_length(n) = max(MIN_BUCKET, next power of two >= n): frexp's exponent of n - 1
        # is (n - 1).bit_length() (exact in float64 for any realistic n)
        e = np.frexp((lens - 1).astype(np.float64))[1]
        e = np.maximum(e, MIN_BUCKET.bit_length() - 1)
        present = np.flatnonzero(np.bincount(e, minlength=1)).tolist()
        top = self.log2[self.buckets[-1]]
        if present and present[-1] > top:
            too_long = sorted(1 << p for p in present if p > top)
            raise ValueError(f"segments longer than the exported buckets allow (bucket {too_long}; "
                             f"exported up to {self.buckets[-1]})")
        feed: dict[str, np.ndarray] = {"type_ids": np.ascontiguousarray(events.type_ids, np.int64),
                                       "mcc_ids": np.ascontiguousarray(events.mcc_ids, np.int64),
                                       "numeric": np.ascontiguousarray(events.numeric, np.float32)}
        dest = []
        have = set(present)
        for L in self.buckets:
            if self.log2[L] not in have:
                feed.update(self.empty[L])
                continue
            sel = np.flatnonzero(e == self.log2[L]) if len(have) > 1 else None
            st, ln = (starts, lens) if sel is None else (starts[sel], lens[sel])
            ar = self.arange[L]
            ok = ar < ln[:, None]
            idx = st[:, None] + np.minimum(ar, ln[:, None] - 1)
            feed[f"idx_{L}"] = idx
            if self.want_bias:
                bias = np.where(ok, np.float32(0), np.float32(-np.inf)).astype(np.float32)
                feed[f"bias_{L}"] = bias[:, None, None, :]
            if self.want_mask:
                feed[f"mask_{L}"] = ok.astype(np.int32)
            flat_ok = ok.reshape(-1)
            feed[f"valid_{L}"] = np.flatnonzero(flat_ok)
            dest.append(idx.reshape(-1)[flat_ok])
        order = dest[0] if len(dest) == 1 else np.concatenate(dest)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order), dtype=np.int64)
        feed["inv"] = inv
        feed["seg"] = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        feed["lens"] = lens.astype(np.float32)[:, None]
        feed["starts"] = starts
        return {k: v for k, v in feed.items() if k in self.names} if len(feed) != len(self.names) else feed


def providers_for(device: str) -> list[str]:
    """ORT execution providers for a device: CUDA (with CPU for the few ops it lacks) or CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r} for the ONNX backend (cpu or cuda)")


class OnnxEncoderBackend:
    """The encoder in an ONNX Runtime InferenceSession (CPU or CUDA execution provider).

    `encode` is safe to call from several threads (ORT sessions are), though the pipeline calls
    it from one; ORT releases the GIL for the whole run."""
    name = "onnx"
    #: encode may run on another thread while the model thread encodes (Explain uses this)
    reentrant = True

    def __init__(self, cfg: EncoderConfig, state: Mapping[str, torch.Tensor], *, device: str = "cpu",
                 intra_op_threads: int = 1, inter_op_threads: int = 1, optimization: str = "ort",
                 attention: str = "mha", cache_dir: pathlib.Path | str | None = None,
                 bundle_digest: str = "") -> None:
        import onnxruntime as ort
        self.cfg = cfg
        self.device = device
        self.optimization = optimization
        self.buckets = bucket_lengths(cfg.max_history)
        providers = providers_for(device)
        if device != "cpu" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("the ONNX backend on cuda needs onnxruntime-gpu (requirements/gpu.txt); this "
                               f"onnxruntime offers {ort.get_available_providers()}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "none"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        cdir = pathlib.Path(cache_dir) if cache_dir is not None else None
        self.attention = attention
        model, self.source = load_or_export(cfg, state, cache_dir=cdir, optimization=optimization,
                                            attention=attention, bundle_digest=bundle_digest)
        try:
            self.session = ort_session(model, so, providers)
        except Exception as e:  # noqa: BLE001 - a cached file that ORT refuses is re-exported once
            if self.source != "cache":
                raise
            log.warning("ONNX Runtime refused the cached export (%s): re-exporting", e)
            model = export_onnx(cfg, state, attention=attention)
            if optimization == "transformer":
                model = transformer_optimize(model, cfg)[0]
            self.session = ort_session(model, so, providers)
            self.source = "export-uncached"
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.feeder = FeedBuilder(self.buckets, self.input_names)
        log.info("ONNX encoder on %s (%s, optimization %s, attention %s, threads %d/%d, model from %s)", device,
                 self.session.get_providers()[0], optimization, attention, intra_op_threads, inter_op_threads,
                 self.source)

    @classmethod
    def from_bundle(cls, bundle, *, cache_dir: str = "", **kw) -> OnnxEncoderBackend:
        """For a loaded Bundle: weights from it, exports cached in its cache/onnx (see cache_dir_for)."""
        return cls(bundle.encoder_config, bundle.encoder_state(), cache_dir=cache_dir_for(bundle.path, cache_dir),
                   bundle_digest=bundle.bundle_digest, **kw)

    def encode(self, events: PackedEvents) -> np.ndarray:
        if events.batch_size == 0:
            return np.zeros((0, self.cfg.emb_dim), np.float32)
        (emb,) = self.session.run(["emb"], self.feeder.feed(events))
        return emb

    def encode_reference(self, events: PackedEvents) -> np.ndarray:
        """`encode` with the reference inputs (`onnx_feed`): tests compare the two."""
        if events.batch_size == 0:
            return np.zeros((0, self.cfg.emb_dim), np.float32)
        feed = onnx_feed(events, self.buckets)
        (emb,) = self.session.run(["emb"], {k: v for k, v in feed.items() if k in self.input_names})
        return emb
