import pytest

from tests.runtime.serving.attack import AttackServer, Neighbours


@pytest.fixture(scope="session")
def attack_server(small_bundle, tmp_path_factory):
    """One `uwrt serve` process for the attack corpus and the fuzz test (tests/runtime/serving/attack.py)."""
    srv = AttackServer(small_bundle, tmp_path_factory.mktemp("attack") / "serve.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def neighbours(pipe, traffic):
    return Neighbours(pipe, traffic[100:160])
