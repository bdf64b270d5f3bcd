"""Does a backbone fine-tune the same after a trip through the TF Hub format?

For a real text encoder (MiniLM-L3, SST-2) and a real image backbone
(EfficientNet-Lite0, hymenoptera) this script:

1. loads the backbone through our keras-hub loader and fine-tunes a classifier
   on it (the reference);
2. loads it again, writes it with `export_tfhub` (encoder + preprocess model
   for text, a [0, 1] feature vector for images), loads the export back
   through the TF Hub path (`resolve_backbone(dir)` -> `load_tf_hub_backbone`,
   i.e. `HubLayer` + `HubTokenizer`), checks that features and token ids
   match the original, and fine-tunes the same classifier on the same data
   with the same seed and hyperparameters;
3. reports both accuracies, their difference in points, and McNemar's exact
   test on the examples exactly one path gets right (`stats.paired_test`):
   the difference is only a divergence if that test says so.

Both arms share everything but the backbone's route, so the difference
measures what the TF Hub path loses (it should lose nothing: the same weights
are trained by the same optimizer through `HubLayer`). They do not produce
bit-identical runs: dropout masks and the order of floating-point reductions
differ between a keras-hub graph and a SavedModel function.

Measured on this 2-core CPU (shared, load average ~9; TF 2.21, Keras 3.15.1,
defaults below, seed 42):

| backbone, data | keras-hub path | TF Hub path | difference |
|---|---|---|---|
| MiniLM-L3, SST-2 (2000 train, 872 dev, seq 64, 2 epochs) | 0.8028 | 0.8016 | -0.11 points |
| EfficientNet-Lite0, hymenoptera (244 train, 153 val, 3 epochs) | 0.9216 | 0.9281 | +0.65 points (1 image) |

Again on 2026-12-01 (same machine type, load ~12), with the paired test: text 0.8005 vs 0.8016
(12 sentences only keras-hub got right, 13 only TF Hub; McNemar p = 1.0, difference interval
-1.0..+1.3 points); images 0.9216 vs 0.9281 (1 vs 2 images, p = 1.0, -1.3..+2.6 points). After the
text-pairs packing landed: text 0.8108 vs 0.8016 (14 vs 6 sentences, p = 0.12), images 0.9346 vs
0.9216 (3 vs 1 images, -1.31 points: the old 1-point rule would have failed it; p = 0.63).

Token ids of all 872 dev sentences are identical through the exported
preprocess model; features agree to 1.9e-6 (text) and 3.0e-6 (images); with
equal head weights, the first step's loss and gradients agree to float rounding.

Usage:

```
python -m benchmarks.hub_roundtrip                      # text and image, defaults below
python -m benchmarks.hub_roundtrip --only=text --train_size=2000 --epochs=2
python -m benchmarks.hub_roundtrip --json=/tmp/hub_roundtrip.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfhub_finetune.backbones.catalog import resolve_backbone  # noqa: E402
from tfhub_finetune.backbones.loader import load_backbone  # noqa: E402
from tfhub_finetune.hub_export import export_tfhub  # noqa: E402
from tfhub_finetune.paths import shared_dir  # noqa: E402
from tfhub_finetune.stats import EvalPredictions, paired_test  # noqa: E402
from tfhub_finetune.training import make_optimizer, set_seed  # noqa: E402


def _log(message: str) -> None:
    print(f"[hub_roundtrip] {message}", flush=True)


# === Text: MiniLM-L3 on SST-2 ===


def text_roundtrip(
    weights: str | Path,
    data_dir: str | Path,
    work_dir: str | Path,
    *,
    train_size: int = 2000,
    sequence_length: int = 64,
    epochs: int = 2,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    seed: int = 42,
) -> dict:
    """Fine-tunes on SST-2 through keras-hub and through a TF Hub export; returns the figures."""
    from tfhub_finetune.builders.text_classifier import build_text_classifier
    from tfhub_finetune.data.labels import LabelVocabulary
    from tfhub_finetune.data.sources import read_text_examples

    data_dir = Path(data_dir)
    train = read_text_examples(str(data_dir / "train.tsv"), has_header=False)
    train = train.take(range(min(train_size, len(train))))
    dev = read_text_examples(str(data_dir / "dev.tsv"), has_header=False)
    labels = LabelVocabulary.from_labels(train.labels)
    y_train, y_dev = labels.encode(train.labels), labels.encode(dev.labels)

    def fine_tune(backbone) -> tuple[EvalPredictions, float]:
        from tfhub_finetune.data.text import make_text_dataset, tokenize_texts

        set_seed(seed)
        model = build_text_classifier(backbone, labels.num_classes, pooling="mean")
        train_ids = tokenize_texts(train.texts, y_train, backbone.tokenizer, sequence_length)
        dev_ids = tokenize_texts(dev.texts, y_dev, backbone.tokenizer, sequence_length)
        train_ds = make_text_dataset(train_ids, backbone.tokenizer, batch_size=batch_size,
                                     training=True, seed=seed)
        dev_ds = make_text_dataset(dev_ids, backbone.tokenizer, batch_size=64, training=False)
        steps = int(train_ds.cardinality()) * epochs
        model.compile(optimizer=make_optimizer(learning_rate, steps),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        model.fit(train_ds, epochs=epochs, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        return EvalPredictions.from_outputs("classification", y_dev,
                                            model.predict(dev_ds, verbose=0)), seconds

    _log(f"text: keras-hub path, {len(train)} train / {len(dev)} dev sentences")
    reference = load_backbone(str(weights))
    keras_hub_preds, keras_hub_s = fine_tune(reference)
    _log(f"text: keras-hub accuracy {_accuracy(keras_hub_preds):.4f} ({keras_hub_s:.0f} s)")

    original = load_backbone(str(weights))
    start = time.perf_counter()
    path = export_tfhub(original, Path(work_dir) / "minilm_l3_tfhub")
    export_s = time.perf_counter() - start
    spec = resolve_backbone(str(path))
    reloaded = load_backbone(spec)
    assert spec.source == "tf_hub", spec

    strings = tf.constant(dev.texts)
    same_ids = reloaded.tokenizer.tokenize(strings).to_list() == original.tokenizer.tokenize(strings).to_list()
    probe = _text_probe(original, dev.texts[:16])
    feature_diff = float(np.max(np.abs(
        reloaded.encoder(probe)["sequence_output"] - original.encoder(probe)["sequence_output"]
    )))
    _log(f"text: exported in {export_s:.0f} s; dev token ids identical={same_ids}, "
         f"max |feature diff|={feature_diff:.2e}")
    del original
    tf_hub_preds, tf_hub_s = fine_tune(reloaded)
    _log(f"text: TF Hub accuracy {_accuracy(tf_hub_preds):.4f} ({tf_hub_s:.0f} s)")
    return {
        "backbone": str(weights),
        "data": f"SST-2 first {len(train)} train, {len(dev)} dev",
        "sequence_length": sequence_length,
        "epochs": epochs,
        **_compare(keras_hub_preds, tf_hub_preds),
        "token_ids_identical": same_ids,
        "feature_max_abs_diff": feature_diff,
        "export_s": export_s,
        "train_s_keras_hub": keras_hub_s,
        "train_s_tf_hub": tf_hub_s,
    }


def _text_probe(backbone, texts: list[str]) -> dict[str, tf.Tensor]:
    ids = backbone.tokenizer.tokenize(tf.constant(texts))[:, :62]
    tok = backbone.tokenizer
    ids = tf.concat([tf.fill([ids.nrows(), 1], tok.start_id), ids, tf.fill([ids.nrows(), 1], tok.end_id)], 1)
    token_ids = ids.to_tensor(default_value=tok.pad_id)
    mask = tf.ones_like(ids).to_tensor()
    return {"token_ids": token_ids, "padding_mask": mask, "segment_ids": tf.zeros_like(token_ids)}


# === Images: EfficientNet-Lite0 on hymenoptera ===


def image_roundtrip(
    weights: str | Path,
    data_dir: str | Path,
    work_dir: str | Path,
    *,
    epochs: int = 3,
    batch_size: int = 16,
    learning_rate: float = 2e-4,
    seed: int = 42,
) -> dict:
    """Fine-tunes on hymenoptera through keras-hub and through a TF Hub export."""
    from tfhub_finetune.backbones.image_source import PIXEL_SCALE_OFFSET
    from tfhub_finetune.builders.image_classifier import build_image_classifier
    from tfhub_finetune.data.image import load_image_dataset

    data_dir = Path(data_dir)

    def fine_tune(backbone) -> tuple[EvalPredictions, float]:
        set_seed(seed)
        train = load_image_dataset(data_dir / "train", image_size=backbone.image_size,
                                   batch_size=batch_size, training=True, seed=seed)
        val = load_image_dataset(data_dir / "val", image_size=backbone.image_size,
                                 batch_size=32, label_names=train.label_names)
        model = build_image_classifier(backbone, len(train.label_names))
        steps = int(np.ceil(train.num_examples / batch_size)) * epochs
        model.compile(optimizer=make_optimizer(learning_rate, steps),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        model.fit(train.dataset, epochs=epochs, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        truth = np.concatenate([y.numpy() for _, y in val.dataset])
        return EvalPredictions.from_outputs("classification", truth,
                                            model.predict(val.dataset, verbose=0)), seconds

    _log("image: keras-hub path")
    reference = load_backbone(str(weights))
    keras_hub_preds, keras_hub_s = fine_tune(reference)
    _log(f"image: keras-hub accuracy {_accuracy(keras_hub_preds):.4f} ({keras_hub_s:.0f} s)")

    original = load_backbone(str(weights))
    start = time.perf_counter()
    path = export_tfhub(original, Path(work_dir) / "efficientnet_lite0_tfhub")
    export_s = time.perf_counter() - start
    spec = resolve_backbone(str(path))
    reloaded = load_backbone(spec)
    assert spec.source == "tf_hub", spec

    pixels = np.random.default_rng(seed).uniform(0, 255, (4, original.image_size, original.image_size, 3))
    pixels = pixels.astype("float32")
    scale, offset = PIXEL_SCALE_OFFSET[original.pixel_convention]
    normalised = pixels * np.asarray(scale, "float32") + np.asarray(offset, "float32")
    feature_diff = float(np.max(np.abs(
        reloaded.encoder(pixels / 255.0) - original.encoder(normalised, training=False)
    )))
    _log(f"image: exported in {export_s:.0f} s; {original.pixel_convention} -> unit inputs, "
         f"max |feature diff|={feature_diff:.2e}, image_size={reloaded.image_size}")
    del original
    tf_hub_preds, tf_hub_s = fine_tune(reloaded)
    _log(f"image: TF Hub accuracy {_accuracy(tf_hub_preds):.4f} ({tf_hub_s:.0f} s)")
    return {
        "backbone": str(weights),
        "data": "hymenoptera train -> val",
        "epochs": epochs,
        **_compare(keras_hub_preds, tf_hub_preds),
        "feature_max_abs_diff": feature_diff,
        "export_s": export_s,
        "train_s_keras_hub": keras_hub_s,
        "train_s_tf_hub": tf_hub_s,
    }


def _accuracy(predictions: EvalPredictions) -> float:
    return float(np.mean(predictions.y_pred == predictions.y_true))


def _compare(keras_hub: EvalPredictions, tf_hub: EvalPredictions) -> dict:
    """Both accuracies, the difference, and McNemar's exact test on the same examples."""
    test = paired_test(tf_hub, keras_hub, "accuracy")
    return {
        "num_examples": keras_hub.num_examples,
        "keras_hub_accuracy": test.b,
        "tf_hub_accuracy": test.a,
        "difference_points": 100 * test.difference,
        "difference_interval_points": [100 * test.low, 100 * test.high],
        "only_keras_hub_right": int(np.sum((keras_hub.y_pred == keras_hub.y_true)
                                           & (tf_hub.y_pred != tf_hub.y_true))),
        "only_tf_hub_right": int(np.sum((tf_hub.y_pred == tf_hub.y_true)
                                        & (keras_hub.y_pred != keras_hub.y_true))),
        "mcnemar_p": test.p_value,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["text", "image", "both"], default="both")
    parser.add_argument("--train_size", type=int, default=2000)
    parser.add_argument("--sequence_length", type=int, default=64)
    parser.add_argument("--text_epochs", type=int, default=2)
    parser.add_argument("--image_epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default="", help="Also write the results to this file.")
    args = parser.parse_args(argv)

    shared = shared_dir()
    results: dict = {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "load_average_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="hub_roundtrip_") as work_dir:
        if args.only in ("text", "both"):
            results["text"] = text_roundtrip(
                shared / "weights/paraphrase_minilm_l3_v2", shared / "data/sst2", work_dir,
                train_size=args.train_size, sequence_length=args.sequence_length,
                epochs=args.text_epochs, seed=args.seed,
            )
        if args.only in ("image", "both"):
            results["image"] = image_roundtrip(
                shared / "weights/efficientnet_lite0", shared / "data/hymenoptera", work_dir,
                epochs=args.image_epochs, seed=args.seed,
            )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
