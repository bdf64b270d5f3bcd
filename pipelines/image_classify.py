"""Fine-tune and evaluate an image classifier.

    python -m pipelines.image_classify \
        --flagfile=pipelines/configs/hymenoptera_efficientnet_lite0.flags

Takes the same flags as `pipelines.text_classify` where they mean the same
thing (`--train_data`, `--eval_data`, `--backbone`, `--model_dir`, `--epochs`,
`--batch_size`, `--learning_rate`, `--seed`, `--mode`, ...), plus
`--image_size`, `--augment` and `--crop_to_aspect_ratio` (the last two are
`DataConfig` fields: saved in params.json and checked on resume). `--train_data` is a
folder of class folders (`train/<class>/*.jpg`), a `.csv` of `path,label`,
TFRecord files or `tfds:<name>[:<split>]`.

Writes to --model_dir: params.json, labels.json, best.weights.h5 (+ best.json),
model.keras (takes raw 0..255 pixels), metrics.json (accuracy, macro-F1,
per-class figures, confusion matrix, skipped files), training_log.csv, logs/
(TensorBoard) and backup/ (resume state); with --export_dir and
--export_quantized=int8 also serving.json (float32 SavedModel vs int8 TFLite). Bad input ends with one line on
stderr and exit code 2.
"""

from __future__ import annotations

from absl import flags

from pipelines import flags as pipeline_flags

FLAGS = flags.FLAGS
pipeline_flags.define_common_flags()
pipeline_flags.define_serving_flags()
pipeline_flags.define_image_flags()

def main(argv):
    del argv
    from tfhub_finetune.driver import run_experiment
    from tfhub_finetune.tasks.image_classification import ImageClassificationTask

    config = pipeline_flags.config_from_flags()
    from tfhub_finetune.backbones.catalog import resolve_backbone

    # The backbone string becomes a spec once, here; everything below takes the spec.
    task = ImageClassificationTask(config, spec=resolve_backbone(config.model.backbone))
    result = run_experiment(config, task)
    if FLAGS.export_dir and config.mode != "eval":
        from tfhub_finetune.export import export_image_classifier

        path = export_image_classifier(
            result["model"],
            task.labels,
            FLAGS.export_dir,
            image_size=task.image_size,
            model_name=FLAGS.model_name,
            model_dir=config.model_dir,
            crop_to_aspect_ratio=config.data.crop_to_aspect_ratio,
            serving_precision=config.serving_precision,
        )
        print(f"Exported SavedModel: {path}")
        from tfhub_finetune.quantized_export import export_quantized_image_classifier

        pipeline_flags.write_quantized_form(
            task, result["model"], path, config, export_quantized_image_classifier,
            labels=task.labels, image_size=task.image_size,
            crop_to_aspect_ratio=config.data.crop_to_aspect_ratio)
    pipeline_flags.print_summary(result, config.model_dir)


def cli() -> None:
    """What `python -m` runs (tests/bad_inputs.py runs it in-process too)."""
    pipeline_flags.run_main(main)


if __name__ == "__main__":
    cli()
