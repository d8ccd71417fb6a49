"""Encoder factory: `RuntimeConfig.encoder_backend` / `encoder_device` -> an EncoderBackend.

Backends are imported only when asked for, so a CPU host never imports the Triton GPU path and
a caller that wants one backend does not pay for the others' imports.
Thread safety: call at load time, from one thread.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from uwrt.runtime.config import RuntimeConfig, pow2_buckets, token_buckets
from uwrt.runtime.encoders.base import EncoderBackend

if TYPE_CHECKING:
    from uwrt.runtime.bundle.bundle import Bundle

log = logging.getLogger("uwrt.encoders")


def _torch_backend(bundle: Bundle, cfg: RuntimeConfig, device: str) -> EncoderBackend:
    from uwrt.runtime.encoders.torch_encoder import TorchEncoderBackend
    return TorchEncoderBackend(bundle.encoder_config, bundle.encoder_state(), device=device)


def _torchscript_backend(bundle: Bundle, cfg: RuntimeConfig, device: str) -> EncoderBackend:
    if device != "cpu":
        raise ValueError("the torchscript encoder backend runs on the CPU only (encoder_device='cpu')")
    from uwrt.runtime.encoders.torchscript_encoder import TorchScriptEncoderBackend
    return TorchScriptEncoderBackend(bundle.encoder_config, bundle.encoder_state())


def _onnx_backend(bundle: Bundle, cfg: RuntimeConfig, device: str) -> EncoderBackend:
    from uwrt.runtime.encoders.onnx_encoder import OnnxEncoderBackend
    return OnnxEncoderBackend.from_bundle(bundle, device=device, cache_dir=cfg.onnx_cache_dir,
                                          intra_op_threads=cfg.onnx_intra_op_threads,
                                          inter_op_threads=cfg.onnx_inter_op_threads,
                                          optimization=cfg.onnx_optimization, attention=cfg.onnx_attention)


def _triton_backend(bundle: Bundle, cfg: RuntimeConfig, device: str) -> EncoderBackend:
    # Imported lazily: the Triton GPU path (runtime/encoders/triton_encoder.py) needs CUDA and is not
    # loaded on CPU hosts.
    from uwrt.runtime.encoders.triton_encoder import TritonEncoderBackend
    b = cfg.batching
    return TritonEncoderBackend(bundle.encoder_config, bundle.encoder_state(), device=device,
                                batch_buckets=pow2_buckets(b.max_batch_size),
                                token_buckets=token_buckets(bundle.encoder_config.max_history, b))


#: Encoder backends by name (RuntimeConfig.encoder_backend): factory(bundle, config, device).
#: torch and torchscript compute the same numbers (tested bit for bit); onnx agrees within 1e-5
#: (runtime/encoders/onnx_encoder.py); triton is the GPU path, imported only when asked for.
ENCODER_BACKENDS = {"onnx": _onnx_backend, "torchscript": _torchscript_backend, "torch": _torch_backend,
                    "triton": _triton_backend}


def build_encoder(bundle: Bundle, cfg: RuntimeConfig) -> EncoderBackend:
    """The configured encoder: `encoder_backend` on `encoder_device`; off the CPU, wrapped in a
    FallbackEncoder over `fallback_encoder_backend` (on the CPU) when one is configured."""
    name, device = cfg.encoder_backend, cfg.encoder_device
    if name not in ENCODER_BACKENDS:
        raise ValueError(f"unknown encoder backend {name!r}; choose one of {sorted(ENCODER_BACKENDS)}")
    primary = ENCODER_BACKENDS[name](bundle, cfg, device)
    if device == "cpu" or not cfg.fallback_encoder_backend:
        return primary
    from uwrt.runtime.encoders.fallback import FallbackEncoder
    fallback = ENCODER_BACKENDS[cfg.fallback_encoder_backend](bundle, cfg, "cpu")
    log.info("encoder %s on %s with %s on cpu as fallback", primary.name, device, fallback.name)
    return FallbackEncoder(primary, fallback, reprobe_s=cfg.fallback_reprobe_s)


