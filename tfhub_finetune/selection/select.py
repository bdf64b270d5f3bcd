"""Choose a backbone for a task under a budget: profile, score, fine-tune by halving, recommend.

`select_model(candidates, train_data, eval_data, output_dir=...)` runs five stages
over a list of candidate backbones (catalog names, `name@layers=k`, local
directories, TF Hub handles), for text or image classification:

1. **Profile** each candidate as deployed (backbone + head at the task's real
   sequence length or image size) with `profile_in_subprocess`: one fresh child
   process per candidate, so memory figures are clean.
2. **Score transferability** without fine-tuning: frozen features of a seeded
   sample of the training data, pooled exactly as the classifier pools them
   (the head's input), scored by LogME, kNN and a linear probe, each timed.
3. **Fine-tune by successive halving** on KerasTuner (`tuner.py`, planned by
   `halving.plan_search`). `SuccessiveHalvingOracle` subclasses
   `keras_tuner.Oracle` (the stock Hyperband oracle samples configurations at
   random per bracket, so it cannot promise every candidate a first rung): the
   backbone is a `Choice` over the shortlist, the learning rate a secondary
   `Choice`. Every backbone trains the first rung at its first learning rate
   (the baseline at `baseline_learning_rate`); the better `1/reduction_factor`
   of the backbones that meet the hard constraints also try the other rates
   for the same epochs, then continue with their best rate from their
   checkpoint, halving again at each rung up to `max_epochs`. A candidate whose
   profile breaks `max_latency_ms`, `max_memory_mb` or `max_params` cannot be
   recommended and gets the first rung only. Trials stop early after
   `early_stopping_patience` epochs without improvement. Every trial uses the
   same seed and the same per-epoch data order.
4. **Recommend** with `recommend(...)` under latency / memory / parameter /
   metric constraints.
5. **Report** with `write_report` (report.md, results.json, pareto.png,
   transferability.png), plus a section on the search, the from-scratch
   baseline ("is pretraining worth it here?") and selection time against
   brute force (fine-tuning every candidate fully: estimated from the measured
   per-epoch times, or measured with `brute_force=True`).

**Why trials can be continued and cached.** The learning rate warms up over
the first tenth of an epoch and then stays constant, so the first k epochs of
any trial are exactly the first k epochs of a longer one (a decaying schedule
would depend on the budget). A promoted trial therefore resumes its parent's
weights and optimizer state (`fit_resumable`), and a finished trial answers
every later question about its (backbone, learning rate) up to its epochs.

**Caching.** Results live under `cache_dir` (default `<output_dir>/cache`):

- `tuner/<project>/`: the KerasTuner project. `<project>` is a hash of the data
  (file contents or folder listings) and every setting that changes what a
  trial computes (sequence length or image size, batch size, seed, metric,
  warm-up, weight decay, dropout, pooling, patience, examples used). Inside, a
  trial is keyed by its hyperparameters: backbone, learning rate, epochs, and
  a fingerprint of the weights behind the backbone name. `overwrite=False`
  reloads the project, so a rerun creates no trials, a wider budget continues
  the finished ones, and a run killed mid-trial resumes that trial from its
  last backup (`fit_resumable`, every `backup_every_steps` and at epoch ends).
  The search plan is recomputed from the finished trials on every request,
  never read back from the oracle's saved state, so changing the budget, the
  learning rates or the candidate list reuses whatever already fits.
- `profiles/` and `transferability/`: one JSON per (candidate, weights, input
  shape or data sample, options, machine). Failures are not cached.

**Distributed tuning.** With KerasTuner's environment variables set
(`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`), run
the same command on every machine over a shared `cache_dir`: the chief
(`KERASTUNER_TUNER_ID=chief`) profiles, scores, serves the oracle over gRPC
until the workers have run every trial, then recommends and reports; each
worker (`tuner0`, `tuner1`, ...) only trains the trials it is given and
returns. The oracle promotes a backbone as soon as enough of its rung has
finished to guarantee it a place in the better part (KerasTuner's Hyperband
rule), so workers rarely wait.

The KerasTuner subclasses (`tuner.SuccessiveHalvingOracle`,
`tuner.SelectionTuner`) are created on first use: importing KerasTuner imports
TensorFlow, which takes ~10 s on a loaded machine, and settings must be
checked before that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.io_utils import atomic_write_text
from tfhub_finetune.selection.halving import (
    RungSummary,
    SearchPlan,
    TrialRecord,
    WorkItem,
    last_line,
    lr_key,
    rung_epochs,
)
from tfhub_finetune.selection.profile import (
    ProfileOptions,
    ProfileResult,
    cpu_description,
    profile_in_subprocess,
)
from tfhub_finetune.selection.recommend import (
    Candidate,
    Recommendation,
    is_fraction_metric,
    recommend,
    validate_constraints,
    violations,
)
from tfhub_finetune.selection.report import transferability_correlations, write_report
from tfhub_finetune.selection.tuner import TRIAL_HISTORY, TrialHistory, tuner_classes

logger = logging.getLogger(__name__)

MODALITIES = ("auto", "text", "image")
METRICS = ("accuracy", "macro_f1")
ESTIMATORS = ("logme", "knn_accuracy", "linear_probe_accuracy")
SCRATCH_BASELINES = {"text": "scratch_text_encoder", "image": "scratch_cnn"}
# Bumped when a trial's computation changes, so old caches are not reused.
_CACHE_VERSION = 1


# --------------------------------------------------------------------------- #
# Settings and result
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Everything one selection run needs. Flags map one to one onto these fields.

    Attributes:
        candidates: tuple of str. Backbones to compare: catalog names,
            `name@layers=k`, local directories, TF Hub handles. The modality's
            from-scratch baseline is added when missing.
        train_data: str. Text: a `.tsv`/`.csv`/`.jsonl` file; images: a folder
            of class folders (or what `data.image.load_image_dataset` reads).
        eval_data: str. Same forms; empty holds out `validation_split`.
        output_dir: str. Where report.md, results.json and the plots go.
        modality: str. `auto` (from the candidates), `text` or `image`.
        text_column: str. Text data: column name or 0-based index.
        label_column: str. Text data: label column name or index.
        has_header: str. Text data: `auto`, `true` or `false`.
        label_names: tuple of str. Names for integer label ids, in id order.
        max_train_examples: int. Use only the first N training examples
            (images: a seeded random N); 0 uses all.
        validation_split: float. Held out when `eval_data` is empty.
        sequence_length: int. Text: max word pieces (also the profiled length).
        pooling: str. Text: `auto`, `cls`, `pooler` or `mean`.
        image_size: int. Images: input side; 0 uses each backbone's own.
        augment: str. Images: `basic`, `randaugment` or `none`.
        metric: str. `accuracy` or `macro_f1` on the evaluation data.
        batch_size: int. Training batch size.
        learning_rates: tuple of float. Peak learning rates for the pretrained
            candidates (the secondary choice): every backbone trains the
            first rung at the first one; the backbones leading that rung
            also try the others and keep the best.
        baseline_learning_rate: float. The from-scratch baseline's learning
            rate (random weights take larger steps than pretrained ones can).
        warmup_ratio: float. Warm-up length as a fraction of one epoch.
        weight_decay: float. AdamW weight decay.
        dropout: float or None. Dropout before the head; None uses the
            modality's builder default (text 0.1, images 0.2).
        seed: int. Seed of initialisation, data order and the data sample.
        min_epochs: int. Epochs of the first rung.
        max_epochs: int. Epochs of a full fine-tuning (the last rung, and
            what brute force trains every candidate for).
        reduction_factor: int. Each rung keeps the best 1/factor of the
            backbones (2: the better half, rounded up).
        early_stopping_patience: int. Stop a trial after this many epochs
            without improvement (counted over its whole chain); 0 disables.
        budget_epochs: int. Most fine-tuning epochs the search may spend,
            summed over all trials (0: no limit). The first rung always runs.
        budget_minutes: float. Most fine-tuning minutes (measured epoch times)
            the search may spend (0: no limit). The first rung always runs.
        brute_force: bool. Also fine-tune every configuration to
            `max_epochs` and compare the choice with the search's.
        shortlist_size: int. Fine-tune only the best N candidates by
            `shortlist_score` (plus the baseline); 0 fine-tunes all.
        shortlist_score: str. Transferability score that ranks the shortlist.
        transfer_examples: int. Training examples used for transferability.
        max_latency_ms: float or None. Constraint: p50 latency at batch 1.
        max_memory_mb: float or None. Constraint: peak inference memory.
        max_params: float or None. Constraint: parameter count.
        min_metric: float or None. Constraint: least fine-tuned metric.
        profile_options: ProfileOptions or None. None uses
            `ProfileOptions(serving_batch_size=32, train_batch_size=batch_size)`.
        profile_timeout_s: float. Limit per candidate's profile.
        cache_dir: str. Cache and KerasTuner project root; empty uses
            `<output_dir>/cache`.
        overwrite: bool. Ignore and replace cached results.
        backup_every_steps: int. Trial backups every N steps (and at epoch ends).
        title: str. Report title; empty derives one from the data.
        progress: bool. Show a tqdm progress bar on stderr.
    """

    candidates: tuple[str, ...]
    train_data: str
    eval_data: str = ""
    output_dir: str = ""
    modality: str = "auto"
    text_column: str = "0"
    label_column: str = "1"
    has_header: str = "auto"
    label_names: tuple[str, ...] = ()
    max_train_examples: int = 0
    validation_split: float = 0.1
    sequence_length: int = 128
    pooling: str = "auto"
    image_size: int = 0
    augment: str = "basic"
    metric: str = "accuracy"
    batch_size: int = 32
    learning_rates: tuple[float, ...] = (5e-5,)
    baseline_learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float | None = None
    seed: int = 42
    min_epochs: int = 1
    max_epochs: int = 4
    reduction_factor: int = 2
    early_stopping_patience: int = 2
    budget_epochs: int = 0
    budget_minutes: float = 0.0
    brute_force: bool = False
    shortlist_size: int = 0
    shortlist_score: str = "logme"
    transfer_examples: int = 500
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_params: float | None = None
    min_metric: float | None = None
    profile_options: ProfileOptions | None = None
    profile_timeout_s: float = 1800.0
    cache_dir: str = ""
    overwrite: bool = False
    backup_every_steps: int = 200
    title: str = ""
    progress: bool = True

    def validate(self) -> SelectionConfig:
        """Checks every value before any work; raises `InputError` naming the setting.

        Returns:
            self, so `SelectionConfig(...).validate()` chains.

        Raises:
            InputError: for empty candidates, missing data or output dir, bad
                numbers, constraints no candidate could meet (negative
                budgets, a fraction metric above 1) and contradictory budgets
                (`min_epochs` above `max_epochs`).

        Example:

        ```python
        SelectionConfig(candidates=("scratch_text_encoder",), train_data="train.tsv",
                        output_dir="runs/select", max_latency_ms=-1).validate()
        # InputError: `max_latency_ms` must be positive; ...
        ```
        """
        if not self.candidates or not all(isinstance(c, str) and c.strip() for c in self.candidates):
            _bad("candidates", list(self.candidates), "Give at least one candidate backbone.",
                 "E.g. --candidates=minilm_l6_h384,scratch_text_encoder.")
        duplicates = sorted({c for c in self.candidates if self.candidates.count(c) > 1})
        if duplicates:
            _bad("candidates", ",".join(duplicates), "A candidate is listed twice.",
                 "List each backbone once.")
        if not self.train_data:
            _bad("train_data", "", "Training data is required.", "Set --train_data.")
        if not self.output_dir:
            _bad("output_dir", "", "An output directory is required.", "Set --output_dir.")
        _one_of("modality", self.modality, MODALITIES)
        _one_of("metric", self.metric, METRICS)
        _one_of("shortlist_score", self.shortlist_score, ESTIMATORS)
        _one_of("pooling", self.pooling, ("auto", "cls", "pooler", "mean"))
        _one_of("augment", self.augment, ("basic", "randaugment", "none"))
        for name in ("batch_size", "min_epochs", "max_epochs", "transfer_examples"):
            _positive_int(name, getattr(self, name))
        for name in ("max_train_examples", "early_stopping_patience", "budget_epochs",
                     "shortlist_size", "image_size", "backup_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _bad(name, value, f"`{name}` must be an integer >= 0.")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            _bad("reduction_factor", self.reduction_factor,
                 "`reduction_factor` must be an integer >= 2 (2 keeps the better half).")
        if self.min_epochs > self.max_epochs:
            raise InputError(
                "`min_epochs` is larger than `max_epochs`: the first rung would train longer "
                "than a full fine-tuning.",
                received={"min_epochs": self.min_epochs, "max_epochs": self.max_epochs},
                fix="Give min_epochs <= max_epochs.",
            )
        if self.sequence_length < 8:
            _bad("sequence_length", self.sequence_length, "`sequence_length` must be >= 8.")
        if not self.learning_rates:
            _bad("learning_rates", [], "Give at least one learning rate.", "E.g. --learning_rates=1e-4.")
        for lr in self.learning_rates:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr < 1):
                _bad("learning_rates", list(self.learning_rates),
                     "Learning rates must be numbers in (0, 1).", "E.g. --learning_rates=1e-4,3e-5.")
        if len({lr_key(lr) for lr in self.learning_rates}) != len(self.learning_rates):
            _bad("learning_rates", list(self.learning_rates), "A learning rate is listed twice.")
        lr = self.baseline_learning_rate
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr < 1):
            _bad("baseline_learning_rate", lr, "The learning rate must be a number in (0, 1).",
                 "E.g. --baseline_learning_rate=1e-3.")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            _bad("warmup_ratio", self.warmup_ratio, "`warmup_ratio` must be in [0, 1].")
        if not 0.0 <= self.weight_decay < 1.0:
            _bad("weight_decay", self.weight_decay, "`weight_decay` must be in [0, 1).")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            _bad("dropout", self.dropout, "`dropout` must be in [0, 1).")
        if not 0.0 < self.validation_split < 1.0:
            _bad("validation_split", self.validation_split, "`validation_split` must be in (0, 1).")
        if not (isinstance(self.budget_minutes, (int, float)) and self.budget_minutes >= 0):
            _bad("budget_minutes", self.budget_minutes, "`budget_minutes` must be >= 0 (0: no limit).")
        if not self.profile_timeout_s > 0:
            _bad("profile_timeout_s", self.profile_timeout_s, "`profile_timeout_s` must be positive.")
        # The same rules `recommend` applies, checked before hours of work.
        validate_constraints(self.constraints, self.metric)
        return self

    @property
    def constraints(self) -> dict[str, float | None]:
        """The four `recommend` constraints as keyword arguments."""
        return {
            "max_latency_ms": self.max_latency_ms,
            "max_memory_mb": self.max_memory_mb,
            "max_params": self.max_params,
            "min_metric": self.min_metric,
        }

    @property
    def objective(self) -> str:
        """The Keras log name the search maximises, e.g. `val_accuracy`."""
        return f"val_{self.metric}"

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir or Path(self.output_dir) / "cache")

    @property
    def rungs(self) -> list[int]:
        return rung_epochs(self.min_epochs, self.max_epochs, self.reduction_factor)


