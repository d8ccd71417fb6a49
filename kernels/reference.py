"""Pure-torch reference ops over the packed (ragged, unpadded) token layout.

These are the CPU serving path and the oracle the fused kernels are tested against. They
accept autograd (the demo trainer uses them), run on any device, and never read device
tensors on the host: `cu_seqlens` arrives as a host numpy array.

Thread safety: stateless functions; safe from any thread.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Segments are grouped into padded buckets of these lengths for batched SDPA; a segment
#: always lands in the same bucket whatever else is in the batch (batch invariance).
MIN_BUCKET = 8


def bucket_length(n: int) -> int:
    """Padded length used for a segment of n tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (int(n) - 1).bit_length())


def bucket_plan(cu_seqlens: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per length bucket: (gather [Bk, L] token ids, valid [Bk, L] bool) for padded batched attention.

    Pad slots gather a real token of their own segment (its last one) and are masked as keys;
    every segment must have >= 1 token."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    starts, lens = cu[:-1], np.diff(cu)
    if (lens < 1).any():
        raise ValueError("every segment needs at least one token")
    buckets = np.array([bucket_length(n) for n in lens], dtype=np.int64)
    plan = []
    for L in np.unique(buckets):
        sel = np.flatnonzero(buckets == L)
        ar = np.arange(L)[None, :]
        plan.append((starts[sel, None] + np.minimum(ar, lens[sel, None] - 1), ar < lens[sel, None]))
    return plan


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: np.ndarray) -> torch.Tensor:
    """Softmax attention within each segment of a packed batch (bidirectional, no mask across segments).

    q, k, v:     [T, H, Dh]  packed tokens
    cu_seqlens:  int [B+1] host array; every segment must have >= 1 token
    returns:     [T, H, Dh]

    Segments are padded into power-of-two length buckets and run through SDPA with a key
    padding mask; padded query rows are computed and discarded (they always see >= 1 valid key,
    so no NaN ever appears).
    """
    out = torch.empty_like(q)
    for idx, valid in bucket_plan(cu_seqlens):
        idx_t = torch.from_numpy(idx).to(q.device)
        mask = torch.from_numpy(valid).to(q.device)
        qb, kb, vb = (x[idx_t].transpose(1, 2) for x in (q, k, v))      # [Bk, H, L, Dh]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None, None, :])
        ob = ob.transpose(1, 2)                                         # [Bk, L, H, Dh]
        out[torch.from_numpy(idx[valid]).to(q.device)] = ob[mask]
    return out


def segment_mean(x: torch.Tensor, cu_seqlens: np.ndarray) -> torch.Tensor:
    """Mean of x [T, D] over each segment -> [B, D]."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lens = np.diff(cu)
    seg = torch.from_numpy(np.repeat(np.arange(len(lens)), lens)).to(x.device)
    total = torch.zeros(len(lens), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seg, x)
    return total / torch.from_numpy(lens).to(x.device, x.dtype)[:, None]
