import os

# Triton kernels run in the interpreter (numpy, on CPU tensors) when no GPU is present. It must be
# set before any @triton.jit function is defined, i.e. before kernels/ modules are imported.
# On a GPU machine leave it unset (or export TRITON_INTERPRET=0) to test compiled kernels.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch
        _has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import tempfile

import numpy as np
import pytest

# The cache key (runtime/bundle/cache_trust.py) lives in the server user's state directory: tests
# (and the servers they start as subprocesses) use a private one, never the developer's.
# `uwrt serve` serves /metrics on a fixed default port (9464): servers the tests start as
# subprocesses would collide on it (and with anyone's server on this machine). Metrics off unless
# a test asks for them with --metrics-port (flags beat the environment).
os.environ.setdefault("UWRT_METRICS_PORT", "0")
os.environ.setdefault("UWRT_STATE_DIR", tempfile.mkdtemp(prefix="uwrt-test-state-"))


@pytest.fixture
def rng():
    """A fresh random generator per test (never zeros, never a fixed input); the seed is printed so a
    failure can be replayed with UWRT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("UWRT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"UWRT_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory):
    """A demo bundle built from scratch with the 'small' preset (seconds), shared by the session."""
    from uwrt.demo.train import DemoConfig, build_demo
    out = tmp_path_factory.mktemp("bundles") / "small"
    build_demo(out, DemoConfig.preset("small"))
    return out


@pytest.fixture(scope="session")
def pipe(small_bundle):
    from uwrt.runtime.pipeline import Pipeline
    return Pipeline.from_dir(small_bundle)


@pytest.fixture(scope="session")
def traffic():
    """300 generator requests (seed 11)."""
    from uwrt.demo.synth import generate
    return generate(300, 11, id_prefix="t-").requests
