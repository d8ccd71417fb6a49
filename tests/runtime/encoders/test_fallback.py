"""GPU -> CPU fallback at run time, with injected faults in a fake GPU backend: the failed batch
is retried on the fallback, the runtime degrades (logged, counted, GetModelInfo) and keeps
answering with health SERVING; re-probing; a fallback failure is not hidden."""
import asyncio
import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.runtime.encoders.test_torch_encoder import CFG, random_packed, random_state
from uwrt.runtime.config import RuntimeConfig, SecurityConfig
from uwrt.runtime.encoders.fallback import FallbackEncoder
from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.pipeline import Pipeline
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.server import Server


class FlakyGPU:
    """A fake GPU backend: a real CPU encoder that raises like CUDA would once `fail` is set."""
    name = "triton"

    def __init__(self, inner, exc=None):
        self.inner, self.fail, self.calls, self.warmups = inner, False, 0, 0
        self.exc = exc or RuntimeError("CUDA error: an illegal memory access was encountered")

    def warmup(self):
        self.warmups += 1

    def encode(self, events):
        self.calls += 1
        if self.fail:
            raise self.exc
        return self.inner.encode(events)


class Recorder:
    """A fallback that records what it encoded."""
    name = "onnx"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def encode(self, events):
        self.calls += 1
        return self.inner.encode(events)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def cpu_encoder():
    return TorchEncoderBackend(CFG, random_state(CFG, 77))


def test_healthy_primary_is_used_and_not_degraded(rng, cpu_encoder):
    gpu, cpu = FlakyGPU(cpu_encoder), Recorder(cpu_encoder)
    fb = FallbackEncoder(gpu, cpu)
    ev = random_packed(rng.integers(1, 60, 5), rng)
    np.testing.assert_array_equal(fb.encode(ev), cpu_encoder.encode(ev))
    assert (gpu.calls, cpu.calls) == (1, 0) and not fb.degraded and fb.name == "triton"
    assert fb.stats()["primary_batches"] == 1 and fb.stats()["primary_failures"] == 0


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: device-side assert triggered"),
                                 MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 ValueError("triton kernel launch failed")])
def test_failure_retries_the_batch_on_the_fallback_and_degrades(rng, cpu_encoder, caplog, exc):
    gpu, cpu = FlakyGPU(cpu_encoder, exc), Recorder(cpu_encoder)
    fb = FallbackEncoder(gpu, cpu)
    ev = random_packed(rng.integers(1, 129, 7), rng)
    gpu.fail = True
    with caplog.at_level(logging.ERROR, logger="uwrt.fallback"):
        out = fb.encode(ev)
    np.testing.assert_array_equal(out, cpu_encoder.encode(ev))       # the failed batch was answered
    assert fb.degraded and fb.name == "onnx (fallback from triton)"
    assert "DEGRADED" in caplog.text and type(exc).__name__ in caplog.text
    s = fb.stats()
    assert (s["primary_failures"], s["retried_batches"], s["fallback_batches"]) == (1, 1, 1)
    assert type(exc).__name__ in s["last_error"]
    # later batches stay on the fallback without touching the GPU again (reprobe_s = 0)
    gpu.fail = False
    for _ in range(3):
        fb.encode(ev)
    assert gpu.calls == 1 and cpu.calls == 4 and fb.degraded and fb.stats()["fallback_batches"] == 4


def test_reprobe_recovers_after_the_interval(rng, cpu_encoder, caplog):
    clock = Clock()
    gpu, cpu = FlakyGPU(cpu_encoder), Recorder(cpu_encoder)
    fb = FallbackEncoder(gpu, cpu, reprobe_s=30.0, clock=clock)
    ev = random_packed([5, 9], rng)
    gpu.fail = True
    fb.encode(ev)
    assert fb.degraded and gpu.calls == 1
    clock.t += 10
    fb.encode(ev)
    assert gpu.calls == 1                                   # too early to re-probe
    clock.t += 25
    fb.encode(ev)                                           # re-probe fails: retried on the fallback again
    assert gpu.calls == 2 and fb.degraded and fb.stats()["primary_failures"] == 2
    clock.t += 31
    gpu.fail = False
    with caplog.at_level(logging.WARNING, logger="uwrt.fallback"):
        np.testing.assert_array_equal(fb.encode(ev), cpu_encoder.encode(ev))
    assert gpu.calls == 3 and not fb.degraded and fb.stats()["recoveries"] == 1 and "recovered" in caplog.text
    assert fb.name == "triton"


