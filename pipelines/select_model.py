"""Choose a backbone for a task under a budget, and say why.

    python -m pipelines.select_model --flagfile=pipelines/configs/select_sst2.flags
    python -m pipelines.select_model --flagfile=pipelines/configs/select_hymenoptera.flags

Profiles every candidate as deployed, scores transferability, fine-tunes the
candidates by successive halving on KerasTuner (cached: a rerun or a wider
budget reuses finished trials; a killed run resumes), recommends one under the
constraints and writes report.md, results.json, pareto.png and
transferability.png to --output_dir. See `tfhub_finetune/selection/select.py`.

Distributed: set KERASTUNER_TUNER_ID (`chief` on one machine, `tuner0`,
`tuner1`, ... on the others), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT,
and run this same command everywhere over a shared --cache_dir.

Bad flags end with one line on stderr and exit code 2, before TensorFlow
loads; so does a run where every candidate failed (after writing the report).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from pipelines import flags as pipeline_flags  # noqa: E402
from tfhub_finetune.errors import InputError  # noqa: E402
from tfhub_finetune.selection.profile import ProfileOptions  # noqa: E402
from tfhub_finetune.selection.select import SelectionConfig  # noqa: E402

FLAGS = flags.FLAGS

# === What to compare, on what ===
flags.DEFINE_list("candidates", [], "Backbones to compare: catalog names, name@layers=k, "
                  "directories, TF Hub handles. The from-scratch baseline is added if missing.")
flags.DEFINE_enum("modality", "auto", ["auto", "text", "image"], "Task input (auto: from the "
                  "candidates).")
flags.DEFINE_string("train_data", None, "Text: .tsv/.csv/.jsonl file; images: class folders.")
flags.DEFINE_string("eval_data", "", "Evaluation data, same forms; empty: hold out "
                    "--validation_split of the training data.")
flags.DEFINE_float("validation_split", 0.1, "Held out when --eval_data is empty.")
flags.DEFINE_integer("max_train_examples", 0, "Use only the first N training examples "
                     "(images: a seeded random N); 0: all.")
flags.DEFINE_list("label_names", [], "Names for integer label ids, in id order.")
flags.DEFINE_string("text_column", "0", "Text: column name (needs a header) or 0-based index.")
flags.DEFINE_string("label_column", "1", "Text: label column name or 0-based index.")
flags.DEFINE_enum("has_header", "auto", ["auto", "true", "false"], "Text: header row?")
flags.DEFINE_integer("sequence_length", 128, "Text: max word pieces; also the profiled length.")
flags.DEFINE_enum("pooling", "auto", ["auto", "cls", "pooler", "mean"], "Text: sentence pooling "
                  "(auto: what each encoder was trained with).")
flags.DEFINE_integer("image_size", 0, "Images: input side in pixels (0: each backbone's own).")
flags.DEFINE_enum("augment", "basic", ["basic", "randaugment", "none"], "Images: augmentation.")
flags.DEFINE_enum("metric", "accuracy", ["accuracy", "macro_f1"], "Fine-tuned metric to maximise.")

# === Fine-tuning search ===
flags.DEFINE_list("learning_rates", ["5e-5"], "Peak learning rates of the pretrained candidates "
                  "(secondary choice): the first rung runs the first; its leaders try the rest.")
flags.DEFINE_float("baseline_learning_rate", 1e-3, "Learning rate of the from-scratch baseline.")
flags.DEFINE_integer("batch_size", 32, "Training batch size.")
flags.DEFINE_float("warmup_ratio", 0.1, "Warm-up as a fraction of the first epoch; constant after.")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
flags.DEFINE_float("dropout", None, "Dropout before the head (default: text 0.1, images 0.2).")
flags.DEFINE_integer("seed", 42, "Seed: initialisation, data order, transferability sample.")
flags.DEFINE_integer("min_epochs", 1, "Epochs of the first rung (every candidate gets it).")
flags.DEFINE_integer("max_epochs", 4, "Epochs of a full fine-tuning (the last rung; brute force).")
flags.DEFINE_integer("reduction_factor", 2, "Each rung keeps the best 1/factor (2: better half).")
flags.DEFINE_integer("early_stopping_patience", 2, "Stop a trial after N epochs without "
                     "improvement (0: off).")
flags.DEFINE_integer("budget_epochs", 0, "Most fine-tuning epochs the search may spend, all "
                     "trials together (0: no limit; the first rung always runs).")
flags.DEFINE_float("budget_minutes", 0.0, "Most fine-tuning minutes (measured epoch times) the "
                   "search may spend (0: no limit; the first rung always runs).")
flags.DEFINE_bool("brute_force", False, "Also fine-tune every candidate to --max_epochs and "
                  "report whether brute force picks the same (measured, not estimated).")
flags.DEFINE_integer("shortlist_size", 0, "Fine-tune only the best N by --shortlist_score "
                     "(plus the baseline); 0: all.")
flags.DEFINE_enum("shortlist_score", "logme", ["logme", "knn_accuracy", "linear_probe_accuracy"],
                  "Transferability score that ranks the shortlist.")
flags.DEFINE_integer("transfer_examples", 500, "Training examples for transferability scores.")

# === Constraints ===
flags.DEFINE_float("max_latency_ms", None, "Most p50 latency at batch 1 (ms).")
flags.DEFINE_float("max_memory_mb", None, "Most peak inference memory (MB).")
flags.DEFINE_float("max_params", None, "Most parameters (e.g. 20e6).")
flags.DEFINE_float("min_metric", None, "Least fine-tuned metric (a fraction for accuracy).")

# === Profiling, output, cache ===
flags.DEFINE_float("profile_min_seconds", 2.0, "Least time spent timing each latency figure.")
flags.DEFINE_integer("profile_batch_size", 32, "Batch for throughput and FLOPs.")
flags.DEFINE_integer("profile_threads", None, "TensorFlow intra-op threads while profiling.")
flags.DEFINE_string("output_dir", None, "Where report.md, results.json and the plots go.")
flags.DEFINE_string("cache_dir", "", "Profiles, scores and the KerasTuner project "
                    "(default: <output_dir>/cache). Share it across runs and workers.")
flags.DEFINE_bool("overwrite", False, "Ignore and replace cached results.")
flags.DEFINE_integer("backup_every_steps", 200, "Trial backups every N steps (and at epoch ends).")
flags.DEFINE_string("title", "", "Report title (default: from the data).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def config_from_flags() -> SelectionConfig:
    """Builds and validates the selection config from parsed flags (no TensorFlow)."""
    f = FLAGS
    learning_rates = []
    for text in f.learning_rates:
        try:
            learning_rates.append(float(text))
        except ValueError:
            raise InputError(
                "A learning rate is not a number.", received={"learning_rates": text},
                fix="E.g. --learning_rates=1e-4,3e-5.",
            ) from None
    for name in ("profile_min_seconds",):
        value = getattr(f, name)
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} must be >= 0.", received={name: value})
    if f.profile_batch_size < 1:
        raise InputError("--profile_batch_size must be positive.",
                         received={"profile_batch_size": f.profile_batch_size})
    options = ProfileOptions(
        serving_batch_size=f.profile_batch_size, train_batch_size=max(f.batch_size, 1),
        min_seconds=f.profile_min_seconds, threads=f.profile_threads,
    )
    config = SelectionConfig(
        candidates=tuple(c.strip() for c in f.candidates),
        train_data=f.train_data or "",
        eval_data=f.eval_data or "",
        output_dir=f.output_dir or "",
        modality=f.modality,
        text_column=f.text_column,
        label_column=f.label_column,
        has_header=f.has_header,
        label_names=tuple(f.label_names),
        max_train_examples=f.max_train_examples,
        validation_split=f.validation_split,
        sequence_length=f.sequence_length,
        pooling=f.pooling,
        image_size=f.image_size,
        augment=f.augment,
        metric=f.metric,
        batch_size=f.batch_size,
        learning_rates=tuple(learning_rates),
        baseline_learning_rate=f.baseline_learning_rate,
        warmup_ratio=f.warmup_ratio,
        weight_decay=f.weight_decay,
        dropout=f.dropout,
        seed=f.seed,
        min_epochs=f.min_epochs,
        max_epochs=f.max_epochs,
        reduction_factor=f.reduction_factor,
        early_stopping_patience=f.early_stopping_patience,
        budget_epochs=f.budget_epochs,
        budget_minutes=f.budget_minutes,
        brute_force=f.brute_force,
        shortlist_size=f.shortlist_size,
        shortlist_score=f.shortlist_score,
        transfer_examples=f.transfer_examples,
        max_latency_ms=f.max_latency_ms,
        max_memory_mb=f.max_memory_mb,
        max_params=f.max_params,
        min_metric=f.min_metric,
        profile_options=options,
        cache_dir=f.cache_dir or "",
        overwrite=f.overwrite,
        backup_every_steps=f.backup_every_steps,
        title=f.title,
        progress=f.progress,
    )
    return config.validate()


def main(argv):
    del argv
    # Every flag is checked before TensorFlow is imported, so flag errors are instant.
    config = config_from_flags()
    from tfhub_finetune.selection.select import run_selection

    result = run_selection(config)
    if result.role == "worker":
        print(f"Worker done: trained {result.trials_run} trial(s).")
        return
    rec = result.recommendation
    print()
    print(f"Recommendation: {rec.reason}" if rec.name else f"No recommendation. {rec.reason}")
    for relaxation in rec.relaxations[:2]:
        print(f"  To get one: {relaxation.describe(rec.metric_name)}")
    taus = ", ".join(
        f"{name} {'undefined' if info['tau'] is None else format(info['tau'], '+.2f')} "
        f"(n={info['n']})" for name, info in result.kendall_tau.items()
    )
    print(f"Kendall tau vs fine-tuned {rec.metric_name}: {taus or 'no scores'}")
    line = f"Selection: {_duration(result.selection_seconds)} wall"
    # With cached stages, the selection's cost is what they took when they ran.
    cost = result.compute_seconds if result.reused else result.selection_seconds
    if result.reused:
        line += (f" (cache used; the results cost {_duration(result.compute_seconds)} of "
                 "recorded compute)")
    if result.brute_force_seconds:
        line += (f"; brute force (estimated): {_duration(result.brute_force_seconds)} "
                 f"({result.brute_force_seconds / cost:.1f}x)")
    if result.brute_force_measured_seconds is not None:
        line += f"; brute force (measured): {_duration(result.brute_force_measured_seconds)}"
    print(line)
    if result.brute_force_choice is not None or result.matches_brute_force is not None:
        verdict = "matches" if result.matches_brute_force else "differs from"
        print(f"Brute-force choice: {result.brute_force_choice} ({verdict} the recommendation)")
    print(f"Trials: {result.trials_run} trained, {result.trials_reused} reused from the cache")
    print(f"Report: {result.paths['report']} (results.json, pareto.png"
          + (", transferability.png" if "transferability" in result.paths else "") + ")")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    pipeline_flags.run_main(main)
