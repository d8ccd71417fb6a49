"""Hot reload under steady load (in-process server, Admin.Reload): two reloads, zero failed
requests, and every response's bundle is the one its batch ran on (the decision log's batch
records: one digest per batch, switching only at the reloads); a broken bundle is refused with
its reason and the old one keeps serving; the admin service is off unless enabled."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import grpc
import pytest

from uwrt.runtime.config import RuntimeConfig, SecurityConfig
from uwrt.runtime.pb import admin_grpc, admin_pb, pb, pb_grpc, rec
from uwrt.runtime.records.reader import records, verify
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.server import Server

# the full GetModelInfo (minimal by default): these tests read the reload.* counters from it
CFG = RuntimeConfig(port=0, grace_s=5.0, admin_enabled=True, security=SecurityConfig(model_info_exposure="full"),
                    batching=BatchingConfig(max_batch_size=8, max_wait_us=2000, max_queue=1024,
                                            max_queue_delay_us=60_000_000))


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory):
    from uwrt.demo.train import DemoConfig, build_demo
    out = tmp_path_factory.mktemp("bundles") / "other"
    build_demo(out, DemoConfig.preset("small", seed=8))
    return out


def test_two_reloads_under_load_drop_nothing(pipe, small_bundle, other_bundle, traffic, tmp_path):
    cfg = dataclasses.replace(CFG, records_dir=str(tmp_path / "log"))
    a_digest = pipe.identity.bundle_digest
    b_digest = json.loads((other_bundle / "manifest.json").read_text())["bundle_digest"]
    assert a_digest != b_digest
    broken = tmp_path / "broken"
    shutil.copytree(other_bundle, broken)
    with open(broken / "trees.ubj", "r+b") as fh:        # a flipped byte: digest verification refuses it
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))

    hooked: list[tuple[str, str, float]] = []       # the metrics hooks (the exporter plugs in there)

    async def main():
        server = Server(pipe, cfg, bundle_path=str(small_bundle))
        await server.start()
        assert server.rt.audit is not None
        server.reloader.metrics_hook = server.rt.audit.metrics_hook = lambda n, lab, v: hooked.append((n, lab, v))
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub, admin = pb_grpc.UnderwritingStub(ch), admin_grpc.AdminStub(ch)
        stop = asyncio.Event()
        got, errors = [], []

        async def client(k: int) -> None:
            i = 0
            while not stop.is_set():
                r = pb.DecisionRequest()
                r.CopyFrom(traffic[(k * 37 + i) % len(traffic)])
                r.request_id = f"l-{k}-{i}"
                i += 1
                try:
                    got.append(await stub.Decide(r, timeout=30))
                except grpc.aio.AioRpcError as e:
                    errors.append(e.code())

        clients = [asyncio.ensure_future(client(k)) for k in range(6)]
        await asyncio.sleep(0.5)
        r1 = await admin.Reload(admin_pb.ReloadRequest(bundle=str(other_bundle)), timeout=300)
        await asyncio.sleep(0.5)
        bad = await admin.Reload(admin_pb.ReloadRequest(bundle=str(broken)), timeout=300)
        await asyncio.sleep(0.3)
        r2 = await admin.Reload(admin_pb.ReloadRequest(), timeout=300)     # "": the bundle loaded last (B)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        await ch.close()
        await server.stop(5.0)
        return r1, bad, r2, got, errors, info

    r1, bad, r2, got, errors, info = asyncio.run(main())
    assert r1.ok and r1.bundle_digest == b_digest, r1.message
    assert not bad.ok and "load" in bad.message and "trees.ubj" in bad.message
    # an empty bundle path reloads the last bundle loaded (B, the default after r1): same digest again
    assert r2.ok and r2.bundle_digest == b_digest, r2.message
    assert not errors, errors[:5]
    assert len(got) > 50
    assert info.model.bundle_digest == b_digest and info.settings["reload.reloads"] == "2"
    assert info.settings["reload.refused"] == "1"
    recs = [r for _, r in records(tmp_path / "log") if r.kind == rec.KIND_DECISION]
    assert len(recs) == len(got)
    by_batch: dict[int, set[str]] = {}
    for r in recs:
        by_batch.setdefault(r.batch_id, set()).add(r.response.model.bundle_digest)
    assert all(len(d) == 1 for d in by_batch.values())              # one bundle per batch
    seq = [next(iter(by_batch[b])) for b in sorted(by_batch)]
    switches = [k for k in range(1, len(seq)) if seq[k] != seq[k - 1]]
    assert seq[0] == a_digest and seq[-1] == b_digest and len(switches) == 1   # A..A then B..B (r2 reloaded B)
    sent = {g.request_id: g.model.bundle_digest for g in got}
    assert all(sent[r.request_id] == r.response.model.bundle_digest for r in recs)
    assert verify(tmp_path / "log").ok
    reloads = [lab for n, lab, _ in hooked if n == "uwrt_reloads_total"]
    assert sorted(reloads) == ["result=ok", "result=ok", "result=refused"]
    assert [lab for n, lab, _ in hooked if n == "uwrt_bundle_info"][-1].endswith(f"bundle_digest={b_digest}")
    assert sum(v for n, _, v in hooked if n == "uwrt_records_written_total") == len(list(records(tmp_path / "log")))


def test_admin_service_is_off_by_default(pipe):
    async def main():
        server = Server(pipe, dataclasses.replace(CFG, admin_enabled=False))
        await server.start()
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin_grpc.AdminStub(ch).Reload(admin_pb.ReloadRequest(), timeout=10)
            return ei.value.code()
        finally:
            await ch.close()
            await server.stop(1.0)

    assert asyncio.run(main()) == grpc.StatusCode.UNIMPLEMENTED


def test_shadow_scores_a_sample_after_the_response_and_counts_agreement(pipe, other_bundle, traffic, tmp_path):
    cfg = dataclasses.replace(CFG, records_dir=str(tmp_path / "log"), shadow_bundle=str(other_bundle),
                              shadow_share=0.5, shadow_queue=64)

    async def main():
        server = Server(pipe, cfg)
        await server.start()
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.UnderwritingStub(ch)
        got = []
        for k in range(0, 120, 8):         # batches one after another: the champion's queue is idle in between
            reqs = []
            for i in range(k, k + 8):
                r = pb.DecisionRequest()
                r.CopyFrom(traffic[i % len(traffic)])
                r.request_id = f"s-{i}"
                reqs.append(r)
            got += await asyncio.gather(*(stub.Decide(r, timeout=30) for r in reqs))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        await ch.close()
        await server.stop(5.0)
        return got, dict(info.settings)

    from uwrt.runtime.serving.shadow import sampled
    got, s = asyncio.run(main())
    assert all(g.model.bundle_digest == pipe.identity.bundle_digest for g in got)   # the champion answered
    recs = [r for _, r in records(tmp_path / "log")]
    dec = {r.request_id: r for r in recs if r.kind == rec.KIND_DECISION}
    shadow = {r.request_id: r for r in recs if r.kind == rec.KIND_SHADOW}
    want = {rid for rid, r in dec.items() if sampled(r.request_digest, 0.5)}
    dropped = int(s["shadow.dropped_busy"]) + int(s["shadow.dropped_queue_full"])
    assert set(shadow) <= want and len(shadow) + dropped == len(want) and 20 < len(want) < 100
    assert int(s["shadow.scored"]) == len(shadow) and len(shadow) > 0
    other = json.loads((other_bundle / "manifest.json").read_text())["bundle_digest"]
    for rid, r in shadow.items():
        assert r.response.model.bundle_digest == other and not r.HasField("request")
        assert r.champion_outcome == dec[rid].response.outcome and r.champion_score == dec[rid].response.score
        assert r.request_digest == dec[rid].request_digest
    conf = sum(int(v) for k, v in s.items() if k.startswith("shadow.confusion."))
    hist = sum(int(v) for k, v in s.items() if k.startswith("shadow.score_abs_diff."))
    agree = sum(r.champion_outcome == r.response.outcome for r in shadow.values())
    assert conf == hist == len(shadow) and int(s["shadow.agree"]) == agree
