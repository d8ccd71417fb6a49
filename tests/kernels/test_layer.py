"""Fused layer kernels (LN+linear/QKV, MLP, pooling epilogue) vs their torch references, and the
dispatch module's choice/fallback rules.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
on a GPU machine with TRITON_INTERPRET=0 the same tests run the compiled kernels.
"""
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uwrt.kernels import dispatch
from uwrt.kernels.epilogue import pool_segments, pool_segments_reference
from uwrt.kernels.ln_qkv import ln_linear, ln_linear_reference, ln_qkv, ln_qkv_reference
from uwrt.kernels.mlp import mlp, mlp_reference
from uwrt.kernels.prologue import prologue, prologue_reference

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-2}
T_VALUES = (1, 15, 16, 17, 33)


def t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=DEV)


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got - want).abs()
    bad = (err > tol * (1 + want.abs())).nonzero()
    assert len(bad) == 0, f"{len(bad)} mismatches, first at {bad[:5].tolist()}: max err {err.max().item():.3g}"


def layer_weights(rng, d, f, dtype):
    return dict(ln_w=t(1 + 0.2 * rng.normal(size=d), dtype), ln_b=t(0.2 * rng.normal(size=d), dtype),
                w_qkv=t(rng.normal(size=(3 * d, d)) / np.sqrt(d), dtype), b_qkv=t(0.2 * rng.normal(size=3 * d), dtype),
                w1=t(rng.normal(size=(f, d)) / np.sqrt(d), dtype), b1=t(0.2 * rng.normal(size=f), dtype),
                w2=t(rng.normal(size=(d, f)) / np.sqrt(f), dtype), b2=t(0.2 * rng.normal(size=d), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 48])