@dataclasses.dataclass
class SelectionResult:
    """What a selection run found.

    Attributes:
        role: str. `local`, `chief` or `worker` (distributed tuning). A
            worker only trains; everything below is empty for it.
        recommendation: Recommendation or None.
        candidates: list of Candidate. Every candidate, failed ones included.
        paths: dict. `report`, `results`, `pareto`, `transferability` -> Path.
        kendall_tau: dict. Score name -> `{"tau", "n", "candidates"}`.
        selection_seconds: float. Wall time of this run.
        compute_seconds: float. Recorded time of the profiles, scores and
            search epochs behind the results, cached ones included (what the
            selection cost when `reused`).
        reused: bool. Whether any stage came from the cache.
        brute_force_seconds: float or None. Estimated time of the brute-force
            alternative (profiling + every configuration for `max_epochs`).
        brute_force_measured_seconds: float or None. The same, measured
            (only with `brute_force=True`).
        brute_force_choice: str or None. What `recommend` picks when every
            candidate is fine-tuned fully (only with `brute_force=True`).
        matches_brute_force: bool or None. Whether that is the recommendation.
        trials_run: int. Trials trained by this process.
        trials_reused: int. Finished trials the search took from the cache.
    """

    role: str
    recommendation: Recommendation | None = None
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    kendall_tau: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    selection_seconds: float = 0.0
    compute_seconds: float = 0.0
    reused: bool = False
    brute_force_seconds: float | None = None
    brute_force_measured_seconds: float | None = None
    brute_force_choice: str | None = None
    matches_brute_force: bool | None = None
    trials_run: int = 0
    trials_reused: int = 0


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def select_model(
    candidates: Sequence[str],
    train_data: str,
    eval_data: str = "",
    *,
    output_dir: str,
    **settings: Any,
) -> SelectionResult:
    """Profiles, scores and fine-tunes candidate backbones, then recommends one.

    See the module docstring for the stages, caching and distributed mode.

    Args:
        candidates: list of str. Backbones: catalog names (`minilm_l6_h384`),
            `name@layers=k`, directories, TF Hub handles. The from-scratch
            baseline is added when missing.
        train_data: str. Training file (text) or class-folder directory (images).
        eval_data: str. Evaluation data; empty holds out a split.
        output_dir: str. Where the report goes.
        **settings: any other `SelectionConfig` field, e.g.
            `learning_rates=(1e-4,)`, `max_epochs=3`, `max_latency_ms=20`.

    Returns:
        A `SelectionResult`.

    Raises:
        InputError: for bad settings, data that cannot be read, candidates of
            mixed modalities, or when every candidate failed (the report is
            written first).

    Example:

    ```python
    result = select_model(
        ["minilm_l6_h384@layers=2", "scratch_text_encoder"],
        "../shared/data/sst2/train.tsv", "../shared/data/sst2/dev.tsv",
        output_dir="runs/select", label_names=("negative", "positive"),
        max_train_examples=2000, sequence_length=64, learning_rates=(1e-4,),
        max_epochs=2, max_latency_ms=20,
    )
    print(result.recommendation.reason)
    ```
    """
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(SelectionConfig)})
    if unknown:
        fields = [f.name for f in dataclasses.fields(SelectionConfig)]
        raise InputError("Unknown selection setting.", received={"setting": unknown[0]},
                         fix=did_you_mean(unknown[0], fields))
    config = SelectionConfig(
        candidates=tuple(candidates), train_data=train_data, eval_data=eval_data,
        output_dir=output_dir, **settings,
    )
    return run_selection(config)


