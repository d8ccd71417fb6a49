import pytest

from tests.runtime.bundle.helpers import make_parts, write_test_bundle


@pytest.fixture(scope="session")
def parts():
    """Encoder weights and a tree model that fit helpers.SCHEMA / CFG."""
    return make_parts()


@pytest.fixture
def bundle(tmp_path, parts):
    """A fresh small bundle in tmp_path/bundle."""
    return write_test_bundle(tmp_path / "bundle", parts)
