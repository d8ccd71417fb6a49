"""Fused attention + out-proj + residual + LayerNorm (uwrt.kernels.attn_block) vs float64 and the encoder layer.

Interpreter on CPU without a GPU (tests/conftest.py); compiled on a GPU. Small grids.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uwrt.kernels import attention as A
from uwrt.kernels.attn_block import attn_block, attn_block_reference
from uwrt.kernels.reference import varlen_attention
from uwrt.runtime.bundle.schema import EncoderConfig
from uwrt.runtime.encoders.torch_encoder import EncoderLayer, linear_rows

DEV = "cuda" if torch.cuda.is_available() and not A.interpreting() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_case(lengths, H, Dh, dtype, rng, *, pad_tokens=0, empty_tail=0, nan_pad_qkv=False):
    lengths = list(lengths) + [0] * empty_tail
    cu = np.zeros(len(lengths) + 1, np.int32)
    cu[1:] = np.cumsum(lengths)
    T, d = int(cu[-1]) + pad_tokens, H * Dh

    def t(*shape, scale=1.0, shift=0.0):
        return torch.tensor(rng.normal(size=shape) * scale + shift, dtype=dtype, device=DEV)

    qkv = t(T, 3 * d, scale=1.5)
    if nan_pad_qkv:
        qkv[int(cu[-1]):] = float("nan")
    p = dict(x=t(T, d), w_out=t(d, d, scale=d ** -0.5), b_out=t(d, scale=0.3),
             ln_weight=t(d, scale=0.2, shift=1.0), ln_bias=t(d, scale=0.2))
    return qkv, cu, torch.from_numpy(cu).to(DEV), p


def run(qkv, cu_d, cu, p, H, Dh, **kw):
    return attn_block(qkv, p["x"], cu_d, p["w_out"], p["b_out"], p["ln_weight"], p["ln_bias"], eps=1e-5,
                      n_heads=H, head_dim=Dh, max_seqlen=int(np.diff(cu).max(initial=0)), **kw)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(got, qkv, cu, p, H, Dh, dtype):
    ref = attn_block_reference(qkv, p["x"], cu, p["w_out"], p["b_out"], p["ln_weight"], p["ln_bias"], 1e-5, H, Dh)
    for g, r, name in zip(got, ref, ("x_new", "h"), strict=True):
        assert torch.isfinite(g).all(), name
        err = rel_err(g, r)
        assert err < TOL[dtype], f"{name}: rel. Frobenius error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_edge_lengths(rng, dtype):
    lengths = [1, A.BLOCK_S - 1, A.BLOCK_S, A.BLOCK_S + 1, 100]
    qkv, cu, cu_d, p = make_case(lengths, 2, 16, dtype, rng)
    check(run(qkv, cu_d, cu, p, 2, 16), qkv, cu, p, 2, 16, dtype)


@pytest.mark.parametrize("H,Dh", [(4, 16), (2, 32), (2, 64), (3, 16)])   # d 64, 64, 128, 48 (padded columns)
def test_head_dims_and_widths(rng, H, Dh):
    qkv, cu, cu_d, p = make_case([6, 37], H, Dh, torch.float32, rng)
    check(run(qkv, cu_d, cu, p, H, Dh), qkv, cu, p, H, Dh, torch.float32)


def test_matches_encoder_layer(rng):
    """Same result as EncoderLayer's own modules: x + out(attn(qkv(ln1 x))), then ln2 (fp32)."""
    cfg = EncoderConfig()
    torch.manual_seed(int(rng.integers(2**31)))
    layer = EncoderLayer(cfg).eval()
    with torch.no_grad():
        for prm in layer.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    lengths = [4, 33, 1, 20]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    T, H, Dh = int(cu[-1]), cfg.n_heads, cfg.head_dim
    x = torch.tensor(rng.normal(size=(T, cfg.d_model)), dtype=torch.float32)
    with torch.no_grad():
        qkv = linear_rows(layer.ln1(x), layer.qkv)
        q, k, v = qkv.view(T, 3, H, Dh).unbind(1)
        want_x = x + linear_rows(varlen_attention(q, k, v, cu).reshape(T, -1), layer.out)
        want_h = layer.ln2(want_x)
        got_x, got_h = attn_block(qkv.to(DEV), x.to(DEV), torch.from_numpy(cu).to(DEV), layer.out.weight.to(DEV),
                                  layer.out.bias.to(DEV), layer.ln2.weight.to(DEV), layer.ln2.bias.to(DEV),
                                  eps=layer.ln2.eps, n_heads=H, head_dim=Dh, max_seqlen=max(lengths))
    assert rel_err(got_x.cpu(), want_x.double()) < 1e-5
    assert rel_err(got_h.cpu(), want_h.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bucket_padding_and_in_place(rng, dtype):
    """Empty trailing segments and rows in no segment (NaN qkv there): real rows as an exact-size
    launch computes them; pad rows get attention 0 (x + b_out, then LayerNorm); out_x=x in place."""
    H, Dh, lengths = 2, 16, [3, 40]
    qkv, cu, cu_d, p = make_case(lengths, H, Dh, dtype, rng, pad_tokens=37, empty_tail=2, nan_pad_qkv=True)
    nb, n_real = len(lengths) + 1, int(cu[-1])
    exact = attn_block(qkv[:n_real].contiguous(), p["x"][:n_real].contiguous(), cu_d[:nb].contiguous(),
                       p["w_out"], p["b_out"], p["ln_weight"], p["ln_bias"], eps=1e-5, n_heads=H, head_dim=Dh,
                       max_seqlen=40)
    x_in = p["x"].clone()
    x_new, h = run(qkv, cu_d, cu, p, H, Dh, out_x=p["x"])
    assert x_new is p["x"]
    assert torch.isfinite(x_new).all() and torch.isfinite(h).all()
    assert torch.equal(x_new[:n_real], exact[0]) and torch.equal(h[:n_real], exact[1])
    p_ref = dict(p, x=x_in)
    q_ref = qkv.clone()
    q_ref[n_real:] = 0   # the reference reads no pad row either (its attention there is 0)
    check((x_new, h), q_ref, cu, p_ref, H, Dh, dtype)


def test_batch_invariance(rng):
    H, Dh = 2, 16
    for dtype in (torch.float32, torch.float16):
        for n in (5, 45):
            qa, cua, cua_d, pa = make_case([n], H, Dh, dtype, rng)
            alone = run(qa, cua_d, cua, pa, H, Dh)
            lengths = [int(m) for m in rng.integers(1, 40, size=2)] + [n]
            qkv, cu, cu_d, p = make_case(lengths, H, Dh, dtype, rng, pad_tokens=5)
            for key in ("w_out", "b_out", "ln_weight", "ln_bias"):
                p[key] = pa[key]
            s0 = int(cu[2])
            qkv[s0:s0 + n], p["x"][s0:s0 + n] = qa, pa["x"]
            got = run(qkv, cu_d, cu, p, H, Dh)
            assert torch.equal(got[0][s0:s0 + n], alone[0]) and torch.equal(got[1][s0:s0 + n], alone[1])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 50), min_size=1, max_size=3), pad=st.integers(0, 20),
       fp16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_length_lists(lengths, pad, fp16, seed):
    dtype = torch.float16 if fp16 else torch.float32
    qkv, cu, cu_d, p = make_case(lengths, 2, 16, dtype, np.random.default_rng(seed), pad_tokens=pad)
    if qkv.shape[0] == 0:
        return
    check(run(qkv, cu_d, cu, p, 2, 16), qkv, cu, p, 2, 16, dtype)


def test_input_errors(rng):
    qkv, cu, cu_d, p = make_case([4], 2, 16, torch.float32, rng)
    with pytest.raises(ValueError, match="w_out"):
        run(qkv, cu_d, cu, dict(p, w_out=p["w_out"].T), 2, 16)
    with pytest.raises(ValueError, match="x must be"):
        run(qkv, cu_d, cu, dict(p, x=p["x"].half()), 2, 16)
    with pytest.raises(ValueError, match="ln_bias"):
        run(qkv, cu_d, cu, dict(p, ln_bias=p["ln_bias"][:-1]), 2, 16)
    with pytest.raises(ValueError, match="head_dim"):
        attn_block(qkv, p["x"], cu_d, p["w_out"], p["b_out"], p["ln_weight"], p["ln_bias"], eps=1e-5,
                   n_heads=4, head_dim=8, max_seqlen=4)
