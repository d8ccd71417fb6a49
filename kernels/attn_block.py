"""Attention + output projection + bias + residual + LayerNorm in one Triton kernel, plus its reference.

The middle launch of an encoder layer (runtime/encoders/torch_encoder.py's EncoderLayer):
    a      = attention within each segment of qkv           [T, d]   (d = H * Dh)
    x_new  = x + a @ W_out^T + b_out                          [T, d]   (returned, the residual stream)
    h      = LayerNorm(x_new; ln2 weight, bias, eps)          [T, d]   (returned, the MLP's input)
Each program owns a block of query rows of one segment and computes ALL heads for them (the same
flat grid, segment lookup and per-segment short/long paths as uwrt.kernels.attention; see its
docstring), accumulating head h's contribution a_h @ W_out[:, h*Dh:(h+1)*Dh]^T into an fp32
[rows, d] tile, so the out-projection, residual and LayerNorm happen in registers; `a` never
touches memory. Rows [cu[B], T) that belong to no segment get a = 0: x_new = x + b_out,
h = LayerNorm(x_new) (finite whenever x is). The long path here takes BLOCK_M = 32 query rows per
program (the [rows, d] fp32 tile must fit in registers for d up to 256).

x_new may be written in place over x (`out_x=x`): every program reads its rows of x before it
writes them, and no two programs share rows. Batch invariant like uwrt.kernels.attention.

Thread safety: stateless; safe from any thread.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from uwrt.kernels.attention import (
    BLOCK_S,
    LOG2E,
    NUM_STAGES,
    _head_long,
    _head_short,
    _locate,
    attention_reference,
    b_pad,
    check_inputs,
    dot_precision,
    grid_size,
)

#: Query rows per program on the long path (segments longer than BLOCK_S) and key block size.
BLOCK_M = 32
BLOCK_N = 64


def key_block(dtype: torch.dtype, head_dim: int) -> int:
    """Long-path key block: 32 for fp32 at head dim 32 (its exact-fp32 dots spill ~0.5 KB/thread at
    64 on sm_80/sm_90, `compile_check --full --ptxas-info`), else BLOCK_N. Model-level, never
    batch-dependent."""
    return 32 if dtype == torch.float32 and head_dim == 32 else BLOCK_N


def num_warps_for(d_model: int) -> int:
    """Warps per program: a function of the model width only (never of the batch)."""
    return 8 if d_model > 128 else 4


@triton.jit
def _proj_head(a, w_ptr, h, DH: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
               acc):
    """acc + a @ W[:, h*DH:(h+1)*DH]^T for a fp32 [R, DH]; W [D, D] row-major ([out, in])."""
    d = tl.arange(0, DH)
    c = tl.arange(0, D_PAD)
    wt = tl.load(w_ptr + c[None, :] * D + (h * DH + d)[:, None], mask=(c < D)[None, :], other=0.0)   # [DH, D_PAD]
    return tl.dot(a.to(wt.dtype), wt, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def _residual_ln_store(y, rows, rmask, x_ptr, stride_x, b_ptr, lnw_ptr, lnb_ptr, xo_ptr, stride_xo, ho_ptr,
                       stride_ho, eps, D: tl.constexpr, D_PAD: tl.constexpr):
    """x_new = x + y + b -> xo; LayerNorm(x_new) -> ho, for rows [R] (masked by rmask), in fp32."""
    c = tl.arange(0, D_PAD)
    cmask = c < D
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + c[None, :], mask=m2, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    xn = x + y + b[None, :]                                               # padded columns stay 0
    tl.store(xo_ptr + rows[:, None] * stride_xo + c[None, :], xn.to(xo_ptr.dtype.element_ty), mask=m2)
    mean = tl.sum(xn, axis=1) / D
    xc = tl.where(cmask[None, :], xn - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(lnw_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    hn = xc * rstd[:, None] * w[None, :] + lb[None, :]
    tl.store(ho_ptr + rows[:, None] * stride_ho + c[None, :], hn.to(ho_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _attn_block_kernel(
    qkv_ptr,        # [T, 3*D] q | k | v per row, head-major
    x_ptr,          # [T, D] residual stream in
    w_ptr,          # [D, D] out-projection weight (nn.Linear layout [out, in]), contiguous
    b_ptr,          # [D] out-projection bias
    lnw_ptr,        # [D] LayerNorm weight
    lnb_ptr,        # [D] LayerNorm bias
    xo_ptr,         # [T, D] x_new out (may be x_ptr)
    ho_ptr,         # [T, D] LayerNorm(x_new) out
    cu_ptr,         # int32 [n_seqs + 1]
    n_seqs, n_tokens,
    stride_qkv, stride_x, stride_xo, stride_ho,
    qk_scale,       # softmax scale * log2(e)
    eps,            # LayerNorm epsilon
    H: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, B_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    D: tl.constexpr = H * DH
    pid = tl.program_id(0)
    s, start, end, j = _locate(cu_ptr, n_seqs, n_tokens, pid, BLOCK_S, B_PAD)
    n = end - start
    if s < n_seqs:
        if n <= BLOCK_S:
            if (j == 0) & (n > 0):
                rows = start + tl.arange(0, BLOCK_S)
                rmask = rows < end
                y = tl.zeros([BLOCK_S, D_PAD], tl.float32)
                for h in range(H):
                    a = _head_short(qkv_ptr, stride_qkv, rows, rmask, h, qk_scale, H, DH, DOT_PRECISION)
                    y = _proj_head(a, w_ptr, h, DH, D, D_PAD, DOT_PRECISION, y)
                _residual_ln_store(y, rows, rmask, x_ptr, stride_x, b_ptr, lnw_ptr, lnb_ptr, xo_ptr, stride_xo,
                                   ho_ptr, stride_ho, eps, D, D_PAD)
        else:
            if ((j % (BLOCK_M // BLOCK_S)) == 0) & (j * BLOCK_S < n):
                rows = start + j * BLOCK_S + tl.arange(0, BLOCK_M)
                rmask = rows < end
                y = tl.zeros([BLOCK_M, D_PAD], tl.float32)
                for h in range(H):
                    a = _head_long(qkv_ptr, stride_qkv, rows, rmask, start, end, h, qk_scale,
                                   H, DH, BLOCK_M, BLOCK_N, DOT_PRECISION)
                    y = _proj_head(a, w_ptr, h, DH, D, D_PAD, DOT_PRECISION, y)
                _residual_ln_store(y, rows, rmask, x_ptr, stride_x, b_ptr, lnw_ptr, lnb_ptr, xo_ptr, stride_xo,
                                   ho_ptr, stride_ho, eps, D, D_PAD)
    else:
        rows = start + j * BLOCK_S + tl.arange(0, BLOCK_S)
        rmask = rows < end
        y = tl.zeros([BLOCK_S, D_PAD], tl.float32)
        _residual_ln_store(y, rows, rmask, x_ptr, stride_x, b_ptr, lnw_ptr, lnb_ptr, xo_ptr, stride_xo,
                           ho_ptr, stride_ho, eps, D, D_PAD)


# ----------------------------------------------------------------------------------------------
# Host side

def attn_block(qkv: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor, w_out: torch.Tensor,
               b_out: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, *, eps: float, n_heads: int,
               head_dim: int, max_seqlen: int, sm_scale: float | None = None, out_x: torch.Tensor | None = None,
               out_h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h) = (x + attention(qkv) @ w_out^T + b_out, LayerNorm(x_new)) in one launch.

    qkv [T, 3d] and cu_seqlens as for uwrt.kernels.attention.attention (same checks, no sync); x, out_x,
    out_h [T, d] with unit column stride; w_out [d, d] contiguous; b_out, ln_weight, ln_bias [d];
    all tensors share qkv's dtype and device. out_x may be x itself (in place). Grid and constants
    depend only on (T, B, dtype, H, Dh): capture-safe.
    """
    check_inputs(qkv, cu_seqlens, n_heads, head_dim, max_seqlen)
    T, d = qkv.shape[0], n_heads * head_dim
    dt, dev = qkv.dtype, qkv.device

    def _check(name, t, shape, contiguous=False):
        if t.shape != shape or t.dtype != dt or t.device != dev or (t.dim() == 2 and t.stride(-1) != 1) \
                or ((contiguous or t.dim() == 1) and not t.is_contiguous()):
            raise ValueError(f"{name} must be {list(shape)} {dt} on {dev}{' contiguous' if contiguous else ''}, "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")

    _check("x", x, (T, d))
    _check("w_out", w_out, (d, d), contiguous=True)
    for name, t in (("b_out", b_out), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check(name, t, (d,))
    out_x = torch.empty(T, d, dtype=dt, device=dev) if out_x is None else out_x
    out_h = torch.empty(T, d, dtype=dt, device=dev) if out_h is None else out_h
    _check("out_x", out_x, (T, d))
    _check("out_h", out_h, (T, d))
    if T == 0:
        return out_x, out_h
    n_seqs = cu_seqlens.shape[0] - 1
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
    _attn_block_kernel[(grid_size(T, n_seqs),)](
        qkv, x, w_out, b_out, ln_weight, ln_bias, out_x, out_h, cu_seqlens, n_seqs, T,
        qkv.stride(0), x.stride(0), out_x.stride(0), out_h.stride(0), scale * LOG2E, float(eps),
        H=n_heads, DH=head_dim, D_PAD=triton.next_power_of_2(d), B_PAD=b_pad(n_seqs), BLOCK_S=BLOCK_S,
        BLOCK_M=BLOCK_M, BLOCK_N=key_block(dt, head_dim), DOT_PRECISION=dot_precision(dt),
        num_warps=num_warps_for(d), num_stages=NUM_STAGES)
    return out_x, out_h


def attn_block_reference(qkv: torch.Tensor, x: torch.Tensor, cu_seqlens_host, w_out: torch.Tensor,
                         b_out: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                         n_heads: int, head_dim: int, *, sm_scale: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle for `attn_block`: (x_new, h), rows in no segment with attention output 0."""
    a = attention_reference(qkv, cu_seqlens_host, n_heads, head_dim, sm_scale=sm_scale)     # [T, d] f64
    x_new = x.double() + a @ w_out.double().T + b_out.double()
    h = F.layer_norm(x_new, (x_new.shape[1],), ln_weight.double(), ln_bias.double(), eps)
    return x_new, h


# ----------------------------------------------------------------------------------------------
# Compile-only variants for uwrt.kernels.compile_check (format: see kernels/compile_check.py).

def _variant(dtype: torch.dtype, H: int, DH: int, bp: int) -> tuple:
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    sig = {a: ptr for a in ("qkv_ptr", "x_ptr", "w_ptr", "b_ptr", "lnw_ptr", "lnb_ptr", "xo_ptr", "ho_ptr")}
    sig.update({"cu_ptr": "*i32", "n_seqs": "i32", "n_tokens": "i32", "stride_qkv": "i32", "stride_x": "i32",
                "stride_xo": "i32", "stride_ho": "i32", "qk_scale": "fp32", "eps": "fp32"})
    const = dict(H=H, DH=DH, D_PAD=triton.next_power_of_2(H * DH), B_PAD=bp, BLOCK_S=BLOCK_S, BLOCK_M=BLOCK_M,
                 BLOCK_N=key_block(dtype, DH), DOT_PRECISION=dot_precision(dtype))
    sig.update({k: "constexpr" for k in const})
    label = f"attn_block {str(dtype).split('.')[-1]} H={H} Dh={DH} B_PAD={bp}"
    return (_attn_block_kernel, sig, const, label, dict(num_warps=num_warps_for(H * DH), num_stages=NUM_STAGES))


COMPILE_VARIANTS = [
    _variant(torch.float16, 4, 16, 16),       # the demo encoder (d 64)
    _variant(torch.float16, 3, 16, 512),      # d 48: padded columns
    _variant(torch.float16, 8, 32, 64),       # d 256
    _variant(torch.bfloat16, 4, 16, 16),
    _variant(torch.float32, 4, 16, 16),
]
COMPILE_VARIANTS_EXTRA = [
    _variant(torch.float16, 4, 64, 64),
    _variant(torch.float32, 8, 32, 16),
]
