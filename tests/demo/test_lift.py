"""The full demo build (~2-3 min on 2 cores): the encoder must add >= 0.02 test AUC over the
tabular-only control, and the shuffled-event-order control must lose most of that gain.
Deselect for a quick loop with `pytest -m "not slow"`."""
import json

import pytest

from uwrt.demo.synth import generate
from uwrt.demo.train import DemoConfig, build_demo
from uwrt.runtime.pipeline import Pipeline


@pytest.mark.slow
def test_full_demo_build_shows_encoder_lift(tmp_path):
    bundle = build_demo(tmp_path / "demo", DemoConfig.preset("full"))
    card = json.loads((bundle.path / "model_card.json").read_text())
    assert card["auc_with_encoder"] - card["auc_tabular_only"] >= 0.02, card
    assert card["auc_shuffled_control"] - card["auc_tabular_only"] < 0.5 * card["encoder_lift"], card
    assert 0.6 < card["auc_tabular_only"] < 0.95
    res = Pipeline(bundle).decide(generate(50, 3, id_prefix="lift-").requests)
    assert all(0 < r.probability_of_default < 1 for r in res)