def run_selection(config: SelectionConfig) -> SelectionResult:
    """Runs a validated-or-not `SelectionConfig` (see `select_model`)."""
    config.validate()
    started = time.perf_counter()
    role = _tuner_role()
    runs = _resolve_candidates(config)
    modality = _modality_of(config, runs)
    runs = _add_baseline(runs, modality, config)
    weights_ids = {r.backbone: r.weights_id for r in runs if r.spec is not None}
    project = _project_name(config, modality)

    if role == "worker":
        # A worker trains what the chief's oracle hands it; the chief does the rest.
        print(f"Distributed tuning: worker {os.environ.get('KERASTUNER_TUNER_ID')} "
              f"asking the chief at {os.environ.get('KERASTUNER_ORACLE_IP')}:"
              f"{os.environ.get('KERASTUNER_ORACLE_PORT')} for trials.", flush=True)
        ok = [r for r in runs if r.spec is not None]
        _, trials_run, _ = _run_search(config, modality, project, ok, weights_ids, bar=None)
        return SelectionResult(role=role, trials_run=trials_run,
                               selection_seconds=time.perf_counter() - started)

    bar = _progress_bar(config, runs)
    stage_seconds: dict[str, float] = {}
    try:
        usable = [r for r in runs if r.spec is not None]
        if not _any_given(usable):
            _fail_all(runs, report=_write_failed_report(config, runs, modality, started))
        tic = time.perf_counter()
        num_classes = _num_classes(config, modality)
        stage_seconds["data"] = time.perf_counter() - tic

        tic = time.perf_counter()
        for run in usable:
            bar.set_description(f"profile {run.name}")
            _profile(run, config, modality, num_classes)
            bar.update(1)
            _echo(bar, _profile_line(run))
        stage_seconds["profile"] = time.perf_counter() - tic

        tic = time.perf_counter()
        for run in usable:
            bar.set_description(f"transferability {run.name}")
            if run.error is None:
                _transferability(run, config, modality)
                _echo(bar, _transfer_line(run))
            bar.update(1)
        stage_seconds["transferability"] = time.perf_counter() - tic

        shortlist = _shortlist(runs, config, modality)
        _mark_constraint_breaks(shortlist, config)
        if not _any_given(shortlist):
            _fail_all(runs, report=_write_failed_report(config, runs, modality, started))
        bar.set_description("fine-tune (successive halving)")
        tic = time.perf_counter()
        plan, trials_run, trials_reused = _run_search(
            config, modality, project, shortlist, weights_ids, bar=bar
        )
        stage_seconds["search"] = time.perf_counter() - tic

        bar.set_description("recommend and report")
        result = _assemble(config, modality, runs, shortlist, plan, project, started,
                           stage_seconds, trials_run, trials_reused)
        bar.update(1)
    finally:
        bar.close()
    trained = {c.name for c in result.candidates if c.metric is not None}
    if not _any_given([r for r in runs if r.name in trained]):
        _fail_all(runs, report=result.paths.get("report"))
    return result


# --------------------------------------------------------------------------- #
# Candidates
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _CandidateRun:
    """One candidate's progress through the stages (mutable bookkeeping)."""

    backbone: str  # What the user gave: the hyperparameter value and cache key.
    name: str  # Short, unique display name for tables and plots.
    spec: Any = None
    weights_id: str = ""
    error: str | None = None
    profile: ProfileResult | None = None
    profile_cached: bool = False
    scores: dict[str, float | None] = dataclasses.field(default_factory=dict)
    transfer: dict[str, Any] = dataclasses.field(default_factory=dict)
    transfer_cached: bool = False
    shortlisted: bool = False
    baseline: bool = False
    added: bool = False
    # Hard constraints the profile breaks (constraint -> figure): first rung only.
    breaks: dict[str, float] = dataclasses.field(default_factory=dict)

    def fail(self, stage: str, reason: str) -> None:
        reason = " ".join(str(reason).split())[:400]
        entry = f"{stage}: {reason}"
        self.error = entry if self.error is None else f"{self.error}; {entry}"


def _resolve_candidates(config: SelectionConfig) -> list[_CandidateRun]:
    from tfhub_finetune.backbones.catalog import resolve_backbone

    runs = []
    for given in config.candidates:
        run = _CandidateRun(backbone=given, name=given)
        try:
            run.spec = resolve_backbone(given)
            run.weights_id = _weights_fingerprint(run.spec)
        except InputError as err:
            # Reported as a failed candidate; the others go on.
            run.fail("resolve", str(err))
        runs.append(run)
    _set_display_names(runs)
    return runs


def _set_display_names(runs: list[_CandidateRun]) -> None:
    # Paths are long in plot labels; their last part is usually unique.
    short = [Path(r.backbone.rstrip("/")).name if "/" in r.backbone else r.backbone for r in runs]
    for run, name in zip(runs, short, strict=True):
        run.name = name if short.count(name) == 1 else run.backbone


def _modality_of(config: SelectionConfig, runs: list[_CandidateRun]) -> str:
    found = {r.spec.modality for r in runs if r.spec is not None}
    if len(found) > 1:
        listing = ", ".join(f"{r.backbone} ({r.spec.modality})" for r in runs if r.spec is not None)
        raise InputError(
            "Candidates mix text and image backbones; one selection compares one task.",
            received={"candidates": listing},
            fix="Run text and image candidates separately.",
        )
    if config.modality != "auto":
        if found and found != {config.modality}:
            raise InputError(
                f"The candidates are {found.pop()} backbones but --modality is {config.modality}.",
                received={"modality": config.modality},
                fix="Fix --modality or the candidate list.",
            )
        return config.modality
    if found:
        return found.pop()
    # Nothing resolved: guess from the data so the failure report can still be written.
    return "image" if Path(config.train_data).is_dir() else "text"


def _add_baseline(
    runs: list[_CandidateRun], modality: str, config: SelectionConfig
) -> list[_CandidateRun]:
    from tfhub_finetune.backbones.catalog import resolve_backbone

    baseline = SCRATCH_BASELINES[modality]
    for run in runs:
        if run.spec is not None and run.spec.source == "scratch":
            run.baseline = True
    if any(r.baseline for r in runs):
        return runs
    # The report must answer "is pretraining worth it here?".
    spec = resolve_backbone(baseline)
    run = _CandidateRun(backbone=baseline, name=baseline, spec=spec,
                        weights_id=_weights_fingerprint(spec), baseline=True, added=True)
    print(f"Adding the from-scratch baseline `{baseline}` to the candidates.", flush=True)
    runs = [*runs, run]
    _set_display_names(runs)
    return runs


def _any_given(runs: Sequence[_CandidateRun]) -> bool:
    # The baseline we added is a yardstick, not a choice: alone it selects nothing.
    return any(not r.added for r in runs)


def _fail_all(runs: Sequence[_CandidateRun], report: Path | None = None) -> None:
    # The problem part of each reason: the full ones are in the report.
    reasons = "; ".join(f"{r.name}: {(r.error or 'no fine-tuned metric').split(' Received:')[0]}"
                        for r in runs if not r.added)
    where = f" See {report}." if report else ""
    raise InputError(
        "Every candidate failed; there is nothing to recommend.",
        received={"failures": reasons},
        fix="Check the candidate names and paths (catalog: tfhub_finetune.list_backbones())."
        + where,
    )


