#!/usr/bin/env python3
"""Whole-encoder forward time per backend and batch size, over generator length mixes.

    python bench/encoder_bench.py --device cpu  [--json OUT] [--batches 1,8,32,64,256] [--reps 30]
    python bench/encoder_bench.py --device cuda [--json OUT]

Each timed call is one `encode(PackedEvents)`: host arrays in, float32 embeddings out (H2D copies,
the forward and the D2H copy with its sync included: what the pipeline pays). Batches are drawn
from featurized generator requests (bundles/demo weights and schema), a fresh draw per rep.
Reports median and p99 in microseconds per batch, after warm-up reps that are not reported
(CUDA-graph capture and Triton compilation are reported apart, as `warmup_s`).

Backends: cpu: torch (eager), torchscript, triton via the interpreter (one tiny case, marked
"interpreter": a correctness smoke, its time means nothing). cuda: torch eager, torch with padded
SDPA ([B, L] batch, key mask; the usual padded baseline), triton fp16 eager (no graphs), triton
fp16 with CUDA graphs, triton fp32 with CUDA graphs; plus the fp16 vs fp32 difference in
embeddings and in the tree stage's probability of default.
Noisy shared machines: compare backends as ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from uwrt.bench.meta import git_sha  # noqa: E402 - after ROOT is on sys.path (run as a script)


def load_pool(bundle_dir: str, n: int):
    """(cfg, state, PackedEvents pool, FeatureBatch or None, bundle or None, source note).

    Featurized generator requests with the bundle's weights; if the bundle or the generator cannot
    load here (e.g. a GPU host whose protobuf differs), a synthetic pool with the generator's length
    mix (p50 ~15, p90 ~65, max 128) and random weights, said so in the output."""
    try:
        from uwrt.demo.synth import generate
        from uwrt.runtime.bundle.bundle import load_bundle
        from uwrt.runtime.featurize import featurize
        bundle = load_bundle(bundle_dir)
        fb, _ = featurize(generate(n, 5, id_prefix="b-").requests, bundle.schema, bundle.encoder_config)
        return bundle.encoder_config, bundle.encoder_state(), fb.events, fb, bundle, "generator + " + bundle_dir
    except Exception as e:  # noqa: BLE001 -- benchmark still useful on synthetic data; reported
        import torch

        from uwrt.runtime.bundle.schema import EncoderConfig
        from uwrt.runtime.encoders.torch_encoder import SequenceEncoder
        from uwrt.runtime.featurize import PackedEvents
        cfg = EncoderConfig()
        torch.manual_seed(0)
        state = SequenceEncoder(cfg).state_dict()
        rng = np.random.default_rng(5)
        lens = np.clip(np.round(rng.lognormal(np.log(15), 1.1, n)), 1, cfg.max_history).astype(np.int64)
        T = int(lens.sum())
        cu = np.zeros(n + 1, np.int32)
        cu[1:] = np.cumsum(lens)
        ev = PackedEvents(rng.integers(1, cfg.n_event_types, T).astype(np.int64),
                          rng.integers(0, cfg.mcc_buckets, T).astype(np.int64),
                          rng.normal(size=(T, cfg.n_numeric)).astype(np.float32), cu, int(lens.max()))
        return cfg, state, ev, None, None, f"synthetic lengths, random weights ({type(e).__name__}: {e})"


def padded_sdpa_backend(cfg, state, device):
    """Torch baseline that pads the batch to [B, max_len] and runs SDPA with a key mask."""
    import torch
    import torch.nn.functional as F

    from uwrt.runtime.encoders.torch_encoder import SequenceEncoder

    m = SequenceEncoder(cfg)
    m.load_state_dict(state)
    m.to(device).eval()

    class Padded:
        name = "torch-padded-sdpa"

        def encode(self, ev):
            with torch.inference_mode():
                lens = ev.lengths
                B, L, H, Dh = len(lens), int(lens.max()), cfg.n_heads, cfg.head_dim
                pos = np.arange(L)[None, :]
                valid = pos < lens[:, None]
                gather = np.where(valid, ev.cu_seqlens[:-1, None] + pos, 0)
                g = torch.from_numpy(gather).to(device)
                mask = torch.from_numpy(valid).to(device)

                def t(a):
                    return torch.from_numpy(a).to(device)

                x = torch.cat([m.type_emb(t(ev.type_ids)), m.mcc_emb(t(ev.mcc_ids)), t(ev.numeric)], -1)
                x = m.in_proj(x)[g]                                    # [B, L, d]
                for lay in m.layers:
                    qkv = lay.qkv(lay.ln1(x)).view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
                    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask[:, None, None, :])
                    x = x + lay.out(a.transpose(1, 2).reshape(B, L, -1))
                    x = x + lay.fc2(F.gelu(lay.fc1(lay.ln2(x))))
                h = m.final_ln(x)
                mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                return m.pool(torch.cat([mean, h[:, 0]], -1)).float().cpu().numpy()

    return Padded()


def draw_batches(pool, batch: int, count: int, rng) -> list:
    n = pool.batch_size
    return [pool.select(rng.choice(n, size=batch, replace=batch > n)) for _ in range(count)]


def time_backend(be, batches: list, warm: int) -> dict:
    """Median / p99 / min microseconds per encode over batches[warm:] (batches[:warm] not timed)."""
    times = []
    for i, ev in enumerate(batches):
        t0 = time.perf_counter()
        be.encode(ev)
        dt = time.perf_counter() - t0
        if i >= warm:
            times.append(dt * 1e6)
    times.sort()
    return {"median_us": statistics.median(times), "p99_us": times[min(len(times) - 1, int(0.99 * len(times)))],
            "min_us": times[0], "reps": len(times), "tokens_mean": float(np.mean([b.n_tokens for b in batches]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--bundle", default=os.path.join(ROOT, "bundles", "demo"))
    ap.add_argument("--batches", default="1,8,32,64,256")
    ap.add_argument("--reps", type=int, default=None, help="timed reps per case (default cpu 5, cuda 200)")
    ap.add_argument("--n", type=int, default=400, help="generator requests in the pool")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before any kernels module is imported
    import torch

    from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend

    if args.device == "cuda" and not torch.cuda.is_available():
        print("encoder_bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b]
    reps = args.reps or (5 if args.device == "cpu" else 200)
    warm = 1 if args.device == "cpu" else 20
    if args.device == "cpu":
        torch.set_num_threads(1)       # shared 2-core machine: one intra-op thread keeps timings comparable
    cfg, state, pool, fb, bundle, source = load_pool(args.bundle, args.n)
    rows, t_start = [], time.perf_counter()
    meta = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "git": git_sha(), "data": source, "encoder": cfg.to_dict(),
            "pool_lengths_p50_p90_max": [float(np.percentile(pool.lengths, 50)), float(np.percentile(pool.lengths, 90)),
                                         int(pool.lengths.max())]}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"data: {source}; lengths p50/p90/max {meta['pool_lengths_p50_p90_max']}")

    # The same pre-drawn batches for every backend (fair comparison; graphs captured up front).
    rng = np.random.default_rng(0)
    drawn = {bs: draw_batches(pool, bs, warm + (reps if bs < 256 else max(reps // 4, 5)), rng) for bs in batches}
    from uwrt.runtime.encoders.triton_encoder import TritonEncoderBackend
    backends = []
    if args.device == "cpu":
        from uwrt.runtime.encoders.torchscript_encoder import TorchScriptEncoderBackend
        backends = [("torch", TorchEncoderBackend(cfg, state), batches),
                    ("torchscript", TorchScriptEncoderBackend(cfg, state), batches)]
    else:
        backends = [("torch-eager-cuda", TorchEncoderBackend(cfg, state, device="cuda"), batches),
                    ("torch-padded-sdpa-cuda", padded_sdpa_backend(cfg, state, "cuda"), batches)]
        for name, dt, graphs in (("triton-fp16-eager", torch.float16, False),
                                 ("triton-fp16-graphs", torch.float16, True),
                                 ("triton-fp32-graphs", torch.float32, True)):
            be = TritonEncoderBackend(cfg, state, device="cuda", dtype=dt, cuda_graphs=graphs)

            def bb(n, bk):
                return next((x for x in bk if x >= n), None)

            shapes = sorted({(bb(ev.batch_size, be.batch_buckets), bb(ev.n_tokens, be.token_buckets))
                             for evs in drawn.values() for ev in evs} - {(None, None)})
            shapes = [s for s in shapes if None not in s]
            t0 = time.perf_counter()
            be.warmup(shapes)
            meta[f"{name}.warmup_s"] = round(time.perf_counter() - t0, 2)
            meta[f"{name}.warmup_shapes"] = len(shapes)
            print(f"{name}: warm-up (compile{' + graph capture' if graphs else ''}) of {len(shapes)} shapes "
                  f"in {meta[f'{name}.warmup_s']} s", flush=True)
            backends.append((name, be, batches))

    for name, be, bs_list in backends:
        for bs in bs_list:
            r = time_backend(be, drawn[bs], warm)
            r.update(backend=name, batch=bs)
            rows.append(r)
            print(f"{name:24s} B={bs:4d} tokens~{r['tokens_mean']:7.0f}  median {r['median_us']:9.0f} us  "
                  f"p99 {r['p99_us']:9.0f} us", flush=True)
    if args.device == "cuda":
        base = {r["batch"]: r["median_us"] for r in rows if r["backend"] == "torch-eager-cuda"}
        for r in rows:
            r["speedup_vs_torch_eager"] = base[r["batch"]] / r["median_us"]

    if args.device == "cpu":
        # Triton in the interpreter: one tiny case, a correctness smoke (its time means nothing).
        tri = TritonEncoderBackend(cfg, state, device="cpu", dtype=torch.float32)
        ev = pool.select(np.flatnonzero(pool.lengths <= 8)[:4])
        t0 = time.perf_counter()
        got = tri.encode(ev)
        meta["triton_interpreter_smoke_s"] = round(time.perf_counter() - t0, 2)
        diff = float(np.abs(got - backends[0][1].encode(ev)).max())
        meta["triton_interpreter_vs_torch_max_abs"] = diff
        print(f"triton via the interpreter (fp32, {ev.batch_size} short requests; correctness smoke, time "
              f"meaningless: {meta['triton_interpreter_smoke_s']} s): max abs diff vs torch {diff:.2e}")
    else:
        e16 = next(b for n, b, _ in backends if n == "triton-fp16-graphs")
        e32 = next(b for n, b, _ in backends if n == "triton-fp32-graphs")
        eref = backends[0][1]
        sel = np.arange(min(256, pool.batch_size))
        ev = pool.select(sel)
        out = {tag: be.encode(ev) for tag, be in (("fp16", e16), ("fp32", e32), ("torch", eref))}
        pd = {}
        try:
            from uwrt.runtime.featurize import FeatureBatch
            from uwrt.runtime.pipeline import Pipeline
            pipe = Pipeline(bundle, encoder=eref)
            sub = FeatureBatch(list(sel), [fb.request_ids[i] for i in sel], ev, fb.tabular[sel])
            for tag, emb in out.items():
                pd[tag] = 1 / (1 + np.exp(-pipe.trees.predict_margin(pipe.model_rows(sub, emb))))
        except Exception as e:  # noqa: BLE001 -- e.g. no xgboost on the GPU host: embeddings only
            meta["pd_note"] = f"no PD comparison: {type(e).__name__}: {e}"
            print(meta["pd_note"])
        for a, b in (("fp16", "fp32"), ("fp32", "torch"), ("fp16", "torch")):
            meta[f"{a}_vs_{b}_emb_max_abs"] = float(np.abs(out[a] - out[b]).max())
            line = f"{a} vs {b}: embedding max abs {meta[f'{a}_vs_{b}_emb_max_abs']:.2e}"
            if pd:
                meta[f"{a}_vs_{b}_pd_max_abs"] = float(np.abs(pd[a] - pd[b]).max())
                line += f", PD max abs {meta[f'{a}_vs_{b}_pd_max_abs']:.2e}"
            print(line)
        meta["triton_fp16_graphs_stats"] = {k: v for k, v in e16.stats().items() if k != "dispatch"}
        meta["dispatch"] = e16.stats()["dispatch"]
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"total {meta['total_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
