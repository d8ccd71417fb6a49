"""The sequence encoder: a small pre-LayerNorm Transformer over packed event histories.

Per event: type embedding + hashed-MCC embedding + numeric features -> linear to d_model;
`n_layers` pre-LN blocks (attention within each request's segment only, GELU MLP); final
LayerNorm; pooled as [masked mean, newest event] -> linear -> `emb_dim` embedding that the tree
stage consumes. No positional encoding: order enters through the time features (gap, age).

`TorchEncoderBackend` (eager torch) implements `uwrt.runtime.encoders.base.EncoderBackend`;
the TorchScript, ONNX Runtime and Triton backends compute the same function.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uwrt.kernels.reference import segment_mean, varlen_attention
from uwrt.runtime.bundle.schema import EncoderConfig, check_state_dict
from uwrt.runtime.featurize import PackedEvents

log = logging.getLogger("uwrt.encoder")

#: CPU GEMM kernels take different code paths (and round differently) for a handful of row
#: counts below this (measured: 1-3, 5-7, 9-11 rows differ from the same rows inside a larger
#: matrix). Padding every linear layer's input to at least this many rows makes a request's
#: result independent of how many other requests share its batch.
#: tests/runtime/encoders/test_torch_encoder.py checks it.
MIN_GEMM_ROWS = 16


def linear_rows(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for x [M, in], with M padded to MIN_GEMM_ROWS so the result is batch invariant."""
    m = x.shape[0]
    if m >= MIN_GEMM_ROWS:
        return layer(x)
    pad = x.new_zeros(MIN_GEMM_ROWS - m, x.shape[1])
    return layer(torch.cat([x, pad]))[:m]


class EncoderLayerParams(nn.Module):
    """One pre-LN block's parameters (the names bundle weights use), without a forward: the eager
    `EncoderLayer` and the TorchScript backend's layer add forwards with different signatures."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, d)


class EncoderLayer(EncoderLayerParams):
    """One pre-LN block in eager torch (ragged attention from the host `cu_seqlens`)."""

    def forward(self, x: torch.Tensor, cu_seqlens: np.ndarray) -> torch.Tensor:
        # x: [T, d]
        T = x.shape[0]
        # q, k, v: each [T, H, Dh]
        q, k, v = linear_rows(self.ln1(x), self.qkv).view(T, 3, self.n_heads, self.head_dim).unbind(1)
        a = varlen_attention(q, k, v, cu_seqlens).reshape(T, -1)
        x = x + linear_rows(a, self.out)
        return x + linear_rows(F.gelu(linear_rows(self.ln2(x), self.fc1)), self.fc2)


class SequenceEncoderParams(nn.Module):
    """The encoder's parameters (the names bundle weights use), without a forward: `SequenceEncoder`
    is the eager model; the TorchScript backend's module adds a forward with another signature."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # type ids: 0 = 'no history' token, 1..n_event_types-1 = EventType, n_event_types = [MASK] (training)
        self.type_emb = nn.Embedding(cfg.n_event_types + 1, cfg.type_emb_dim)
        self.mcc_emb = nn.Embedding(cfg.mcc_buckets, cfg.mcc_emb_dim)
        self.in_proj = nn.Linear(cfg.type_emb_dim + cfg.mcc_emb_dim + cfg.n_numeric, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.pool = nn.Linear(2 * cfg.d_model, cfg.emb_dim)

    @property
    def mask_type_id(self) -> int:
        return self.cfg.n_event_types


class SequenceEncoder(SequenceEncoderParams):
    """Packed events -> (embedding [B, emb_dim], hidden states [T, d_model])."""

    def forward(self, type_ids: torch.Tensor, mcc_ids: torch.Tensor, numeric: torch.Tensor,
                cu_seqlens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # type_ids, mcc_ids: [T] int64; numeric: [T, n_numeric]; cu_seqlens: host int [B+1]
        x = torch.cat([self.type_emb(type_ids), self.mcc_emb(mcc_ids), numeric], dim=-1)
        x = linear_rows(x, self.in_proj)                                 # [T, d]
        for layer in self.layers:
            x = layer(x, cu_seqlens)
        h = self.final_ln(x)                                  # [T, d]
        newest = torch.from_numpy(np.asarray(cu_seqlens[:-1], dtype=np.int64)).to(h.device)
        pooled = torch.cat([segment_mean(h, cu_seqlens), h[newest]], dim=-1)  # [B, 2d]
        return linear_rows(pooled, self.pool), h

    def encode_packed(self, ev: PackedEvents) -> torch.Tensor:
        """Embedding [B, emb_dim] for a PackedEvents batch (float32, module's device)."""
        dev = self.pool.weight.device
        emb, _ = self(torch.from_numpy(ev.type_ids).to(dev), torch.from_numpy(ev.mcc_ids).to(dev),
                      torch.from_numpy(ev.numeric).to(dev), ev.cu_seqlens)
        return emb


class TorchEncoderBackend:
    """CPU (or any torch device) encoder in float32 eager torch.

    Not safe to call concurrently from several threads (torch intra-op threads are shared);
    the serving worker calls it from one thread.
    """
    name = "torch"

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor], *, device: str = "cpu") -> None:
        check_state_dict(cfg, state)
        self.cfg = cfg
        self.model = SequenceEncoder(cfg)
        self.model.load_state_dict(state, strict=True)
        self.model.to(device).eval()
        self.device = device

    def encode(self, events: PackedEvents) -> np.ndarray:
        if events.batch_size == 0:
            return np.zeros((0, self.cfg.emb_dim), np.float32)
        with torch.inference_mode():
            emb = self.model.encode_packed(events)
        return emb.to("cpu", torch.float32).numpy()
