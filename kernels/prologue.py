"""Encoder prologue: embedding gathers + concat + input projection, one Triton kernel.

Per token t: in_proj([type_emb[type_ids[t]] | mcc_emb[mcc_ids[t]] | numeric[t]]) -> x [T, d]
(uwrt.runtime.encoders.torch_encoder.SequenceEncoder's first step). The concatenated row is assembled in registers
from three masked loads (each fills its own column range, zeros elsewhere, so the sum is exact)
and multiplied by in_proj's weight in one `tl.dot`: the [T, in] intermediate never reaches
memory, and the four torch launches (two gathers, cast, concat) disappear from the graph.

Batch invariance: BLOCK_M=16 rows per program, fixed tiles, one reduction over the whole input
width: a row's result depends only on its own ids and features.

Thread safety: stateless launchers; safe from any thread (torch's stream rules apply).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from uwrt.kernels.ln_qkv import linear_rows_reference

BLOCK_M = 16
BLOCK_N = 64


@triton.jit
def _prologue_kernel(
    type_ptr,    # int64 [T] event type ids
    mcc_ptr,     # int64 [T] hashed MCC ids
    num_ptr,     # fp32 [T, NN] numeric features
    temb_ptr,    # [n_types, E1] type embedding
    memb_ptr,    # [n_mcc, E2] MCC embedding
    w_ptr,       # [N, E1 + E2 + NN] in_proj weight
    b_ptr,       # [N]
    out_ptr,     # [T, N]
    T,
    E1: tl.constexpr, E2: tl.constexpr, NN: tl.constexpr, N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    K = E1 + E2 + NN                                          # constexpr (sum of constexprs)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    ks = tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    tid = tl.load(type_ptr + rows, mask=rmask, other=0)
    mid = tl.load(mcc_ptr + rows, mask=rmask, other=0)
    in1 = ks < E1
    in2 = (ks >= E1) & (ks < E1 + E2)
    in3 = (ks >= E1 + E2) & (ks < K)
    dt = w_ptr.dtype.element_ty
    a = tl.load(temb_ptr + tid[:, None] * E1 + ks[None, :], mask=rmask[:, None] & in1[None, :], other=0.0).to(dt)
    a += tl.load(memb_ptr + mid[:, None] * E2 + (ks - E1)[None, :], mask=rmask[:, None] & in2[None, :],
                 other=0.0).to(dt)
    a += tl.load(num_ptr + rows[:, None] * NN + (ks - E1 - E2)[None, :], mask=rmask[:, None] & in3[None, :],
                 other=0.0).to(dt)
    w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(ks < K)[:, None] & cmask[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(a, w, input_precision="ieee")
    else:
        acc = tl.dot(a, w)
    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def prologue(type_ids: torch.Tensor, mcc_ids: torch.Tensor, numeric: torch.Tensor, type_emb: torch.Tensor,
             mcc_emb: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """in_proj(cat(type_emb[type_ids], mcc_emb[mcc_ids], numeric)) -> [T, d] in w's dtype.

    type_ids, mcc_ids int64 [T] (must index their tables: not checked on the device, no sync);
    numeric fp32 [T, n_numeric]; embeddings and w/b in one dtype."""
    T = type_ids.shape[0]
    E1, E2, NN = type_emb.shape[1], mcc_emb.shape[1], numeric.shape[1]
    N, K = w.shape
    if K != E1 + E2 + NN or b.shape != (N,) or mcc_ids.shape != (T,) or numeric.shape[0] != T:
        raise ValueError(f"prologue: bad shapes: w {tuple(w.shape)} vs {E1}+{E2}+{NN} inputs, T={T}")
    if K > 512:
        raise ValueError(f"prologue: input width {K} > 512 is not supported")
    out = torch.empty(T, N, device=w.device, dtype=w.dtype)
    if T == 0:
        return out
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _prologue_kernel[grid](type_ids.contiguous(), mcc_ids.contiguous(), numeric.contiguous(), type_emb.contiguous(),
                           mcc_emb.contiguous(), w.contiguous(), b.contiguous(), out, int(T),
                           E1=int(E1), E2=int(E2), NN=int(NN), N=int(N),
                           BLOCK_K=max(16, triton.next_power_of_2(int(K))),
                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IEEE=(w.dtype == torch.float32), num_warps=4)
    return out


def prologue_reference(type_ids, mcc_ids, numeric, type_emb, mcc_emb, w, b) -> torch.Tensor:
    """Torch reference of `prologue` (the CPU path)."""
    x = torch.cat([type_emb[type_ids], mcc_emb[mcc_ids], numeric.to(w.dtype)], dim=1)
    return linear_rows_reference(x, w, b)


def _variants():
    out = []
    for dt in ("*fp16", "*fp32"):
        for E1, E2, NN, N in ((8, 16, 5, 64), (16, 32, 8, 256)):
            sig = {"type_ptr": "*i64", "mcc_ptr": "*i64", "num_ptr": "*fp32", "temb_ptr": dt, "memb_ptr": dt,
                   "w_ptr": dt, "b_ptr": dt, "out_ptr": dt, "T": "i32", "E1": "constexpr", "E2": "constexpr",
                   "NN": "constexpr", "N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "IEEE": "constexpr"}
            const = {"E1": E1, "E2": E2, "NN": NN, "N": N, "BLOCK_K": max(16, triton.next_power_of_2(E1 + E2 + NN)),
                     "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "IEEE": dt == "*fp32"}
            out.append((_prologue_kernel, sig, const, f"prologue {dt[1:]} in={E1}+{E2}+{NN} N={N}", dict(num_warps=4)))
    return out


#: (kernel, signature, constexprs, label, options) tuples for uwrt.kernels.compile_check (sm_80 / sm_90).
COMPILE_VARIANTS = _variants()
