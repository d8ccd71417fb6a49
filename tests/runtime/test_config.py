import pytest

from tests.factories import ROOT
from uwrt.runtime.cli.main import build_parser, config_from_args
from uwrt.runtime.config import RuntimeConfig, knobs

README = (ROOT / "README.md").read_text()


def test_every_knob_is_documented_in_readme_and_code():
    for name, _, _default, doc in knobs():
        assert f"`{name}`" in README, f"README's Configuration table lacks {name}"
        assert doc, f"{name} has no #: doc comment"


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "uwrt.toml"
    f.write_text("port = 6000\ngrace_s = 3\n[batching]\nmax_batch_size = 8\nmax_wait_us = 700\n")
    env = {"UWRT_PORT": "6001", "UWRT_BATCHING_MAX_WAIT_US": "900", "UWRT_BATCHING_LENGTH_BUCKETS": "4,16"}
    c = RuntimeConfig.load(str(f), env=env, max_wait_us=1200)
    assert c.port == 6001                                   # env beats file
    assert c.grace_s == 3.0 and c.batching.max_batch_size == 8   # file beats defaults
    assert c.batching.max_wait_us == 1200                   # flag beats env
    assert c.batching.length_buckets == (4, 16)
    assert c.torch_threads == RuntimeConfig().torch_threads


def test_cli_flags_map_to_knobs(tmp_path):
    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch-size", "4", "--length-buckets", "8,64"])
    c = config_from_args(args)
    assert c.port == 0 and c.batching.max_batch_size == 4 and c.batching.length_buckets == (8, 64)


@pytest.mark.parametrize("text,msg", [("bogus = 1\n", "unknown configuration key 'bogus'"),
                                      ("[batching]\nmax_wait = 3\n", "batching.max_wait"),
                                      ("port = 'x'\n", "port")])
def test_bad_config_files_are_named(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("'", ".")):
        RuntimeConfig.load(str(f), env={})


def test_bad_values_rejected():
    with pytest.raises(ValueError):
        RuntimeConfig.load(env={"UWRT_PORT": "eighty"})
    with pytest.raises(ValueError):
        RuntimeConfig.load(env={}, max_batch_size=0)
    with pytest.raises(ValueError, match="unknown configuration knob"):
        RuntimeConfig.load(env={}, no_such_knob=1)
