"""ONNX Runtime over an exported graph (see :mod:`hotdog_ray.export`): uint8 NHWC images in,
class probabilities out.

Imports no PyTorch: a CPU scoring actor runs on this module alone (importing PyTorch was half of
its start-up, while the job's first decoded images waited for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


def onnx_session(
    data: bytes, *, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session over ``data``; ``threads`` caps its intra-op threads (None: one per core)."""

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
    return ort.InferenceSession(data, options, providers=list(providers))


def run_onnx(session: "onnxruntime.InferenceSession", images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) for a uint8 NHWC batch."""
    return session.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.uint8)})[0]
