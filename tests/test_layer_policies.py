"""`layer_policies`: policies set for a scope, the originals back after it, even on error."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from tfhub_finetune.layer_policies import layer_policies


def _model() -> tuple[keras.Model, list[keras.layers.Layer]]:
    inputs = keras.Input((4,))
    first = keras.layers.Dense(3, dtype="mixed_bfloat16")
    second = keras.layers.Dense(2, dtype="float32")
    return keras.Model(inputs, second(first(inputs))), [first, second]


def test_policies_apply_inside_and_the_same_objects_come_back():
    _, (first, second) = _model()
    before = [first.dtype_policy, second.dtype_policy]
    x = np.ones((1, 4), np.float32)
    with layer_policies([(first, "float32"), (second, "float32")]):
        assert first.compute_dtype == "float32" and second.dtype_policy is before[1]  # Untouched.
        assert keras.backend.standardize_dtype(first(x).dtype) == "float32"
    assert first.dtype_policy is before[0] and second.dtype_policy is before[1]
    assert keras.backend.standardize_dtype(first(x).dtype) == "bfloat16"


def test_policies_come_back_when_the_body_raises():
    _, (first, _) = _model()
    before = first.dtype_policy
    with pytest.raises(RuntimeError), layer_policies([(first, "float32")]):
        assert first.compute_dtype == "float32"
        raise RuntimeError("export failed")
    assert first.dtype_policy is before