# --------------------------------------------------------------------------- #
# Modalities: how a task's data and model are built for each kind of input
# --------------------------------------------------------------------------- #


class _TextModality:
    name = "text"
    builder = "tfhub_finetune.builders.text_classifier:build_text_classifier"
    dropout = 0.1

    def make_task(self, experiment: Any) -> Any:
        from tfhub_finetune.tasks.text_classification import TextClassificationTask

        return TextClassificationTask(experiment)

    def profile_request(
        self, config: SelectionConfig, run: _CandidateRun, num_classes: int
    ) -> tuple[dict[str, Any], dict[str, list[int]]]:
        from tfhub_finetune.backbones.base import TEXT_INPUTS

        kwargs = {"backbone": run.backbone, "num_classes": num_classes,
                  "pooling": config.pooling, "dropout": _dropout(config, self)}
        return kwargs, {name: [config.sequence_length] for name in TEXT_INPUTS}

    def feature_dataset(self, task: Any, config: SelectionConfig) -> Any:
        from tfhub_finetune.data.text import make_text_dataset

        # Shuffled with the run's seed but not bucketed: a uniform sample, not
        # the sentences whose length bucket happens to fill first.
        return make_text_dataset(task.train_data, task.backbone.tokenizer, batch_size=64,
                                 training=True, seed=config.seed, bucketing=False)


class _ImageModality:
    name = "image"
    builder = "tfhub_finetune.builders.image_classifier:build_image_classifier"
    dropout = 0.2

    def make_task(self, experiment: Any) -> Any:
        from tfhub_finetune.tasks.image_classification import ImageClassificationTask

        return ImageClassificationTask(experiment)

    def profile_request(
        self, config: SelectionConfig, run: _CandidateRun, num_classes: int
    ) -> tuple[dict[str, Any], list[int]]:
        size = config.image_size or run.spec.image_size or 224
        kwargs = {"backbone": run.backbone, "num_classes": num_classes, "image_size": size,
                  "dropout": _dropout(config, self)}
        return kwargs, [size, size, 3]

    def feature_dataset(self, task: Any, config: SelectionConfig) -> Any:
        # Shuffled (class folders come in blocks) and never augmented.
        return task.train_data.batches(64, training=True, seed=config.seed, augment="none")


_MODALITIES: dict[str, Any] = {"text": _TextModality(), "image": _ImageModality()}


def _dropout(config: SelectionConfig, modality: Any) -> float:
    return modality.dropout if config.dropout is None else float(config.dropout)


def _experiment_config(
    config: SelectionConfig, modality: Any, backbone: str, model_dir: str, learning_rate: float
) -> Any:
    """The `ExperimentConfig` a trial (or a feature extraction) runs with."""
    from tfhub_finetune.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

    data = DataConfig(
        train_data=config.train_data, eval_data=config.eval_data,
        text_column=str(config.text_column), label_column=str(config.label_column),
        has_header=config.has_header, label_names=tuple(config.label_names),
        validation_split=config.validation_split, max_train_examples=config.max_train_examples,
        augment=config.augment,
    )
    model = ModelConfig(backbone=backbone, pooling=config.pooling, dropout=_dropout(config, modality),
                        sequence_length=config.sequence_length, image_size=config.image_size)
    train = TrainConfig(
        epochs=config.max_epochs, batch_size=config.batch_size, learning_rate=learning_rate,
        warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay, seed=config.seed,
        monitor=config.objective, early_stopping_patience=config.early_stopping_patience,
        backup_every_steps=config.backup_every_steps,
    )
    return ExperimentConfig(model_dir=model_dir, data=data, model=model, train=train).validate()


def _num_classes(config: SelectionConfig, modality: str) -> int:
    """Reads the training labels once (the profile needs the head's width)."""
    if modality == "text":
        from tfhub_finetune.data.labels import LabelVocabulary
        from tfhub_finetune.data.sources import read_text_examples

        examples = read_text_examples(
            config.train_data, text_column=_column(config.text_column),
            label_column=_column(config.label_column),
            has_header={"true": True, "false": False}.get(config.has_header, "auto"),
        )
        vocabulary = LabelVocabulary.from_labels(
            examples.labels, label_names=list(config.label_names) or None,
            source=examples.source, rows=examples.rows,
        )
        return vocabulary.num_classes
    from tfhub_finetune.data.image import load_image_dataset

    # No validation pass and nothing decoded: only the class list is needed.
    data = load_image_dataset(config.train_data, image_size=32, validate=False, cache=False,
                              label_names=list(config.label_names) or None)
    return len(data.label_names)


def _column(value: str) -> str | int:
    return int(value) if str(value).lstrip("-").isdigit() else value


# --------------------------------------------------------------------------- #
# Stage 1: profiling
# --------------------------------------------------------------------------- #


def _profile(run: _CandidateRun, config: SelectionConfig, modality: str, num_classes: int) -> None:
    adapter = _MODALITIES[modality]
    kwargs, shapes = adapter.profile_request(config, run, num_classes)
    options = config.profile_options or ProfileOptions(train_batch_size=config.batch_size)
    key = _hash({
        "version": _CACHE_VERSION, "backbone": run.backbone, "weights": run.weights_id,
        "builder": adapter.builder, "kwargs": kwargs, "shapes": shapes,
        "options": dataclasses.asdict(options), "machine": _machine(),
    })
    path = config.cache_root / "profiles" / f"{key}.json"
    if path.exists() and not config.overwrite:
        run.profile = ProfileResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        run.profile.name = run.name
        run.profile_cached = True
        return
    result = profile_in_subprocess(adapter.builder, kwargs, shapes, name=run.name,
                                   options=options, timeout_s=config.profile_timeout_s)
    run.profile = result
    if result.params is None:
        run.fail("profile", result.error or "the model could not be built")
        return
    if result.error is None:
        atomic_write_text(path, json.dumps(result.to_dict(), indent=2))


def _profile_line(run: _CandidateRun) -> str:
    p = run.profile
    if run.error or p is None:
        return f"profile   {run.name}: FAILED ({run.error})"
    cached = " [cached]" if run.profile_cached else f" ({p.profile_seconds or 0:.0f} s)"
    return (f"profile   {run.name}: {_fmt(p.latency_p50_ms, '.3g')} ms p50, "
            f"{_count(p.params)} params, {_fmt(p.peak_infer_memory_mb, '.0f')} MB peak{cached}")


# --------------------------------------------------------------------------- #
# Stage 2: transferability
# --------------------------------------------------------------------------- #


def _transferability(run: _CandidateRun, config: SelectionConfig, modality: str) -> None:
    key = _hash({
        "version": _CACHE_VERSION, "backbone": run.backbone, "weights": run.weights_id,
        "data": _data_fingerprint(config), "settings": _trial_settings(config, modality),
        "examples": config.transfer_examples, "estimators": ESTIMATORS,
    })
    path = config.cache_root / "transferability" / f"{key}.json"
    if path.exists() and not config.overwrite:
        cached = json.loads(path.read_text(encoding="utf-8"))
        run.scores, run.transfer, run.transfer_cached = cached["scores"], cached["figures"], True
        return
    try:
        scores, figures = _score_candidate(run, config, modality)
    except Exception as err:  # A candidate that cannot load is reported, not fatal.
        run.fail("transferability", f"{type(err).__name__}: {err}")
        return
    run.scores, run.transfer = scores, figures
    atomic_write_text(path, json.dumps({"scores": scores, "figures": figures}, indent=2))


def _score_candidate(
    run: _CandidateRun, config: SelectionConfig, modality: str
) -> tuple[dict[str, float | None], dict[str, Any]]:
    import gc

    import keras

    from tfhub_finetune import training
    from tfhub_finetune.selection.transferability import extract_features, score_transferability

    adapter = _MODALITIES[modality]
    keras.backend.clear_session()
    training.set_seed(config.seed)
    experiment = _experiment_config(config, adapter, run.backbone, "unused", config.learning_rates[0])
    task = adapter.make_task(experiment)
    task.prepare_train()
    model = task.build_model()
    # The head's input is the feature exactly as the classifier pools it
    # (masked mean, [CLS] or the pooler for text; global average for images).
    features_model = keras.Model(model.input, model.get_layer("head_logits").input)
    tic = time.perf_counter()
    features, labels = extract_features(
        features_model, adapter.feature_dataset(task, config), config.transfer_examples
    )
    extract_seconds = time.perf_counter() - tic
    scores = score_transferability(features, labels, ESTIMATORS)
    figures: dict[str, Any] = {
        "transfer_examples": int(len(features)),
        "feature_dim": int(features.shape[1]),
        "feature_extraction_seconds": round(extract_seconds, 3),
    }
    for name, score in scores.items():
        figures[f"{name}_seconds"] = score.score_seconds
        if score.error:
            figures[f"{name}_error"] = score.error
    del model, features_model, task
    keras.backend.clear_session()
    gc.collect()
    return {name: s.value for name, s in scores.items()}, figures


