"""Triton varlen attention (uwrt.kernels.attention) vs a float64 per-segment reference.

Runs in the Triton interpreter on CPU when there is no GPU (tests/conftest.py), compiled on a GPU.
Grids are kept small: the interpreter runs programs one after another.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uwrt.kernels import attention as A
from uwrt.kernels.reference import varlen_attention

DEV = "cuda" if torch.cuda.is_available() and not A.interpreting() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_case(lengths, H, Dh, dtype, rng, *, pad_tokens=0, empty_tail=0, pad_value=None):
    """Random qkv for segments of `lengths` (+ `empty_tail` empty segments, + `pad_tokens` rows in
    no segment, filled with `pad_value` if given). Returns (qkv, cu host int32, cu device)."""
    lengths = list(lengths) + [0] * empty_tail
    cu = np.zeros(len(lengths) + 1, np.int32)
    cu[1:] = np.cumsum(lengths)
    T = int(cu[-1]) + pad_tokens
    x = rng.normal(size=(T, 3 * H * Dh)) * 1.5
    if pad_value is not None:
        x[int(cu[-1]):] = pad_value
    return torch.tensor(x, dtype=dtype, device=DEV), cu, torch.from_numpy(cu).to(DEV)


def run(qkv, cu_dev, H, Dh, cu_host, **kw):
    lens = np.diff(cu_host)
    return A.attention(qkv, cu_dev, n_heads=H, head_dim=Dh, max_seqlen=int(lens.max(initial=0)), **kw)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, qkv, cu, H, Dh, dtype, **kw):
    ref = A.attention_reference(qkv, cu, H, Dh, **kw)
    assert not torch.isnan(out).any()
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel. Frobenius error {err:.2e} >= {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_edge_lengths(rng, dtype):
    # 1, BLOCK_S-1, BLOCK_S, BLOCK_S+1 (first long one), a long segment walking 3 key blocks, 2
    lengths = [1, A.BLOCK_S - 1, A.BLOCK_S, A.BLOCK_S + 1, 130, 2]
    qkv, cu, cu_d = make_case(lengths, 2, 16, dtype, rng)
    check(run(qkv, cu_d, 2, 16, cu), qkv, cu, 2, 16, dtype)


@pytest.mark.parametrize("Dh", A.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims(rng, Dh, dtype):
    H = {16: 4, 32: 2, 64: 2}[Dh]
    qkv, cu, cu_d = make_case([7, 40], H, Dh, dtype, rng)
    check(run(qkv, cu_d, H, Dh, cu), qkv, cu, H, Dh, dtype)


def test_matches_cpu_serving_path(rng):
    """Same math as uwrt.kernels.reference.varlen_attention (the CPU encoder's attention)."""
    H, Dh = 4, 16
    qkv, cu, cu_d = make_case([3, 17, 32, 45], H, Dh, torch.float32, rng)
    T = qkv.shape[0]
    q, k, v = qkv.cpu().view(T, 3, H, Dh).unbind(1)
    want = varlen_attention(q, k, v, cu).reshape(T, -1)
    got = run(qkv, cu_d, H, Dh, cu).cpu()
    assert rel_err(got, want.double()) < 1e-5


def test_sm_scale(rng):
    qkv, cu, cu_d = make_case([5, 36], 2, 32, torch.float32, rng)
    check(run(qkv, cu_d, 2, 32, cu, sm_scale=0.37), qkv, cu, 2, 32, torch.float32, sm_scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fixed_grid_bucket_padding(rng, dtype):
    """A (batch bucket, token bucket) launch: empty trailing segments and rows in no segment (NaN
    garbage there) leave real rows exactly as an exact-size launch computes them; pad rows -> 0."""
    H, Dh, lengths = 2, 16, [5, 33, 1]
    qkv, cu, cu_d = make_case(lengths, H, Dh, dtype, rng, pad_tokens=45, empty_tail=3, pad_value=np.nan)
    n_real = int(cu[-1])
    out = torch.full((qkv.shape[0], H * Dh), float("nan"), dtype=dtype, device=DEV)
    got = run(qkv, cu_d, H, Dh, cu, out=out)
    assert got is out
    assert not torch.isnan(out).any()
    assert torch.equal(out[n_real:], torch.zeros_like(out[n_real:]))
    check(out[:n_real], qkv[:n_real], cu[:len(lengths) + 1], H, Dh, dtype)
    exact = run(qkv[:n_real].contiguous(), cu_d[:len(lengths) + 1].contiguous(), H, Dh, cu[:len(lengths) + 1])
    assert torch.equal(out[:n_real], exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_invariance(rng, dtype):
    """A segment's output is bit-identical alone and at any position inside a batch."""
    H, Dh = 2, 16
    for n in (9, 70):
        alone, cu1, cu1_d = make_case([n], H, Dh, dtype, rng)
        ref = run(alone, cu1_d, H, Dh, cu1)
        others = [int(m) for m in rng.integers(1, 50, size=3)]
        for pos in (0, 2):
            lengths = others[:pos] + [n] + others[pos:]
            qkv, cu, cu_d = make_case(lengths, H, Dh, dtype, rng, pad_tokens=7, empty_tail=1)
            s0 = int(cu[pos])
            qkv[s0:s0 + n] = alone
            out = run(qkv, cu_d, H, Dh, cu)
            assert torch.equal(out[s0:s0 + n], ref), (n, lengths, pos)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
       pad=st.integers(0, 40), fp16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_length_lists(lengths, pad, fp16, seed):
    dtype = torch.float16 if fp16 else torch.float32
    rng = np.random.default_rng(seed)
    qkv, cu, cu_d = make_case(lengths, 2, 16, dtype, rng, pad_tokens=pad)
    if qkv.shape[0] == 0:
        return
    out = run(qkv, cu_d, 2, 16, cu)
    ref = A.attention_reference(qkv, cu, 2, 16)
    assert torch.isfinite(out).all()
    if ref.norm() > 0:
        assert rel_err(out, ref) < TOL[dtype]
    n_real = int(cu[-1])
    assert torch.equal(out[n_real:], torch.zeros_like(out[n_real:]))


def test_reference_is_softmax_attention(rng):
    """The oracle itself, on one segment, against an explicit formula."""
    H, Dh = 2, 16
    qkv, cu, _ = make_case([6], H, Dh, torch.float64, rng)
    q, k, v = qkv.view(6, 3, H, Dh).unbind(1)
    h = 1
    w = torch.softmax(q[:, h] @ k[:, h].T / Dh ** 0.5, dim=-1)
    want = w @ v[:, h]
    got = A.attention_reference(qkv, cu, H, Dh)[:, h * Dh:(h + 1) * Dh]
    assert torch.allclose(got, want, atol=1e-12)


def test_input_errors(rng):
    qkv, cu, cu_d = make_case([4], 2, 16, torch.float32, rng)
    with pytest.raises(ValueError, match="head_dim"):
        A.attention(qkv, cu_d, n_heads=4, head_dim=8, max_seqlen=4)
    with pytest.raises(ValueError, match="qkv must be"):
        A.attention(qkv, cu_d, n_heads=3, head_dim=16, max_seqlen=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        A.attention(qkv, cu_d.long(), n_heads=2, head_dim=16, max_seqlen=4)
    with pytest.raises(ValueError, match="n_heads"):
        A.attention(torch.zeros(4, 3 * 32 * 16, device=DEV), cu_d, n_heads=32, head_dim=16, max_seqlen=4)
    with pytest.raises(ValueError, match="out must be"):
        A.attention(qkv, cu_d, n_heads=2, head_dim=16, max_seqlen=4, out=torch.empty(4, 31, device=DEV))
    with pytest.raises(TypeError):
        A.attention(qkv.to(torch.int32), cu_d, n_heads=2, head_dim=16, max_seqlen=4)
    if DEV == "cpu":
        with pytest.raises(TypeError, match="bfloat16"):
            A.attention(qkv.bfloat16(), cu_d, n_heads=2, head_dim=16, max_seqlen=4)


@pytest.mark.skipif(DEV != "cuda", reason="bf16 is wrong in the Triton interpreter; GPU only")
def test_bfloat16_gpu(rng):
    qkv, cu, cu_d = make_case([3, 33, 80], 4, 32, torch.bfloat16, rng)
    check(run(qkv, cu_d, 4, 32, cu), qkv, cu, 4, 32, torch.bfloat16)


def test_grid_is_a_function_of_host_sizes():
    """The launch shape depends only on (T, B): fixed for a (batch bucket, token bucket)."""
    assert A.grid_size(100, 5) == 100 // A.BLOCK_S + 6
    assert A.b_pad(5) == 16 and A.b_pad(15) == 16 and A.b_pad(16) == 32 and A.b_pad(256) == 512
    # enough programs: every segment gets ceil(n / BLOCK_S) slots, the rows in no segment too
    for lens in ([1] * 9, [A.BLOCK_S] * 3, [A.BLOCK_S + 1, 200, 5]):
        T = sum(lens) + 17
        need = sum(-(-n // A.BLOCK_S) for n in lens) + (-(-17 // A.BLOCK_S))
        assert A.grid_size(T, len(lens)) >= need


def test_malformed_cu_seqlens_stays_in_bounds(rng):
    """A decreasing / past-the-end cu_seqlens gives wrong numbers but never touches rows outside
    [0, T) (the output buffer's guard rows around the view stay intact); the host check rejects it."""
    H, Dh, T = 2, 16, 40
    qkv = torch.tensor(rng.normal(size=(T, 3 * H * Dh)), dtype=torch.float32, device=DEV)
    backing = torch.full((T + 64, H * Dh), 7.0, device=DEV)
    out = backing[32:32 + T]
    for cu in ([0, 30, 10, 55], [0, 70], [5, 20]):
        with pytest.raises(ValueError):
            A.check_cu_seqlens_host(np.array(cu), T)
        A.attention(qkv, torch.tensor(cu, dtype=torch.int32, device=DEV), n_heads=H, head_dim=Dh, max_seqlen=70,
                    out=out)
        assert torch.equal(backing[:32], torch.full_like(backing[:32], 7.0))
        assert torch.equal(backing[32 + T:], torch.full_like(backing[32 + T:], 7.0))
    A.check_cu_seqlens_host(np.array([0, 3, 3, 40]), T)
