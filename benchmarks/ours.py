"""Ours: `pipelines.text_classify`'s training step, its SavedModel export, its input pipeline.

Training runs what the pipeline runs, configured the way the pipeline would
be: the flags of `pipelines/configs/demo_sst2.flags` (plus any overrides in
`flags`), parsed by `pipelines.flags.config_from_flags`; then the steps of
`tfhub_finetune.driver.run_experiment` up to `fit` (seed, `set_precision`,
strategy, `resolve_jit_compile`, `TextClassificationTask.prepare_train`,
`build_model`, `driver.compile_model`), and `model.fit` on the task's own
per-epoch datasets (tokenized once, kept in memory, length-grouped). The training
file is the benchmark's sentence sample written as a TSV, so every system
trains on the same sentences. Left out, as for the peers: the per-epoch
validation pass and the checkpoint/backup writes of `fit_resumable`'s
callbacks, which are I/O at epoch ends and every 200 steps, not the step.

Inference loads the SavedModel `tfhub_finetune.export.export_text_classifier`
wrote (mode `export`, run once per benchmark) in a fresh process and calls its
`serving_default` signature on raw strings, as TF Serving would. With
`form=int8` it serves the Keras int8 SavedModel `--export_quantized=int8`
writes the same way; with `form=int8_tflite` that export's TFLite file through
`tfhub_finetune.tflite_text.TfliteTextClassifier` (raw strings in, tokenized in
Python), as an application embedding the interpreter would.

Every mode starts TensorFlow as the pipelines do: with the CPU kernels
(oneDNN or Eigen) `tf_startup.choose_cpu_kernels` measured faster here.

Run through `benchmarks.run_all`; by hand:
`python -m benchmarks.ours --mode=train --args_json='{"train_examples": 256}'`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import _harness  # noqa: E402
from tfhub_finetune import tf_startup  # noqa: E402

# As the pipelines do before TensorFlow starts: its CPU kernels are the ones measured faster.
tf_startup.choose_cpu_kernels()

FLAGFILE = "pipelines/configs/demo_sst2.flags"
DEFAULTS = {
    "train_examples": 1024,
    "warmup_steps": 5,
    "warmup_full_pass": False,
    "seed": 0,
    "flags": [],
    "stock_adamw": False,
    "keras_decay_norm": False,
    "inter_op": 0,
    "intra_op": 0,
    "latency_calls": 200,
    "infer_examples": 1024,
    "infer_batch_size": 64,
    "saved_model": "",
    "export_dir": "",
    "serving_jit_compile": False,
    # As for training's `--precision=auto`: ours as a user gets its best on the
    # machine at hand (`serving_graph.fastest_lowering` times float32 against bf16).
    "serving_precision": "auto",
    "lean_serving_graph": True,
    # Which serving form `export` returns: the float32 SavedModel, the Keras int8
    # SavedModel (`--export_quantized=int8`) or that export's TFLite int8 file.
    "form": "float32",
}


def _threads(args: dict) -> None:
    import tensorflow as tf

    # Must run before TensorFlow's runtime starts (the first op).
    if args["inter_op"]:
        tf.config.threading.set_inter_op_parallelism_threads(int(args["inter_op"]))
    if args["intra_op"]:
        tf.config.threading.set_intra_op_parallelism_threads(int(args["intra_op"]))


def _config(train_tsv: Path, model_dir: Path, overrides: list[str]):
    """The pipeline's `ExperimentConfig` from its demo flag file plus `overrides`."""
    from absl import flags

    from pipelines import flags as pipeline_flags

    if "backbone" not in flags.FLAGS:
        pipeline_flags.define_common_flags()
        pipeline_flags.define_text_flags()
    argv = ["ours", f"--flagfile={_harness.REPO_ROOT / FLAGFILE}", f"--train_data={train_tsv}",
            f"--model_dir={model_dir}", *overrides]
    flags.FLAGS(argv)
    return pipeline_flags.config_from_flags()


def _write_sample(texts: list[str], labels, directory: Path) -> Path:
    path = directory / "train.tsv"
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(f"{text}\t{int(label)}\n")
    return path


