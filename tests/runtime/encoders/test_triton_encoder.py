"""TritonEncoderBackend vs the torch encoder (TorchEncoderBackend): same embeddings on edge lengths
and generator batches, batch invariance, bucketing/chunking paths, errors; GPU-only tests (CUDA
graphs, fp16) skip without CUDA.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (slow: batches stay small).
"""
import os

import numpy as np
import pytest
import torch

from tests.runtime.encoders.test_torch_encoder import random_packed, random_state
from uwrt.kernels import dispatch
from uwrt.runtime.bundle.schema import EncoderConfig
from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
from uwrt.runtime.encoders.triton_encoder import TritonEncoderBackend
from uwrt.runtime.featurize import PackedEvents, featurize

CFG = EncoderConfig()
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available() and not INTERP
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton kernels, CUDA graphs)")
ATOL = 1e-4


@pytest.fixture(scope="module")
def state():
    return random_state(CFG, 7)


@pytest.fixture(scope="module")
def ref(state):
    return TorchEncoderBackend(CFG, state)


@pytest.fixture(scope="module")
def tri(state):
    """fp32 Triton backend: interpreter on CPU, compiled (eager, no graphs) on a GPU."""
    return TritonEncoderBackend(CFG, state, device=DEV, dtype=torch.float32, cuda_graphs=False)


def concat(parts):
    return PackedEvents.concat(parts)


