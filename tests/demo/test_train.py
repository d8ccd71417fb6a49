"""The demo trainer's presets, progress output and model card wording (the builds themselves:
tests/conftest.py's small bundle, tests/demo/test_lift.py's full one)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from uwrt.demo import synth
from uwrt.demo.train import MIN_LIFT, PRESETS, DemoConfig, _bar, control_summary, model_card_md, train_encoder
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema
from uwrt.runtime.cli.main import build_parser
from uwrt.runtime.featurize import featurize


def test_presets():
    assert DemoConfig() == DemoConfig.preset("default") and not DemoConfig().controls
    full = DemoConfig.preset("full")
    assert full.controls and full.n_applicants == 20000 and full.epochs == 6
    assert DemoConfig.preset("small", controls=True).controls
    assert DemoConfig.preset("default", n_applicants=123, epochs=2).n_applicants == 123
    with pytest.raises(ValueError, match="unknown preset"):
        DemoConfig.preset("huge")
    assert set(PRESETS) == {"default", "full", "small"}


@pytest.mark.parametrize("argv,controls", [([], False), (["--with-controls"], True), (["--preset", "full"], True),
                                           (["--preset", "small", "--with-controls"], True)])
def test_build_demo_flags(argv, controls):
    args = build_parser(["build-demo"]).parse_args(["build-demo", "--out", "x", *argv])
    cfg = DemoConfig.preset(args.preset, controls=True if args.with_controls else None)
    assert cfg.controls is controls


def test_control_summary_says_what_the_control_means():
    assert "not run" in control_summary(0.78, 0.81, None) and "--with-controls" in control_summary(0.78, 0.81, None)
    none_kept = control_summary(0.7872, 0.8185, 0.7820)              # the example: "keeps -17%"
    assert "%" not in none_kept and "adds nothing" in none_kept and "order and timing" in none_kept
    assert "keeps only 30%" in control_summary(0.70, 0.80, 0.73)
    assert "still keeps 80%" in control_summary(0.70, 0.80, 0.78) and "NOT" in control_summary(0.70, 0.80, 0.78)
    assert "no gain" in control_summary(0.80, 0.79, 0.78)


def _card(**over):
    c = {"model": "m", "split": "time", "auc_tabular_only": 0.78, "auc_with_encoder": 0.81,
         "auc_shuffled_control": 0.77,
         "encoder_lift": 0.03, "n_applicants": 8000, "n_train": 5600, "n_test": 2400, "seed": 7,
         "default_rate_train": 0.1, "default_rate_test": 0.1, "config": {"epochs": 4}, "versions": {"uwrt": "0"},
         "acceptance": {"min_encoder_lift": MIN_LIFT, "encoder_lift_ok": True, "shuffled_control_loses_most": True}}
    c.update(over)
    return c


def test_model_card_says_which_evidence_it_carries():
    with_control = model_card_md(_card())
    assert "| 0.7700 |" in with_control and "not run" not in with_control and "adds nothing" in with_control
    without = model_card_md(_card(auc_shuffled_control=None,
                                  acceptance={"min_encoder_lift": MIN_LIFT, "encoder_lift_ok": False,
                                              "shuffled_control_loses_most": None}))
    assert "| not run |" in without and "--with-controls" in without
    assert "NOT met" in without and "does not show the encoder's lift" in without and "--preset full" in without


def test_bars_are_off_when_stderr_is_not_a_terminal():
    with _bar(10, "x", "applicant") as bar:            # pytest captures stderr: not a terminal
        assert bar.disable


BAR_PROBE = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from uwrt.demo.train import _bar, _logs_above_bars
with _logs_above_bars():
    bar = _bar(4, "encoder epoch 1/4", "applicant")
    for i in range(4):
        time.sleep(0.15)
        bar.update(1)
        if i == 1:
            logging.getLogger("uwrt.demo").info("a line logged while the bar runs")
    bar.close()
"""


def test_bars_show_rate_and_eta_on_a_terminal():
    """On a terminal (a pty with a size) the bar shows progress, rate and ETA, and a log record
    printed meanwhile lands on its own line, not inside the bar."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.factories import ROOT
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])}
    proc = subprocess.Popen([sys.executable, "-c", BAR_PROBE], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                                  # the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    frames = out.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("encoder epoch 1/4:")]
    assert any("2/4 [" in f and "applicant/s" in f for f in bars), frames      # count, elapsed<ETA, rate
    assert "INFO uwrt.demo: a line logged while the bar runs" in frames


def test_training_logs_one_line_per_epoch(caplog, rng):
    enc_cfg = EncoderConfig(max_history=16)
    data = synth.generate(64, int(rng.integers(0, 1000)))
    schema = FeatureSchema.build("t", list(synth.APPLICANT_FEATURES), enc_cfg.emb_dim)
    fb, errors = featurize(data.requests, schema, enc_cfg)
    assert not errors
    cfg = DemoConfig(n_applicants=64, epochs=2, batch_size=32, encoder=enc_cfg)
    tab = (fb.tabular - fb.tabular.mean(0)) / (fb.tabular.std(0) + 1e-6)
    with caplog.at_level(logging.INFO, logger="uwrt.demo"):
        train_encoder(fb, tab, data.default.astype(np.float64), data.dpd30_90.astype(np.float64), cfg, "enc")
    epochs = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert [m.split(" loss")[0] for m in epochs] == ["enc: epoch 1/2", "enc: epoch 2/2"]