def _transfer_line(run: _CandidateRun) -> str:
    if run.error:
        return f"transfer  {run.name}: FAILED ({run.error})"
    parts = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in run.scores.items())
    took = sum(v for k, v in run.transfer.items() if k.endswith("_seconds"))
    cached = " [cached]" if run.transfer_cached else f" ({took:.0f} s)"
    return f"transfer  {run.name}: {parts}{cached}"


def _mark_constraint_breaks(runs: Sequence[_CandidateRun], config: SelectionConfig) -> None:
    """Records, per candidate, the hard constraints its profile already breaks.

    Latency, memory and size are known before any training and do not change
    with it, so a candidate over one of those limits cannot be recommended:
    the search gives it the first rung only (see `plan_search`).
    """
    hard = {k: v for k, v in config.constraints.items() if v is not None and k != "min_metric"}
    for run in runs:
        if run.profile is not None:
            run.breaks = violations(Candidate.from_profile(run.profile), hard)


def _learning_rates_of(config: SelectionConfig,
                       runs: Sequence[_CandidateRun]) -> dict[str, list[float]]:
    """Backbone -> learning rates to try, the first first (the baseline has its own)."""
    return {r.backbone: [config.baseline_learning_rate] if r.baseline
            else list(config.learning_rates) for r in runs}


def _eligible(runs: Sequence[_CandidateRun]) -> list[str] | None:
    """Backbones that may be recommended, or None when no candidate breaks a constraint."""
    if not any(r.breaks for r in runs):
        return None
    return [r.backbone for r in runs if not r.breaks]


def _shortlist(
    runs: list[_CandidateRun], config: SelectionConfig, modality: str
) -> list[_CandidateRun]:
    ok = [r for r in runs if r.error is None]
    pretrained = [r for r in ok if not r.baseline]
    if config.shortlist_size and len(pretrained) > config.shortlist_size:
        def rank(r: _CandidateRun) -> float:
            value = r.scores.get(config.shortlist_score)
            return -value if isinstance(value, (int, float)) else math.inf

        keep = set(id(r) for r in sorted(pretrained, key=rank)[: config.shortlist_size])
        pretrained = [r for r in pretrained if id(r) in keep]
    chosen = [*pretrained, *[r for r in ok if r.baseline]]
    for run in chosen:
        run.shortlisted = True
    return chosen


# --------------------------------------------------------------------------- #
# Stage 3: the trial trainer KerasTuner runs
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _TrialTrainer:
    """Trains one trial: builds the task and model, restores the parent, fits, reports."""

    config: SelectionConfig
    modality: str

    def fit_trial(self, values: Mapping[str, Any], trial_dir: Path, parent_dir: Path | None,
                  tuner_id: str) -> dict[str, float]:
        import keras

        from tfhub_finetune import training
        from tfhub_finetune.driver import loss_for
        from tfhub_finetune.metrics import training_metrics

        config, adapter = self.config, _MODALITIES[self.modality]
        backbone, lr = str(values["backbone"]), float(values["learning_rate"])
        target, initial = int(values["tuner/epochs"]), int(values.get("tuner/initial_epoch", 0))
        backup = trial_dir / "backup"
        history_path = trial_dir / TRIAL_HISTORY
        if parent_dir is not None and not (backup / training.BACKUP_STATE).exists():
            if (parent_dir / "backup" / training.BACKUP_STATE).exists():
                # Continue the parent: its weights, optimizer state and history.
                shutil.copytree(parent_dir / "backup", backup, dirs_exist_ok=True)
                if (parent_dir / TRIAL_HISTORY).exists():
                    shutil.copy2(parent_dir / TRIAL_HISTORY, history_path)
            else:
                logger.warning("Trial %s: parent backup missing; training from scratch.",
                               trial_dir.name)
                initial = 0
        history = TrialHistory(history_path)

        keras.backend.clear_session()
        training.set_seed(config.seed)
        experiment = _experiment_config(config, adapter, backbone, str(trial_dir), lr)
        task = adapter.make_task(experiment)
        task.prepare_train()
        model = task.build_model()
        steps = task.steps_per_epoch
        model.compile(
            # Constant after warm-up: k epochs are the start of any longer run.
            optimizer=training.make_optimizer(
                lr, total_steps=steps, warmup_ratio=config.warmup_ratio,
                weight_decay=config.weight_decay, end_learning_rate=lr,
            ),
            loss=loss_for(experiment.model.task),
            metrics=training_metrics(experiment.model.task, task.labels.num_classes),
        )
        recorder = tuner_classes().EpochRecorder(
            history, config.objective, config.early_stopping_patience, tuner_id
        )
        outcome = training.fit_resumable(
            model, task.train_epoch_dataset, epochs=target, steps_per_epoch=steps,
            model_dir=trial_dir, validation_data=task.eval_dataset(), callbacks=[recorder],
            backup_every_steps=config.backup_every_steps, verbose=0,
        )
        if outcome["terminated"]:
            # Leave the trial RUNNING: the next run resumes it from the backup.
            raise SystemExit("Stopped by SIGTERM after a backup; rerun the command to resume.")
        scores = history.scores()
        if not scores:
            raise RuntimeError("The trial finished without a single evaluated epoch.")
        metrics: dict[str, float] = {
            config.objective: max(scores),
            "epochs_trained": float(len(scores)),
            "stopped_early": float(history.stopped_at is not None),
        }
        for k in sorted(history.epochs):
            metrics[f"{config.objective}_epoch_{k}"] = float(history.epochs[k]["score"])
            if k > initial:
                metrics[f"epoch_{k}_seconds"] = float(history.epochs[k]["seconds"])
        del model, task
        keras.backend.clear_session()
        if parent_dir is not None:
            # The parent is superseded: later trials continue from this one.
            shutil.rmtree(parent_dir / "backup", ignore_errors=True)
        return metrics


def _run_search(
    config: SelectionConfig, modality: str, project: str, shortlist: Sequence[_CandidateRun],
    weights_ids: Mapping[str, str], bar: Any,
) -> tuple[SearchPlan | None, int, int]:
    """Runs (or serves, or works for) the KerasTuner search; returns (plan, run, reused)."""
    classes = tuner_classes()
    candidates = [r.backbone for r in shortlist]
    oracle = classes.SuccessiveHalvingOracle(
        config.objective, candidates, _learning_rates_of(config, shortlist), config.rungs,
        reduction_factor=config.reduction_factor, budget_epochs=config.budget_epochs,
        budget_seconds=config.budget_minutes * 60.0, brute_force=config.brute_force,
        weights_ids=weights_ids, eligible=_eligible(shortlist), seed=config.seed,
    )
    names = {r.backbone: r.name for r in shortlist}
    role = _tuner_role()
    directory = config.cache_root / "tuner"
    tuner = classes.SelectionTuner(
        oracle, _TrialTrainer(config, modality), directory=str(directory), project_name=project,
        # Workers never delete the shared project; the chief or a local run may.
        overwrite=config.overwrite and role != "worker",
    )
    if role == "worker":
        tuner.search(verbose=0)
        return None, tuner.trials_run, 0

    reused = sum(1 for t in oracle.trials.values() if t.status == "COMPLETED")
    if bar is not None:
        plan = oracle.plan()
        bar.total = bar.n + _planned_trials(plan, config, shortlist) + 1
        bar.refresh()

        def started(item: WorkItem, trial_id: str) -> None:
            bar.set_description(f"fine-tune {names.get(item.backbone, item.backbone)} "
                                f"lr={item.learning_rate:g} to {item.target_epochs} ep")

        def ended(record: TrialRecord) -> None:
            bar.update(1)
            name = names.get(record.backbone, record.backbone)
            took = sum(record.epoch_seconds.values())
            if record.status == "COMPLETED" and record.scores:
                stop = " (stopped early)" if record.stopped_early else ""
                line = (f"trial {record.trial_id} {name} lr={record.learning_rate:g} epochs "
                        f"{record.initial_epoch}->{record.epochs_trained}: {config.objective} "
                        f"{max(record.scores):.4f}{stop} ({took:.0f} s)")
            else:
                line = (f"trial {record.trial_id} {name} lr={record.learning_rate:g}: "
                        f"{record.status} {last_line(record.message)}")
            _echo(bar, line)

        oracle.on_trial_start, oracle.on_trial_end = started, ended
    if role == "chief":
        print(f"Distributed tuning: chief serving the oracle on "
              f"{os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')}"
              "; start the workers with the same command.", flush=True)
    tuner.search(verbose=0)
    # Counted on the oracle: on a chief, the workers trained them.
    finished = sum(1 for t in oracle.trials.values() if t.status == "COMPLETED")
    return oracle.plan(), finished - reused, reused


