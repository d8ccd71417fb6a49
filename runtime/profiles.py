"""Deployment profiles: `cpu`, `gpu` and `auto`, and how one is picked.

A profile is a documented set of knob values (device, encoder backend, tree path, threads,
batching knobs, length buckets). It sits between the built-in defaults and the operator's own
settings, so one config file can override any of it:

    built-in defaults (runtime/config.py) < profile < TOML file < UWRT_* environment < flags

`resolve_profile("auto")` picks `gpu` when CUDA is usable (probed by actually running a small
kernel, not only `torch.cuda.is_available()`), else `cpu`, and says why; an explicit `gpu`
where CUDA is not usable raises `ProfileUnavailable` with the probe's reason (the CLI exits
non-zero: it never silently serves a `gpu` request on CPU). The probe is a parameter (and the
module-level `cuda_usable`, which tests monkeypatch), so the resolution is testable on a
machine without a GPU.

The tree stage stays on the CPU in both profiles (`tree_path = "auto"`: the routed stage over
the compiled paths this machine supports, measured at warm-up).

Thread safety: pure functions and frozen values; `cuda_usable` initialises CUDA once (call it
from the main thread at start-up).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from uwrt.runtime.config import RuntimeConfig

log = logging.getLogger("uwrt.profiles")

PROFILE_NAMES = ("auto", "cpu", "gpu")


class ProfileUnavailable(RuntimeError):
    """An explicitly requested profile cannot run on this machine (the message says why)."""


@dataclass(frozen=True)
class Profile:
    """A named set of knob values (dotted knob name -> value) plus what it costs, for docs."""
    name: str
    device: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)


#: The CPU profile: what `make serve` runs on a 2-core machine. The encoder backend is the one
#: measured fastest per batch on CPU (bench/encoder_cpu_bench.py: ONNX Runtime with its own
#: graph optimizations beat TorchScript and eager torch at every shape measured); one intra-op
#: thread for the encoder and one for the trees (each owns a core); batches up to 32 requests /
#: 4096 tokens, 1 ms batching window, length buckets 8/32/128.
CPU = Profile(
    name="cpu", device="cpu",
    summary="encoder on ONNX Runtime (CPU execution provider), trees on CPU; no GPU needed",
    settings={
        "encoder_device": "cpu", "encoder_backend": "onnx", "fallback_encoder_backend": "",
        "tree_path": "auto", "torch_threads": 1, "tree_threads": 1,
        "onnx_intra_op_threads": 1, "onnx_inter_op_threads": 1,
        "batching.max_batch_size": 32, "batching.max_batch_tokens": 4096, "batching.max_wait_us": 1000,
        "batching.length_buckets": (8, 32, 128),
    })

#: The GPU profile: the Triton encoder with CUDA graphs (one per batch x token bucket, captured
#: during warm-up before SERVING), the tree stage on CPU, the ONNX CPU encoder standing by as the
#: run-time fallback (runtime/encoders/fallback.py). Larger batches (up to 128 requests / 16384 tokens)
#: amortise kernel launches; finer length buckets (8/16/32/64/128) keep graphs tight; a 500 us
#: window since a GPU batch is cheap to launch; two tree threads (a GPU host has cores to spare).
GPU = Profile(
    name="gpu", device="cuda",
    summary="encoder on the GPU (Triton kernels, CUDA graphs), trees on CPU, CPU encoder as fallback",
    settings={
        "encoder_device": "cuda", "encoder_backend": "triton", "fallback_encoder_backend": "onnx",
        "tree_path": "auto", "torch_threads": 1, "tree_threads": 2,
        "onnx_intra_op_threads": 1, "onnx_inter_op_threads": 1,
        "batching.max_batch_size": 128, "batching.max_batch_tokens": 16384, "batching.max_wait_us": 500,
        "batching.length_buckets": (8, 16, 32, 64, 128),
    })

PROFILES = {"cpu": CPU, "gpu": GPU}


def cuda_usable() -> tuple[bool, str]:
    """(usable, reason): torch sees a CUDA device and a small kernel runs and synchronizes."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return False, f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return False, (f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda or 'none'}, {torch.cuda.device_count()} device(s))")
    try:
        x = torch.ones(64, 64, device="cuda")
        ok = float((x @ x).sum().item()) == 64.0 ** 3   # .item() syncs: any launch error surfaces here
        if not ok:
            return False, "a test matmul on the GPU returned a wrong result"
        return True, (f"CUDA usable: {torch.cuda.get_device_name(0)} "
                      f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    except Exception as e:  # noqa: BLE001 - any CUDA failure means "not usable", with its reason
        return False, f"CUDA initialisation failed: {type(e).__name__}: {e}"


def resolve_profile(requested: str, *, probe: Callable[[], tuple[bool, str]] | None = None) -> tuple[Profile, str]:
    """The profile to run and why. `auto`: gpu if the probe says CUDA is usable, else cpu.
    Raises ProfileUnavailable for an explicit `gpu` that the probe rejects, ValueError for an
    unknown name."""
    if requested not in PROFILE_NAMES:
        raise ValueError(f"unknown profile {requested!r}; choose one of {', '.join(PROFILE_NAMES)}")
    if requested == "cpu":
        return CPU, "cpu profile requested"
    usable, why = (probe or cuda_usable)()
    if requested == "gpu":
        if not usable:
            raise ProfileUnavailable(f"--profile gpu requested but CUDA is not usable: {why}")
        return GPU, f"gpu profile requested; {why}"
    return (GPU, f"auto: {why}") if usable else (CPU, f"auto: picked cpu because {why}")


@dataclass(frozen=True)
class Resolved:
    config: RuntimeConfig
    profile: Profile
    requested: str
    reason: str


def load_config(config_file: str | None = None, *, env: Mapping[str, str] | None = None,
                probe: Callable[[], tuple[bool, str]] | None = None, **overrides: Any) -> Resolved:
    """RuntimeConfig.load with the profile layered in (defaults < profile < file < env < flags).
    The requested profile comes from the same sources (`profile` knob); the config's `profile`
    is the resolved one (cpu or gpu). Logs the choice and its reason."""
    seen: dict[str, Any] = {}

    def resolver(requested: str) -> tuple[str, Mapping[str, Any]]:
        prof, reason = resolve_profile(requested, probe=probe)
        seen.update(profile=prof, requested=requested, reason=reason)
        return prof.name, prof.settings

    cfg = RuntimeConfig.load(config_file, env=env, profile_resolver=resolver, **overrides)
    log.info("profile %s (%s)", seen["profile"].name, seen["reason"])
    return Resolved(cfg, seen["profile"], seen["requested"], seen["reason"])
