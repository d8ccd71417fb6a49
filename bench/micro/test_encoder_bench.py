"""The encoder per backend (torch eager, TorchScript, and ONNX Runtime / Triton when available) per
batch size, each checked against eager torch on the same packed batch."""
import numpy as np
import pytest

from uwrt.runtime.featurize import featurize

BACKENDS = ["torch", "torchscript", "onnx", "triton"]


def make_backend(name, bundle):
    cfg, state = bundle.encoder_config, bundle.encoder_state()
    if name == "torch":
        from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
        return TorchEncoderBackend(cfg, state)
    if name == "torchscript":
        from uwrt.runtime.encoders.torchscript_encoder import TorchScriptEncoderBackend
        return TorchScriptEncoderBackend(cfg, state)
    if name == "onnx":
        pytest.importorskip("onnxruntime")
        mod = pytest.importorskip("uwrt.runtime.encoders.onnx_encoder")
        return mod.OnnxEncoderBackend(cfg, state, bundle_digest=bundle.bundle_digest)
    if name == "triton":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("the Triton encoder needs a CUDA device")
        mod = pytest.importorskip("uwrt.runtime.encoders.triton_encoder")
        return mod.TritonEncoderBackend(cfg, state)
    raise ValueError(name)


_cache = {}


def backend(name, bundle):
    if name not in _cache:
        _cache[name] = make_backend(name, bundle)
    return _cache[name]


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("name", BACKENDS)
def test_encoder(benchmark, bundle, requests_pool, name, batch):
    benchmark.group = f"encoder batch {batch}"
    be = backend(name, bundle)
    fb, errs = featurize(requests_pool[:batch], bundle.schema, bundle.encoder_config)
    assert not errs
    ref = backend("torch", bundle).encode(fb.events)
    out = benchmark(be.encode, fb.events)
    assert out.shape == (batch, bundle.encoder_config.emb_dim)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
