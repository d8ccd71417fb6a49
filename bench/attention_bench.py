#!/usr/bin/env python3
"""Varlen attention forward: Triton kernel vs torch SDPA (padded + key mask, nested/jagged) vs
the torch reference, on generator length mixes and fixed shapes, with the roofline floor.

    python bench/attention_bench.py --device cpu  [--json OUT] [--reps 20]
    python bench/attention_bench.py --device cuda [--json OUT] [--dtype float16]

Every provider maps packed qkv [T, 3*H*Dh] + cu_seqlens to packed out [T, H*Dh] (what the encoder
needs), so padding/unpadding is part of the padded providers' cost; `sdpa_padded_core` also times
the SDPA call alone on pre-padded [B, H, Lmax, Dh] tensors. Providers:
  triton            uwrt.kernels.attention (cuda: compiled; cpu: the interpreter on ONE tiny case only,
                    marked "interpreter": a smoke run whose time means nothing)
  triton_graph      (cuda) the same launch captured once in a CUDA graph and replayed: the kernel
                    without Python launch overhead, as the graph-captured encoder runs it
  torch_reference   uwrt.kernels.reference.varlen_attention (power-of-two length buckets + SDPA + mask)
  sdpa_padded       pad to [B, H, Lmax, Dh], SDPA with a key padding mask, unpad
  sdpa_nested       SDPA on nested (jagged) tensors; "unsupported" rows say why where it cannot run
Cases: lengths of featurized generator histories (min(len, max_history=128), >= 1 token; a
lognormal stand-in with the same shape if the generator cannot load) at batch 1, 8, 32, 64, and
fixed shapes. Timing: median and p99 over --reps after warm-up (not reported), CUDA events on GPU.
Roofline floor per case: max(bytes / peak bandwidth, FLOPs / peak FLOP/s) with bytes = T * 4d *
elem (read q, k, v, write out) and FLOPs = 4 * d * sum(n_i^2) (QK^T and PV; attention's intensity
is ~n/2 FLOP/byte). Peaks: --peak-gbps / --peak-tflops, else measured here (device copy bandwidth;
a large matmul). Noisy shared machines: compare providers as ratios within one run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from uwrt.bench.meta import git_sha  # noqa: E402 - after ROOT is on sys.path (run as a script)

MAX_HISTORY = 128




def length_pool(n: int) -> tuple[np.ndarray, str]:
    """History lengths as the encoder sees them: min(len, MAX_HISTORY), an empty history -> 1 token."""
    try:
        from uwrt.demo.synth import generate
        lens = np.array([len(r.history.type) for r in generate(n, 3, id_prefix="ab-").requests])
        src = "generator"
    except Exception as e:  # noqa: BLE001 -- still a useful benchmark; said so in the output
        lens = np.round(np.random.default_rng(3).lognormal(np.log(12), 1.2, n))
        src = f"lognormal stand-in ({type(e).__name__})"
    return np.clip(lens, 1, MAX_HISTORY).astype(np.int64), src


def cases(pool: np.ndarray) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = [(f"generator B={b}", rng.choice(pool, size=b, replace=False)) for b in (1, 8, 32, 64)]
    out += [("fixed B=32 n=16", np.full(32, 16)), ("fixed B=8 n=128", np.full(8, 128)),
            ("fixed B=64 n=64", np.full(64, 64)), ("skewed B=16 1x128+15x8", np.array([128] + [8] * 15))]
    return out


# ----------------------------------------------------------------------------------------------
# Providers: f(qkv [T, 3d], cu device int32, cu host, H, Dh) -> [T, d]

def prov_triton(qkv, cu_d, cu_h, H, Dh):
    from uwrt.kernels.attention import attention
    return attention(qkv, cu_d, n_heads=H, head_dim=Dh, max_seqlen=int(np.diff(cu_h).max()))


def prov_reference(qkv, cu_d, cu_h, H, Dh):
    from uwrt.kernels.reference import varlen_attention
    T = qkv.shape[0]
    q, k, v = qkv.view(T, 3, H, Dh).unbind(1)
    return varlen_attention(q, k, v, cu_h).reshape(T, -1)


class Padded:
    """Gather/scatter indices for one case, built once on the host (not timed)."""

    def __init__(self, cu_h: np.ndarray, device):
        lens = np.diff(cu_h)
        self.B, self.L = len(lens), int(lens.max())
        ar = np.arange(self.L)[None, :]
        valid = ar < lens[:, None]
        self.idx = torch.from_numpy(cu_h[:-1, None] + np.minimum(ar, lens[:, None] - 1)).to(device)   # [B, L]
        self.valid = torch.from_numpy(valid).to(device)
        self.mask = self.valid[:, None, None, :]                                          # [B, 1, 1, L]

    def pad(self, qkv, H, Dh):
        T = qkv.shape[0]
        x = qkv.view(T, 3, H, Dh)[self.idx]                   # [B, L, 3, H, Dh]
        return x.permute(2, 0, 3, 1, 4).unbind(0)             # 3 x [B, H, L, Dh]

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def prov_padded_factory(cu_h, device):
    P = Padded(cu_h, device)

    def run(qkv, cu_d, cu_h_, H, Dh):
        o = P.core(*P.pad(qkv, H, Dh))                        # [B, H, L, Dh]
        return o.transpose(1, 2)[P.valid].reshape(qkv.shape[0], -1)
    return run, P


def prov_nested(qkv, cu_d, cu_h, H, Dh):
    T = qkv.shape[0]
    offsets = torch.from_numpy(cu_h.astype(np.int64)).to(qkv.device)
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
               for t in qkv.view(T, 3, H, Dh).unbind(1))     # [B, H, j, Dh]
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).values().reshape(T, -1)


def graph_provider(qkv, cu_d, cu_h, H, Dh):
    """Capture one attention launch (static qkv/cu/out) in a CUDA graph; the provider replays it."""
    try:
        prov_triton(qkv, cu_d, cu_h, H, Dh)                   # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = prov_triton(qkv, cu_d, cu_h, H, Dh)
    except Exception as e:  # noqa: BLE001 -- reported as this provider's failure
        err = e

        def failed(*_):
            raise RuntimeError(f"graph capture failed: {type(err).__name__}: {err}")
        return failed

    def run(*_):
        g.replay()
        return out
    return run


# ----------------------------------------------------------------------------------------------
# Timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, reps: int, warmup: int) -> list[float]:
    """Per-call times in microseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def measure_peaks(device, dtype, args) -> tuple[float, float, str]:
    """(bytes/s, FLOP/s, note): from flags, else measured (copy of 256 MiB; a 4096^2 / 2048^2 matmul)."""
    notes = []
    if args.peak_gbps:
        bw = args.peak_gbps * 1e9
        notes.append("bandwidth from --peak-gbps")
    else:
        n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        ts = time_fn(lambda: dst.copy_(src), device, reps=5, warmup=2)
        bw = 2 * src.numel() * 4 / (min(ts) * 1e-6)
        notes.append("bandwidth measured (device copy)")
    if args.peak_tflops:
        fl = args.peak_tflops * 1e12
        notes.append("FLOP/s from --peak-tflops")
    else:
        m = 4096 if device.type == "cuda" else 1024
        a = torch.rand(m, m, device=device, dtype=dtype)
        ts = time_fn(lambda: a @ a, device, reps=3, warmup=1)
        fl = 2 * m ** 3 / (min(ts) * 1e-6)
        notes.append(f"FLOP/s measured ({m}^2 {str(dtype).split('.')[-1]} matmul)")
    return bw, fl, "; ".join(notes)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None,
                    help="float16 | bfloat16 | float32 (default: float16 on cuda, float32 on cpu)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per provider and case (default cuda 100, cpu 10)")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="write rows + environment here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"    # before uwrt.kernels.attention (imported below) defines its kernels
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (100 if device.type == "cuda" else 10)
    H, Dh = args.heads, args.head_dim
    d = H * Dh
    elem = torch.tensor([], dtype=dtype).element_size()
    torch.manual_seed(0)

    from uwrt.kernels.attention import attention_reference, interpreting
    pool, src = length_pool(2000)
    bw, fl, peak_note = measure_peaks(device, dtype, args)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton=__import__("triton").__version__, python=platform.python_version(),
               git=git_sha(), dtype=str(dtype), heads=H, head_dim=Dh, reps=reps, lengths=src,
               interpreter=interpreting(), peak_gbps=bw / 1e9, peak_tflops=fl / 1e12, peak_note=peak_note,
               torch_threads=torch.get_num_threads())
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    hdr = f"{'case':24s} {'B':>3s} {'T':>5s} {'maxn':>4s} {'provider':18s} {'med_us':>9s} {'p99_us':>9s} " \
          f"{'GB/s':>7s} {'floor_us':>8s} {'x_floor':>8s} {'relerr':>8s}"
    print(hdr)
    for name, lens in cases(pool):
        lens = np.asarray(lens, dtype=np.int64)
        cu_h = np.zeros(len(lens) + 1, np.int64)
        cu_h[1:] = np.cumsum(lens)
        T = int(cu_h[-1])
        qkv = torch.randn(T, 3 * d, device=device, dtype=dtype)
        cu_d = torch.from_numpy(cu_h.astype(np.int32)).to(device)
        nbytes = T * 4 * d * elem
        flops = 4 * d * float((lens ** 2).sum())
        floor_us = max(nbytes / bw, flops / fl) * 1e6
        ref = attention_reference(qkv, cu_h, H, Dh)
        padded, P = prov_padded_factory(cu_h, device)
        provs = [("torch_reference", prov_reference), ("sdpa_padded", padded), ("sdpa_nested", prov_nested)]
        if device.type == "cuda" and not interpreting():
            provs.insert(0, ("triton", prov_triton))
        if device.type == "cuda" and not interpreting():
            provs.insert(1, ("triton_graph", graph_provider(qkv, cu_d, cu_h, H, Dh)))
        for pname, fn in provs:
            row = dict(case=name, B=len(lens), T=T, max_n=int(lens.max()), sum_n2=int((lens ** 2).sum()),
                       provider=pname, bytes=nbytes, flops=flops, floor_us=floor_us)
            try:
                with torch.no_grad():
                    err = rel_err(fn(qkv, cu_d, cu_h, H, Dh), ref)
                    ts = time_fn(functools.partial(fn, qkv, cu_d, cu_h, H, Dh), device, reps, warmup=3)
            except Exception as e:  # noqa: BLE001 -- e.g. nested SDPA unsupported here: report, go on
                row.update(status=f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                rows.append(row)
                print(f"{name:24s} {len(lens):3d} {T:5d} {int(lens.max()):4d} {pname:18s} {row['status']}")
                continue
            med, p99 = statistics.median(ts), float(np.percentile(ts, 99))
            row.update(status="ok", median_us=med, p99_us=p99, gbps=nbytes / (med * 1e-6) / 1e9,
                       x_floor=med / floor_us, rel_err=err)
            rows.append(row)
            print(f"{name:24s} {len(lens):3d} {T:5d} {int(lens.max()):4d} {pname:18s} {med:9.1f} {p99:9.1f} "
                  f"{row['gbps']:7.2f} {floor_us:8.2f} {row['x_floor']:8.1f} {err:8.1e}")
        # SDPA alone on pre-padded inputs: the padded baseline's kernel cost without pad/unpad
        q, k, v = (t.contiguous() for t in P.pad(qkv, H, Dh))
        with torch.no_grad():
            ts = time_fn(functools.partial(P.core, q, k, v), device, reps, warmup=3)
        med, p99 = statistics.median(ts), float(np.percentile(ts, 99))
        rows.append(dict(case=name, B=len(lens), T=T, max_n=int(lens.max()), sum_n2=int((lens ** 2).sum()),
                         provider="sdpa_padded_core", bytes=nbytes, flops=flops, floor_us=floor_us, status="ok",
                         median_us=med, p99_us=p99, gbps=nbytes / (med * 1e-6) / 1e9, x_floor=med / floor_us,
                         padding_waste=len(lens) * int(lens.max()) ** 2 / float((lens ** 2).sum())))
        print(f"{name:24s} {len(lens):3d} {T:5d} {int(lens.max()):4d} {'sdpa_padded_core':18s} {med:9.1f} {p99:9.1f} "
              f"{rows[-1]['gbps']:7.2f} {floor_us:8.2f} {rows[-1]['x_floor']:8.1f} {'':>8s}  "
              f"(B*max^2/sum n^2 = {rows[-1]['padding_waste']:.1f})")

    if device.type == "cpu" and interpreting():
        # The Triton kernel through the interpreter: one tiny case, correctness smoke only.
        lens = np.array([5, 40])
        cu_h = np.array([0, 5, 45])
        qkv = torch.randn(45, 3 * d, dtype=torch.float32)
        t0 = time.perf_counter()
        out = prov_triton(qkv, torch.from_numpy(cu_h.astype(np.int32)), cu_h, H, Dh)
        dt_us = (time.perf_counter() - t0) * 1e6
        err = rel_err(out, attention_reference(qkv, cu_h, H, Dh))
        rows.append(dict(case="tiny B=2 [5, 40]", B=2, T=45, max_n=40, provider="triton", status="interpreter",
                         median_us=dt_us, rel_err=err))
        print(f"{'tiny B=2 [5, 40]':24s} {2:3d} {45:5d} {40:4d} {'triton':18s} {dt_us:9.0f} (interpreter, 1 call: "
              f"time meaningless) relerr {err:.1e}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