def test_fallback_failure_is_raised_and_counted(rng, cpu_encoder):
    class Broken:
        name = "onnx"

        def encode(self, events):
            raise RuntimeError("cpu broke too")

    gpu = FlakyGPU(cpu_encoder)
    gpu.fail = True
    fb = FallbackEncoder(gpu, Broken())
    with pytest.raises(RuntimeError, match="cpu broke too"):
        fb.encode(random_packed([4], rng))
    assert fb.stats()["fallback_failures"] == 1 and fb.degraded


def test_warmup_warms_both_and_a_failing_primary_fails_it(cpu_encoder):
    gpu = FlakyGPU(cpu_encoder)
    fb = FallbackEncoder(gpu, Recorder(cpu_encoder))
    fb.warmup()
    assert gpu.warmups == 1

    def bad():
        raise RuntimeError("CUDA graph capture failed")
    gpu.warmup = bad
    with pytest.raises(RuntimeError, match="capture"):
        fb.warmup()
    with pytest.raises(ValueError):
        FallbackEncoder(gpu, Recorder(cpu_encoder), reprobe_s=-1)


def test_server_keeps_serving_on_gpu_failure(small_bundle, traffic, caplog):
    """End to end: a server whose GPU encoder starts failing mid-traffic answers every request
    (scores equal to a CPU-only pipeline's), stays SERVING, and reports degraded + counters."""
    base = Pipeline.from_dir(small_bundle, encoder_backend="torch")
    cpu_only = Pipeline.from_dir(small_bundle, encoder_backend="onnx")
    gpu = FlakyGPU(base.encoder)
    pipe = Pipeline.from_dir(small_bundle, encoder=FallbackEncoder(gpu, cpu_only.encoder))
    cfg = RuntimeConfig(port=0, grace_s=5.0, batching=BatchingConfig(max_batch_size=8, max_wait_us=500, max_queue=1024,
                                                                     max_queue_delay_us=60_000_000),
                        security=SecurityConfig(model_info_exposure="full"))
    reqs = []
    for i in range(40):
        r = pb.DecisionRequest()
        r.CopyFrom(traffic[i])
        r.request_id = f"f-{i}"
        reqs.append(r)
    expect = {r.request_id: o for r, o in zip(reqs, cpu_only.decide(reqs), strict=True)}

    async def main():
        server = Server(pipe, cfg, profile="gpu")
        await server.start()
        assert gpu.warmups == 1                              # encoder warm-up ran before SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub, health = pb_grpc.UnderwritingStub(ch), health_pb2_grpc.HealthStub(ch)
            before = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            first = await asyncio.gather(*(stub.Decide(r, timeout=30) for r in reqs[:10]))
            gpu.fail = True                                  # inject the fault
            rest = await asyncio.gather(*(stub.Decide(r, timeout=30) for r in reqs[10:]))
            after = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            st = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        await server.stop(1.0)
        return before, first + rest, after, st

    with caplog.at_level(logging.ERROR, logger="uwrt.fallback"):
        before, responses, after, st = asyncio.run(main())
    assert not before.degraded and before.encoder_backend == "triton" and before.profile == "gpu"
    assert len(responses) == 40 and all(not r.HasField("error") for r in responses)
    for r in responses[10:]:                                 # answered by the CPU fallback
        assert r.probability_of_default == pytest.approx(expect[r.request_id].probability_of_default, abs=1e-6)
    assert after.degraded and after.encoder_backend == "onnx (fallback from triton)"
    assert int(after.settings["encoder.primary_failures"]) == 1
    assert int(after.settings["encoder.retried_batches"]) == 1
    assert int(after.settings["encoder.fallback_batches"]) >= 1
    assert st.status == health_pb2.HealthCheckResponse.SERVING
    assert "DEGRADED" in caplog.text
