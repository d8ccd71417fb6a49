"""Encoder epilogue: final LayerNorm + per-segment mean + newest-token gather, one Triton kernel.

x [T, d] (the residual stream after the last layer) and int32 cu_seqlens [B+1] on the device ->
pooled [B, 2d] float32 = [mean over the segment of LN(x), LN(x) of the segment's first token]
(the newest event; uwrt.runtime.encoders.torch_encoder.SequenceEncoder's pooling). The pooling head's linear layer
then runs through uwrt.kernels.ln_qkv.ln_linear.

Why a kernel: torch's `index_add_` on CUDA sums with atomics (order varies from run to run) and
a padded reduction's launch shape depends on the batch, so neither is batch invariant. Here one
program per segment walks its own rows from its own start in fixed BLOCK_T chunks, in order:
a segment's result depends only on its own tokens. Empty segments (batch-bucket padding) give
zeros; rows after cu[B] are never read. Math in fp32.

Thread safety: stateless launchers; safe from any thread (torch's stream rules apply).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_T = 16


@triton.jit
def _pool_kernel(
    x_ptr,      # [T, D] residual stream
    lnw_ptr,    # [D] final LayerNorm weight
    lnb_ptr,    # [D]
    cu_ptr,     # int32 [B+1] segment offsets
    out_ptr,    # fp32 [B, 2*D]: mean | newest
    eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    g = tl.load(lnw_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    be = tl.load(lnb_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    newest = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < end
        x = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        h = xc * (1.0 / tl.sqrt(var + eps))[:, None] * g[None, :] + be[None, :]
        total += tl.sum(tl.where(rmask[:, None], h, 0.0), axis=0)
        newest += tl.sum(tl.where((rows == start)[:, None], h, 0.0), axis=0)
    n = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + b * (2 * D) + ds, total / n, mask=dmask)
    tl.store(out_ptr + b * (2 * D) + D + ds, newest, mask=dmask)


def pool_segments(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                  cu_seqlens: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """[segment mean of LN(x), LN(x)[segment start]] -> float32 [B, 2d]; no host sync.

    x [T, d]; cu_seqlens int32 [B+1] on x's device (empty segments allowed, give zeros)."""
    T, D = x.shape
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != x.device:
        raise ValueError("pool_segments: cu_seqlens must be int32 [B+1] on x's device")
    if ln_w.shape != (D,) or ln_b.shape != (D,):
        raise ValueError("pool_segments: ln_w and ln_b must be [d]")
    B = cu_seqlens.shape[0] - 1
    if out is None:
        out = torch.empty(B, 2 * D, device=x.device, dtype=torch.float32)
    if B == 0:
        return out
    _pool_kernel[(B,)](x.contiguous(), ln_w.contiguous(), ln_b.contiguous(), cu_seqlens.contiguous(), out,
                       float(eps), D=int(D), BLOCK_D=max(16, triton.next_power_of_2(int(D))), BLOCK_T=BLOCK_T,
                       num_warps=2)
    return out


def pool_segments_reference(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                            cu_seqlens_host) -> torch.Tensor:
    """Torch reference of `pool_segments` (float32; empty segments give zeros)."""
    cu = np.asarray(cu_seqlens_host, dtype=np.int64)
    h = F.layer_norm(x.float(), (x.shape[1],), ln_w.float(), ln_b.float(), eps)
    lens = np.diff(cu)
    B, D = len(lens), x.shape[1]
    seg = torch.from_numpy(np.repeat(np.arange(B), lens)).to(x.device)
    total = torch.zeros(B, D, dtype=torch.float32, device=x.device).index_add_(0, seg, h[: int(cu[-1])])
    mean = total / torch.from_numpy(np.maximum(lens, 1)).to(x.device, torch.float32)[:, None]
    starts = torch.from_numpy(np.minimum(cu[:-1], max(x.shape[0] - 1, 0))).to(x.device)
    newest = torch.where(torch.from_numpy(lens > 0).to(x.device)[:, None], h[starts], 0.0)
    return torch.cat([mean, newest], dim=1)


def _variants():
    out = []
    for dt in ("*fp16", "*fp32"):
        for D in (64, 128, 256):
            sig = {"x_ptr": dt, "lnw_ptr": dt, "lnb_ptr": dt, "cu_ptr": "*i32", "out_ptr": "*fp32", "eps": "fp32",
                   "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_T": "constexpr"}
            out.append((_pool_kernel, sig, {"D": D, "BLOCK_D": D, "BLOCK_T": BLOCK_T},
                        f"pool_segments {dt[1:]} D={D}", dict(num_warps=2)))
    return out


#: (kernel, signature, constexprs, label, options) tuples for uwrt.kernels.compile_check (sm_80 / sm_90).
COMPILE_VARIANTS = _variants()
