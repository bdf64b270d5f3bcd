"""Choose a backbone for a task under a budget, and say why.

    python -m pipelines.select_model --flagfile=pipelines/configs/select_sst2.flags
    python -m pipelines.select_model --flagfile=pipelines/configs/select_hymenoptera.flags
    python -m pipelines.select_model --flagfile=pipelines/configs/select_conll2003.flags

Text, text pairs (`--text_pair_column`), tokens (NER on CoNLL/JSONL: a tag
flag or `--modality=tokens`; selected on entity F1) and images: each trial
trains what text_classify, token_classify or image_classify would.

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

from absl import flags

from pipelines import flags as pipeline_flags
from tfhub_finetune.errors import InputError
from tfhub_finetune.selection.config import (
    SELECTION_DEFAULTS,
    TRIAL_FIELDS,
    Constraints,
    SearchConfig,
    SelectionConfig,
)
from tfhub_finetune.selection.profile import ProfileOptions

FLAGS = flags.FLAGS

# === The training settings every trial uses: the same flags as text_classify/image_classify ===
pipeline_flags.define_common_flags()
pipeline_flags.define_text_flags()
pipeline_flags.define_image_flags()
pipeline_flags.define_tag_flags()
for _name, _value in SELECTION_DEFAULTS.items():
    FLAGS.set_default(_name, _value)
# Set per trial by the search (or not used by it): giving one is a mistake worth saying.
_SET_BY_SELECTION = {
    **{name.rpartition(".")[2]: "the search sets it per trial" for name in TRIAL_FIELDS},
    "backbone": "list the backbones in --candidates",
    "adaptation": "list the adaptations to compare in --adaptations",
    "freeze_backbone": "give --adaptations=head (or include head in the list)",
    "learning_rate": "give --learning_rates (and --baseline_learning_rate)",
    "epochs": "give --min_epochs and --max_epochs",
    "monitor": "trials monitor val_<--metric>",
    "lr_schedule": "trials keep the rate constant after warm-up, so they can be continued",
    "verbose": "--progress shows selection's progress",
    "export_dir": "export the recommendation with its training pipeline",
    "model_name": "export the recommendation with its training pipeline",
    "tfds_fallback": "give --train_data",
}

# === What to compare ===
flags.DEFINE_list("candidates", [], "Backbones to compare: catalog names, name@layers=k, "
                  "directories, TF Hub handles. The from-scratch baseline is added if missing.")
# Strings, not enums: SelectionConfig checks them, in one line with the close name.
flags.DEFINE_string("modality", "auto", "Task input: text, text_pair (two texts: "
                    "--text_pair_column), tokens (a tag per word, CoNLL/JSONL: NER) or image. "
                    "auto: tokens when a tag flag (--tag_column, --tag_scheme, --window_stride) "
                    "is given, text_pair with --text_pair_column, else from the candidates.")
flags.DEFINE_string("metric", "auto", "Fine-tuned metric to maximise: accuracy, macro_f1, f1 "
                    "(class 1 of two, GLUE's MRPC F1) or entity_f1 (tokens, as seqeval). auto: "
                    "entity_f1 for tokens, else accuracy.")

# === Fine-tuning search ===
flags.DEFINE_list("learning_rates", ["5e-5"], "Peak learning rates of the pretrained candidates "
                  "(secondary choice): the first rung runs the first; its leaders try the rest.")
flags.DEFINE_list("adaptations", [], "How much of each pretrained backbone trains, compared "
                  "with the backbone: full, head (frozen backbone; trains on cached features), "
                  "top:K (the last K transformer blocks / CNN stages), lora:R (keras-hub LoRA, "
                  "text encoders). Default: full,lora:8,head for text, tokens and text pairs; "
                  "full,top:2,head for images. The from-scratch baseline trains full only.")
flags.DEFINE_list("adaptation_learning_rates", [], "An adaptation's own learning rates, e.g. "
                  "head=1e-2/3e-3,lora=1e-3 (a kind names every rank or K; lora:8=... one). "
                  "Default: --learning_rates x 10 for lora, x 100 for head, x 1 for full and top.")
flags.DEFINE_float("baseline_learning_rate", 1e-3, "Learning rate of the from-scratch baseline.")
flags.DEFINE_integer("min_epochs", 1, "Epochs of the first rung (every candidate gets it).")
flags.DEFINE_integer("max_epochs", 4, "Epochs of a full fine-tuning (the last rung; brute force).")
flags.DEFINE_integer("reduction_factor", 2, "Each rung keeps the best 1/factor (2: better half).")
flags.DEFINE_integer("budget_epochs", 0, "Most fine-tuning epochs the search may spend, all "
                     "trials together (0: no limit; the first rung always runs).")
flags.DEFINE_float("budget_minutes", 0.0, "Most fine-tuning minutes (measured epoch times) the "
                   "search may spend (0: no limit; the first rung always runs).")
flags.DEFINE_bool("brute_force", False, "Also fine-tune every candidate to --max_epochs and "
                  "report whether brute force picks the same (measured, not estimated).")
flags.DEFINE_integer("lr_race_rungs", 1, "Rungs after the learning-rate check that every rate "
                     "of a promoted backbone keeps training before the best goes on alone "
                     "(0: decide on the check's scores).")
flags.DEFINE_enum("prefer", "latency", ["latency", "params", "memory", "train_time"],
                  "Cost that breaks ties: the cheapest of the candidates within noise of the "
                  "best is recommended (train_time: the projected full fine-tune minutes "
                  "--max_train_minutes limits).")
flags.DEFINE_float("tie_alpha", 0.05, "Significance of the paired test that decides a tie with "
                   "the best (0: no ties, the highest figure wins).")
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
flags.DEFINE_float("max_train_minutes", None, "Most minutes a full fine-tuning of a configuration "
                   "may take, projected from its first rung (seconds per epoch x --max_epochs); "
                   "configurations over it are not promoted.")
flags.DEFINE_float("max_train_memory_mb", None, "Most peak training RSS (MB) of a configuration's "
                   "trials; configurations over it are not promoted.")
flags.DEFINE_list("serving_forms", ["float32"], "Serving forms the recommendation may use: "
                  "float32 (the export), int8 (Keras int8 SavedModel for text and tokens, TFLite "
                  "dynamic range for images) and int8_tflite (text classifiers: the int8 network "
                  "as a TFLite file, served in the application's process by "
                  "tflite_text.TfliteTextClassifier, not by TF Serving). Each is one more export "
                  "and eval-set pass per finalist and its own candidate row with its own "
                  "latency, memory and accuracy.")

# === Profiling, output, cache ===
flags.DEFINE_float("profile_min_seconds", 2.0, "Least time spent timing each latency figure.")
flags.DEFINE_integer("profile_batch_size", 32, "Batch for throughput and FLOPs.")
flags.DEFINE_integer("profile_threads", None, "TensorFlow intra-op threads while profiling.")
flags.DEFINE_string("latency_clock", "wall", "What latency counts: wall (elapsed time per "
                    "request) or cpu (CPU time per request; with --profile_threads=1, figures "
                    "that stay comparable on a busy machine).")
flags.DEFINE_string("output_dir", None, "Where report.md, results.json and the plots go.")
flags.DEFINE_string("cache_dir", "", "Profiles, scores and the KerasTuner project "
                    "(default: <output_dir>/cache). Share it across runs and workers.")
flags.DEFINE_bool("overwrite", False, "Ignore and replace cached results.")
flags.DEFINE_string("title", "", "Report title (default: from the data).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def config_from_flags() -> SelectionConfig:
    """Builds and validates the selection config from parsed flags (no TensorFlow)."""
    f = FLAGS
    for name, fix in _SET_BY_SELECTION.items():
        if f[name].present:
            raise InputError(f"--{name} is not a selection flag.", received={name: f[name].value},
                             fix=f"Remove it: {fix}.")
    learning_rates = []
    for text in f.learning_rates:
        try:
            learning_rates.append(float(text))
        except ValueError:
            raise InputError(
                "A learning rate is not a number.", received={"learning_rates": text},
                fix="E.g. --learning_rates=1e-4,3e-5.",
            ) from None
    if not (math.isfinite(f.profile_min_seconds) and f.profile_min_seconds >= 0):
        raise InputError("--profile_min_seconds must be >= 0.",
                         received={"profile_min_seconds": f.profile_min_seconds})
    if f.profile_batch_size < 1:
        raise InputError("--profile_batch_size must be positive.",
                         received={"profile_batch_size": f.profile_batch_size})
    options = ProfileOptions(
        serving_batch_size=f.profile_batch_size, train_batch_size=max(f.batch_size, 1),
        min_seconds=f.profile_min_seconds, threads=f.profile_threads,
        latency_clock=f.latency_clock,
    )
    # A tag flag says the data is tagged words: select for token classification.
    tagging = [n for n in pipeline_flags.TAG_FLAGS if f[n].present]
    modality = "tokens" if tagging and not f["modality"].present else f.modality
    config = pipeline_flags.dataclass_from_flags(
        SelectionConfig,
        base=pipeline_flags.experiment_config_from_flags(),
        search=pipeline_flags.dataclass_from_flags(
            SearchConfig, candidates=tuple(c.strip() for c in f.candidates),
            learning_rates=tuple(learning_rates), modality=modality),
        constraints=pipeline_flags.dataclass_from_flags(Constraints),
        profile_options=options,
    )
    return config.resolved().validate()


def main(argv):
    del argv
    # Every flag is checked before TensorFlow is imported, so flag errors are instant.
    config = config_from_flags()
    from tfhub_finetune.io_utils import check_output_dir

    check_output_dir(config.output_dir, "output_dir")
    if config.cache_dir:
        check_output_dir(config.cache_dir, "cache_dir")
    from tfhub_finetune.selection.select import run_selection

    result = run_selection(config)
    if result.role == "worker":
        print(f"Worker done: trained {result.trials_run} trial(s).")
        return
    rec = result.recommendation
    # With brute force measured, the answer is its full-epoch one; the search's follows it.
    brute = result.brute_force_recommendation
    answer = brute or rec
    source = " (brute force: every configuration fine-tuned fully)" if brute else ""
    print()
    print(f"Recommendation{source}: {answer.reason}" if answer.name
          else f"No recommendation{source}. {answer.reason}")
    for relaxation in answer.relaxations[:2]:
        print(f"  To get one: {relaxation.describe(answer.metric_name)}")
    taus = ", ".join(
        f"{name}{' (prior)' if info['kind'] == 'prior' else ''} "
        f"{'undefined' if info['weighted_tau'] is None else format(info['weighted_tau'], '+.2f')}"
        f" (n={info['n']})" for name, info in result.kendall_tau.items()
    )
    print(f"Weighted Kendall tau vs fine-tuned {rec.metric_name}: {taus or 'no scores'}")
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
    if brute is not None:
        verdict = "matches or ties with" if result.matches_brute_force else "differs from"
        regret = "" if result.regret_points is None else f"; regret {result.regret_points:.1f}"
        print(f"The search's choice: {rec.reason} ({verdict} brute force's{regret})")
    print(f"Trials: {result.trials_run} trained, {result.trials_reused} reused from the cache")
    print(f"Report: {result.paths['report']} (results.json, pareto.png"
          + (", transferability.png" if "transferability" in result.paths else "") + ")")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def cli() -> None:
    """What `python -m` runs (tests/bad_inputs.py runs it in-process too)."""
    pipeline_flags.run_main(main)


if __name__ == "__main__":
    cli()
