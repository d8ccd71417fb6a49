"""ONNX Runtime encoder vs the torch path: parity on random packed and generator batches, edge
lengths, batch invariance, the export cache (key, reuse, corruption, read-only bundle), session
options, and what ORT's optimizers fuse."""
import json
import logging
import pathlib

import numpy as np
import pytest

from tests.runtime.encoders.test_torch_encoder import CFG, random_packed, random_state
from uwrt.runtime.bundle.bundle import load_bundle
from uwrt.runtime.bundle.schema import EncoderConfig
from uwrt.runtime.encoders import onnx_encoder as encoder_onnx
from uwrt.runtime.encoders.onnx_encoder import (
    OnnxEncoderBackend,
    bucket_lengths,
    cache_dir_for,
    encoder_key,
    fusion_report,
    onnx_feed,
)
from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
from uwrt.runtime.featurize import Limits, featurize

EDGE = [1, 7, 8, 9, 16, 17, 128]


@pytest.fixture(scope="module")
def weights():
    return random_state(CFG, 4242)


@pytest.fixture(scope="module", params=["mha", "matmul"])
def pair(weights, request):
    return TorchEncoderBackend(CFG, weights), OnnxEncoderBackend(CFG, weights, optimization="ort",
                                                                 attention=request.param)


def test_bucket_lengths():
    assert bucket_lengths(128) == [8, 16, 32, 64, 128]
    assert bucket_lengths(100) == [8, 16, 32, 64, 128] and bucket_lengths(1) == [8] and bucket_lengths(9) == [8, 16]


@pytest.mark.parametrize("optimization,attention", [("none", "matmul"), ("ort", "matmul"), ("transformer", "matmul"),
                                                    ("none", "mha"), ("ort", "mha"), ("transformer", "mha")])
def test_matches_torch_on_edge_and_random_lengths(rng, weights, optimization, attention):
    torch_be = TorchEncoderBackend(CFG, weights)
    onnx_be = OnnxEncoderBackend(CFG, weights, optimization=optimization, attention=attention)
    cases = [EDGE, [1], [128], list(rng.integers(1, 129, 37)), list(rng.integers(1, 9, 50))]
    for lengths in cases:
        ev = random_packed(lengths, rng)
        got, want = onnx_be.encode(ev), torch_be.encode(ev)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"lengths {lengths}")


def test_each_edge_length_alone(rng, pair):
    torch_be, onnx_be = pair
    for n in EDGE:
        ev = random_packed([n], rng)
        np.testing.assert_allclose(onnx_be.encode(ev), torch_be.encode(ev), atol=1e-5, rtol=0, err_msg=f"length {n}")


@pytest.mark.parametrize("attention", ["mha", "matmul"])
def test_other_model_shapes(rng, attention):
    cfg = EncoderConfig(n_heads=2, n_layers=1, max_history=40)
    w = random_state(cfg, int(rng.integers(1 << 30)))
    ev = random_packed(list(rng.integers(1, 41, 9)) + [40, 33], rng, cfg)
    np.testing.assert_allclose(OnnxEncoderBackend(cfg, w, attention=attention).encode(ev),
                               TorchEncoderBackend(cfg, w).encode(ev), atol=1e-5, rtol=0)


def test_batch_invariance(rng, pair):
    """A request's embedding alone vs inside random batches of random neighbours."""
    _, be = pair
    pool = random_packed(rng.integers(1, 129, 40), rng)
    alone = np.concatenate([be.encode(pool.select([i])) for i in range(pool.batch_size)])
    for _ in range(5):
        rows = rng.permutation(pool.batch_size)[: int(rng.integers(2, pool.batch_size))]
        np.testing.assert_allclose(be.encode(pool.select(rows)), alone[rows], atol=1e-6, rtol=0)


def test_generator_batches_through_featurize(small_bundle, traffic):
    b = load_bundle(small_bundle)
    batch, errors = featurize(traffic[:64], b.schema, b.encoder_config, Limits())
    assert not errors
    torch_be = TorchEncoderBackend(b.encoder_config, b.encoder_state())
    onnx_be = OnnxEncoderBackend(b.encoder_config, b.encoder_state())
    np.testing.assert_allclose(onnx_be.encode(batch.events), torch_be.encode(batch.events), atol=1e-5, rtol=0)


def test_empty_batch_and_too_long_segment(rng, pair):
    _, be = pair
    ev = random_packed([3], rng).select([])
    assert be.encode(ev).shape == (0, CFG.emb_dim)
    with pytest.raises(ValueError, match="longer than the exported buckets"):
        be.encode(random_packed([CFG.max_history + 1], rng))


