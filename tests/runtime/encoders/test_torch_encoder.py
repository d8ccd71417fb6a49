"""Packed encoder vs an independent float64 padded reference; batch invariance; weight checks."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uwrt.kernels.reference import bucket_length, varlen_attention
from uwrt.runtime.bundle.schema import EncoderConfig, check_state_dict
from uwrt.runtime.encoders.torch_encoder import SequenceEncoder, TorchEncoderBackend
from uwrt.runtime.encoders.torchscript_encoder import TorchScriptEncoderBackend
from uwrt.runtime.featurize import PackedEvents

CFG = EncoderConfig()
BACKENDS = [TorchEncoderBackend, TorchScriptEncoderBackend]


def random_state(cfg: EncoderConfig, seed: int) -> dict:
    """Random non-trivial weights: default init plus noise on every tensor (LayerNorm too)."""
    torch.manual_seed(seed)
    m = SequenceEncoder(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.state_dict()


def random_packed(lengths, rng: np.random.Generator, cfg: EncoderConfig = CFG) -> PackedEvents:
    lengths = np.asarray(lengths, dtype=np.int64)
    T = int(lengths.sum())
    cu = np.zeros(len(lengths) + 1, np.int32)
    cu[1:] = np.cumsum(lengths)
    return PackedEvents(
        type_ids=rng.integers(1, cfg.n_event_types, T).astype(np.int64),
        mcc_ids=rng.integers(0, cfg.mcc_buckets, T).astype(np.int64),
        numeric=rng.normal(size=(T, cfg.n_numeric)).astype(np.float32),
        cu_seqlens=cu, max_len=int(lengths.max()))


def reference_f64(state: dict, cfg: EncoderConfig, ev: PackedEvents) -> np.ndarray:
    """Independent float64 implementation on a padded [B, L] layout with an explicit key mask."""
    w = {k: v.double() for k, v in state.items()}
    lens = ev.lengths
    B, L, d, H = len(lens), int(lens.max()), cfg.d_model, cfg.n_heads
    Dh = d // H

    def lin(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.ln_eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    x = torch.zeros(B, L, cfg.type_emb_dim + cfg.mcc_emb_dim + cfg.n_numeric, dtype=torch.float64)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        s, n = int(ev.cu_seqlens[b]), int(lens[b])
        t = torch.from_numpy(ev.type_ids[s:s + n])
        m = torch.from_numpy(ev.mcc_ids[s:s + n])
        x[b, :n] = torch.cat([w["type_emb.weight"][t], w["mcc_emb.weight"][m],
                              torch.from_numpy(ev.numeric[s:s + n]).double()], -1)
        valid[b, :n] = True
    h = lin(x, "in_proj")
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        qkv = lin(ln(h, f"{p}.ln1"), f"{p}.qkv").view(B, L, 3, H, Dh)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))          # [B, H, L, Dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, d)
        h = h + lin(a, f"{p}.out")
        u = lin(ln(h, f"{p}.ln2"), f"{p}.fc1")
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        h = h + lin(u, f"{p}.fc2")
    h = ln(h, "final_ln")
    mean = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    return lin(torch.cat([mean, h[:, 0]], -1), "pool").numpy()


EDGE_LENGTHS = [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_float64_padded_reference_on_edge_lengths(rng, backend):
    state = random_state(CFG, int(rng.integers(1 << 30)))
    ev = random_packed(rng.permutation(EDGE_LENGTHS), rng)
    got = backend(CFG, state).encode(ev)
    want = reference_f64(state, CFG, ev)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 140), min_size=1, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_packed_matches_reference_hypothesis(lengths, seed):
    r = np.random.default_rng(seed)
    state = random_state(CFG, seed)
    ev = random_packed(lengths, r)
    np.testing.assert_allclose(TorchEncoderBackend(CFG, state).encode(ev), reference_f64(state, CFG, ev),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [2, 4, 8])
def test_other_head_counts(rng, heads, backend):
    cfg = EncoderConfig(n_heads=heads)
    state = random_state(cfg, int(rng.integers(1 << 30)))
    ev = random_packed(rng.integers(1, 70, 6), rng, cfg)
    np.testing.assert_allclose(backend(cfg, state).encode(ev), reference_f64(state, cfg, ev), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(rng, backend):
    """A request's embedding is identical alone and inside random batches of random neighbours."""
    be = backend(CFG, random_state(CFG, int(rng.integers(1 << 30))))
    pool = random_packed(rng.integers(1, 129, 40), rng)
    alone = np.concatenate([be.encode(pool.select([i])) for i in range(pool.batch_size)])
    for _ in range(5):
        rows = rng.permutation(pool.batch_size)[: int(rng.integers(2, pool.batch_size))]
        got = be.encode(pool.select(rows))
        np.testing.assert_allclose(got, alone[rows], atol=1e-6, rtol=0)


