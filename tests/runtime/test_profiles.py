"""Deployment profiles: resolution (auto / cpu / gpu, with an injected CUDA probe), precedence
(defaults < profile < file < env < flags), the CLI's refusal of an unusable `gpu`, and every
backend x profile combination that runs here end to end through the server (cpu profile with
torch / torchscript / onnx; gpu profile with a fake Triton backend on a fake device)."""
import asyncio
import dataclasses
import json
import logging
import sys
import types

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.factories import relabelled
from uwrt.runtime import profiles
from uwrt.runtime.cli.main import main
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.encoders.fallback import FallbackEncoder
from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.profiles import CPU, GPU, ProfileUnavailable, load_config, resolve_profile
from uwrt.runtime.serving.server import Server, build_pipeline

NO_CUDA = lambda: (False, "torch.cuda.is_available() is False (test)")  # noqa: E731
CUDA = lambda: (True, "CUDA usable: Fake H100 (test)")                  # noqa: E731


def test_resolution():
    assert resolve_profile("cpu", probe=CUDA)[0] is CPU
    prof, why = resolve_profile("auto", probe=NO_CUDA)
    assert prof is CPU and "picked cpu" in why and "is_available() is False" in why
    prof, why = resolve_profile("auto", probe=CUDA)
    assert prof is GPU and "Fake H100" in why
    assert resolve_profile("gpu", probe=CUDA)[0] is GPU
    with pytest.raises(ProfileUnavailable, match="--profile gpu requested but CUDA is not usable: torch.cuda"):
        resolve_profile("gpu", probe=NO_CUDA)
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        resolve_profile("tpu", probe=CUDA)


def test_real_probe_answers_with_a_reason():
    usable, why = profiles.cuda_usable()
    assert isinstance(usable, bool) and why


def test_every_profile_setting_is_a_valid_knob():
    for prof in (CPU, GPU):
        cfg = load_config(env={}, probe=CUDA, profile=prof.name).config
        flat = cfg.flat()
        for dotted, v in prof.settings.items():
            assert flat[dotted] == (list(v) if isinstance(v, tuple) else v), (prof.name, dotted)
        assert cfg.profile == prof.name and cfg.tree_path == "auto"


def test_precedence_defaults_profile_file_env_flags(tmp_path):
    f = tmp_path / "uwrt.toml"
    f.write_text("profile = 'gpu'\n[batching]\nmax_wait_us = 700\nmax_queue = 64\n")
    env = {"UWRT_BATCHING_MAX_QUEUE": "99", "UWRT_TREE_THREADS": "3"}
    r = load_config(str(f), env=env, probe=CUDA, tree_threads=4)
    c = r.config
    assert r.profile is GPU and r.requested == "gpu" and c.profile == "gpu"
    assert c.batching.max_batch_size == 128 and c.encoder_backend == "triton"   # profile beats defaults
    assert c.batching.max_wait_us == 700                                      # file beats profile
    assert c.batching.max_queue == 99                                         # env beats file
    assert c.tree_threads == 4                                                # flag beats env
    assert c.batching.max_queue_delay_us == RuntimeConfig().batching.max_queue_delay_us
    # the profile itself: flag > env > file; auto resolves and the resolved name is kept
    assert load_config(str(f), env={"UWRT_PROFILE": "cpu"}, probe=CUDA).config.encoder_backend == "onnx"
    assert load_config(env={}, probe=NO_CUDA).config.profile == "cpu"
    assert load_config(env={}, probe=CUDA).config.profile == "gpu"
    # without a resolver (uwrt score, library use) only the plain defaults apply
    assert RuntimeConfig.load(env={}).profile == "auto" and RuntimeConfig.load(env={}).encoder_backend == "onnx"


