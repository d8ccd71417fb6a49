"""Decision records and idempotency through a real in-process server (port 0, grpc.aio clients):
every answer is in the log exactly as sent, errors too; a retried id gets its stored decision
back (path REPLAY), another request under the same id is ALREADY_EXISTS, concurrent duplicates
are decided once, and all of it holds across a restart on the same log directory."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pb import pb, pb_grpc, rec
from uwrt.runtime.records.reader import records, verify
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.server import Server

BASE = RuntimeConfig(port=0, grace_s=5.0, batching=BatchingConfig(max_batch_size=16, max_wait_us=2000, max_queue=1024,
                                                                         max_queue_delay_us=60_000_000))


def cfg_for(tmp_path, **kw) -> RuntimeConfig:
    return dataclasses.replace(BASE, records_dir=str(tmp_path / "log"), **kw)


class Harness:
    def __init__(self, pipe, cfg):
        self.server = Server(pipe, cfg)

    async def __aenter__(self):
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.UnderwritingStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(2.0)


def copy(req, rid=None):
    r = pb.DecisionRequest()
    r.CopyFrom(req)
    if rid is not None:
        r.request_id = rid
    return r


def logged(tmp_path) -> list[rec.DecisionRecord]:
    return [r for _, r in records(tmp_path / "log")]


def test_every_decision_is_recorded_as_sent(pipe, traffic, tmp_path, rng):
    reqs = [copy(traffic[int(i)], f"d-{k}") for k, i in enumerate(rng.integers(0, len(traffic), 60))]

    async def main():
        async with Harness(pipe, cfg_for(tmp_path)) as h:
            unary = await asyncio.gather(*(h.stub.Decide(r, timeout=30) for r in reqs[:40]))
            stream = [x async for x in h.stub.DecideStream(iter(reqs[40:]), timeout=30)]
            return unary + stream

    got = asyncio.run(main())
    assert len(got) == 60 and all(not g.HasField("error") for g in got)
    recs = logged(tmp_path)
    by_id = {r.request_id: r for r in recs}
    assert len(recs) == 60 and len(by_id) == 60
    req_by_id = {r.request_id: r for r in reqs}
    for g in got:
        r = by_id[g.request_id]
        assert r.kind == rec.KIND_DECISION
        assert r.response.SerializeToString() == g.SerializeToString()        # the response exactly as sent
        assert r.request == req_by_id[g.request_id]
        assert r.rpc == (rec.RPC_DECIDE if int(g.request_id[2:]) < 40 else rec.RPC_DECIDE_STREAM)
        assert r.response.model.bundle_digest == pipe.identity.bundle_digest and r.batch_id > 0
        assert r.received_unix_ns <= r.answered_unix_ns and r.as_of_unix_s == r.request.as_of.seconds
        assert r.encoder_backend and r.tree_backend and r.profile == "cpu"
    rep = verify(tmp_path / "log")
    assert rep.ok, rep.all_problems()
    assert all(s.sealed for s in rep.segments)          # sealed at shutdown


def test_errors_are_recorded_and_capped(pipe, traffic, tmp_path):
    bad = copy(traffic[0], "bad-1")
    bad.history.type.append(99)                          # columns of unequal length / unknown type
    huge = copy(traffic[1], "huge-1")
    huge.purchase.merchant_id = "m" * 5000

    async def main():
        async with Harness(pipe, cfg_for(tmp_path, max_request_bytes=4096)) as h:
            codes = []
            for r in (bad, huge):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await h.stub.Decide(r, timeout=30)
                codes.append(ei.value.code())
            return codes

    codes = asyncio.run(main())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    recs = {r.request_id: r for r in logged(tmp_path)}
    assert recs["bad-1"].kind == rec.KIND_ERROR and recs["bad-1"].error.code == "INVALID_ARGUMENT"
    assert recs["bad-1"].error.field.startswith("history") and recs["bad-1"].request == bad
    h = recs["huge-1"]
    assert h.kind == rec.KIND_ERROR and "exceeds the limit" in h.error.message
    assert not h.HasField("request") and 0 < len(h.request_prefix) <= 256      # a bounded prefix, not the payload


def test_digest_mode_keeps_no_payload(pipe, traffic, tmp_path):
    async def main():
        async with Harness(pipe, cfg_for(tmp_path, records_payload="digest")) as h:
            return await h.stub.Decide(copy(traffic[3], "p-1"), timeout=30)

    asyncio.run(main())
    (r,) = logged(tmp_path)
    assert not r.HasField("request") and len(r.request_digest) == 32 and r.as_of_unix_s == traffic[3].as_of.seconds


def test_retry_replays_conflict_is_refused_duplicates_decided_once_also_after_restart(pipe, traffic, tmp_path):
    a = copy(traffic[5], "idem-a")
    other = copy(traffic[6], "idem-a")                   # same id, another request

    async def first():
        async with Harness(pipe, cfg_for(tmp_path)) as h:
            one = await h.stub.Decide(a, timeout=30)
            again = await h.stub.Decide(a, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await h.stub.Decide(other, timeout=30)
            burst = await asyncio.gather(*(h.stub.Decide(copy(traffic[7], "idem-b"), timeout=30) for _ in range(6)))
            return one, again, ei.value, burst

    one, again, err, burst = asyncio.run(first())
    assert one.path == pb.MODEL and again.path == pb.REPLAY
    again.path = pb.MODEL
    assert again.SerializeToString() == one.SerializeToString()      # bit for bit, but for the path
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "idem-a" in err.details()
    assert sum(b.path == pb.MODEL for b in burst) == 1 and sum(b.path == pb.REPLAY for b in burst) == 5
    decided_b = next(b for b in burst if b.path == pb.MODEL)
    for b in burst:
        b.path = pb.MODEL
        assert b.SerializeToString() == decided_b.SerializeToString()

    async def after_restart():
        async with Harness(pipe, cfg_for(tmp_path)) as h:
            return await h.stub.Decide(a, timeout=30), await h.stub.Decide(copy(traffic[7], "idem-b"), timeout=30)

    ra, rb = asyncio.run(after_restart())
    assert ra.path == pb.REPLAY and rb.path == pb.REPLAY
    ra.path = rb.path = pb.MODEL
    assert ra.SerializeToString() == one.SerializeToString() and rb.SerializeToString() == decided_b.SerializeToString()
    recs = logged(tmp_path)
    kinds = [(r.request_id, r.kind) for r in recs]
    assert kinds.count(("idem-a", rec.KIND_DECISION)) == 1 and kinds.count(("idem-b", rec.KIND_DECISION)) == 1
    assert kinds.count(("idem-a", rec.KIND_REPLAY)) == 2 and kinds.count(("idem-b", rec.KIND_REPLAY)) == 6
    assert kinds.count(("idem-a", rec.KIND_ERROR)) == 1
    replay = next(r for r in recs if r.kind == rec.KIND_REPLAY and r.request_id == "idem-a")
    orig = next(r for r in recs if r.kind == rec.KIND_DECISION and r.request_id == "idem-a")
    assert (replay.replay_of_writer, replay.replay_of_seq) == ("w0", orig.seq)
    assert verify(tmp_path / "log").ok


def test_an_invalid_request_does_not_hold_its_id(pipe, traffic, tmp_path):
    bad = copy(traffic[8], "fix-me")
    bad.purchase.amount_minor = -5
    good = copy(traffic[8], "fix-me")

    async def main():
        async with Harness(pipe, cfg_for(tmp_path)) as h:
            with pytest.raises(grpc.aio.AioRpcError):
                await h.stub.Decide(bad, timeout=30)
            return await h.stub.Decide(good, timeout=30)

    assert asyncio.run(main()).path == pb.MODEL         # corrected and resent under the same id: decided
