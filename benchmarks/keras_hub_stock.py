"""Peer: keras-hub's stock `BertTextClassifier` with its default preprocessor, `fit` and `predict`.

What a keras-hub user writes from the docs, on the same MiniLM-L6 weights
(the package's Hugging Face-format folder, which keras-hub converts on
load): `BertTextClassifier.from_preset(dir, num_classes=2)` with a
`BertTextClassifierPreprocessor` of `sequence_length=128` (the default
preprocessor pads every sentence to that length), compiled by keras-hub's own
`"auto"` defaults (Adam 5e-5, no XLA on a CPU-only machine), and `fit` /
`predict` on raw strings, which map the preprocessor over a `tf.data`
pipeline. Nothing is tuned: this is the baseline our pipeline's length
length grouping, tokenize-once caching and optimizer work are measured against.

Run through `benchmarks.run_all`; by hand:
`python -m benchmarks.keras_hub_stock --mode=train --args_json='{"train_examples": 256}'`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import _harness  # noqa: E402

DEFAULTS = {
    "train_examples": 1024,
    "warmup_steps": 3,
    "batch_size": 32,
    "sequence_length": 128,
    "seed": 0,
    "latency_calls": 100,
    "infer_examples": 1024,
    "infer_batch_size": 64,
}


def _classifier(args: dict):
    import keras
    import keras_hub

    keras.utils.set_random_seed(args["seed"])
    handle = str(_harness.hf_model_dir())
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        handle, sequence_length=args["sequence_length"]
    )
    return keras_hub.models.BertTextClassifier.from_preset(
        handle, num_classes=2, preprocessor=preprocessor
    )


def train(args: dict) -> dict:
    """Training examples/s of stock `fit` over one pass of the sample, after warm-up steps."""
    args = {**DEFAULTS, **args}
    texts, labels = _harness.sample_sst2(args["train_examples"], args["seed"])
    classifier = _classifier(args)
    batch = args["batch_size"]

    warm = _harness.Clock()
    warm.start()
    n_warm = args["warmup_steps"] * batch
    classifier.fit(x=texts[-n_warm:], y=labels[-n_warm:], batch_size=batch, epochs=1, verbose=0)
    warm.stop()
    timer = _harness.epoch_clock()
    history = classifier.fit(
        x=texts, y=labels, batch_size=batch, epochs=1, callbacks=[timer], verbose=0
    )
    n = len(texts)
    return {
        "examples": n,
        "steps": -(-n // batch),
        "examples_per_s": n / timer.clock.wall_s,
        "cpu_ms_per_example": 1000.0 * timer.clock.cpu_s / n,
        "timed_s": timer.clock.wall_s,
        "warmup_s": warm.wall_s,
        "padded_tokens": n * args["sequence_length"],
        "final_loss": float(history.history["loss"][-1]),
        "params": classifier.count_params(),
        "jit_compile": bool(classifier.jit_compile),
        "optimizer": type(classifier.optimizer).__name__,
    }


def infer(args: dict) -> dict:
    """Batch-1 latency and batch-64 examples/s of stock `predict` on raw strings."""
    args = {**DEFAULTS, **args}
    texts, _ = _harness.sample_sst2(args["infer_examples"], args["seed"] + 7)
    classifier = _classifier(args)

    def predict(batch: list[str]):
        return classifier.predict(batch, batch_size=args["infer_batch_size"], verbose=0)

    return _harness.inference_protocol(predict, texts, args)


if __name__ == "__main__":
    sys.exit(_harness.child_main({"train": train, "infer": infer}))