def _prepare(args: dict, workdir: Path, texts: list[str], labels):
    """Config, task and compiled model, exactly as `driver.run_experiment` sets them up."""
    _threads(args)
    from tfhub_finetune import distribute, driver, training
    from tfhub_finetune.tasks.text_classification import TextClassificationTask

    if args["stock_adamw"]:
        import keras

        # Ablation: the pipeline's optimizer before the fused update step.
        training.FusedAdamW = keras.optimizers.AdamW
    if args["keras_decay_norm"]:
        # Ablation: the fused update, with Keras' own decay and norm passes.
        del training.FusedAdamW._apply_weight_decay, training.FusedAdamW._clip_gradients
    config = _config(_write_sample(texts, labels, workdir), workdir / "run", list(args["flags"]))
    training.set_seed(config.train.seed)
    rt = config.runtime
    precision = distribute.set_precision(rt.precision)
    strategy = distribute.get_distribution_strategy(
        rt.distribution, num_gpus=None if rt.num_gpus < 0 else rt.num_gpus,
        all_reduce=rt.all_reduce, tpu_address=rt.tpu or None,
    )
    jit = distribute.resolve_jit_compile(rt.jit_compile)
    task = TextClassificationTask(config)
    with strategy.scope():
        task.prepare_train()
        model = task.build_model()
        driver.compile_model(model, config, task.steps_per_epoch, task.labels.num_classes, jit)
    return config, task, model, {"precision": precision, "jit_compile": jit,
                                 "bucketing": config.train.bucketing,
                                 "optimizer": type(model.optimizer).__name__}


def train(args: dict) -> dict:
    """Training examples/s of the pipeline's `fit` over one pass of the sample, after warm-up."""
    import numpy as np

    args = {**DEFAULTS, **args}
    texts, labels = _harness.sample_sst2(args["train_examples"], args["seed"])
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as tmp:
        config, task, model, settings = _prepare(args, Path(tmp), texts, labels)

        # Warm-up: tracing, optimizer slots, oneDNN primitives. Under XLA
        # every distinct batch shape compiles, so a full pass is needed.
        warm_data = task.train_epoch_dataset(0)
        if not args["warmup_full_pass"]:
            warm_data = warm_data.take(args["warmup_steps"])
        warm = _harness.Clock()
        warm.start()
        model.fit(warm_data, epochs=1, verbose=0)
        warm.stop()

        timed_data = task.train_epoch_dataset(1)
        shapes = [tuple(x["token_ids"].shape) for x, _ in timed_data]
        timer = _harness.epoch_clock()
        history = model.fit(timed_data, epochs=1, callbacks=[timer], verbose=0)

    n = len(texts)
    lengths = task.train_data.lengths
    return {
        **settings,
        "examples": n,
        "steps": len(shapes),
        "examples_per_s": n / timer.clock.wall_s,
        "cpu_ms_per_example": 1000.0 * timer.clock.cpu_s / n,
        "timed_s": timer.clock.wall_s,
        "warmup_s": warm.wall_s,
        "real_tokens": int(np.sum(lengths)),
        "padded_tokens": int(sum(b * s for b, s in shapes)),
        "lengths": [int(v) for v in lengths],
        "distinct_shapes": len(set(shapes)),
        "final_loss": float(history.history["loss"][-1]),
        "params": model.count_params(),
        "flags": list(args["flags"]),
        "stock_adamw": bool(args["stock_adamw"]),
        "keras_decay_norm": bool(args["keras_decay_norm"]),
    }