def _planned_trials(plan: SearchPlan, config: SelectionConfig,
                    shortlist: Sequence[_CandidateRun]) -> int:
    """Trials a search from here will start (for the progress bar; an estimate)."""
    racing = sum(not r.breaks for r in shortlist) or len(shortlist)
    sizes = math.ceil(racing / config.reduction_factor)
    # The first rung, the leaders' learning-rate checks, then the later rungs.
    total = len(shortlist) + sizes * (len(config.learning_rates) - 1)
    for _ in config.rungs[1:]:
        total += sizes
        sizes = math.ceil(sizes / config.reduction_factor)
    if config.brute_force:
        total += sum(len(v) for v in _learning_rates_of(config, shortlist).values())
    done = sum(1 for r in plan.rungs for s in r.entries if s.status == "done")
    return max(total - done, len(plan.todo))


# --------------------------------------------------------------------------- #
# Stages 4-5: recommendation and report
# --------------------------------------------------------------------------- #


def _assemble(
    config: SelectionConfig, modality: str, runs: list[_CandidateRun],
    shortlist: list[_CandidateRun], plan: SearchPlan, project: str, started: float,
    stage_seconds: dict[str, float], trials_run: int, trials_reused: int,
) -> SelectionResult:
    records, brute_records = [], []
    for run in runs:
        records.append(_candidate(run, plan, config, brute=False))
        brute_records.append(_candidate(run, plan, config, brute=True))
    rec = recommend(records, **config.constraints, metric_name=config.metric)

    profile_seconds = sum((r.profile.profile_seconds or 0.0) for r in runs if r.profile)
    estimate = _brute_force_estimate(plan, config, shortlist, profile_seconds)
    # What the results cost, cached stages included (recorded when they ran).
    compute = {
        "profiling": profile_seconds,
        "transferability": sum(v for r in runs for k, v in r.transfer.items()
                               if k.endswith("_seconds") and isinstance(v, (int, float))),
        "fine-tuning search": sum(
            plan.seconds(s.backbone, s.learning_rate).get(k, 0.0)
            for rung in plan.rungs for s in rung.entries if s.status == "done"
            for k in range((plan.rungs[rung.rung - 1].epochs if rung.rung else 0) + 1,
                           s.epochs + 1)
        ),
    }
    measured = brute_choice = matches = None
    brute_rec = None
    if config.brute_force and plan.finished:
        measured = profile_seconds + sum(
            sum(plan.seconds(s.backbone, s.learning_rate).get(k, 0.0)
                for k in range(1, s.epochs + 1))
            for s in plan.brute_force if s.status == "done"
        )
        brute_rec = recommend(brute_records, **config.constraints, metric_name=config.metric)
        brute_choice = brute_rec.name
        matches = brute_choice == rec.name
    selection_seconds = time.perf_counter() - started
    halving_epochs = plan.planned_epochs
    budget = {
        "rungs (cumulative epochs)": config.rungs,
        "learning rates": list(config.learning_rates),
        "baseline learning rate": config.baseline_learning_rate,
        "fine-tuning epochs (search plan)": halving_epochs,
        "fine-tuning epochs (brute force)": config.max_epochs * sum(
            len(v) for v in _learning_rates_of(config, shortlist).values()),
        "trials trained by this run": trials_run,
        "trials reused from the cache": trials_reused,
        "budget_epochs": config.budget_epochs or "no limit",
        "budget_minutes": config.budget_minutes or "no limit",
        "budget stop": plan.budget_stop or "none",
    }
    extra = {
        "settings": _jsonable_config(config),
        "modality": modality,
        "project": project,
        "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
        "compute_seconds": {k: round(v, 2) for k, v in compute.items()},
        "rungs": [_rung_dict(r, runs) for r in plan.rungs],
        "brute_force": {
            "estimated_seconds": estimate,
            "measured_seconds": measured,
            "choice": brute_choice,
            "matches_recommendation": matches,
            "metrics": {c.name: c.metric for c in brute_records} if brute_rec else None,
            "kendall_tau": transferability_correlations(brute_records) if brute_rec else None,
        },
    }
    device = next((r.profile.device for r in runs if r.profile and r.profile.device), None)
    reused = trials_reused or any(r.profile_cached or r.transfer_cached for r in runs)
    extra["wall_seconds"] = round(selection_seconds, 2)
    paths = write_report(
        config.output_dir, records, rec, device=device, budget=budget,
        # With cached stages the wall time says nothing about the selection's cost.
        selection_seconds=sum(compute.values()) if reused else selection_seconds,
        brute_force_seconds=estimate,
        title=config.title or _default_title(config, modality), extra=extra,
    )
    correlations = transferability_correlations(records)
    section = _selection_markdown(
        config, modality, runs, records, rec, plan, selection_seconds, estimate, measured,
        brute_rec, brute_records, correlations, trials_run, trials_reused, stage_seconds, compute,
    )
    _insert_section(paths["report"], section)
    result = SelectionResult(
        role=_tuner_role(), recommendation=rec, candidates=records, paths=paths,
        kendall_tau=correlations, selection_seconds=selection_seconds,
        compute_seconds=sum(compute.values()), reused=bool(reused),
        brute_force_seconds=estimate, brute_force_measured_seconds=measured,
        brute_force_choice=brute_choice, matches_brute_force=matches,
        trials_run=trials_run, trials_reused=trials_reused,
    )
    return result


def _candidate(run: _CandidateRun, plan: SearchPlan, config: SelectionConfig,
               brute: bool) -> Candidate:
    figures: dict[str, Any] = {
        "backbone": run.backbone,
        "pretrained": None if run.spec is None else run.spec.source != "scratch",
        "shortlisted": run.shortlisted,
        **run.transfer,
    }
    if run.breaks:
        figures["breaks_constraints"] = sorted(run.breaks)
    if run.spec is not None:
        figures["description"] = run.spec.description
    error, metric = run.error, None
    if run.error is None and run.shortlisted:
        state = plan.brute_force_result(run.backbone) if brute else plan.halving_result(run.backbone)
        if state is not None and state.status == "done":
            metric = state.score
            seconds = plan.seconds(run.backbone, state.learning_rate)
            figures.update({
                "fine_tune_epochs": state.epochs,
                "learning_rate": state.learning_rate,
                "stopped_early": bool(state.record and state.record.stopped_early
                                      and state.record.epochs_trained <= state.epochs),
                "seconds_per_epoch": _round(statistics.median(seconds.values())) if seconds else None,
                "fine_tune_seconds": _round(sum(seconds.get(k, 0.0)
                                                for k in range(1, state.epochs + 1))),
            })
        elif state is not None and state.status == "failed":
            error = f"fine-tuning: {state.message}"
        elif not brute:
            error = "fine-tuning: no finished trial"
    elif run.error is None:
        figures["status"] = f"not shortlisted (by {config.shortlist_score})"
    if run.profile is not None:
        return Candidate.from_profile(
            dataclasses.replace(run.profile, name=run.name), metric=metric, scores=run.scores,
            error=error, figures=figures,
        )
    return Candidate(name=run.name, metric=metric, error=error, figures=figures,
                     scores=dict(run.scores))


def _brute_force_estimate(
    plan: SearchPlan, config: SelectionConfig, shortlist: Sequence[_CandidateRun],
    profile_seconds: float,
) -> float | None:
    """Profiling + every (candidate, learning rate) for `max_epochs` at its measured epoch time."""
    total = profile_seconds
    for backbone, rates in _learning_rates_of(config, shortlist).items():
        per_config = [statistics.median(plan.seconds(backbone, lr).values())
                      for lr in rates if plan.seconds(backbone, lr)]
        if not per_config:
            continue
        # An unmeasured learning rate is assumed to cost what the measured ones did.
        total += statistics.mean(per_config) * len(rates) * config.max_epochs
    return round(total, 1) if total else None