def test_session_options_and_providers(weights):
    be = OnnxEncoderBackend(CFG, weights, intra_op_threads=2, inter_op_threads=1, optimization="none")
    with pytest.raises(ValueError, match="attention must be"):
        OnnxEncoderBackend(CFG, weights, attention="flash")
    so = be.session.get_session_options()
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert be.session.get_providers() == ["CPUExecutionProvider"]
    assert encoder_onnx.providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown device"):
        encoder_onnx.providers_for("tpu")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            OnnxEncoderBackend(CFG, weights, device="cuda")


def test_fusions_are_measured(weights):
    """What each level fuses (recorded in README): ORT's own level fuses the erf GELU, MatMul+Add
    and the attention scale; the transformer optimizer fuses Gelu and nothing ORT misses."""
    r = fusion_report(CFG, weights)
    assert r["exported"]["Erf"] == CFG.n_layers and "Gelu" not in r["exported"]
    assert r["ort"].get("Gelu") == CFG.n_layers and "Erf" not in r["ort"]
    assert r["ort"].get("Gemm", 0) + r["ort"].get("FusedMatMul", 0) > 0
    assert r["transformer_fused"].get("Gelu") == CFG.n_layers and "Erf" not in r["transformer"]
    assert r["transformer+ort"] == r["ort"]


# -- cache -----------------------------------------------------------------------------------------

def test_key_depends_on_weights_version_and_level(weights, monkeypatch):
    k = encoder_key(CFG, weights, "ort")
    assert k == encoder_key(CFG, dict(weights), "ort")
    assert k != encoder_key(CFG, weights, "none") and k != encoder_key(CFG, weights, "ort", "mha")
    other = dict(weights)
    other["pool.bias"] = other["pool.bias"] + 1e-3
    assert k != encoder_key(CFG, other, "ort")
    monkeypatch.setattr(encoder_onnx, "EXPORT_VERSION", encoder_onnx.EXPORT_VERSION + 1)
    assert k != encoder_key(CFG, weights, "ort")


def test_cache_reuse_and_corruption(small_bundle, rng, caplog, tmp_path):
    b = load_bundle(small_bundle)
    cdir = tmp_path / "cache"
    first = OnnxEncoderBackend.from_bundle(b, cache_dir=str(cdir))
    assert first.source == "export"
    files = sorted(cdir.glob("encoder-*.onnx"))
    assert len(files) == 1
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["bundle_digest"] == b.bundle_digest and meta["export_version"] == encoder_onnx.EXPORT_VERSION
    second = OnnxEncoderBackend.from_bundle(b, cache_dir=str(cdir))
    assert second.source == "cache"
    ev = random_packed(rng.integers(1, b.encoder_config.max_history + 1, 12), rng, b.encoder_config)
    want = first.encode(ev)
    np.testing.assert_array_equal(second.encode(ev), want)
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF                       # flip a byte: digest mismatch
    files[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="uwrt.encoder.onnx"):
        third = OnnxEncoderBackend.from_bundle(b, cache_dir=str(cdir))
    assert third.source == "export" and "corrupt" in caplog.text
    np.testing.assert_array_equal(third.encode(ev), want)
    files[0].with_suffix(".json").write_text("{not json")
    assert OnnxEncoderBackend.from_bundle(b, cache_dir=str(cdir)).source == "export"


def test_cache_defaults_to_bundle_then_user_dir(small_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for(small_bundle) == pathlib.Path(small_bundle) / "cache" / "onnx"
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")                          # cache/ cannot be created under a file (even as root)
    assert cache_dir_for(not_a_dir) == tmp_path / "xdg" / "uwrt" / "onnx"
    assert cache_dir_for(small_bundle, str(tmp_path / "mine")) == tmp_path / "mine"


def test_fast_feed_equals_reference(rng, pair):
    """The serving path's inputs (FeedBuilder) == `onnx_feed`'s (filtered to the session's inputs),
    dtype, shape and value, and the embeddings agree to the bit, on edge and random lengths."""
    _, be = pair
    cases = [EDGE, [1], [8], [9], [CFG.max_history], list(rng.integers(1, CFG.max_history + 1, 37)),
             list(rng.integers(1, 9, 50)), list(rng.integers(9, 17, 5)), [int(rng.integers(1, CFG.max_history + 1))]]
    for lengths in cases:
        ev = random_packed(lengths, rng)
        ref = {k: v for k, v in onnx_feed(ev, be.buckets).items() if k in be.input_names}
        got = be.feeder.feed(ev)
        assert got.keys() == ref.keys(), lengths
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, (k, lengths)
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} for lengths {lengths}")
        np.testing.assert_array_equal(be.encode(ev), be.encode_reference(ev))
    with pytest.raises(ValueError, match="longer than the exported buckets"):
        be.feeder.feed(random_packed([3, CFG.max_history + 1], rng))
    # the shared empties of absent buckets are never written to
    assert all(not a.flags.writeable for e in be.feeder.empty.values() for a in e.values())
