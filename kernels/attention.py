"""Variable-length fused attention forward over packed tokens (Triton), plus its torch reference.

Layout: `qkv` [T, 3*H*Dh] holds, per token row, q | k | v, each head-major (the encoder's
`linear(ln1(x)).view(T, 3, H, Dh)`); the output [T, H*Dh] is head-major (`a.reshape(T, -1)`).
Segment b owns tokens [cu_seqlens[b], cu_seqlens[b+1]) and attends only within itself
(bidirectional, softmax scale 1/sqrt(Dh) unless given).

Grid (CUDA-graph friendly, vLLM-style): a flat 1-D grid of `grid_size(T, B)` =
T // SLOT + B + 1 programs, where SLOT = BLOCK_S = 32 query rows. Program `pid` finds its segment
s as the last one whose first slot `cu[s] // SLOT + s` is <= pid (one vector load of cu_seqlens,
no binary search), and its slot j within it. The grid depends only on host ints (T, B), so a
graph captured for a (batch bucket, token bucket) replays for any cu_seqlens with those sizes.
Per segment, chosen by the segment's OWN length n (never by the batch):
  * short path, 1 <= n <= BLOCK_S: slot 0 computes the whole segment as one [32, 32] tile,
    plain (one-pass) softmax; other slots exit.
  * long path, n > BLOCK_S: slots j = 0, k, 2k, ... (k = BLOCK_M / SLOT) each take BLOCK_M = 64
    query rows and walk the segment's keys from its own start in BLOCK_N = 64 blocks with an
    online softmax (32 x 32 for fp32 at head dim 64: `long_blocks`).
  * n == 0 (empty trailing segments of a batch bucket): nothing to do.
  * "segment" B (virtual): the rows [cu[B], T) that belong to no segment (padding up to a token
    bucket) are written as zeros, so the whole output is always defined and finite.
Every program loops over the H heads itself (H*Dh <= 256). Math in fp32 (fp32 dot products use
input_precision="ieee", i.e. no TF32), exp2 with the scale folded in, every computed row has at
least one valid key, so no NaN can appear. Batch invariance: a segment's output depends only on
its own tokens and length (fixed tiles, keys walked from its own start), so it is bit-identical
whatever else shares the batch; tests/kernels/test_attention.py checks it.

Dtypes: float32 and float16 anywhere; bfloat16 only on CUDA (the Triton interpreter computes
bf16 wrongly, triton #11584). Configs are frozen (`SHORT`, `LONG`, `NUM_WARPS`); no autotuning.

Thread safety: stateless; the launcher allocates its output (or writes the caller's `out`).
Safe from any thread; Triton's kernel cache is process-wide and lock-protected.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

#: Query rows per grid slot, and the tile size of the short path (whole segment in one tile).
BLOCK_S = 32
#: Query rows / key rows per step of the long path (segments longer than BLOCK_S); see long_blocks.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
HEAD_DIMS = (16, 32, 64)
MAX_MODEL_DIM = 256          # H * Dh: all heads of a query block are handled by one program
LOG2E = 1.4426950408889634


@triton.jit
def _locate(cu_ptr, n_seqs, n_tokens, pid, SLOT: tl.constexpr, B_PAD: tl.constexpr):
    """Program pid -> (segment s, its first token, one past its last token, slot j within it).

    s == n_seqs is the virtual segment of the rows [cu[B], T) that belong to no segment."""
    idx = tl.arange(0, B_PAD)
    valid = idx <= n_seqs
    cu = tl.load(cu_ptr + idx, mask=valid, other=0)                        # [B_PAD] int32
    first_slot = tl.where(valid, cu // SLOT + idx, 2147483647)
    s = tl.sum((first_slot <= pid).to(tl.int32), axis=0) - 1
    start = tl.sum(tl.where(idx == s, cu, 0), axis=0)
    nxt = tl.sum(tl.where(idx == s + 1, cu, 0), axis=0)
    end = tl.where(s < n_seqs, nxt, n_tokens)
    j = pid - (start // SLOT + s)
    # Valid cu_seqlens never need these clamps; they keep a malformed one (decreasing, past T)
    # from ever reading or writing outside [0, T) (a fault would poison a CUDA graph's context).
    start = tl.minimum(tl.maximum(start, 0), n_tokens)
    end = tl.minimum(tl.maximum(end, start), n_tokens)
    j = tl.maximum(j, 0)
    return s, start, end, j


@triton.jit
def _head_short(qkv_ptr, stride_qkv, rows, rmask, h, qk_scale,
                H: tl.constexpr, DH: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention of head h for a whole segment held in one tile: rows [R] are both the queries and
    the keys (rmask marks the segment's real tokens, >= 1 of them). Returns fp32 [R, DH]."""
    d = tl.arange(0, DH)
    row_off = rows * stride_qkv
    q = tl.load(qkv_ptr + row_off[:, None] + (h * DH + d)[None, :], mask=rmask[:, None], other=0.0)
    kt = tl.load(qkv_ptr + row_off[None, :] + (H * DH + h * DH + d)[:, None], mask=rmask[None, :], other=0.0)
    v = tl.load(qkv_ptr + row_off[:, None] + (2 * H * DH + h * DH + d)[None, :], mask=rmask[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale           # [R, R] fp32, log2 units
    s = tl.where(rmask[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)                                                   # finite: >= 1 valid key
    p = tl.exp2(s - m[:, None])
    denom = tl.sum(p, axis=1)                                               # >= 1
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return o / denom[:, None]


@triton.jit
def _head_long(qkv_ptr, stride_qkv, rows, rmask, start, end, h, qk_scale,
               H: tl.constexpr, DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Attention of head h for query rows [BM] over keys [start, end) in BN blocks walked from
    `start` (online softmax). Every key block holds >= 1 valid key. Returns fp32 [BM, DH]."""
    d = tl.arange(0, DH)
    q = tl.load(qkv_ptr + rows[:, None] * stride_qkv + (h * DH + d)[None, :],
                mask=rmask[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DH], tl.float32)
    for kb in range(start, end, BN):
        keys = kb + tl.arange(0, BN)
        kmask = keys < end
        key_off = keys * stride_qkv
        kt = tl.load(qkv_ptr + key_off[None, :] + (H * DH + h * DH + d)[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(qkv_ptr + key_off[:, None] + (2 * H * DH + h * DH + d)[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))                          # finite
        alpha = tl.exp2(m_i - m_new)                                        # 0 on the first block
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _varlen_attn_fwd_kernel(
    qkv_ptr,        # [T, 3*H*DH] q | k | v per row, head-major; row stride stride_qkv, unit column stride
    out_ptr,        # [T, H*DH] head-major; row stride stride_out
    cu_ptr,         # int32 [n_seqs + 1], cu[0] == 0, non-decreasing, cu[n_seqs] <= n_tokens
    n_seqs,         # B (segments, incl. empty trailing ones)
    n_tokens,       # T (rows of qkv and out; rows >= cu[B] belong to no segment -> zeros)
    stride_qkv,
    stride_out,
    qk_scale,       # softmax scale * log2(e)
    H: tl.constexpr, DH: tl.constexpr, B_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    s, start, end, j = _locate(cu_ptr, n_seqs, n_tokens, pid, BLOCK_S, B_PAD)
    n = end - start
    d = tl.arange(0, DH)
    if s < n_seqs:
        if n <= BLOCK_S:
            if (j == 0) & (n > 0):
                rows = start + tl.arange(0, BLOCK_S)
                rmask = rows < end
                o_ptrs = out_ptr + rows[:, None] * stride_out + d[None, :]
                for h in range(H):
                    o = _head_short(qkv_ptr, stride_qkv, rows, rmask, h, qk_scale, H, DH, DOT_PRECISION)
                    tl.store(o_ptrs + h * DH, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            if ((j % (BLOCK_M // BLOCK_S)) == 0) & (j * BLOCK_S < n):
                rows = start + j * BLOCK_S + tl.arange(0, BLOCK_M)
                rmask = rows < end
                o_ptrs = out_ptr + rows[:, None] * stride_out + d[None, :]
                for h in range(H):
                    o = _head_long(qkv_ptr, stride_qkv, rows, rmask, start, end, h, qk_scale,
                                   H, DH, BLOCK_M, BLOCK_N, DOT_PRECISION)
                    tl.store(o_ptrs + h * DH, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        rows = start + j * BLOCK_S + tl.arange(0, BLOCK_S)
        rmask = rows < end
        zero = tl.zeros([BLOCK_S, DH], tl.float32).to(out_ptr.dtype.element_ty)
        o_ptrs = out_ptr + rows[:, None] * stride_out + d[None, :]
        for h in range(H):
            tl.store(o_ptrs + h * DH, zero, mask=rmask[:, None])


# ----------------------------------------------------------------------------------------------
# Host side

def grid_size(n_tokens: int, n_seqs: int) -> int:
    """Programs launched for T tokens in B segments; fixed for a (batch bucket, token bucket)."""
    return int(n_tokens) // BLOCK_S + int(n_seqs) + 1


def b_pad(n_seqs: int) -> int:
    """The cu_seqlens vector width the kernel loads (a compile-time constant per batch bucket)."""
    return max(16, triton.next_power_of_2(int(n_seqs) + 1))


def long_blocks(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the long path: a function of the model (dtype, head dim), never of the
    batch. fp32 at head dim 64 uses 32 x 32 (its exact-fp32 dots spill registers at 64 x 64:
    ~1.7 KB/thread on sm_80/sm_90 per `compile_check --ptxas-info`)."""
    return (32, 32) if dtype == torch.float32 and head_dim == 64 else (BLOCK_M, BLOCK_N)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32); fp16/bf16 use the tensor cores as is."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (numpy, CPU tensors)."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_inputs(qkv: torch.Tensor, cu_seqlens: torch.Tensor, n_heads: int, head_dim: int,
                 max_seqlen: int) -> None:
    """Raise ValueError/TypeError for inputs the kernels do not support (host metadata only: no sync)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if n_heads < 1 or n_heads * head_dim > MAX_MODEL_DIM:
        raise ValueError(f"n_heads * head_dim must be in [1, {MAX_MODEL_DIM}], got {n_heads} * {head_dim}")
    if qkv.dim() != 2 or qkv.shape[1] != 3 * n_heads * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {3 * n_heads * head_dim}] with unit column stride, got "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qkv dtype {qkv.dtype} not supported (float32, float16, bfloat16)")
    if qkv.dtype == torch.bfloat16 and (qkv.device.type != "cuda" or interpreting()):
        raise TypeError("bfloat16 attention needs a CUDA device (the Triton interpreter computes bf16 wrongly)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be int32 [B+1] with B >= 1, "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != qkv.device or not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens must be contiguous on {qkv.device}, got {cu_seqlens.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if qkv.shape[0] >= 2**31 // (3 * n_heads * head_dim) or cu_seqlens.shape[0] > 2**20:
        raise ValueError("too many tokens/segments for int32 indexing")


def check_cu_seqlens_host(cu_host, n_tokens: int) -> None:
    """Raise ValueError unless a host cu_seqlens is valid for T = n_tokens rows: cu[0] == 0,
    non-decreasing, cu[B] <= T, B >= 1. For callers holding the host copy (the kernels cannot
    check the device copy without a sync; they clamp instead of faulting on a malformed one)."""
    cu = np.asarray(cu_host)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have B+1 >= 2 entries, got shape {cu.shape}")
    if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > n_tokens:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end <= {n_tokens}: {cu[:8]}...")


def attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, *, n_heads: int, head_dim: int, max_seqlen: int,
              sm_scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention within each segment of a packed batch: qkv [T, 3*H*Dh] -> [T, H*Dh].

    cu_seqlens: int32 [B+1] on qkv's device, cu[0] == 0, non-decreasing, cu[B] <= T (read only by
    the kernel: this function never syncs). Empty segments are allowed; rows [cu[B], T) belong to
    no segment and come out as zeros. max_seqlen: host upper bound of the segment lengths, checked
    for sign only (the path is chosen per segment in the kernel, so it cannot change results).
    sm_scale defaults to 1/sqrt(head_dim). `out` ([T, H*Dh], qkv's dtype, unit column stride) is
    written in place and returned (static buffers for CUDA graphs); otherwise a new tensor.
    Grid and constants depend only on (T, B, dtype, H, Dh): capture-safe.
    """
    check_inputs(qkv, cu_seqlens, n_heads, head_dim, max_seqlen)
    T, d = qkv.shape[0], n_heads * head_dim
    if out is None:
        out = torch.empty(T, d, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (T, d) or out.dtype != qkv.dtype or out.device != qkv.device or out.stride(1) != 1:
        raise ValueError(f"out must be [{T}, {d}] {qkv.dtype} on {qkv.device} with unit column stride")
    if T == 0:
        return out
    n_seqs = cu_seqlens.shape[0] - 1
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
    bm, bn = long_blocks(qkv.dtype, head_dim)
    _varlen_attn_fwd_kernel[(grid_size(T, n_seqs),)](
        qkv, out, cu_seqlens, n_seqs, T, qkv.stride(0), out.stride(0), scale * LOG2E,
        H=n_heads, DH=head_dim, B_PAD=b_pad(n_seqs), BLOCK_S=BLOCK_S, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION=dot_precision(qkv.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def attention_reference(qkv: torch.Tensor, cu_seqlens_host, n_heads: int, head_dim: int, *,
                        sm_scale: float | None = None) -> torch.Tensor:
    """float64 oracle for `attention`: a per-segment loop of explicit softmax(q k^T * scale) v.

    Returns float64 [T, H*Dh] on qkv's device; rows outside every segment are zeros."""
    cu = np.asarray(cu_seqlens_host, dtype=np.int64)
    T = qkv.shape[0]
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
    q, k, v = qkv.detach().to(torch.float64).view(T, 3, n_heads, head_dim).unbind(1)   # [T, H, Dh]
    out = torch.zeros(T, n_heads, head_dim, dtype=torch.float64, device=qkv.device)
    for b in range(len(cu) - 1):
        s0, s1 = int(cu[b]), int(cu[b + 1])
        if s1 > s0:
            scores = torch.einsum("qhd,khd->hqk", q[s0:s1], k[s0:s1]) * scale
            out[s0:s1] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v[s0:s1])
    return out.reshape(T, -1)


# ----------------------------------------------------------------------------------------------
# Compile-only variants for uwrt.kernels.compile_check (no interpreter): (kernel, signature, constexprs,
# label, options). COMPILE_VARIANTS (always checked): every head dim in fp16, the demo shape
# (H=4, Dh=16) in every dtype, batch buckets from 1 to 511 segments. COMPILE_VARIANTS_EXTRA
# (--full): more shapes.

def _variant(dtype: torch.dtype, H: int, DH: int, bp: int) -> tuple:
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    sig = {"qkv_ptr": ptr, "out_ptr": ptr, "cu_ptr": "*i32", "n_seqs": "i32", "n_tokens": "i32",
           "stride_qkv": "i32", "stride_out": "i32", "qk_scale": "fp32"}
    bm, bn = long_blocks(dtype, DH)
    const = dict(H=H, DH=DH, B_PAD=bp, BLOCK_S=BLOCK_S, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=dot_precision(dtype))
    sig.update({k: "constexpr" for k in const})
    label = f"attention {str(dtype).split('.')[-1]} H={H} Dh={DH} B_PAD={bp}"
    return (_varlen_attn_fwd_kernel, sig, const, label, dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES))


COMPILE_VARIANTS = [
    _variant(torch.float16, 4, 16, 16),
    _variant(torch.float16, 4, 16, 512),
    _variant(torch.float16, 8, 32, 64),
    _variant(torch.float16, 4, 64, 16),
    _variant(torch.bfloat16, 4, 16, 16),
    _variant(torch.float32, 4, 16, 16),
    _variant(torch.float32, 4, 64, 64),       # long path 32 x 32 (long_blocks)
]
COMPILE_VARIANTS_EXTRA = [
    _variant(torch.bfloat16, 4, 64, 64),
    _variant(torch.float32, 8, 32, 64),
    _variant(torch.float16, 16, 16, 256),
]
