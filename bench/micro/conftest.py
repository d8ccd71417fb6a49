"""Fixtures for the microbenchmarks (pytest-benchmark).

Perf work (timed; the demo bundle when it exists, else a small one built on the fly):

    python -m pytest bench/micro -p no:cacheprovider --benchmark-only --benchmark-sort=name \
        [--benchmark-json bench/results/micro.json]

CI runs the same tests untimed (`--benchmark-disable`: each body runs once, its assertions
checked) through tests/bench/test_micro_smoke.py. Environment:
  UWRT_MICRO_BUNDLE        bundle directory (default bundles/demo if present, else a small build)
  UWRT_MICRO_TREE_PATHS    tree paths to time (default: every path uwrt.runtime.trees.router knows)

Each benchmark also checks its result against the reference path (encoder backends against eager
torch, tree paths against xgboost, the batching plan against its invariants), so a fast path
that breaks fails here too. Thread safety: fixtures are per session; tests run serially.
"""
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

if "TRITON_INTERPRET" not in os.environ:      # as tests/conftest.py: no GPU -> Triton interpreter
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:  # noqa: BLE001
        pass


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    from uwrt.runtime.bundle.bundle import load_bundle
    path = os.environ.get("UWRT_MICRO_BUNDLE")
    if not path:
        demo = ROOT / "bundles" / "demo"
        if (demo / "manifest.json").exists():
            path = str(demo)
        else:
            from uwrt.demo.train import DemoConfig, build_demo
            path = str(tmp_path_factory.mktemp("micro") / "small")
            build_demo(path, DemoConfig.preset("small"))
    return load_bundle(path)


@pytest.fixture(scope="session")
def requests_pool():
    """Generator traffic (seed 5): 256 applicants."""
    from uwrt.demo.synth import generate
    return generate(256, 5, id_prefix="m-").requests


@pytest.fixture(scope="session")
def booster(bundle):
    from uwrt.runtime.trees.base import load_booster
    return load_booster(bundle.tree_model_bytes(), nthread=1)


@pytest.fixture(scope="session")
def rows_by_batch(bundle, requests_pool):
    """Exact tree-stage rows [B, F] for B in (1, 8, 32, 128), from the real featurizer and encoder."""
    from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
    from uwrt.runtime.featurize import featurize
    enc = TorchEncoderBackend(bundle.encoder_config, bundle.encoder_state())
    fb, errs = featurize(requests_pool[:128], bundle.schema, bundle.encoder_config)
    assert not errs
    rows = np.concatenate([fb.tabular, enc.encode(fb.events).astype(np.float32)], axis=1)
    return {b: np.ascontiguousarray(rows[:b]) for b in (1, 8, 32, 128)}


@pytest.fixture
def micro_rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
