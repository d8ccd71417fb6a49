"""TorchScript CPU encoder: the same math as `SequenceEncoder`, run as one compiled graph.

Why: eager torch re-acquires the GIL after each of its ~100 ops per forward, so in the server
the model thread waits on the event loop at every op (measured: the encoder ran 2-10x slower in
the server than offline; bench/RESULTS.md). A scripted module's forward runs in the TorchScript
interpreter with the GIL released for the whole call.

The host plans the ragged attention once per batch (`attention_plan`: gather indices, key masks
and scatter targets per length bucket, from the host `cu_seqlens`: no device reads); the graph
takes them as tensors. Parameter names equal `SequenceEncoder`'s, so bundle weights load as is.
tests/runtime/encoders/test_torch_encoder.py compares this backend with the eager one and with the float64 reference.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uwrt.kernels.reference import bucket_plan
from uwrt.runtime.bundle.schema import EncoderConfig, check_state_dict
from uwrt.runtime.encoders.torch_encoder import MIN_GEMM_ROWS, EncoderLayerParams, SequenceEncoderParams
from uwrt.runtime.featurize import PackedEvents

assert MIN_GEMM_ROWS == 16, "update the literal in _lin"


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.linear with rows padded to MIN_GEMM_ROWS (16) (batch invariance; see
    uwrt.runtime.encoders.torch_encoder.linear_rows)."""
    m = x.shape[0]
    if m >= 16:
        return F.linear(x, w, b)
    pad = torch.zeros(16 - m, x.shape[1], dtype=x.dtype, device=x.device)
    return F.linear(torch.cat([x, pad]), w, b)[:m]


class _Layer(EncoderLayerParams):
    """EncoderLayer's parameters; a forward TorchScript compiles (attention planned on the host)."""

    def forward(self, x: torch.Tensor, idx: list[torch.Tensor], mask: list[torch.Tensor],
                valid: list[torch.Tensor], dest: list[torch.Tensor]) -> torch.Tensor:
        # x: [T, d]; per bucket i: idx [Bk, L] token ids, mask [Bk, 1, 1, L], valid [n] flat ids into
        # [Bk * L], dest [n] token ids (the same tokens, in the same order as valid)
        T = x.shape[0]
        qkv = _lin(self.ln1(x), self.qkv.weight, self.qkv.bias).view(T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                    # [T, H, Dh]
        a = torch.empty_like(q)
        for i in range(len(idx)):
            qb = q[idx[i]].transpose(1, 2)                            # [Bk, H, L, Dh]
            kb = k[idx[i]].transpose(1, 2)
            vb = v[idx[i]].transpose(1, 2)
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[i])
            ob = ob.transpose(1, 2).reshape(-1, self.n_heads, self.head_dim)   # [Bk * L, H, Dh]
            a[dest[i]] = ob[valid[i]]
        x = x + _lin(a.reshape(T, -1), self.out.weight, self.out.bias)
        return x + _lin(F.gelu(_lin(self.ln2(x), self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


class ScriptableEncoder(SequenceEncoderParams):
    """`SequenceEncoder`'s parameters (same names, so bundle weights load as is) with a forward
    that returns the embedding only, in a form TorchScript compiles."""
    __jit_unused_properties__ = ["mask_type_id"]
    __jit_ignored_attributes__ = ["cfg"]

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.n_layers)])

    def forward(self, type_ids: torch.Tensor, mcc_ids: torch.Tensor, numeric: torch.Tensor,
                idx: list[torch.Tensor], mask: list[torch.Tensor], valid: list[torch.Tensor],
                dest: list[torch.Tensor], seg: torch.Tensor, lens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.type_emb(type_ids), self.mcc_emb(mcc_ids), numeric], dim=-1)
        x = _lin(x, self.in_proj.weight, self.in_proj.bias)
        for layer in self.layers:
            x = layer(x, idx, mask, valid, dest)
        h = self.final_ln(x)                                          # [T, d]
        total = torch.zeros(lens.shape[0], h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, seg, h)
        pooled = torch.cat([total / lens, h[starts]], dim=-1)         # [B, 2d]
        return _lin(pooled, self.pool.weight, self.pool.bias)


#: idx, mask, valid, dest (one tensor per length bucket), then seg [T], lens [B, 1], starts [B]
AttentionPlan = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                      torch.Tensor, torch.Tensor, torch.Tensor]


def attention_plan(cu_seqlens: np.ndarray) -> AttentionPlan:
    """Host-side plan of the ragged attention and pooling (same buckets as uwrt.kernels.reference)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    starts, lens = cu[:-1], np.diff(cu)
    idx: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    dest: list[torch.Tensor] = []
    for gather, ok in bucket_plan(cu):
        idx.append(torch.from_numpy(gather))
        mask.append(torch.from_numpy(ok)[:, None, None, :])
        valid.append(torch.from_numpy(np.flatnonzero(ok.reshape(-1))))
        dest.append(torch.from_numpy(gather[ok]))
    seg = torch.from_numpy(np.repeat(np.arange(len(lens)), lens))
    return idx, mask, valid, dest, seg, torch.from_numpy(lens.astype(np.float32))[:, None], torch.from_numpy(starts)


class TorchScriptEncoderBackend:
    """CPU encoder as a TorchScript graph: releases the GIL for the whole forward.

    Not safe to call concurrently from several threads (shared intra-op pool); the serving
    worker calls it from one thread."""
    name = "torchscript"

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor]) -> None:
        check_state_dict(cfg, state)
        self.cfg = cfg
        m = ScriptableEncoder(cfg)
        m.load_state_dict(state, strict=True)
        with warnings.catch_warnings():
            # torch 2.13 marks torch.jit.script deprecated (in favour of torch.compile / export);
            # it still compiles and runs. The ONNX Runtime backend (its own issue) is the successor.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.script.*")
            self.model = torch.jit.script(m.eval())

    def encode(self, events: PackedEvents) -> np.ndarray:
        if events.batch_size == 0:
            return np.zeros((0, self.cfg.emb_dim), np.float32)
        plan = attention_plan(events.cu_seqlens)
        with torch.inference_mode():
            emb = self.model(torch.from_numpy(events.type_ids), torch.from_numpy(events.mcc_ids),
                             torch.from_numpy(events.numeric), *plan)
        return emb.numpy()
