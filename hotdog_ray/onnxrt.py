"""ONNX Runtime over an exported graph (see :mod:`hotdog_ray.export`): uint8 NHWC images in,
calibrated class probabilities and the out-of-distribution score out.

Imports no PyTorch: a CPU scoring actor runs on this module alone (importing PyTorch was half of
its start-up, while the job's first decoded images waited for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME, OUTPUT_NAME, OOD_NAME = "images", "probabilities", "ood_score"


class Scores(NamedTuple):
    """A forward pass's answer: class probabilities (N, C) and the OOD score (N,), or one image's
    (C,) and a float. The score is NaN from a graph exported before the score existed."""

    probabilities: np.ndarray
    ood_score: np.ndarray

    def rows(self) -> list["Scores"]:
        """One :class:`Scores` per image."""
        return [Scores(p, float(s)) for p, s in zip(self.probabilities, self.ood_score)]

    @classmethod
    def empty(cls, classes: int) -> "Scores":
        return cls(np.zeros((0, classes), np.float32), np.zeros(0, np.float32))


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


def run_onnx(session: "onnxruntime.InferenceSession", images: np.ndarray) -> Scores:
    """The :class:`Scores` of a uint8 NHWC batch."""
    outputs = session.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.uint8)})
    probs = outputs[0]
    return Scores(probs, outputs[1] if len(outputs) > 1 else np.full(len(probs), np.nan, np.float32))
