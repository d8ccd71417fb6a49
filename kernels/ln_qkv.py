"""Fused (optional LayerNorm) + linear + bias over packed rows: x [T, K] -> [T, N].

With LayerNorm it is the first kernel of each encoder layer (LN1 + QKV projection + bias,
x [T, d] -> qkv [T, 3d]); without it the same kernel is the encoder's input projection and its
pooling head, so every GEMM in the Triton encoder takes one code path with fixed tiles.

Batch invariance: a program owns BLOCK_M=16 rows x BLOCK_N columns and reduces over the whole
K in one `tl.dot` with fixed tile sizes (no split-K, no row-count-dependent choice), so a row's
result does not depend on which other rows share the call. LayerNorm statistics are per row, in
fp32. Inputs/weights fp16, bf16 or fp32; accumulation fp32 (fp32 dots use IEEE, not TF32).

Thread safety: stateless launchers; safe from any thread (torch's stream rules apply).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16     # rows per program (tl.dot needs >= 16)
BLOCK_N = 64     # output columns per program
MIN_GEMM_ROWS = 16  # same constant as uwrt.runtime.encoders.torch_encoder.MIN_GEMM_ROWS (CPU GEMM batch invariance)


@triton.jit
def _ln_linear_kernel(
    x_ptr,      # [T, K] input rows (contiguous)
    lnw_ptr,    # [K] LayerNorm weight (unused unless HAS_LN)
    lnb_ptr,    # [K] LayerNorm bias (unused unless HAS_LN)
    w_ptr,      # [N, K] linear weight (torch layout), contiguous
    b_ptr,      # [N] linear bias
    out_ptr,    # [T, N] output
    T,          # rows
    eps,        # LayerNorm epsilon
    K: tl.constexpr, N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LN: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # [BM]
    ks = tl.arange(0, BLOCK_K)                                 # [BK]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)             # [BN]
    rmask = rows < T
    kmask = ks < K
    cmask = cols < N

    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    if HAS_LN:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1) / K
        xc = tl.where(kmask[None, :], xf - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / K
        rstd = 1.0 / tl.sqrt(var + eps)
        g = tl.load(lnw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        be = tl.load(lnb_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        a = (xc * rstd[:, None] * g[None, :] + be[None, :]).to(w_ptr.dtype.element_ty)
    else:
        a = x.to(w_ptr.dtype.element_ty)

    # W^T tile [BK, BN]: element (k, n) = W[n, k]
    w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(a, w, input_precision="ieee")
    else:
        acc = tl.dot(a, w)
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(int(k)))


def ln_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor | None = None,
              ln_b: torch.Tensor | None = None, eps: float = 1e-5, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """[LayerNorm(x) if ln_w is given else x] @ w.T + b with one Triton kernel.

    x [T, K]; w [N, K]; b [N]; ln_w, ln_b [K] or None. Returns [T, N] in w's dtype (or `out`).
    K up to 512 (the whole reduction lives in one tile)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or b.shape != (w.shape[0],):
        raise ValueError(f"ln_linear: bad shapes x {tuple(x.shape)}, w {tuple(w.shape)}, b {tuple(b.shape)}")
    T, K = x.shape
    N = w.shape[0]
    if K > 512:
        raise ValueError(f"ln_linear: K={K} > 512 is not supported (one tile per reduction)")
    has_ln = ln_w is not None
    if ln_w is not None and (ln_b is None or ln_w.shape != (K,) or ln_b.shape != (K,)):
        raise ValueError("ln_linear: ln_w and ln_b must both be [K]")
    x, w, b = x.contiguous(), w.contiguous(), b.contiguous()
    if out is None:
        out = torch.empty(T, N, device=x.device, dtype=w.dtype)
    if T == 0:
        return out
    if ln_w is not None and ln_b is not None:  # both or neither: checked above
        lnw, lnb = ln_w.contiguous(), ln_b.contiguous()
    else:
        lnw = lnb = b
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _ln_linear_kernel[grid](x, lnw, lnb, w, b, out, int(T), float(eps),
                            K=int(K), N=int(N), BLOCK_K=_block_k(K), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                            HAS_LN=has_ln, IEEE=(w.dtype == torch.float32), num_warps=4)
    return out


def ln_qkv(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor,
           eps: float) -> torch.Tensor:
    """LayerNorm(x) @ w_qkv.T + b_qkv: x [T, d] -> qkv [T, 3d] (one kernel)."""
    return ln_linear(x, w_qkv, b_qkv, ln_w, ln_b, eps)


def linear_rows_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.linear with rows padded to MIN_GEMM_ROWS (CPU GEMMs round differently for tiny row counts)."""
    m = x.shape[0]
    if m >= MIN_GEMM_ROWS:
        return F.linear(x, w, b)
    return F.linear(torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - m, x.shape[1])]), w, b)[:m]


def ln_linear_reference(x, w, b, ln_w=None, ln_b=None, eps: float = 1e-5) -> torch.Tensor:
    """Torch reference of `ln_linear` (the CPU path)."""
    h = F.layer_norm(x, (x.shape[1],), ln_w, ln_b, eps) if ln_w is not None else x
    return linear_rows_reference(h.to(w.dtype), w, b)


def ln_qkv_reference(x, ln_w, ln_b, w_qkv, b_qkv, eps: float) -> torch.Tensor:
    """Torch reference of `ln_qkv`: F.linear(F.layer_norm(x), w_qkv, b_qkv)."""
    return ln_linear_reference(x, w_qkv, b_qkv, ln_w, ln_b, eps)


def _variants():
    out = []
    for dt in ("*fp16", "*fp32"):
        for K, N, has_ln in ((64, 192, True), (128, 384, True), (256, 768, True), (30, 64, False), (128, 32, False)):
            sig = {"x_ptr": dt, "lnw_ptr": dt, "lnb_ptr": dt, "w_ptr": dt, "b_ptr": dt, "out_ptr": dt,
                   "T": "i32", "eps": "fp32", "K": "constexpr", "N": "constexpr", "BLOCK_K": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HAS_LN": "constexpr", "IEEE": "constexpr"}
            const = {"K": K, "N": N, "BLOCK_K": _block_k(K), "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                     "HAS_LN": has_ln, "IEEE": dt == "*fp32"}
            out.append((_ln_linear_kernel, sig, const, f"ln_linear {dt[1:]} K={K} N={N} ln={int(has_ln)}",
                        dict(num_warps=4)))
    return out


#: (kernel, signature, constexprs, label, options) tuples for uwrt.kernels.compile_check (sm_80 / sm_90).
COMPILE_VARIANTS = _variants()
