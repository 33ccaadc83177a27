"""A full OOD bank for benchmark models: what the out-of-distribution flag costs does not depend on
what the bank holds, only on its size (the most a trained model keeps) and its width."""

from __future__ import annotations

from typing import Any

import numpy as np


def full_bank_meta(model: Any, meta: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """``meta`` with a calibration, and a bank of :data:`~hotdog_ray.confidence.BANK_SIZE` unit rows
    of the model's feature width."""
    from hotdog_ray.confidence import BANK_SIZE, Calibration, normalise
    from hotdog_ray.models import last_conv_layer

    width = last_conv_layer(model).out_channels
    bank = normalise(np.abs(np.random.default_rng(0).normal(size=(BANK_SIZE, width))))
    return meta | Calibration(temperature=1.3, ood_threshold=0.5).meta(), bank
