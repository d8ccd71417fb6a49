"""The encoder interface every backend implements (torch, TorchScript, ONNX Runtime, Triton,
and the fallback wrapper). No heavy imports: the pipeline and the CLI type against it without
loading torch."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from uwrt.runtime.featurize import PackedEvents


class EncoderBackend(Protocol):
    """What the pipeline needs from an encoder implementation.

    `encode` maps a PackedEvents batch to float32 embeddings [B, emb_dim]. Implementations
    document their own thread safety; the pipeline calls one backend from one worker thread.
    """

    @property
    def name(self) -> str:
        """The backend's name for logs and GetModelInfo (a wrapper may compute it)."""
        ...

    def encode(self, events: PackedEvents) -> np.ndarray: ...