def _rung_dict(rung: RungSummary, runs: Sequence[_CandidateRun]) -> dict[str, Any]:
    names = {r.backbone: r.name for r in runs}
    return {
        "rung": rung.rung + 1,
        "epochs": rung.epochs,
        "entries": [{"candidate": names.get(s.backbone, s.backbone),
                     "learning_rate": s.learning_rate, "status": s.status,
                     "score": s.score, "epochs": s.epochs} for s in rung.entries],
        "promoted": [names.get(b, b) for b in rung.promoted],
        "complete": rung.complete,
    }


def _selection_markdown(
    config: SelectionConfig, modality: str, runs: Sequence[_CandidateRun],
    records: Sequence[Candidate], rec: Recommendation, plan: SearchPlan,
    selection_seconds: float, estimate: float | None, measured: float | None,
    brute_rec: Recommendation | None, brute_records: Sequence[Candidate],
    correlations: Mapping[str, Mapping[str, Any]], trials_run: int, trials_reused: int,
    stage_seconds: Mapping[str, float], compute: Mapping[str, float],
) -> str:
    metric = config.metric
    fmt = functools.partial(_format_metric, metric=metric)
    by_name = {c.name: c for c in records}
    lines = ["## Selection vs brute force", ""]
    stages = sum(stage_seconds.get(k, 0.0) for k in ("profile", "transferability", "search"))
    lines.append(f"- Selection wall time (this run): **{_duration(selection_seconds)}** "
                 f"(data {_duration(stage_seconds.get('data', 0))}, profiling "
                 f"{_duration(stage_seconds.get('profile', 0))}, transferability "
                 f"{_duration(stage_seconds.get('transferability', 0))}, fine-tuning search "
                 f"{_duration(stage_seconds.get('search', 0))}; stages {_duration(stages)}).")
    reused = trials_reused or any(r.profile_cached or r.transfer_cached for r in runs)
    total = sum(compute.values())
    if reused:
        cached = sum(r.profile_cached for r in runs), sum(r.transfer_cached for r in runs)
        lines.append(f"- Reused from the cache: {trials_reused} finished trials, {cached[0]} "
                     f"profiles, {cached[1]} transferability scores (their time is not in the "
                     "wall time above).")
    lines.append(
        f"- Selection compute behind these results (recorded when each stage ran, cached ones "
        f"included): **{_duration(total)}** = "
        + ", ".join(f"{k} {_duration(v)}" for k, v in compute.items())
        + " (model loading, data preparation and process start-up are in the wall time only)."
    )
    baseline_seconds, against = (total, "the selection's recorded compute") if reused else (
        selection_seconds, "the selection's wall time")
    if estimate:
        lines.append(
            f"- Brute force, **estimated**: {_duration(estimate)} = profiling (measured, needed "
            f"either way) + every pretrained candidate x {len(config.learning_rates)} learning "
            f"rate(s) and the baseline x 1 x {config.max_epochs} epochs at its measured time "
            "per epoch (median over its "
            "epochs; a configuration cut after the first rung has only its first epoch, which "
            "includes graph tracing, so its share errs high). Early stopping is not assumed. "
            f"That is {estimate / baseline_seconds:.1f}x {against}."
        )
    if measured is not None and brute_rec is not None:
        same = "**matches**" if brute_rec.name == rec.name else "**differs from**"
        lines.append(
            f"- Brute force, **measured** (`--brute_force`): every configuration fine-tuned to "
            f"{config.max_epochs} epochs (or its early stop); {_duration(measured)} = profiling "
            "+ the measured time of every epoch trained (epochs the search already trained are "
            f"counted once, as a brute-force run pays them). Its choice under the same "
            f"constraints: **{brute_rec.name or 'none'}**, which {same} the recommendation "
            f"({rec.name or 'none'})."
        )
        lines += ["", f"| candidate | search {metric} (epochs) | brute-force {metric} "
                  f"({config.max_epochs} epochs) |", "|---|---:|---:|"]
        for c, b in zip(records, brute_records, strict=True):
            if c.metric is None and b.metric is None:
                continue
            epochs = c.figures.get("fine_tune_epochs", "—")
            lines.append(f"| {c.name} | {fmt(c.metric)} ({epochs}) | {fmt(b.metric)} "
                         f"({b.figures.get('fine_tune_epochs', '—')}) |")
        taus = transferability_correlations(brute_records)
        if taus:
            shown = ", ".join(f"{k} {_tau(v['tau'])}" for k, v in taus.items())
            lines += ["", f"Kendall tau against the brute-force {metric}: {shown}."]
    elif not config.brute_force:
        lines.append("- Whether brute force would choose the same: not measured; rerun with "
                     "`--brute_force` (it continues the cached trials to the full epochs).")
    lines.append("")

    lines += ["## Is pretraining worth it here?", ""]
    baseline = next((by_name[r.name] for r in runs if r.baseline and r.name in by_name), None)
    pretrained = [c for c in records if c.figures.get("pretrained") and c.metric is not None]
    if baseline is not None and baseline.metric is not None and pretrained:
        best = max(pretrained, key=lambda c: c.metric)
        gap = best.metric - baseline.metric
        points = f"{gap * 100:+.1f} points" if is_fraction_metric(metric) else f"{gap:+.4g}"
        verdict = ("Yes" if gap > 0.01 else "Barely" if gap > 0 else "No")
        lines.append(
            f"{verdict}: the best pretrained candidate, {best.name}, reaches {fmt(best.metric)} "
            f"({_epochs(best.figures.get('fine_tune_epochs'))}) against "
            f"{fmt(baseline.metric)} for the from-scratch baseline {baseline.name} "
            f"({_epochs(baseline.figures.get('fine_tune_epochs'))}): {points}, at "
            f"{_ratio(best.latency_ms, baseline.latency_ms)} its latency and "
            f"{_ratio(best.params, baseline.params)} its parameters."
        )
        if baseline.figures.get("fine_tune_epochs") != best.figures.get("fine_tune_epochs"):
            lines.append("(The two trained for different epochs: halving stopped the weaker one "
                         "earlier.)")
        full = {c.name: c for c in brute_records if c.metric is not None}
        pretrained_full = [c for c in full.values() if c.figures.get("pretrained")]
        if brute_rec is not None and baseline.name in full and pretrained_full:
            top = max(pretrained_full, key=lambda c: c.metric)
            gap = top.metric - full[baseline.name].metric
            points = f"{gap * 100:+.1f} points" if is_fraction_metric(metric) else f"{gap:+.4g}"
            lines.append(f"With every candidate fine-tuned for {config.max_epochs} epochs "
                         f"(brute force): {top.name} {fmt(top.metric)} against "
                         f"{fmt(full[baseline.name].metric)}, {points}.")
    else:
        lines.append("Not answered: the baseline or every pretrained candidate has no "
                     f"fine-tuned {metric}.")
    lines.append("")

    lines += ["## The search", ""]
    data_line = _data_sentence(config, modality, runs)
    lines += [
        f"- Data: {data_line}",
        f"- Training: batch {config.batch_size}, AdamW (weight decay {config.weight_decay:g}), "
        f"learning rates {', '.join(f'{lr:g}' for lr in config.learning_rates)} (the "
        f"from-scratch baseline {config.baseline_learning_rate:g}), warm-up over "
        f"{config.warmup_ratio:.0%} of the first epoch then constant (so trials continue "
        f"exactly), seed {config.seed} and the same per-epoch data order for every candidate, "
        + (f"early stopping after {_epochs(config.early_stopping_patience)} without improvement"
           if config.early_stopping_patience else "no early stopping")
        + f"; the metric is the best {config.objective} so far.",
        f"- Successive halving: rungs at {', '.join(map(str, config.rungs))} epochs. Every "
        f"candidate runs the first rung at its first learning rate; the best "
        f"1/{config.reduction_factor} of the backbones that meet the hard constraints also "
        "try the other learning rates for the same epochs and continue, with the best one, "
        f"from their checkpoint; each later rung keeps the best 1/{config.reduction_factor}. "
        + ("Over a hard constraint from profiling, so first rung only: "
           + ", ".join(f"{r.name} ({', '.join(sorted(r.breaks))})" for r in runs if r.breaks)
           + ". " if any(r.breaks for r in runs) else "")
        + f"Budget: {config.budget_epochs or 'no'} epoch limit, "
        f"{config.budget_minutes or 'no'} minute limit"
        + (f"; {plan.budget_stop}." if plan.budget_stop else "."),
        f"- Transferability: frozen features of {config.transfer_examples} training examples "
        "(seeded sample), pooled as the classifier pools them; LogME, 5-NN and a linear probe "
        "(30% held out).",
        f"- Trials: {trials_run} trained by this run, {trials_reused} reused from the cache "
        f"(`{config.cache_root}`).",
        "",
        f"| rung | epochs | candidate | learning rate | {metric} | status |",
        "|---:|---:|---|---:|---:|---|",
    ]
    names = {r.backbone: r.name for r in runs}
    for rung in plan.rungs:
        for st in rung.entries:
            status = st.status
            if st.backbone in rung.promoted and st.learning_rate == _best_lr(rung, st.backbone):
                status += ", promoted"
            if st.status == "done" and st.epochs < rung.epochs:
                status += f", stopped early at {st.epochs}"
            lines.append(f"| {rung.rung + 1} | {rung.epochs} | {names.get(st.backbone)} | "
                         f"{st.learning_rate:g} | {fmt(st.score)} | {status} |")
    lines.append("")
    taus = ", ".join(f"{k} {_tau(v['tau'])} (n={v['n']})" for k, v in correlations.items())
    if taus:
        lines += [f"Kendall tau of each transferability score against the search's {metric}: "
                  f"{taus}. Candidates cut early were fine-tuned for fewer epochs, which the "
                  "ranking includes.", ""]
    if rec.name and by_name[rec.name].figures.get("learning_rate"):
        chosen = by_name[rec.name]
        lr, backbone = chosen.figures["learning_rate"], chosen.figures.get("backbone", rec.name)
        module = "text_classify" if modality == "text" else "image_classify"
        if importlib.util.find_spec(f"pipelines.{module}") is not None:
            how = (f"`python -m pipelines.{module} --backbone={backbone} --learning_rate={lr:g} "
                   f"--epochs={config.max_epochs} ...`")
        else:
            how = (f"`build_{modality}_classifier(\"{backbone}\", ...)` with AdamW at {lr:g} for "
                   f"{config.max_epochs} epochs")
        lines += ["## Next step", "",
                  f"Fine-tune the recommendation on all the data: {how} (the search kept the "
                  "learning rate constant after warm-up; a decaying schedule usually does a "
                  "little better).", ""]
    return "\n".join(lines)