def test_bad_profile_values_are_refused():
    with pytest.raises(ValueError, match="profile must be one of"):
        RuntimeConfig.load(env={}, profile="fast")
    with pytest.raises(ValueError, match="encoder_backend must be one of"):
        RuntimeConfig.load(env={}, encoder_backend="tensorrt")
    with pytest.raises(ValueError, match="tree_path must be one of"):
        RuntimeConfig.load(env={}, tree_path="gpu")
    with pytest.raises(ValueError, match="encoder_device"):
        RuntimeConfig.load(env={}, encoder_device="metal")


def test_cli_gpu_without_cuda_exits_nonzero_with_reason(monkeypatch, capsys, small_bundle):
    monkeypatch.setattr(profiles, "cuda_usable", NO_CUDA)
    rc = main(["serve", "--profile", "gpu", "--bundle", str(small_bundle), "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 3 and "--profile gpu requested but CUDA is not usable" in err and "is_available() is False" in err


def test_auto_without_cuda_logs_why(caplog, monkeypatch):
    monkeypatch.setattr(profiles, "cuda_usable", NO_CUDA)
    with caplog.at_level(logging.INFO, logger="uwrt.profiles"):
        r = load_config(env={})
    assert r.config.profile == "cpu" and r.config.encoder_device == "cpu"
    assert "profile cpu (auto: picked cpu because torch.cuda.is_available() is False" in caplog.text


# -- end to end through the server -------------------------------------------------------------

async def _serve_and_ask(pipe, cfg, reqs, profile, reason, between=None):
    # GetModelInfo's settings are asked below: full exposure (minimal is the default)
    cfg = dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, model_info_exposure="full"))
    server = Server(pipe, cfg, profile=profile, profile_reason=reason)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub, health = pb_grpc.UnderwritingStub(ch), health_pb2_grpc.HealthStub(ch)
            st = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            got = await asyncio.gather(*(stub.Decide(r, timeout=30) for r in reqs))
            if between:
                between()
                got += await asyncio.gather(*(stub.Decide(r, timeout=30) for r in reqs))
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    finally:
        await server.stop(1.0)
    return st, got, info


SMALL = dict(max_batch_size=8, max_batch_tokens=1024, max_queue=1024, max_queue_delay_us=60_000_000)


@pytest.mark.parametrize("backend", ["torch", "torchscript", "onnx"])
def test_cpu_profile_each_backend_end_to_end(backend, small_bundle, traffic, monkeypatch):
    monkeypatch.setattr(profiles, "cuda_usable", NO_CUDA)
    r = load_config(env={}, profile="cpu", encoder_backend=backend, bundle=str(small_bundle), port=0, **SMALL)
    pipe = build_pipeline(r.config, str(small_bundle))
    assert pipe.encoder.name == backend
    reqs = relabelled(traffic, backend, 12)
    offline = {q.request_id: o for q, o in zip(reqs, pipe.decide(reqs), strict=True)}
    st, got, info = asyncio.run(_serve_and_ask(pipe, r.config, reqs, r.config.profile, r.reason))
    assert st.status == health_pb2.HealthCheckResponse.SERVING
    for g in got:
        assert g.probability_of_default == pytest.approx(offline[g.request_id].probability_of_default, abs=1e-9)
    assert info.profile == "cpu" and info.encoder_backend == backend and not info.degraded
    settings = {k: json.loads(v) for k, v in info.settings.items()}       # every value is JSON text
    assert settings["profile"] == "cpu" and settings["tree_path"] == "auto"
    assert settings["profile.reason"] == "cpu profile requested"
    assert settings["batching.length_buckets"] == list(r.config.batching.length_buckets)


class FakeTriton:
    """Stands in for uwrt.runtime.encoders.triton_encoder.TritonEncoderBackend on a CPU machine: records its
    construction arguments and warm-up, computes with the CPU torch encoder, can be made to fail."""
    name = "triton"
    instances: list = []

    def __init__(self, cfg, state, *, device="cuda", batch_buckets=(), token_buckets=(), **kw):
        self.inner = TorchEncoderBackend(cfg, state)
        self.device, self.batch_buckets, self.token_buckets = device, tuple(batch_buckets), tuple(token_buckets)
        self.warmed, self.fail = 0, False
        FakeTriton.instances.append(self)

    def warmup(self):
        self.warmed += 1

    def encode(self, events):
        if self.fail:
            raise RuntimeError("CUDA error: out of memory")
        return self.inner.encode(events)


