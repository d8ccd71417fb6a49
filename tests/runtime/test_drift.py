"""Drift: PSI against the bundle's development sample, offline (`uwrt drift`) and in the server,
with generator traffic whose risk mix is shifted on purpose (`uwrt generate --drift`)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import grpc
import numpy as np
import pytest

from uwrt.demo.synth import generate
from uwrt.runtime.cli.main import main as cli_main
from uwrt.runtime.config import RuntimeConfig, SecurityConfig
from uwrt.runtime.errors import BundleError
from uwrt.runtime.jsonl import write_jsonl
from uwrt.runtime.monitoring.drift import (
    DriftWindow,
    MonitoringStats,
    VariableStats,
    decile_edges,
    drift_report,
    load_stats,
    proportions,
    psi,
)
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.server import Server

SHIFT = 3.0        # `generate --drift`: mean latent risk +1.5 sd on average


def psi_reference(expected, counts) -> float:
    """PSI written out term by term (the vectorised psi is checked against it)."""
    n, k = sum(counts), len(counts)
    total = 0.0
    for e, c in zip(expected, counts, strict=True):
        a = (c + 0.5) / (n + 0.5 * k)
        total += (a - e) * math.log(a / e)
    return total


def test_psi_matches_reference_and_reads(rng):
    for _ in range(20):
        k = int(rng.integers(2, 12))
        e = proportions(rng.integers(0, 500, k))
        c = rng.integers(0, 300, k)
        c[rng.integers(0, k)] = 0                         # an empty bin: smoothed, finite
        assert psi(e, c) == pytest.approx(psi_reference(e, c), rel=1e-12)
        assert math.isfinite(psi(e, c)) and psi(e, c) >= 0
    e = proportions(np.full(10, 1000))
    assert psi(e, np.full(10, 1000)) == pytest.approx(0.0, abs=1e-12)


def test_bins_follow_the_edges(rng):
    x = np.concatenate([rng.normal(size=2000), rng.integers(0, 3, 500).astype(float)])
    v = VariableStats.from_sample("x", "feature", x)
    edges = np.array(v.edges)
    probe = np.concatenate([x[:300], edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [np.nan]])
    ref = np.array([sum(1 for e in edges if e < p) if not np.isnan(p) else len(edges) for p in probe])
    assert np.array_equal(v.bin(probe), ref)              # bin i = (edge[i-1], edge[i]]; NaN -> last
    assert len(v.expected) == len(edges) + 1 and abs(sum(v.expected) - 1) < 1e-9
    # a discrete feature: tied deciles merge into fewer bins, all of them populated in the sample
    d = VariableStats.from_sample("d", "feature", rng.integers(0, 3, 3000).astype(float))
    assert d.bins <= 3 and min(d.expected) > 0.05
    assert len(decile_edges(rng.normal(size=5000))) == 9
    assert len(decile_edges(np.ones(100))) == 0                  # one value: one bin


def test_bin_rows_matches_the_reference(small_bundle, rng):
    """The server's all-variables-at-once binning against VariableStats.bin per variable, on fresh
    random rows with every edge, values just beside them, NaN and +-inf mixed in."""
    from uwrt.runtime.bundle.bundle import load_bundle
    stats = load_stats(load_bundle(small_bundle, check_trees_with_xgboost=False))
    n_tab = len(stats.feature_names)
    v = len(stats.variables)
    for _ in range(5):
        b = int(rng.integers(1, 64))
        rows = rng.normal(size=(b, n_tab + 8)) * rng.uniform(0.1, 50.0)
        scores = rng.uniform(300, 850, b)
        for j in range(b):                      # put edges themselves and their neighbours in
            i = int(rng.integers(0, v - 1))
            var = stats.variables[i]
            if var.edges:
                e = var.edges[int(rng.integers(0, len(var.edges)))]
                val = float(rng.choice([e, np.nextafter(e, -np.inf), np.nextafter(e, np.inf)]))
                if i == 0:
                    scores[j] = val
                else:
                    rows[j, i - 1] = val
        mask = rng.random(rows.shape) < 0.05
        rows[mask] = rng.choice([np.nan, np.inf, -np.inf], int(mask.sum()))
        scores[rng.random(b) < 0.05] = np.nan
        assert np.array_equal(stats.bin_rows(rows, n_tab, scores), stats.bin_rows_reference(rows, n_tab, scores))


def test_window_is_bounded_by_count_and_time(rng):
    stats = MonitoringStats((VariableStats("score", "score", (0.0,), (0.5, 0.5)),
                             VariableStats("embedding_norm", "embedding_norm", (1.0,), (0.5, 0.5))),
                            {"APPROVE": 1.0}, 100, "t")
    w = DriftWindow(stats, capacity=50, window_s=10.0)
    bins = rng.integers(0, 2, (30, 2)).astype(np.int8)
    oc = np.zeros(30, np.int8)
    w.add(bins, oc, now_s=100.0)
    counts, o, n = w.snapshot(105.0)
    assert n == 30 and counts[0].sum() == 30 and np.array_equal(counts[0, :2], np.bincount(bins[:, 0], minlength=2))
    w.add(bins, oc, now_s=106.0)                          # 60 > capacity 50: the oldest 10 are gone
    assert w.snapshot(107.0)[2] == 50
    assert w.snapshot(112.0)[2] == 30                     # the first batch is now older than 10 s
    assert w.snapshot(200.0)[2] == 0
    big = rng.integers(0, 2, (120, 2)).astype(np.int8)    # one batch larger than the ring
    w.add(big, np.zeros(120, np.int8), now_s=300.0)
    c, _, n = w.snapshot(300.0)
    assert n == 50 and np.array_equal(c[1, :2], np.bincount(big[-50:, 1], minlength=2))


def test_stats_round_trip_and_refusals(small_bundle):
    from uwrt.runtime.bundle.bundle import load_bundle
    b = load_bundle(small_bundle, check_trees_with_xgboost=False)
    stats = load_stats(b)
    assert stats is not None and stats.names[0] == "score" and stats.names[-1] == "embedding_norm"
    assert MonitoringStats.from_dict(json.loads(stats.to_json())) == stats
    assert stats.n >= 2000 and abs(sum(stats.outcomes.values()) - 1) < 1e-9
    doc = stats.to_dict()
    doc["variables"][1]["expected"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="expected must hold"):
        MonitoringStats.from_dict(doc)
    with pytest.raises(ValueError, match="monitors features"):
        stats.check_schema(["only_this"])
    with pytest.raises(ValueError, match="too small"):
        MonitoringStats.compute(tabular=np.zeros((50, 1)), embedding=np.zeros((50, 2)), scores=np.zeros(50),
                                outcomes=[1] * 50, feature_names=["a"], source="t")


def test_tampered_monitoring_file_is_refused(small_bundle, tmp_path):
    import shutil

    from uwrt.runtime.bundle.bundle import load_bundle
    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy, ignore=shutil.ignore_patterns("cache"))
    b = load_bundle(copy, check_trees_with_xgboost=False)
    doc = json.loads((copy / "monitoring.json").read_text())
    doc["n"] += 1
    (copy / "monitoring.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="monitoring.json"):
        load_stats(b)


def _requests(tmp_path, name: str, n: int, seed: int, drift: float):
    reqs = generate(n, seed, id_prefix=f"{name}-", drift=drift).requests
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as fh:
        write_jsonl(reqs, fh)
    return reqs, path


def test_offline_drift_flags_the_shifted_mix_only(small_bundle, tmp_path, capsys, rng):
    seed = int(rng.integers(0, 1 << 30))
    _, same = _requests(tmp_path, "same", 1500, seed, 0.0)
    _, shifted = _requests(tmp_path, "shifted", 1500, seed + 1, SHIFT)
    reports = {}
    for name, path in (("same", same), ("shifted", shifted)):
        capsys.readouterr()
        rc = cli_main(["drift", "--bundle", str(small_bundle), "--input", str(path), "--json", "--fail-above", "0.25"])
        reports[name] = (rc, json.loads(capsys.readouterr().out))
    rc, rep = reports["same"]
    assert rc == 0 and rep["decisions"] == 1500
    assert all(v["psi"] < 0.10 for v in rep["variables"].values()), rep["variables"]
    rc, rep = reports["shifted"]
    assert rc == 1
    assert rep["variables"]["score"]["psi"] > 0.25 and rep["variables"]["score"]["reading"] == "significant"
    assert rep["outcomes"]["DECLINE"]["share"] > rep["outcomes"]["DECLINE"]["expected"]


N_SERVED = 1500
CFG = RuntimeConfig(port=0, grace_s=5.0, drift_min_decisions=200, security=SecurityConfig(model_info_exposure="full"),
                    batching=BatchingConfig(max_batch_size=16, max_queue=2048, max_queue_delay_us=60_000_000))


def _serve_and_report(pipe, reqs):
    async def main():
        server = Server(pipe, CFG)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.UnderwritingStub(ch)
                for s in range(0, len(reqs), 250):       # a few hundred in flight at a time
                    await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs[s:s + 250]))
                obs = server.rt.obs
                obs._sync_drift(obs_now())
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                return obs._report, {k: json.loads(v) for k, v in info.settings.items()}   # values are JSON
        finally:
            await server.stop(1.0)
    return asyncio.run(main())


def obs_now() -> float:
    import time
    return time.monotonic()


def test_server_psi_crosses_025_only_for_the_shifted_mix(pipe, rng):
    # 1500 decisions a run: at 600 the shifted score's PSI came as low as 0.275 over 20 seeds
    # (sampling noise of the window and the development sample), at 1500 it stayed >= 0.378 over 30
    seed = int(rng.integers(0, 1 << 30))
    same = generate(N_SERVED, seed, id_prefix="ss-").requests
    shifted = generate(N_SERVED, seed + 1, id_prefix="sh-", drift=SHIFT).requests
    rep, info = _serve_and_report(pipe, same)
    assert rep["decisions"] == N_SERVED
    assert rep["variables"]["score"]["psi"] < 0.10, rep["variables"]["score"]
    assert info["drift.status"].startswith("on:") and float(info["drift.psi.score"]) < 0.10
    rep, info = _serve_and_report(pipe, shifted)           # a fresh server: a fresh window
    assert rep["variables"]["score"]["psi"] > 0.25, rep["variables"]["score"]
    assert "significant" in info["drift.max_psi"]


def test_report_is_nan_below_min_decisions():
    stats = MonitoringStats((VariableStats("score", "score", (0.0,), (0.5, 0.5)),
                             VariableStats("embedding_norm", "embedding_norm", (1.0,), (0.5, 0.5))),
                            {"APPROVE": 1.0}, 100, "t")
    rep = drift_report(stats, np.array([[3, 4], [5, 2]]), np.array([7, 0, 0, 0]), 7, min_decisions=10)
    assert math.isnan(rep["variables"]["score"]["psi"]) and rep["variables"]["score"]["reading"] == "n/a"


def test_bundle_without_monitoring_reports_drift_off(pipe):
    from uwrt.runtime.serving.observe import Observer
    bundle = dataclasses.replace(pipe.bundle, manifest={**pipe.bundle.manifest, "files": {
        k: v for k, v in pipe.bundle.manifest["files"].items() if k != "monitoring.json"}})

    class P:       # the pipeline's surface Observer reads, on a bundle without monitoring.json
        def __init__(self):
            self.bundle, self.schema, self.identity = bundle, pipe.schema, pipe.identity
            self.tree_report, self.trees, self.explainer = pipe.tree_report, pipe.trees, pipe.explainer
    obs = Observer(P(), CFG, batcher=None)                 # type: ignore[arg-type]
    assert obs.window is None and "no monitoring.json" in obs.drift_status
    assert obs.info()["drift.status"].startswith("off:")