def export(args: dict) -> dict:
    """Builds the classifier as the pipeline would and exports it for inference.

    Weights are the pretrained backbone plus an untrained head: serving speed
    does not depend on the values. Uses `tfhub_finetune.export`'s
    `export_text_classifier` (the pipeline's `--export_dir`).
    """
    args = {**DEFAULTS, **args}
    from tfhub_finetune.export import export_text_classifier

    texts, labels = _harness.sample_sst2(64, args["seed"])
    export_dir = Path(args["export_dir"])
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as tmp:
        config, task, model, settings = _prepare(args, Path(tmp), texts, labels)
        clock = _harness.Clock()
        clock.start()
        path = export_text_classifier(
            model, task.backbone, task.labels, export_dir, model_name="minilm_sst2",
            sequence_length=config.model.sequence_length, measure_latency=False,
            serving_jit_compile=bool(args["serving_jit_compile"]),
            serving_precision=args["serving_precision"],
            lean_serving_graph=bool(args["lean_serving_graph"]),
        )
        # What the float export serves (the int8 forms below are other graphs).
        card = json.loads((Path(path) / "assets.extra" / "model_card.json").read_text())
        served = ({"compute_dtype": card["compute_dtype"],
                   "serving_graph": card["preprocessing"]["serving_graph"]}
                  if args["form"] == "float32" else {})
        if args["form"] != "float32":
            from tfhub_finetune.quantized_export import (
                export_quantized_text_classifier,
                tflite_form,
            )

            path = export_quantized_text_classifier(
                model, task.backbone, task.labels, export_dir, model_name="minilm_sst2",
                quantized_from=path, measure_latency=False,
            )
            if args["form"] == "int8_tflite":
                path = tflite_form(path)
        clock.stop()
    return {**settings, "saved_model": str(path), "export_s": clock.wall_s, "form": args["form"],
            "serving_jit_compile": bool(args["serving_jit_compile"]),
            "serving_precision": args["serving_precision"],
            "lean_serving_graph": bool(args["lean_serving_graph"]), **served,
            "exporter": "tfhub_finetune.export.export_text_classifier"}


def infer(args: dict) -> dict:
    """Batch-1 latency and batch-64 examples/s of the exported SavedModel on raw strings."""
    args = {**DEFAULTS, **args}
    _threads(args)
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - registers the tokenizer's ops for the SavedModel

    from tfhub_finetune.quantized_export import TFLITE_FILE

    texts, _ = _harness.sample_sst2(args["infer_examples"], args["seed"] + 7)
    if (Path(args["saved_model"]) / TFLITE_FILE).exists():
        from tfhub_finetune.tflite_text import TfliteTextClassifier

        # Tokenized in Python (text_client), length-sorted chunks, one interpreter.
        predict = TfliteTextClassifier.from_folder(args["saved_model"],
                                                   num_threads=args["intra_op"] or None).predict
    else:
        serve = tf.saved_model.load(args["saved_model"]).signatures["serving_default"]

        def predict(batch: list[str]):
            return serve(text=tf.constant(batch))["probabilities"].numpy()

    return _harness.inference_protocol(predict, texts, args) | {"saved_model": args["saved_model"]}


def input_pipeline(args: dict) -> dict:
    """Examples/s of tokenization + batching alone (the tf.data pipeline, no model).

    Over the whole SST-2 training file: `tokenize_texts` (the once-per-run
    cost) plus one length-grouped, shuffled pass of `make_text_dataset`, as the
    pipeline builds it; and, separately, one more pass over the cached ids
    (what every later epoch costs).
    """
    args = {**DEFAULTS, **args}
    _threads(args)
    from tfhub_finetune.backbones.loader import load_backbone
    from tfhub_finetune.data.text import make_text_dataset, tokenize_texts

    texts, labels = _harness.read_sst2("train")
    tokenizer = load_backbone(_harness.CATALOG_NAME).tokenizer
    tokenizer.tokenize(texts[:64])  # Traces the tokenizer graph once (a one-off cost).

    def one_pass(tokens, seed: int) -> int:
        ds = make_text_dataset(tokens, tokenizer, batch_size=32, training=True, seed=seed,
                               reshuffle_each_iteration=False)
        return sum(int(x["token_ids"].shape[0]) for x, _ in ds)

    first = _harness.Clock()
    first.start()
    tokens = tokenize_texts(texts, labels, tokenizer, sequence_length=128)
    seen = one_pass(tokens, 0)
    first.stop()
    cached = _harness.Clock()
    cached.start()
    one_pass(tokens, 1)
    cached.stop()
    n = len(texts)
    if seen != n:
        raise RuntimeError(f"The pipeline yielded {seen} of {n} examples.")
    return {
        "examples": n,
        "tokenize_and_batch_examples_per_s": n / first.wall_s,
        "tokenize_and_batch_cpu_ms_per_example": 1000.0 * first.cpu_s / n,
        "cached_epoch_examples_per_s": n / cached.wall_s,
    }


if __name__ == "__main__":
    sys.exit(_harness.child_main({"train": train, "infer": infer, "export": export,
                                  "input": input_pipeline}))
