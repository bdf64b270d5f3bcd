"""Task heads: single-label softmax, multi-label sigmoid, regression.

Heads end in float32 whatever the global precision policy, so softmax, the
loss and the metrics are computed in full precision under mixed precision.
"""

from __future__ import annotations

import keras

from tfhub_finetune.errors import InputError, did_you_mean

TASKS = ("single_label", "multi_label", "regression")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError("Unknown task.", received={"task": task}, fix=did_you_mean(task, TASKS))
    return task


def build_head(
    features: keras.KerasTensor,
    num_classes: int,
    task: str = "single_label",
    dropout: float = 0.1,
    name: str = "head",
) -> keras.KerasTensor:
    """Adds dropout and a dense output layer on pooled features.

    Args:
        features: KerasTensor. (batch, dim) pooled backbone features.
        num_classes: int. Classes (single/multi-label) or outputs (regression).
        task: str. `single_label` (softmax probabilities), `multi_label`
            (per-label sigmoid probabilities) or `regression` (linear scores).
        dropout: float. Dropout rate before the output layer.
        name: str. Prefix for the head's layer names.

    Returns:
        The output tensor: `probabilities` or `scores`, float32.

    Example:

    ```python
    x = keras.Input((384,))
    model = keras.Model(x, build_head(x, num_classes=2))
    ```
    """
    check_task(task)
    if num_classes < 1 or (task == "single_label" and num_classes < 2):
        raise InputError(
            "A classifier needs at least 2 classes (1 output for regression/multi-label).",
            received={"num_classes": num_classes, "task": task},
        )
    x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(features) if dropout else features
    logits = keras.layers.Dense(num_classes, name=f"{name}_logits")(x)
    if task == "regression":
        return keras.layers.Activation("linear", dtype="float32", name="scores")(logits)
    activation = "softmax" if task == "single_label" else "sigmoid"
    return keras.layers.Activation(activation, dtype="float32", name="probabilities")(logits)