def test_matches_torch_on_edge_lengths(rng, ref, tri):
    ev = random_packed(rng.permutation([1, 7, 8, 9, 16, 17]), rng)
    got, want = tri.encode(ev), ref.encode(ev)
    assert got.shape == (6, CFG.emb_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_matches_torch_on_max_history(rng, ref, tri):
    """A history longer than max_history is cut to max_history (128) tokens by featurize: the
    longest segment the encoder sees (attention's long path, several key blocks)."""
    ev = random_packed([CFG.max_history], rng)
    np.testing.assert_allclose(tri.encode(ev), ref.encode(ev), atol=ATOL, rtol=0)


def test_matches_torch_on_generator_requests(request, traffic):
    """Featurized generator requests (the small bundle's weights), including a truncated long history."""
    pytest.importorskip("xgboost", reason="the small_bundle fixture trains the demo trees (xgboost)")
    from uwrt.runtime.bundle.bundle import load_bundle
    bundle = load_bundle(request.getfixturevalue("small_bundle"))
    cfg, state = bundle.encoder_config, bundle.encoder_state()
    fb, errors = featurize(traffic[:40], bundle.schema, cfg)
    assert not errors
    lens = fb.events.lengths
    rows = list(np.flatnonzero(lens <= 12)[:5]) + [int(np.argmax(lens))]
    ev = fb.events.select(rows)
    assert ev.lengths.max() == cfg.max_history                 # a truncated history is present
    want = TorchEncoderBackend(cfg, state).encode(ev)
    got = TritonEncoderBackend(cfg, state, device=DEV, dtype=torch.float32, cuda_graphs=False).encode(ev)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_batch_invariance(rng, tri):
    """A request's embedding alone == inside a batch (other buckets, other neighbours).

    Compiled kernels: bit-identical wherever it sits. Interpreter: bit-identical when it starts at
    the same row position modulo 16 (numpy's matmul rounds by position inside a tile); within a
    few float32 ulps otherwise (|diff| <= 1e-6 + 2e-6 * |value|: seed 2163798105 gave 1.07e-6 on 1.748)."""
    probe = random_packed([9], rng)
    alone = tri.encode(probe)
    aligned = concat([random_packed([5, 11], rng), probe, random_packed([3], rng)])    # probe starts at row 16
    np.testing.assert_array_equal(tri.encode(aligned)[2], alone[0])
    shifted = concat([random_packed([3, 2], rng), probe])                              # probe starts at row 5
    got = tri.encode(shifted)[2]
    if DEV == "cuda":
        np.testing.assert_array_equal(got, alone[0])
    else:
        np.testing.assert_allclose(got, alone[0], atol=1e-6, rtol=2e-6)


def test_chunks_batches_over_the_largest_bucket_and_runs_past_the_largest_token_bucket(rng, state, ref):
    b = TritonEncoderBackend(CFG, state, device=DEV, dtype=torch.float32, cuda_graphs=False,
                             batch_buckets=(1, 2), token_buckets=(16,))
    ev = random_packed([2, 5, 1, 3, 4], rng)                     # 3 chunks of <= 2 requests
    np.testing.assert_allclose(b.encode(ev), ref.encode(ev), atol=ATOL, rtol=0)
    assert b.stats()["chunks"] == 1 and b.stats()["encode"] == 4
    big = random_packed([9, 12], rng)                            # 21 tokens > largest token bucket
    np.testing.assert_allclose(b.encode(big), ref.encode(big), atol=ATOL, rtol=0)
    assert b.stats()["no_graph_shape"] == 1


def test_explicit_torch_impl_runs_without_triton(rng, state, ref, monkeypatch):
    """impl='torch' is the reference path on any machine (no interpreter needed)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset_stats()
    b = TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.float32, impl="torch")
    ev = random_packed([1, 17, 4], rng)
    np.testing.assert_allclose(b.encode(ev), ref.encode(ev), atol=ATOL, rtol=0)
    st = dispatch.stats()
    assert dispatch.fallbacks() == 0 and st["torch.attn_block"] == CFG.n_layers and not any(
        k.startswith("triton.") for k in st)


def test_auto_without_interpreter_on_cpu_falls_back_and_counts(rng, state, ref, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset_stats()
    b = TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.float32)
    ev = random_packed([3, 6], rng)
    np.testing.assert_allclose(b.encode(ev), ref.encode(ev), atol=ATOL, rtol=0)
    assert dispatch.fallbacks() == 3 + 3 * CFG.n_layers     # prologue, pooling, head linear + 3 per layer
    assert b.stats()["dispatch"]["fallback.mlp"] == CFG.n_layers
    with pytest.raises(dispatch.KernelUnavailable):
        TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.float32, impl="triton").encode(ev)


def test_empty_batch_and_bad_arguments(state):
    b = TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.float32)
    empty = PackedEvents(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, CFG.n_numeric), np.float32),
                         np.zeros(1, np.int32), 0)
    assert b.encode(empty).shape == (0, CFG.emb_dim)
    with pytest.raises(ValueError, match="batch_buckets"):
        TritonEncoderBackend(CFG, state, device="cpu", batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.int8)
    ev = random_packed([3, 2], np.random.default_rng(1))
    ev.mcc_ids[1] = CFG.mcc_buckets
    with pytest.raises(ValueError, match="mcc_ids out of range"):
        b.encode(ev)
    bad = dict(state)
    bad.pop("pool.bias")
    with pytest.raises(ValueError, match="missing"):
        TritonEncoderBackend(CFG, bad, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_device_without_cuda_raises(state):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        TritonEncoderBackend(CFG, state, device="cuda")


def test_reachable_shapes_cover_every_batch(state):
    b = TritonEncoderBackend(CFG, state, device="cpu", dtype=torch.float32)
    shapes = set(b.reachable_shapes())
    rng = np.random.default_rng(0)
    for _ in range(200):
        B = int(rng.integers(1, 257))
        T = int(rng.integers(B, B * CFG.max_history + 1))
        Bb = next(x for x in b.batch_buckets if x >= B)
        Tb = next((x for x in b.token_buckets if x >= T), None)
        assert Tb is None or (Bb, Tb) in shapes


# ----------------------------------------------------------------------------------------------
# GPU only

@gpu
def test_cuda_graphs_match_eager_and_reference(rng, state, ref):
    g = TritonEncoderBackend(CFG, state, device="cuda", dtype=torch.float32, cuda_graphs=True)
    e = TritonEncoderBackend(CFG, state, device="cuda", dtype=torch.float32, cuda_graphs=False)
    summary = g.warmup([(8, 64), (8, 128), (1, 16)])
    assert summary["graphs"] == 3
    for lens in ([1, 7, 8, 9, 16, 17], [3] * 8, [5]):
        ev = random_packed(lens, rng)
        got = g.encode(ev)
        np.testing.assert_array_equal(got, e.encode(ev))
        np.testing.assert_allclose(got, ref.encode(ev), atol=ATOL, rtol=0)
    assert g.stats()["graph_replays"] == 3 and g.stats()["dispatch"].get("fallback.attn_block", 0) == 0


@gpu
def test_cuda_graph_batch_invariance_across_buckets(rng, state):
    g = TritonEncoderBackend(CFG, state, device="cuda", dtype=torch.float16)
    probe = random_packed([23], rng)
    alone = g.encode(probe)[0]
    for n_other in (1, 6, 40, 200):
        other = random_packed(rng.integers(1, 129, n_other), rng)
        batch = concat([other.select(list(range(n_other // 2))), probe,
                        other.select(list(range(n_other // 2, n_other)))]) if n_other > 1 else concat([other, probe])
        pos = n_other // 2 if n_other > 1 else 1
        np.testing.assert_array_equal(g.encode(batch)[pos], alone)


@gpu
def test_fp16_close_to_fp32(rng, state):
    """fp16 weights/activations (fp32 accumulation) vs fp32: embeddings within 2e-2 abs."""
    ev = random_packed(rng.integers(1, 129, 32), rng)
    e16 = TritonEncoderBackend(CFG, state, device="cuda", dtype=torch.float16).encode(ev)
    e32 = TritonEncoderBackend(CFG, state, device="cuda", dtype=torch.float32).encode(ev)
    diff = np.abs(e16 - e32).max()
    print(f"fp16 vs fp32 max abs embedding diff {diff:.2e}")
    assert np.isfinite(e16).all() and diff < 2e-2