def _epochs(value: Any) -> str:
    return "? epochs" if value is None else f"{value} epoch" + ("" if value == 1 else "s")


def _best_lr(rung: RungSummary, backbone: str) -> float | None:
    done = [s for s in rung.entries if s.backbone == backbone and s.status == "done"]
    return max(done, key=lambda s: s.score).learning_rate if done else None


def _data_sentence(config: SelectionConfig, modality: str, runs: Sequence[_CandidateRun]) -> str:
    subset = (f"the first {config.max_train_examples} training examples"
              if config.max_train_examples else "all training examples")
    evaluation = f"evaluated on `{config.eval_data}`" if config.eval_data else \
        f"evaluated on a {config.validation_split:.0%} held-out split"
    if modality == "text":
        return (f"`{config.train_data}`, {subset}, {evaluation}; sequence length "
                f"{config.sequence_length} word pieces (profiled at that length), pooling "
                f"`{config.pooling}`.")
    sizes = sorted({int(r.profile.input_shapes.get('images', [0])[0]) for r in runs
                    if r.profile and r.profile.input_shapes.get("images")})
    side = f"{config.image_size}" if config.image_size else \
        f"each backbone's own ({', '.join(map(str, sizes))} px)"
    return (f"`{config.train_data}`, {subset}, {evaluation}; images at {side}, "
            f"augmentation `{config.augment}`.")


def _insert_section(report: Path, section: str) -> None:
    # Right after the summary bullets, before the candidate table.
    text = report.read_text(encoding="utf-8")
    marker = "\n## Budget spent"
    if marker not in text:
        marker = "\n## Candidates"
    head, sep, tail = text.partition(marker)
    new = f"{head}\n{section}{sep}{tail}" if sep else f"{text}\n{section}"
    atomic_write_text(report, new)


def _write_failed_report(config: SelectionConfig, runs: Sequence[_CandidateRun], modality: str,
                         started: float) -> Path:
    records = [Candidate(name=r.name, error=r.error or "not fine-tuned: every listed candidate "
                         "failed", figures={"backbone": r.backbone}, scores=dict(r.scores))
               for r in runs]
    rec = recommend(records, **config.constraints, metric_name=config.metric)
    paths = write_report(config.output_dir, records, rec,
                         selection_seconds=time.perf_counter() - started,
                         title=config.title or _default_title(config, modality))
    return paths["report"]


def _default_title(config: SelectionConfig, modality: str) -> str:
    name = Path(config.train_data.rstrip("/")).parent.name or config.train_data
    subset = f", {config.max_train_examples} training examples" if config.max_train_examples else ""
    shape = (f", sequence length {config.sequence_length}" if modality == "text"
             else (f", {config.image_size} px" if config.image_size else ""))
    return f"Model selection: {name} ({modality}{subset}{shape})"


# --------------------------------------------------------------------------- #
# Fingerprints, cache keys, small helpers
# --------------------------------------------------------------------------- #


def _project_name(config: SelectionConfig, modality: str) -> str:
    key = _hash({"version": _CACHE_VERSION, "data": _data_fingerprint(config),
                 "settings": _trial_settings(config, modality)})
    return f"{modality}_{key[:16]}"


def _trial_settings(config: SelectionConfig, modality: str) -> dict[str, Any]:
    """Every setting that changes what a trial computes (not the budget or the candidates)."""
    return {
        "modality": modality, "metric": config.metric, "batch_size": config.batch_size,
        "seed": config.seed, "warmup_ratio": config.warmup_ratio,
        "weight_decay": config.weight_decay, "dropout": config.dropout,
        "patience": config.early_stopping_patience, "max_train_examples": config.max_train_examples,
        "validation_split": None if config.eval_data else config.validation_split,
        "sequence_length": config.sequence_length if modality == "text" else None,
        "pooling": config.pooling if modality == "text" else None,
        "image_size": config.image_size if modality == "image" else None,
        "augment": config.augment if modality == "image" else None,
        "columns": [config.text_column, config.label_column, config.has_header],
        "label_names": list(config.label_names),
    }


@functools.cache
def _path_fingerprint(path: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{path}"
    if p.is_file():
        size = p.stat().st_size
        if size <= 64 * 1024 * 1024:
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return f"{size}:{p.stat().st_mtime_ns}"
    listing = sorted(
        (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in p.rglob("*") if f.is_file()
    )
    return _hash(listing)


def _data_fingerprint(config: SelectionConfig) -> dict[str, str]:
    return {"train": _path_fingerprint(config.train_data),
            "eval": _path_fingerprint(config.eval_data) if config.eval_data else ""}


def _weights_fingerprint(spec: Any) -> str:
    """Spec plus the files behind it (sizes and times), so changed weights are not reused."""
    from tfhub_finetune.paths import package_dir

    location = None
    if spec.source == "python_package":
        try:
            location = package_dir(spec.handle)
        except InputError:
            location = None
    elif Path(spec.handle).exists():
        location = Path(spec.handle)
    files = _path_fingerprint(str(location)) if location is not None else ""
    return _hash({"spec": spec.to_dict(), "files": files})[:16]


def _machine() -> str:
    return f"{cpu_description()} | {platform.python_version()}"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tuner_role() -> str:
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(name):
            raise InputError(
                "Distributed tuning needs KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and "
                "KERASTUNER_TUNER_ID together.",
                received={"missing": name},
                fix="Set all three (the chief's KERASTUNER_TUNER_ID contains `chief`).",
            )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _progress_bar(config: SelectionConfig, runs: Sequence[_CandidateRun]) -> Any:
    from tqdm import tqdm

    usable = sum(r.spec is not None for r in runs)
    # Profiles and transferability per candidate; the search adds its trials.
    return tqdm(total=2 * usable + 1, desc="select", unit="step", file=sys.stderr,
                disable=not config.progress, dynamic_ncols=True, mininterval=1.0)


def _echo(bar: Any, line: str) -> None:
    bar.write(line, file=sys.stdout) if not bar.disable else print(line, flush=True)


def _jsonable_config(config: SelectionConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["profile_options"] = (dataclasses.asdict(config.profile_options)
                               if config.profile_options else None)
    return data


def _format_metric(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f}%" if is_fraction_metric(metric) else f"{value:.4g}"


def _ratio(mine: float | None, theirs: float | None) -> str:
    if not mine or not theirs:
        return "? x"
    return f"{mine / theirs:.1f}x"


def _tau(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _count(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _float(value: Any) -> float | None:
    # KerasTuner hands back numpy floats; reports and JSON want plain ones.
    return None if value is None else float(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _bad(name: str, value: Any, problem: str, fix: str | None = None) -> None:
    raise InputError(problem, received={name: value}, fix=fix)


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _bad(name, value, f"Invalid value for `{name}`.", did_you_mean(str(value), choices))


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _bad(name, value, f"`{name}` must be a positive integer.")
