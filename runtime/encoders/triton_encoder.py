"""Triton encoder backend: the SequenceEncoder forward as ~3 fused kernels per layer, replayed
from CUDA graphs.

Forward over packed tokens (same math as uwrt.runtime.encoders.torch_encoder.SequenceEncoder):
  prologue   embedding gathers + concat + in_proj                      (uwrt.kernels.prologue)
  per layer  LN1 + QKV + bias                                          (uwrt.kernels.ln_qkv)
             attention + out-proj + bias + residual + LN2              (uwrt.kernels.attn_block)
             fc1 + GELU + fc2 + bias + residual                        (uwrt.kernels.mlp)
  epilogue   final LN + segment mean + newest token                    (uwrt.kernels.epilogue)
             pooling head linear (fp32)                                (uwrt.kernels.ln_qkv.ln_linear)
Each op goes through uwrt.kernels.dispatch (impl="auto": Triton when it can run, else the counted,
logged torch reference).

Shapes are bucketed: B up to the next batch bucket (empty trailing segments), T up to the next
token bucket (rows past cu[B] belong to no segment; attention writes them as zeros). One CUDA
graph per (batch bucket, token bucket) holds static device buffers; `encode` fills pinned host
staging, copies it in with non-blocking copies, replays the graph and copies the embedding back:
cu_seqlens and max length come from the host (PackedEvents), so the forward never syncs; the one
sync is at the end, to read the result. Batches over the largest batch bucket run in chunks.

Batch invariance: every kernel computes a row / segment from its own data with fixed tiles (no
split-K, no atomics, no batch-dependent launch choice); padding never mixes with real rows. So a
request's embedding is bit-identical alone or in any batch, in any bucket.

Weights: layers and prologue in `dtype` (fp16 default; fp32 for interpreter tests), accumulation
in fp32; final LayerNorm and pooling head in fp32. On device="cpu" it runs the kernels in the
Triton interpreter (TRITON_INTERPRET=1, tests) without graphs.

Thread safety: not safe for concurrent `encode` calls (shared static buffers and staging); the
serving worker calls it from one thread. `warmup` must not run concurrently with `encode`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from uwrt.kernels import dispatch as K
from uwrt.runtime.bundle.schema import EncoderConfig, check_state_dict
from uwrt.runtime.featurize import PackedEvents

log = logging.getLogger("uwrt.encoder")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


@dataclass
class _Static:
    """Static buffers for one (batch bucket B, token bucket T) shape, and (on CUDA) its graph.

    Inputs live in ONE byte buffer per side (pinned host `hbuf`, device `dbuf`, same layout:
    type_ids int64 [T] | mcc_ids int64 [T] | numeric f32 [T, n_numeric] | cu_seqlens int32 [B+1]),
    so each encode uploads with a single non-blocking copy. `n_*` are numpy views of the host side
    (cheap fills), `type_ids`/`mcc_ids`/`numeric`/`cu` typed views of the device side."""
    B: int
    T: int
    hbuf: torch.Tensor
    dbuf: torch.Tensor
    n_type: np.ndarray
    n_mcc: np.ndarray
    n_num: np.ndarray
    n_cu: np.ndarray
    type_ids: torch.Tensor
    mcc_ids: torch.Tensor
    numeric: torch.Tensor
    cu: torch.Tensor
    out: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = field(default=0)


class TritonEncoderBackend:
    """EncoderBackend over the fused Triton kernels (see module docstring)."""
    name = "triton"

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor], *, device: str = "cuda",
                 dtype: torch.dtype = torch.float16, cuda_graphs: bool = True,
                 batch_buckets: tuple[int, ...] = BATCH_BUCKETS, token_buckets: tuple[int, ...] = TOKEN_BUCKETS,
                 impl: str = "auto") -> None:
        check_state_dict(cfg, state)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"TritonEncoderBackend(device={device!r}): CUDA is not available on this machine "
                               f"(torch {torch.__version__}); use the CPU encoder backends")
        if dev.type not in ("cuda", "cpu"):
            raise ValueError(f"TritonEncoderBackend: unsupported device {device!r} (cuda or cpu)")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"TritonEncoderBackend: dtype must be float16, bfloat16 or float32, got {dtype}")
        if impl not in K.IMPLS:
            raise ValueError(f"impl must be one of {K.IMPLS}, got {impl!r}")
        if not batch_buckets or list(batch_buckets) != sorted(set(batch_buckets)) or batch_buckets[0] < 1:
            raise ValueError(f"batch_buckets must be increasing positive ints, got {batch_buckets}")
        if not token_buckets or list(token_buckets) != sorted(set(token_buckets)) or token_buckets[0] < 1:
            raise ValueError(f"token_buckets must be increasing positive ints, got {token_buckets}")
        self.cfg, self.device, self.dtype, self.impl = cfg, dev, dtype, impl
        self.batch_buckets, self.token_buckets = tuple(batch_buckets), tuple(token_buckets)
        self.cuda_graphs = bool(cuda_graphs) and dev.type == "cuda"
        if dev.index is None and dev.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())

        def p(name, dt=dtype):
            return state[name].detach().to(self.device, dt).contiguous()

        self.type_emb, self.mcc_emb = p("type_emb.weight"), p("mcc_emb.weight")
        self.in_w, self.in_b = p("in_proj.weight"), p("in_proj.bias")
        self.layers = []
        for i in range(cfg.n_layers):
            pre = f"layers.{i}."
            self.layers.append({k: p(pre + k) for k in (
                "ln1.weight", "ln1.bias", "qkv.weight", "qkv.bias", "out.weight", "out.bias",
                "ln2.weight", "ln2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")})
        f32 = torch.float32
        self.fln_w, self.fln_b = p("final_ln.weight", f32), p("final_ln.bias", f32)
        self.pool_w, self.pool_b = p("pool.weight", f32), p("pool.bias", f32)
        if self.cuda_graphs:
            why = K.triton_blocker("attn_block", self.in_w) if impl != "torch" else "impl='torch'"
            if why is not None:
                # Counted in stats()["graphs_disabled"]; the eager path still serves.
                log.warning("triton encoder: CUDA graphs disabled: not every op can run as a Triton kernel (%s)", why)
                self.cuda_graphs = False
        self.graphs_disabled = bool(cuda_graphs) and dev.type == "cuda" and not self.cuda_graphs
        self._static: dict[tuple[int, int], _Static] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None   # one CUDA graph memory pool, made at first capture
        self.counters = {"encode": 0, "graph_replays": 0, "eager_runs": 0, "captures": 0, "chunks": 0,
                         "no_graph_shape": 0}

    # ------------------------------------------------------------------------------------------
    # The forward (static shapes; no host reads of device memory)

    def _forward(self, type_ids: torch.Tensor, mcc_ids: torch.Tensor, numeric: torch.Tensor,
                 cu: torch.Tensor, cu_host: np.ndarray | None) -> torch.Tensor:
        # type_ids, mcc_ids: int64 [T]; numeric: fp32 [T, n_numeric]; cu: int32 [B+1] on device
        cfg, impl, eps = self.cfg, self.impl, self.cfg.ln_eps
        H, Dh, T = cfg.n_heads, cfg.head_dim, type_ids.shape[0]
        x = K.prologue(type_ids, mcc_ids, numeric, self.type_emb, self.mcc_emb, self.in_w, self.in_b,
                       impl=impl)                                                      # [T, d]
        for L in self.layers:
            qkv = K.ln_linear(x, L["qkv.weight"], L["qkv.bias"], L["ln1.weight"], L["ln1.bias"], eps, impl=impl)
            x, h = K.attn_block(qkv, x, L["out.weight"], L["out.bias"], L["ln2.weight"], L["ln2.bias"], eps,
                                cu, cu_host, n_heads=H, head_dim=Dh, max_seqlen=T, impl=impl)
            x = K.mlp(h, x, L["fc1.weight"], L["fc1.bias"], L["fc2.weight"], L["fc2.bias"], impl=impl)
        pooled = K.pool_segments(x, self.fln_w, self.fln_b, eps, cu, cu_host, impl=impl)  # fp32 [B, 2d]
        return K.ln_linear(pooled, self.pool_w, self.pool_b, impl=impl)                  # fp32 [B, emb]

    # ------------------------------------------------------------------------------------------
    # Static buffers and graphs

    def _new_static(self, B: int, T: int) -> _Static:
        dev, pin = self.device, self.device.type == "cuda"
        n_num = self.cfg.n_numeric
        o_mcc = _align(8 * T)
        o_num = o_mcc + _align(8 * T)
        o_cu = o_num + _align(4 * T * n_num)
        total = o_cu + _align(4 * (B + 1))
        hbuf = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        dbuf = torch.zeros(total, dtype=torch.uint8, device=dev)

        def views(buf):
            return (buf[:8 * T].view(torch.int64), buf[o_mcc:o_mcc + 8 * T].view(torch.int64),
                    buf[o_num:o_num + 4 * T * n_num].view(torch.float32).view(T, n_num),
                    buf[o_cu:o_cu + 4 * (B + 1)].view(torch.int32))

        st = _Static(B, T, hbuf, dbuf, *(v.numpy() for v in views(hbuf)), *views(dbuf))
        if pin:
            st.h_out = torch.zeros(B, self.cfg.emb_dim, dtype=torch.float32, pin_memory=True)
        return st

    def _stage(self, st: _Static, ev: PackedEvents) -> np.ndarray:
        """Fill the host staging buffer from `ev` (padded to st.B segments / st.T rows); returns host cu."""
        B, T = ev.batch_size, ev.n_tokens
        # The kernels gather embedding rows without bounds checks (no device-side asserts, no sync):
        # check the ids on the host (microseconds) so a bad id is a clear error, not a wild read.
        for name, ids, n in (("type_ids", ev.type_ids, self.type_emb.shape[0]),
                             ("mcc_ids", ev.mcc_ids, self.mcc_emb.shape[0])):
            if T and (int(ids.min()) < 0 or int(ids.max()) >= n):
                raise ValueError(f"{name} out of range [0, {n}): min {int(ids.min())}, max {int(ids.max())}")
        if ev.numeric.shape != (T, self.cfg.n_numeric):
            raise ValueError(f"numeric must be [{T}, {self.cfg.n_numeric}], got {ev.numeric.shape}")
        st.n_type[:T] = ev.type_ids
        st.n_type[T:] = 0
        st.n_mcc[:T] = ev.mcc_ids
        st.n_mcc[T:] = 0
        st.n_num[:T] = ev.numeric
        st.n_num[T:] = 0
        st.n_cu[: B + 1] = ev.cu_seqlens
        st.n_cu[B + 1:] = T                                  # empty trailing segments
        return st.n_cu.copy()

    def _upload(self, st: _Static) -> None:
        # Pinned staging: one asynchronous H2D copy, no sync (ordered before the replay on this stream).
        st.dbuf.copy_(st.hbuf, non_blocking=self.device.type == "cuda")

    def _capture(self, st: _Static) -> None:
        """Warm the kernels for this shape (Triton compiles on first launch), then capture a graph."""
        # A valid dummy batch: st.B segments sharing the first st.T rows as evenly as possible.
        lens = np.full(st.B, max(st.T // st.B, 1), dtype=np.int64)
        cu = np.zeros(st.B + 1, np.int32)
        cu[1:] = np.minimum(np.cumsum(lens), st.T)
        rng = np.random.default_rng(0)
        st.n_type[:] = rng.integers(0, self.cfg.n_event_types, st.T)
        st.n_mcc[:] = rng.integers(0, self.cfg.mcc_buckets, st.T)
        st.n_num[:] = rng.normal(size=(st.T, self.cfg.n_numeric))
        st.n_cu[:] = cu
        self._upload(st)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._forward(st.type_ids, st.mcc_ids, st.numeric, st.cu, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        # Graphs share one memory pool: replays are serial and each result is copied out before
        # the next replay.
        with torch.cuda.graph(g, pool=self._pool), torch.no_grad():
            st.out = self._forward(st.type_ids, st.mcc_ids, st.numeric, st.cu, None)
        st.graph = g
        self.counters["captures"] += 1

    def _static_for(self, B: int, T: int) -> _Static:
        st = self._static.get((B, T))
        if st is None:
            st = self._static[(B, T)] = self._new_static(B, T)
        if self.cuda_graphs and st.graph is None:
            t0 = time.perf_counter()
            self._capture(st)
            log.info("triton encoder: captured CUDA graph for batch bucket %d, token bucket %d in %.0f ms",
                     B, T, 1e3 * (time.perf_counter() - t0))
        return st

    def reachable_shapes(self) -> list[tuple[int, int]]:
        """(batch bucket, token bucket) pairs some batch maps to: B in (previous batch bucket, Bb],
        T in (previous token bucket, Tb], B <= T <= B * max_history (featurize keeps at most
        max_history tokens per request)."""
        out = []
        for i, b in enumerate(self.batch_buckets):
            b_lo = self.batch_buckets[i - 1] + 1 if i else 1
            for j, tb in enumerate(self.token_buckets):
                t_lo = self.token_buckets[j - 1] + 1 if j else 1
                if tb >= b_lo and t_lo <= b * self.cfg.max_history:
                    out.append((b, tb))
        return out

    def warmup(self, shapes: list[tuple[int, int]] | None = None) -> dict:
        """Compile the kernels and (on CUDA with cuda_graphs) capture one graph per shape.

        shapes: (batch bucket, token bucket) pairs; default every pair that a batch can reach
        (batch bucket <= token bucket <= batch bucket * max_history). Returns a summary dict."""
        t0 = time.perf_counter()
        if shapes is None:
            shapes = self.reachable_shapes()
        for B, T in shapes:
            if B not in self.batch_buckets or T not in self.token_buckets:
                raise ValueError(f"warmup shape {(B, T)} is not a (batch bucket, token bucket) pair")
            st = self._static_for(B, T)
            if not self.cuda_graphs:
                # Eager paths compile on first use: run a dummy batch once.
                lens = np.full(B, max(T // B, 1), dtype=np.int64)
                cu = np.zeros(B + 1, np.int32)
                cu[1:] = np.minimum(np.cumsum(lens), T)
                ev = PackedEvents(np.ones(int(cu[-1]), np.int64), np.zeros(int(cu[-1]), np.int64),
                                  np.ones((int(cu[-1]), self.cfg.n_numeric), np.float32), cu, int(lens.max()))
                self._run(st, ev)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"shapes": len(shapes), "graphs": self.counters["captures"], "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------
    # Serving

    def _run(self, st: _Static, ev: PackedEvents) -> np.ndarray:
        cu_host = self._stage(st, ev)
        self._upload(st)
        if st.graph is not None:
            assert st.out is not None  # _capture sets the graph's output tensor with the graph
            st.graph.replay()
            st.replays += 1
            self.counters["graph_replays"] += 1
            out = st.out
        else:
            self.counters["eager_runs"] += 1
            with torch.no_grad():
                out = self._forward(st.type_ids, st.mcc_ids, st.numeric, st.cu, cu_host)
        B = ev.batch_size
        if st.h_out is not None:
            st.h_out.copy_(out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()   # the one sync: the result to the host
            return st.h_out[:B].numpy().copy()
        return out[:B].to("cpu", torch.float32).numpy().copy()

    def encode(self, events: PackedEvents) -> np.ndarray:
        """Embeddings float32 [B, emb_dim] for a PackedEvents batch (see module docstring)."""
        B = events.batch_size
        if B == 0:
            return np.zeros((0, self.cfg.emb_dim), np.float32)
        self.counters["encode"] += 1
        maxb = self.batch_buckets[-1]
        if B > maxb:
            self.counters["chunks"] += 1
            return np.concatenate([self.encode(events.select(np.arange(i, min(i + maxb, B))))
                                   for i in range(0, B, maxb)])
        Bb = _bucket(B, self.batch_buckets)
        assert Bb is not None  # B <= the largest batch bucket (larger batches are chunked above)
        T = events.n_tokens
        Tb = _bucket(T, self.token_buckets)
        if Tb is None:
            # Beyond the largest token bucket: run once at the exact size without a graph.
            self.counters["no_graph_shape"] += 1
            log.warning("triton encoder: %d tokens exceed the largest token bucket %d; running without a graph",
                        T, self.token_buckets[-1])
            st = self._new_static(Bb, T)
            return self._run(st, events)
        st = self._static_for(Bb, Tb)
        return self._run(st, events)

    def stats(self) -> dict:
        """Backend counters plus uwrt.kernels.dispatch counters (fallbacks included)."""
        return {**self.counters, "graphs_disabled": self.graphs_disabled,
                "graphs": sum(s.graph is not None for s in self._static.values()), "dispatch": K.stats()}
