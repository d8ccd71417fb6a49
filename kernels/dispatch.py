"""Per-op choice between the fused Triton kernels and their torch references.

Every op takes `impl`:
  * "triton": run the Triton kernel; raise `KernelUnavailable` (with the reason) if it cannot run
    here (CPU tensors without the interpreter, CUDA tensors with it, a missing op module, bf16
    in the interpreter, ...).
  * "torch": run the torch reference (uwrt.kernels.reference / each op module's `*_reference`).
  * "auto": Triton when it can run, else the reference. Each fallback is counted
    (`stats()["fallback.<op>"]`) and logged once per (op, reason) on logger "uwrt.kernels":
    a fallback is never silent.
Triton can run when the tensors are CUDA tensors (compiled kernels) or CPU tensors with
TRITON_INTERPRET=1 set before the kernel modules were imported (the interpreter; tests).

Ops: prologue (embedding gathers + concat + in_proj), ln_linear (LN + QKV; pooling head), mlp,
attention, attn_block (attention + out-proj + residual + LN2), pool_segments (final LN + mean +
newest). attention/attn_block come from
uwrt.kernels.attention / uwrt.kernels.attn_block when those modules exist; if uwrt.kernels.attn_block is missing
its Triton form is composed from the Triton attention + ln_linear.

The torch paths take the host copy of cu_seqlens (`cu_host`, numpy) so they never read device
memory; they are not CUDA-graph capturable (host-planned gathers). Rows past cu[B] (token-bucket
padding) come out of attention as zeros on every path; empty segments are allowed.

Thread safety: the choice is stateless; the counters are guarded by a lock (safe from any thread).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from uwrt.kernels import epilogue
from uwrt.kernels import ln_qkv as _lnq
from uwrt.kernels import mlp as _mlp
from uwrt.kernels import prologue as _pro
from uwrt.kernels.reference import varlen_attention

log = logging.getLogger("uwrt.kernels")

IMPLS = ("auto", "triton", "torch")
OPS = ("prologue", "ln_linear", "mlp", "attention", "attn_block", "pool_segments")

_lock = threading.Lock()
_counts: Counter = Counter()
_logged: set = set()


class KernelUnavailable(RuntimeError):
    """impl="triton" was asked for an op that cannot run as a Triton kernel here."""


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set (Triton kernels run in numpy on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _optional_module(name: str):
    """The module, or None if it does not exist (cached: checked once per process)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def triton_blocker(op: str, *tensors: torch.Tensor) -> str | None:
    """Why `op` cannot run as a Triton kernel on these tensors, or None if it can."""
    if op == "attention" and _optional_module("uwrt.kernels.attention") is None:
        return "module uwrt.kernels.attention not found"
    if op == "attn_block" and _optional_module("uwrt.kernels.attention") is None:
        return "modules uwrt.kernels.attn_block / uwrt.kernels.attention not found"
    devs = {t.device.type for t in tensors}
    if len(devs) != 1:
        return f"tensors on several devices {sorted(devs)}"
    dev = devs.pop()
    if dev == "cuda":
        if interpreting():
            return "TRITON_INTERPRET is set but the tensors are on CUDA"
        return None
    if dev == "cpu":
        if not interpreting():
            return "CPU tensors and TRITON_INTERPRET is not set (no compiled Triton on CPU)"
        if not isinstance(_lnq._ln_linear_kernel, _interpreted_type()):
            return "TRITON_INTERPRET was set after the kernel modules were imported"
        if any(t.dtype == torch.bfloat16 for t in tensors):
            return "bfloat16 is computed wrongly by the Triton interpreter"
        return None
    return f"device type {dev!r} is not supported by Triton"


def _interpreted_type():
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction


