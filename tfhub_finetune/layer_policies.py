"""Keras dtype policies set on layers for the length of a scope, then restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras


@contextlib.contextmanager
def layer_policies(policies: Sequence[tuple[keras.layers.Layer, Any]]) -> Iterator[None]:
    """Sets each layer's dtype policy (a name or a `DTypePolicy`); restores them after.

    A layer whose policy already has that name is left alone, so a scope
    that changes nothing touches nothing. Each layer gets back the policy
    object it had, even when the body raises.

    Args:
        policies: `(layer, policy)` pairs.

    Example:

    ```python
    with layer_policies([(layer, "float32") for layer in model.layers]):
        outputs = model(inputs)  # float32 compute, whatever the training policy
    ```
    """
    saved = [(layer, layer.dtype_policy) for layer, _ in policies]
    try:
        for layer, policy in policies:
            if getattr(policy, "name", policy) != layer.dtype_policy.name:
                layer.dtype_policy = policy
        yield
    finally:
        for layer, policy in saved:
            if layer.dtype_policy is not policy:
                layer.dtype_policy = policy
