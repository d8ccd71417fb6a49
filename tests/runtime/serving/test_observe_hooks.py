"""The observer's hooks for features merged beside it: the challenger's metrics hook and the
decision log's running totals reach prometheus_client; a hot reload re-points the observer."""
from __future__ import annotations

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.serving.metrics import registry
from uwrt.runtime.serving.observe import Observer


class _Batcher:
    _inflight = None

    def stats(self):
        return {"rejected": 0, "expired": 0, "cancelled": 0, "batches": 0, "queued": 0}


IDEM = "uwrt_records_idempotency_total"


def _v(name: str, **labels) -> float:
    return registry().get_sample_value(name, labels) or 0.0


def test_shadow_and_records_reach_the_metrics(pipe):
    obs = Observer(pipe, RuntimeConfig(port=0), _Batcher())

    class Shadow:
        metrics_hook = None

    class Audit:
        totals = {"records": 10, "fsyncs": 3, "failures": 0, "replays": 4, "conflicts": 1}

        def stats(self):
            return dict(self.totals)

    sh, au = Shadow(), Audit()
    obs.attach_shadow(sh)
    obs.attach_audit(au)                     # totals so far are the baseline, not counted
    before = (_v("uwrt_shadow_decisions_total", champion="APPROVE", challenger="DECLINE"),
              _v("uwrt_shadow_score_abs_diff_count"), _v("uwrt_records_written_total"), _v("uwrt_records_fsyncs_total"),
              _v(IDEM, result="replays"), _v(IDEM, result="conflicts"))
    sh.metrics_hook("uwrt_shadow_decisions_total", "champion=APPROVE,challenger=DECLINE", 1.0)
    sh.metrics_hook("uwrt_shadow_score_abs_diff", "", 3.5)
    au.totals = {"records": 17, "fsyncs": 5, "failures": 1, "replays": 7, "conflicts": 1}
    obs.sync()
    after = (_v("uwrt_shadow_decisions_total", champion="APPROVE", challenger="DECLINE"),
             _v("uwrt_shadow_score_abs_diff_count"), _v("uwrt_records_written_total"), _v("uwrt_records_fsyncs_total"),
             _v(IDEM, result="replays"), _v(IDEM, result="conflicts"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1.0, 1.0, 7.0, 2.0, 3.0, 0.0]


def test_reloads_reach_the_metrics(pipe):
    obs = Observer(pipe, RuntimeConfig(port=0), _Batcher())

    class Reloader:
        metrics_hook = None

    r = Reloader()
    obs.attach_reloader(r)
    ok, refused = _v("uwrt_reloads_total", result="ok"), _v("uwrt_reloads_total", result="refused")
    r.metrics_hook("uwrt_reloads_total", "result=refused", 1.0)
    r.metrics_hook("uwrt_reloads_total", "result=ok", 1.0)
    r.metrics_hook("uwrt_reloads_total", "result=ok", 1.0)
    r.metrics_hook("uwrt_bundle_info", "bundle_id=x", 1.0)          # the bundle info series follows swap()
    assert _v("uwrt_reloads_total", result="ok") - ok == 2.0
    assert _v("uwrt_reloads_total", result="refused") - refused == 1.0


def test_swap_moves_the_hook_to_the_new_pipeline(small_bundle, pipe):
    from uwrt.runtime.pipeline import Pipeline
    obs = Observer(pipe, RuntimeConfig(port=0), _Batcher())
    obs.install()
    try:
        assert pipe.on_batch == obs.on_batch
        new = Pipeline.from_dir(small_bundle)
        obs.swap(pipe, new)
        assert pipe.on_batch is None and new.on_batch == obs.on_batch and obs.pipe is new
        assert obs.window is not None and obs.drift_status.startswith("on:")
        labels = {s.labels["bundle_digest"] for fam in registry().collect() if fam.name == "uwrt_bundle_info"
                  for s in fam.samples}
        assert labels == {new.identity.bundle_digest}
    finally:
        obs.close()
        pipe.on_batch = None
