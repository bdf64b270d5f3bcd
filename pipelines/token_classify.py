"""Fine-tune and evaluate a token classifier (named-entity recognition).

    python -m pipelines.token_classify --flagfile=pipelines/configs/conll2003.flags

Data: CoNLL column files (`token ... tag` per line, blank line between
sentences, `-DOCSTART-` lines skipped; `--text_column`/`--tag_column` pick
the fields) or JSONL (`{"tokens": [...], "tags": [...]}`), tags in
`--tag_scheme` (iob2, iob1, bioes; converted to IOB2). Each word is predicted
on its first word piece; a sentence longer than `--sequence_length` word
pieces is split into windows `--window_stride` pieces apart and every word is
predicted once, in the window where it has the most context.

Writes to --model_dir what the other pipelines write; metrics.json holds
entity precision/recall/F1 (overall and per type, as seqeval computes them)
and token accuracy; `--monitor=val_entity_f1` (the default) picks the best
epoch on entity F1. `--export_dir` also writes the serving SavedModels
(`token_export`); `--export_quantized=int8` also the Keras int8 form beside them
and serving.json (each form's entity F1, latency, throughput and size). Bad
input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

from absl import flags

from pipelines import flags as pipeline_flags

FLAGS = flags.FLAGS
pipeline_flags.define_common_flags()
pipeline_flags.define_serving_flags()
pipeline_flags.define_token_flags()


def main(argv):
    del argv
    # Every field from its flag; the task is this pipeline's.
    config = pipeline_flags.config_from_flags(model_task="token_classification")
    from tfhub_finetune.driver import run_experiment
    from tfhub_finetune.tasks.token_classification import TokenClassificationTask

    task = TokenClassificationTask(config)
    result = run_experiment(config, task)
    if FLAGS.export_dir and config.mode != "eval" and not result.get("terminated"):
        from tfhub_finetune.token_export import export_token_classifier

        path = export_token_classifier(
            result["model"], task.backbone, task.labels, FLAGS.export_dir,
            model_name=FLAGS.model_name, model_dir=config.model_dir,
            serving_precision=config.serving_precision,
        )
        print(f"Exported SavedModel: {path}")
        from tfhub_finetune.quantized_export import export_quantized_token_classifier

        pipeline_flags.write_quantized_form(task, result["model"], path, config,
                                            export_quantized_token_classifier,
                                            backbone=task.backbone, labels=task.labels)
    for kind, scores in (result.get("eval") or {}).get("per_type", {}).items():
        print(f"  {kind:<6} precision={scores['precision']:.4f}  recall={scores['recall']:.4f}  "
              f"f1={scores['f1']:.4f}  ({scores['support']} entities)")
    pipeline_flags.print_summary(result, config.model_dir)


def cli() -> None:
    """What `python -m` runs (tests/bad_inputs.py runs it in-process too)."""
    pipeline_flags.run_main(main)


if __name__ == "__main__":
    cli()
