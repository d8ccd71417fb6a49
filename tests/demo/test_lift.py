"""The demo builds show the encoder's lift: the encoder must add >= 0.02 test AUC over the
tabular-only model, both in the default build (`make serve`'s; no shuffled control) and in the
full one (the model card's evidence), where the shuffled-event-order control must also lose most
of that gain. Slow (the default build ~40 s, the full one ~2 min on 2 cores); deselect for a
quick loop with `pytest -m "not slow"`."""
import json

import pytest

from uwrt.demo.synth import generate
from uwrt.demo.train import MIN_LIFT, DemoConfig, build_demo
from uwrt.runtime.pipeline import Pipeline


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "full"])
def test_demo_build_shows_encoder_lift(tmp_path, preset):
    bundle = build_demo(tmp_path / "demo", DemoConfig.preset(preset))
    card = json.loads((bundle.path / "model_card.json").read_text())
    assert card["auc_with_encoder"] - card["auc_tabular_only"] >= MIN_LIFT, card
    assert card["acceptance"]["encoder_lift_ok"] and 0.6 < card["auc_tabular_only"] < 0.95
    if preset == "full":
        assert card["controls"]["shuffled_event_order"] and card["acceptance"]["shuffled_control_loses_most"]
        assert card["auc_shuffled_control"] - card["auc_tabular_only"] < 0.5 * card["encoder_lift"], card
    else:
        assert card["auc_shuffled_control"] is None and not card["controls"]["shuffled_event_order"]
    res = Pipeline(bundle).decide(generate(50, 3, id_prefix="lift-").requests)
    assert all(0 < r.probability_of_default < 1 for r in res)
