import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture
def rng():
    """A fresh random generator per test (never zeros, never a fixed input); the seed is printed so a
    failure can be replayed with UWRT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("UWRT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"UWRT_TEST_SEED={seed}")
    return np.random.default_rng(seed)