def test_gpu_profile_wiring_with_a_fake_device(small_bundle, traffic, monkeypatch):
    monkeypatch.setattr(profiles, "cuda_usable", CUDA)
    monkeypatch.setitem(sys.modules, "uwrt.runtime.encoders.triton_encoder",
                        types.SimpleNamespace(TritonEncoderBackend=FakeTriton))
    FakeTriton.instances.clear()
    r = load_config(env={}, bundle=str(small_bundle), port=0, **SMALL)      # auto -> gpu (fake probe)
    assert r.config.profile == "gpu" and r.config.encoder_device == "cuda" and r.config.encoder_backend == "triton"
    pipe = build_pipeline(r.config, str(small_bundle))
    assert isinstance(pipe.encoder, FallbackEncoder) and pipe.encoder.fallback.name == "onnx"
    (gpu,) = FakeTriton.instances
    assert gpu.device == "cuda" and gpu.batch_buckets[-1] == 8 and gpu.batch_buckets[0] == 1
    mh = pipe.bundle.encoder_config.max_history
    assert gpu.token_buckets[0] == 16 and gpu.token_buckets[-1] == max(mh, min(1024, 8 * mh))
    reqs = relabelled(traffic, "g", 10)

    def inject():
        gpu.fail = True
    st, got, info = asyncio.run(_serve_and_ask(pipe, r.config, reqs, r.config.profile, r.reason, between=inject))
    assert gpu.warmed == 1                                                   # warmed before SERVING
    assert st.status == health_pb2.HealthCheckResponse.SERVING
    assert len(got) == 20 and all(not g.HasField("error") for g in got)
    pd = {g.request_id: [] for g in got}
    for g in got:
        pd[g.request_id].append(g.probability_of_default)
    for a, b in pd.values():                                                 # GPU (fake) vs CPU fallback
        assert a == pytest.approx(b, abs=1e-5)
    assert info.profile == "gpu" and info.degraded and info.encoder_backend == "onnx (fallback from triton)"
    assert info.settings["encoder.primary_failures"] == "1"
    assert "Fake H100" in json.loads(info.settings["profile.reason"])
    assert np.isfinite(list(pd.values())).all()


def test_gpu_encoder_that_cannot_start(small_bundle, monkeypatch, capsys, caplog):
    """CUDA usable but the Triton encoder cannot be built (here: not importable): an explicit gpu
    exits 3 saying why; auto serves the cpu profile and says why in GetModelInfo's reason."""
    import uwrt.runtime.serving.server
    monkeypatch.setattr(profiles, "cuda_usable", CUDA)
    monkeypatch.setitem(sys.modules, "uwrt.runtime.encoders.triton_encoder", None)       # import fails
    served = {}

    async def fake_serve(pipe, cfg, *, profile, profile_reason, **_):
        served.update(pipe=pipe, cfg=cfg, profile=profile, reason=profile_reason)
        return 0
    monkeypatch.setattr(uwrt.runtime.serving.server, "serve", fake_serve)
    args = ["serve", "--bundle", str(small_bundle), "--port", "0"]
    assert main(args + ["--profile", "gpu"]) == 3
    assert "encoder (triton on cuda) cannot start: ModuleNotFoundError" in capsys.readouterr().err and not served
    with caplog.at_level(logging.ERROR, logger="uwrt.profiles"):
        assert main(args) == 0
    assert served["profile"] == "cpu" and served["pipe"].encoder.name == "onnx"
    assert "encoder failed to start (ModuleNotFoundError" in served["reason"]
    assert "GPU encoder cannot start" in caplog.text
