"""The demo bundle's drift baseline (monitoring.json): statistics of a development sample drawn
from the training population, scored by the model just trained.

The sample is fresh (its own seed, never trained on): the score and the embedding are what the
model produces on applicants it has not seen, which is what serving traffic from the same
population looks like. Scoring the training rows instead would give an in-sample (overfit)
score distribution, and the stationary generator traffic would then read as drifted.

Deterministic for a given seed, so the bundle stays byte-identical (README: The model bundle).
"""
from __future__ import annotations

import numpy as np
import torch

from uwrt.demo import synth
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, Policy
from uwrt.runtime.featurize import featurize
from uwrt.runtime.monitoring.drift import MonitoringStats
from uwrt.runtime.policy import outcome_for, score_for

#: development sample size: a quarter of the training population's size, at least this many
MIN_SAMPLE = 2000
SEED_OFFSET = 1000


@torch.inference_mode()
def development_stats(*, seed: int, n_applicants: int, schema: FeatureSchema, encoder_config: EncoderConfig,
                      policy: Policy, encoder, booster) -> str:
    """monitoring.json text for the trained `encoder` (a SequenceEncoder) and `booster`."""
    n = max(MIN_SAMPLE, n_applicants // 4)
    data = synth.generate(n, seed + SEED_OFFSET, id_prefix="dev-")
    fb, errors = featurize(data.requests, schema, encoder_config)
    if errors:
        raise RuntimeError(f"generator produced invalid requests: {list(errors.values())[:3]}")
    emb = np.concatenate([encoder.encode_packed(fb.events.select(np.arange(s, min(s + 512, fb.batch_size)))).numpy()
                          for s in range(0, fb.batch_size, 512)]).astype(np.float32)
    pd = np.asarray(booster.inplace_predict(np.concatenate([fb.tabular, emb], 1), missing=np.nan), np.float64)
    stats = MonitoringStats.compute(
        tabular=fb.tabular, embedding=emb, scores=np.array([score_for(p, policy) for p in pd.tolist()]),
        outcomes=[int(outcome_for(p, policy)) for p in pd.tolist()],
        feature_names=[f.name for f in schema.features if f.source != "embedding"],
        source=f"demo development sample: {n} fresh generator applicants (seed {seed + SEED_OFFSET}), "
               "scored by the trained encoder and trees")
    return stats.to_json()
