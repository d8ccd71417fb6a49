"""Featurization (validation + packing) per batch size."""
import pytest

from uwrt.runtime.featurize import featurize


@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_featurize(benchmark, bundle, requests_pool, batch):
    benchmark.group = "featurize"
    reqs = requests_pool[:batch]
    fb, errs = benchmark(featurize, reqs, bundle.schema, bundle.encoder_config)
    assert not errs and fb.batch_size == batch
    assert fb.events.cu_seqlens[-1] == fb.events.n_tokens and fb.tabular.shape[0] == batch
