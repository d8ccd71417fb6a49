"""Fused MLP block over packed rows: out = x + fc2(gelu(fc1(h) + b1)) + b2.

h [T, d] is the already LayerNormed input (uwrt.kernels.attn_block returns it), x [T, d] the residual
stream. One program owns BLOCK_M=16 rows and all d output columns; it walks d_ff in BLOCK_F
chunks: a = gelu(h @ W1[chunk].T + b1[chunk]) stays in registers and is multiplied straight into
the [BLOCK_M, d] fp32 accumulator, so the [T, d_ff] intermediate never reaches memory.

GELU is the exact (erf) form, as torch's default `F.gelu`; `tl.math.erf` works both compiled and
in the interpreter. Batch invariance: fixed tiles, the d_ff walk in a fixed order, no split-K.

Thread safety: stateless launchers; safe from any thread (torch's stream rules apply).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from uwrt.kernels.ln_qkv import linear_rows_reference

BLOCK_M = 16
BLOCK_F = 32     # d_ff chunk (K of the second dot, N of the first)


@triton.jit
def _mlp_kernel(
    h_ptr,      # [T, D] LayerNormed input
    x_ptr,      # [T, D] residual
    w1_ptr,     # [F, D] fc1 weight
    b1_ptr,     # [F]
    w2_ptr,     # [D, F] fc2 weight
    b2_ptr,     # [D]
    out_ptr,    # [T, D]
    T,          # rows
    D: tl.constexpr, F: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)              # [BM]
    ds = tl.arange(0, BLOCK_D)                                 # [BD]
    rmask = rows < T
    dmask = ds < D
    m2 = rmask[:, None] & dmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * D + ds[None, :], mask=m2, other=0.0).to(w1_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)                        # [BF]
        fmask = fs < F
        # W1^T chunk [BD, BF]: (k, f) = W1[f, k]
        w1 = tl.load(w1_ptr + fs[None, :] * D + ds[:, None], mask=dmask[:, None] & fmask[None, :], other=0.0)
        if IEEE:
            a = tl.dot(h, w1, input_precision="ieee")
        else:
            a = tl.dot(h, w1)
        a = a + tl.load(b1_ptr + fs, mask=fmask, other=0.0).to(tl.float32)[None, :]
        a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))   # exact GELU; masked cols stay 0
        # W2^T chunk [BF, BD]: (f, n) = W2[n, f]
        w2 = tl.load(w2_ptr + ds[None, :] * F + fs[:, None], mask=fmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(w2_ptr.dtype.element_ty), w2, acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(w2_ptr.dtype.element_ty), w2, acc)
    b2 = tl.load(b2_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=m2, other=0.0).to(tl.float32)
    out = x + acc + b2[None, :]
    tl.store(out_ptr + rows[:, None] * D + ds[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


def mlp(h: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
        b2: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + fc2(gelu(fc1(h))) in one kernel. h, x [T, d]; w1 [d_ff, d]; b1 [d_ff]; w2 [d, d_ff]; b2 [d].

    Returns [T, d] in x's dtype (or writes `out`, which may be x itself: each program reads its
    rows before writing them). d up to 256."""
    T, D = x.shape
    Fdim = w1.shape[0]
    if h.shape != x.shape or w1.shape != (Fdim, D) or b1.shape != (Fdim,) or w2.shape != (D, Fdim) or b2.shape != (D,):
        raise ValueError(f"mlp: bad shapes h {tuple(h.shape)} x {tuple(x.shape)} "
                         f"w1 {tuple(w1.shape)} w2 {tuple(w2.shape)}")
    if D > 256:
        raise ValueError(f"mlp: d={D} > 256 is not supported (one row tile holds all of d)")
    h, x, w1, b1, w2, b2 = (t.contiguous() for t in (h, x, w1, b1, w2, b2))
    if out is None:
        out = torch.empty_like(x)
    if T == 0:
        return out
    grid = (triton.cdiv(T, BLOCK_M),)
    _mlp_kernel[grid](h, x, w1, b1, w2, b2, out, int(T), D=int(D), F=int(Fdim),
                      BLOCK_D=max(16, triton.next_power_of_2(int(D))), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F,
                      IEEE=(w1.dtype == torch.float32), num_warps=4)
    return out


def mlp_reference(h, x, w1, b1, w2, b2) -> torch.Tensor:
    """Torch reference of `mlp` (the CPU path): x + fc2(F.gelu(fc1(h)))."""
    return x + linear_rows_reference(F.gelu(linear_rows_reference(h, w1, b1)), w2, b2)


def _variants():
    out = []
    for dt in ("*fp16", "*fp32"):
        for D, Fd in ((64, 128), (128, 512), (256, 1024)):
            sig = {"h_ptr": dt, "x_ptr": dt, "w1_ptr": dt, "b1_ptr": dt, "w2_ptr": dt, "b2_ptr": dt, "out_ptr": dt,
                   "T": "i32", "D": "constexpr", "F": "constexpr", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_F": "constexpr", "IEEE": "constexpr"}
            const = {"D": D, "F": Fd, "BLOCK_D": D, "BLOCK_M": BLOCK_M, "BLOCK_F": BLOCK_F, "IEEE": dt == "*fp32"}
            out.append((_mlp_kernel, sig, const, f"mlp {dt[1:]} D={D} F={Fd}", dict(num_warps=4)))
    return out


#: (kernel, signature, constexprs, label, options) tuples for uwrt.kernels.compile_check (sm_80 / sm_90).
COMPILE_VARIANTS = _variants()