def test_ln_qkv_matches_reference(rng, dtype, d):
    w = layer_weights(rng, d, 2 * d, dtype)
    for T in T_VALUES:
        x = t(rng.normal(loc=0.3, scale=2.0, size=(T, d)), dtype)
        got = ln_qkv(x, w["ln_w"], w["ln_b"], w["w_qkv"], w["b_qkv"], 1e-5)
        assert got.shape == (T, 3 * d) and got.dtype == dtype
        f32 = {k: v.float() for k, v in w.items()}
        want = ln_qkv_reference(x.float(), f32["ln_w"], f32["ln_b"], f32["w_qkv"], f32["b_qkv"], 1e-5)
        close(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_without_layernorm_odd_sizes(rng, dtype):
    """The in_proj / pooling-head form: K not a power of two, N smaller than a column block."""
    for K, N in ((30, 64), (128, 32), (17, 100)):
        w, b = t(rng.normal(size=(N, K)) / np.sqrt(K), dtype), t(rng.normal(size=N), dtype)
        for T in (1, 17, 33):
            x = t(rng.normal(size=(T, K)), dtype)
            close(ln_linear(x, w, b), ln_linear_reference(x.float(), w.float(), b.float()), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("E1,E2,NN,d", [(8, 16, 5, 64), (4, 12, 7, 48)])
def test_prologue_matches_reference(rng, dtype, E1, E2, NN, d):
    temb, memb = t(rng.normal(size=(12, E1)), dtype), t(rng.normal(size=(128, E2)), dtype)
    K = E1 + E2 + NN
    w, b = t(rng.normal(size=(d, K)) / np.sqrt(K), dtype), t(0.2 * rng.normal(size=d), dtype)
    for T in T_VALUES:
        tid = torch.as_tensor(rng.integers(0, 12, T), device=DEV)
        mid = torch.as_tensor(rng.integers(0, 128, T), device=DEV)
        num = t(rng.normal(size=(T, NN)))
        got = prologue(tid, mid, num, temb, memb, w, b)
        assert got.shape == (T, d) and got.dtype == dtype
        close(got, prologue_reference(tid, mid, num, temb.float(), memb.float(), w.float(), b.float()), TOL[dtype])


def test_ln_linear_rejects_bad_shapes(rng):
    x, w, b = t(rng.normal(size=(4, 8))), t(rng.normal(size=(16, 9))), t(rng.normal(size=16))
    with pytest.raises(ValueError, match="bad shapes"):
        ln_linear(x, w, b)
    with pytest.raises(ValueError, match="ln_w and ln_b"):
        ln_linear(x, t(rng.normal(size=(16, 8))), b, ln_w=t(rng.normal(size=8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,f", [(64, 128), (32, 80)])
def test_mlp_matches_reference(rng, dtype, d, f):
    w = layer_weights(rng, d, f, dtype)
    for T in T_VALUES:
        h = t(rng.normal(size=(T, d)), dtype)
        x = t(rng.normal(size=(T, d)), dtype)
        got = mlp(h, x, w["w1"], w["b1"], w["w2"], w["b2"])
        assert got.shape == (T, d) and got.dtype == dtype
        want = mlp_reference(h.float(), x.float(), *(w[k].float() for k in ("w1", "b1", "w2", "b2")))
        close(got, want, TOL[dtype])


def test_mlp_gelu_is_the_erf_form(rng):
    """Identity-like weights expose the activation: must be F.gelu (erf), not the tanh approximation."""
    d = 16
    h = t(rng.uniform(-4, 4, size=(17, d)))
    eye = torch.eye(d, device=DEV)
    zero = torch.zeros(d, device=DEV)
    got = mlp(h, torch.zeros_like(h), eye, zero, eye, zero)
    close(got, F.gelu(h), 1e-6)
    assert (got - F.gelu(h, approximate="tanh")).abs().max() > 1e-5


def test_mlp_in_place_output(rng):
    d, f = 32, 64
    w = layer_weights(rng, d, f, torch.float32)
    h, x = t(rng.normal(size=(33, d))), t(rng.normal(size=(33, d)))
    want = mlp_reference(h, x, w["w1"], w["b1"], w["w2"], w["b2"])
    got = mlp(h, x, w["w1"], w["b1"], w["w2"], w["b2"], out=x)
    assert got.data_ptr() == x.data_ptr()
    close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_segments_matches_reference(rng, dtype):
    d = 64
    lens = np.concatenate([[1, 15, 16, 17, 33], rng.integers(1, 40, 3), [0, 0]])   # empty trailing segments
    cu = np.zeros(len(lens) + 1, np.int32)
    cu[1:] = np.cumsum(lens)
    T = int(cu[-1]) + 7                                                             # rows in no segment
    x = t(rng.normal(scale=3.0, size=(T, d)), dtype)
    x[int(cu[-1]):] = float("nan")                                                  # never read
    lw, lb = t(1 + 0.2 * rng.normal(size=d), dtype), t(0.2 * rng.normal(size=d), dtype)
    got = pool_segments(x, lw, lb, 1e-5, torch.from_numpy(cu).to(DEV))
    want = pool_segments_reference(x[: int(cu[-1])].float(), lw.float(), lb.float(), 1e-5, cu)
    assert got.shape == (len(lens), 2 * d) and got.dtype == torch.float32
    close(got, want, 2e-5 if dtype == torch.float32 else 2e-3)
    assert (got[-2:] == 0).all()


def test_kernels_are_row_local(rng):
    """Batch invariance at the kernel level: the same rows give the same bits wherever they sit.

    Compiled, each row's result is independent of its place in a tile. The interpreter's numpy
    matmul may round differently by row position inside a 16-row tile, so there exact equality is
    asserted only for rows at the same position modulo 16, closeness otherwise."""
    d, f = 64, 128
    w = layer_weights(rng, d, f, torch.float32)
    x = t(rng.normal(size=(48, d)))
    full_q = ln_qkv(x, w["ln_w"], w["ln_b"], w["w_qkv"], w["b_qkv"], 1e-5)
    full_m = mlp(x, x, w["w1"], w["b1"], w["w2"], w["b2"])
    for s, n in ((16, 5), (32, 16), (3, 9)):
        part_q = ln_qkv(x[s:s + n], w["ln_w"], w["ln_b"], w["w_qkv"], w["b_qkv"], 1e-5)
        part_m = mlp(x[s:s + n], x[s:s + n], w["w1"], w["b1"], w["w2"], w["b2"])
        if s % 16 == 0 or DEV == "cuda":
            assert torch.equal(part_q, full_q[s:s + n]) and torch.equal(part_m, full_m[s:s + n])
        else:
            close(part_q, full_q[s:s + n], 1e-5)
            close(part_m, full_m[s:s + n], 1e-5)


# ----------------------------------------------------------------------------------------------
# dispatch

@pytest.fixture
def fresh_stats():
    dispatch.reset_stats()
    yield
    dispatch.reset_stats()


def test_dispatch_auto_uses_triton_when_it_can_run(rng, fresh_stats):
    x, w, b = t(rng.normal(size=(5, 16))), t(rng.normal(size=(16, 16))), t(rng.normal(size=16))
    assert dispatch.choose("ln_linear", "auto", x, w) == "triton"
    close(dispatch.ln_linear(x, w, b), ln_linear_reference(x, w, b), 1e-5)
    st = dispatch.stats()
    assert st.get("triton.ln_linear") == 2 and dispatch.fallbacks() == 0


def test_dispatch_auto_falls_back_logged_and_counted(rng, fresh_stats, monkeypatch, caplog):
    """CPU tensors without the interpreter: auto -> torch reference, logged once, counted every time;
    explicit triton -> KernelUnavailable."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = (torch.as_tensor(rng.normal(size=s), dtype=torch.float32) for s in ((5, 16), (24, 16), (24,)))
    with caplog.at_level(logging.WARNING, logger="uwrt.kernels"):
        for _ in range(3):
            got = dispatch.ln_linear(x, w, b)
    close(got, ln_linear_reference(x, w, b), 0)
    assert dispatch.stats()["fallback.ln_linear"] == 3 and dispatch.fallbacks() == 3
    assert dispatch.stats()["torch.ln_linear"] == 3
    msgs = [r.getMessage() for r in caplog.records if r.name == "uwrt.kernels"]
    assert len(msgs) == 1 and "ln_linear falls back" in msgs[0] and "TRITON_INTERPRET" in msgs[0]
    with pytest.raises(dispatch.KernelUnavailable, match="ln_linear: impl='triton' cannot run here"):
        dispatch.ln_linear(x, w, b, impl="triton")
    with pytest.raises(dispatch.KernelUnavailable, match="mlp"):
        dispatch.mlp(x, x, w, b, w.T.contiguous(), b[:16], impl="triton")


def test_dispatch_missing_op_module(rng, fresh_stats, monkeypatch, caplog):
    """An op whose Triton module is absent falls back under auto and raises under triton."""
    real = dispatch._optional_module
    monkeypatch.setattr(dispatch, "_optional_module",
                        lambda name: None if name == "uwrt.kernels.attention" else real(name))
    cu = np.array([0, 3, 8], np.int32)
    qkv = t(rng.normal(size=(8, 3 * 32)))
    with caplog.at_level(logging.WARNING, logger="uwrt.kernels"):
        out = dispatch.attention(qkv, torch.from_numpy(cu).to(DEV), cu, n_heads=2, head_dim=16, max_seqlen=5)
    assert out.shape == (8, 32) and dispatch.stats()["fallback.attention"] == 1
    assert any("uwrt.kernels.attention not found" in r.getMessage() for r in caplog.records)
    with pytest.raises(dispatch.KernelUnavailable, match="not found"):
        dispatch.attention(qkv, torch.from_numpy(cu).to(DEV), cu, n_heads=2, head_dim=16, max_seqlen=5, impl="triton")


def test_dispatch_rejects_unknown_impl(rng):
    x = t(rng.normal(size=(2, 16)))
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.ln_linear(x, x, x[0], impl="cuda")


def test_dispatch_torch_impl_is_the_reference_and_counted(rng, fresh_stats):
    x, w, b = t(rng.normal(size=(7, 16))), t(rng.normal(size=(16, 16))), t(rng.normal(size=16))
    assert torch.equal(dispatch.ln_linear(x, w, b, impl="torch"), ln_linear_reference(x, w, b))
    assert dispatch.stats() == {"torch.ln_linear": 1}


def test_dispatch_attention_and_block_paths_agree(rng, fresh_stats):
    """Torch and Triton attention / attn_block through dispatch, with empty segments and padding rows."""
    H, Dh = 2, 16
    d = H * Dh
    lens = np.array([1, 17, 5, 0])
    cu = np.zeros(len(lens) + 1, np.int32)
    cu[1:] = np.cumsum(lens)
    T = int(cu[-1]) + 4
    qkv, x = t(rng.normal(size=(T, 3 * d))), t(rng.normal(size=(T, d)))
    w_out, b_out = t(rng.normal(size=(d, d)) / np.sqrt(d)), t(rng.normal(size=d))
    lw, lb = t(1 + 0.1 * rng.normal(size=d)), t(0.1 * rng.normal(size=d))
    cu_d = torch.from_numpy(cu).to(DEV)
    kw = dict(n_heads=H, head_dim=Dh, max_seqlen=int(lens.max()))
    a_tr = dispatch.attention(qkv, cu_d, cu, impl="triton", **kw)
    a_pt = dispatch.attention(qkv, cu_d, cu, impl="torch", **kw)
    close(a_tr, a_pt, 1e-5)
    assert (a_pt[int(cu[-1]):] == 0).all()
    xn_tr, h_tr = dispatch.attn_block(qkv, x, w_out, b_out, lw, lb, 1e-5, cu_d, cu, impl="triton", **kw)
    xn_pt, h_pt = dispatch.attn_block(qkv, x, w_out, b_out, lw, lb, 1e-5, cu_d, cu, impl="torch", **kw)
    close(xn_tr, xn_pt, 1e-5)
    close(h_tr, h_pt, 1e-4)


@settings(max_examples=15, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=6), pad=st.integers(0, 20), seed=st.integers(0, 2**31))
def test_pool_segments_random_lengths(lens, pad, seed):
    """Random segment lengths (empty ones included) and padding rows: kernel == reference."""
    r = np.random.default_rng(seed)
    cu = np.zeros(len(lens) + 1, np.int32)
    cu[1:] = np.cumsum(lens)
    T = int(cu[-1]) + pad
    if T == 0:
        return
    d = 32
    x = t(r.normal(scale=2.0, size=(T, d)))
    lw, lb = t(1 + 0.2 * r.normal(size=d)), t(0.2 * r.normal(size=d))
    got = pool_segments(x, lw, lb, 1e-5, torch.from_numpy(cu).to(DEV))
    close(got, pool_segments_reference(x, lw, lb, 1e-5, cu), 2e-5)
