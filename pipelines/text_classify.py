"""Fine-tune and evaluate a text classifier.

    python -m pipelines.text_classify --flagfile=pipelines/configs/demo_sst2.flags

Writes to --model_dir: params.json, labels.json, best.weights.h5 (+ best.json),
model.keras, metrics.json (accuracy, macro-F1, per-class figures, confusion
matrix), training_log.csv, logs/ (TensorBoard) and backup/ (resume state); with
--export_dir and --export_quantized=int8 also serving.json (each serving form's
accuracy, latency, throughput and size; see tfhub_finetune/quantized_export.py).
Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

from absl import flags

from pipelines import flags as pipeline_flags

FLAGS = flags.FLAGS
pipeline_flags.define_common_flags()
pipeline_flags.define_serving_flags()
pipeline_flags.define_text_serving_flags()
pipeline_flags.define_text_flags()


def main(argv):
    del argv
    # Flags are checked before TensorFlow is imported, so flag errors are instant.
    config = pipeline_flags.config_from_flags()
    from tfhub_finetune.backbones.catalog import resolve_backbone
    from tfhub_finetune.driver import run_experiment
    from tfhub_finetune.tasks.text_classification import TextClassificationTask

    # The backbone string becomes a spec once, here; everything below takes the spec.
    task = TextClassificationTask(config, tfds_fallback=FLAGS.tfds_fallback,
                                  spec=resolve_backbone(config.model.backbone))
    result = run_experiment(config, task)
    if FLAGS.export_dir and config.mode != "eval":
        from tfhub_finetune.export import export_text_classifier

        path = export_text_classifier(
            result["model"], task.backbone, task.labels, FLAGS.export_dir,
            model_name=FLAGS.model_name, model_dir=config.model_dir,
            serving_jit_compile=config.serving_jit_compile,
            serving_precision=config.serving_precision,
        )
        print(f"Exported SavedModel: {path}"
              + (" (XLA; serve with --xla_cpu_compilation_enabled)"
                 if config.serving_jit_compile else ""))
        from tfhub_finetune.quantized_export import export_quantized_text_classifier

        pipeline_flags.write_quantized_form(task, result["model"], path, config,
                                            export_quantized_text_classifier,
                                            backbone=task.backbone, labels=task.labels)
    pipeline_flags.print_summary(result, config.model_dir)


def cli() -> None:
    """What `python -m` runs (tests/bad_inputs.py runs it in-process too)."""
    pipeline_flags.run_main(main)


if __name__ == "__main__":
    cli()