_SCRIPTED = {}


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=20), seed=st.integers(0, 2**31 - 1))
def test_torchscript_backend_is_bit_identical_to_eager(lengths, seed):
    if not _SCRIPTED:
        state = random_state(CFG, 12345)
        _SCRIPTED["pair"] = (TorchEncoderBackend(CFG, state), TorchScriptEncoderBackend(CFG, state))
    eager, scripted = _SCRIPTED["pair"]
    ev = random_packed(lengths, np.random.default_rng(seed))
    np.testing.assert_array_equal(scripted.encode(ev), eager.encode(ev))


def test_varlen_attention_matches_per_sequence_softmax(rng):
    lens = rng.integers(1, 50, 9)
    T, H, Dh = int(lens.sum()), 4, 16
    q, k, v = (torch.from_numpy(rng.normal(size=(T, H, Dh))).float() for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lens)])
    out = varlen_attention(q, k, v, cu)
    for b in range(len(lens)):
        s, e = cu[b], cu[b + 1]
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double()) / math.sqrt(Dh), -1)
        ref = torch.einsum("hqk,khd->qhd", att, v[s:e].double())
        np.testing.assert_allclose(out[s:e].numpy(), ref.numpy(), atol=1e-5)
    assert torch.isfinite(out).all()


def test_varlen_attention_rejects_empty_segment():
    q = torch.randn(3, 1, 8)
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, np.array([0, 3, 3]))


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 128, 129)] == [8, 8, 16, 16, 32, 128, 256]


@pytest.mark.parametrize("kw", [{}, {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 48, "emb_dim": 8},
                                {"n_layers": 3, "mcc_buckets": 17, "type_emb_dim": 4, "mcc_emb_dim": 5}])
def test_weight_shapes_match_the_torch_model(kw):
    """The bundle checks weights against EncoderConfig.weight_shapes() without building the model;
    the model's own state dict must say the same."""
    cfg = EncoderConfig(**kw)
    assert cfg.weight_shapes() == {k: tuple(v.shape) for k, v in SequenceEncoder(cfg).state_dict().items()}


def test_check_state_dict_rejects_bad_weights(rng):
    state = random_state(CFG, 1)
    check_state_dict(CFG, state)
    bad = dict(state)
    bad["pool.weight"] = torch.randn(5, 5)
    with pytest.raises(ValueError, match="shape"):
        check_state_dict(CFG, bad)
    missing = {k: v for k, v in state.items() if k != "final_ln.bias"}
    with pytest.raises(ValueError, match="missing"):
        check_state_dict(CFG, missing)
    nan = dict(state)
    nan["in_proj.bias"] = torch.full_like(state["in_proj.bias"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        check_state_dict(CFG, nan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_history_token_is_finite(rng, backend):
    be = backend(CFG, random_state(CFG, 3))
    ev = PackedEvents(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, CFG.n_numeric), np.float32),
                      np.array([0, 1], np.int32), 1)
    assert np.isfinite(be.encode(ev)).all()