def choose(op: str, impl: str, *tensors: torch.Tensor) -> str:
    """"triton" or "torch" for this call; counts the choice and every auto fallback."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        _count(f"torch.{op}")
        return "torch"
    why = triton_blocker(op, *tensors)
    if why is None:
        _count(f"triton.{op}")
        return "triton"
    if impl == "triton":
        raise KernelUnavailable(f"{op}: impl='triton' cannot run here: {why}")
    with _lock:
        _counts[f"fallback.{op}"] += 1
        _counts[f"torch.{op}"] += 1
        first = (op, why) not in _logged
        _logged.add((op, why))
    if first:
        log.warning("kernels: %s falls back to the torch reference (%s); counted in dispatch.stats()", op, why)
    return "torch"


def _count(key: str) -> None:
    with _lock:
        _counts[key] += 1


def stats() -> dict[str, int]:
    """Counters: 'triton.<op>', 'torch.<op>' (calls per path) and 'fallback.<op>' (auto fallbacks)."""
    with _lock:
        return dict(_counts)


def fallbacks() -> int:
    """Total number of automatic fallbacks to a torch reference since the last reset."""
    with _lock:
        return sum(v for k, v in _counts.items() if k.startswith("fallback."))


def reset_stats() -> None:
    with _lock:
        _counts.clear()
        _logged.clear()


# ----------------------------------------------------------------------------------------------
# Ops

def prologue(type_ids, mcc_ids, numeric, type_emb, mcc_emb, w, b, *, impl: str = "auto") -> torch.Tensor:
    """in_proj(cat(type_emb[type_ids], mcc_emb[mcc_ids], numeric)) (uwrt.kernels.prologue)."""
    if choose("prologue", impl, type_ids, numeric, w) == "triton":
        return _pro.prologue(type_ids, mcc_ids, numeric, type_emb, mcc_emb, w, b)
    return _pro.prologue_reference(type_ids, mcc_ids, numeric, type_emb, mcc_emb, w, b)


def ln_linear(x, w, b, ln_w=None, ln_b=None, eps: float = 1e-5, *, impl: str = "auto") -> torch.Tensor:
    """[LayerNorm](x) @ w.T + b (uwrt.kernels.ln_qkv)."""
    if choose("ln_linear", impl, x, w) == "triton":
        return _lnq.ln_linear(x, w, b, ln_w, ln_b, eps)
    return _lnq.ln_linear_reference(x, w, b, ln_w, ln_b, eps)


def mlp(h, x, w1, b1, w2, b2, *, impl: str = "auto") -> torch.Tensor:
    """x + fc2(gelu(fc1(h))) (uwrt.kernels.mlp)."""
    if choose("mlp", impl, h, x, w1) == "triton":
        return _mlp.mlp(h, x, w1, b1, w2, b2)
    return _mlp.mlp_reference(h, x, w1, b1, w2, b2)


def _host_cu(cu_seqlens: torch.Tensor, cu_host) -> np.ndarray:
    if cu_host is not None:
        return np.asarray(cu_host, dtype=np.int64)
    # Reference path without a host copy: reading the device tensor syncs (never on the graph path).
    return cu_seqlens.cpu().numpy().astype(np.int64)


def attention_torch(qkv: torch.Tensor, cu_host: np.ndarray, n_heads: int, head_dim: int) -> torch.Tensor:
    """Torch attention over packed qkv [T, 3d] -> [T, d] (uwrt.kernels.reference.varlen_attention);
    empty segments are skipped and rows past cu[-1] come out as zeros (as the Triton kernel)."""
    T = qkv.shape[0]
    cu = np.unique(np.asarray(cu_host, dtype=np.int64))       # drops empty segments (repeated offsets)
    out = torch.zeros(T, n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    n = int(cu[-1])
    if n == 0:
        return out
    if cu[0] != 0:
        raise ValueError("cu_seqlens must start at 0")
    q, k, v = qkv[:n].reshape(n, 3, n_heads, head_dim).unbind(1)
    out[:n] = varlen_attention(q, k, v, cu).reshape(n, -1)
    return out


def attention(qkv, cu_seqlens, cu_host=None, *, n_heads: int, head_dim: int, max_seqlen: int,
              impl: str = "auto") -> torch.Tensor:
    """Segment-local softmax attention: qkv [T, 3d] -> [T, d] (uwrt.kernels.attention)."""
    if choose("attention", impl, qkv, cu_seqlens) == "triton":
        return _optional_module("uwrt.kernels.attention").attention(
            qkv, cu_seqlens, n_heads=n_heads, head_dim=head_dim, max_seqlen=max_seqlen)
    return attention_torch(qkv, _host_cu(cu_seqlens, cu_host), n_heads, head_dim)


def attn_block(qkv, x, w_out, b_out, ln_w, ln_b, eps: float, cu_seqlens, cu_host=None, *, n_heads: int,
               head_dim: int, max_seqlen: int, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new = x + attention(qkv) @ w_out.T + b_out, h = LayerNorm(x_new)) (uwrt.kernels.attn_block)."""
    if choose("attn_block", impl, qkv, x, cu_seqlens) == "triton":
        ab = _optional_module("uwrt.kernels.attn_block")
        if ab is not None:
            return ab.attn_block(qkv, x, cu_seqlens, w_out, b_out, ln_w, ln_b, eps=eps,
                                 n_heads=n_heads, head_dim=head_dim, max_seqlen=max_seqlen)
        # Composite Triton form until uwrt.kernels.attn_block exists: attention kernel, then the linear
        # kernel; residual add and LayerNorm are row-wise torch ops (batch invariant).
        a = _optional_module("uwrt.kernels.attention").attention(
            qkv, cu_seqlens, n_heads=n_heads, head_dim=head_dim, max_seqlen=max_seqlen)
        x_new = x + _lnq.ln_linear(a, w_out, b_out)
        return x_new, F.layer_norm(x_new, (x.shape[1],), ln_w, ln_b, eps)
    a = attention_torch(qkv, _host_cu(cu_seqlens, cu_host), n_heads, head_dim)
    x_new = x + _lnq.linear_rows_reference(a, w_out, b_out)
    return x_new, F.layer_norm(x_new, (x.shape[1],), ln_w, ln_b, eps)


def pool_segments(x, ln_w, ln_b, eps: float, cu_seqlens, cu_host=None, *, impl: str = "auto") -> torch.Tensor:
    """[segment mean, first token] of LayerNorm(x) -> float32 [B, 2d] (uwrt.kernels.epilogue)."""
    if choose("pool_segments", impl, x, cu_seqlens) == "triton":
        return epilogue.pool_segments(x, ln_w, ln_b, eps, cu_seqlens)
    return epilogue.pool_segments_reference(x, ln_w, ln_b, eps, _host_cu(cu_seqlens, cu_host))
