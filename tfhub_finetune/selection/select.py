"""Choose a backbone for a task under a budget: profile, score, fine-tune by halving, recommend.

`select_model(candidates, train_data, eval_data, output_dir=...)` runs five stages
over a list of candidate backbones (catalog names, `name@layers=k`, local
directories, TF Hub handles), for text, text-pair, token (NER) or image
classification (`modality`, or from the data settings). Each stage
works on a `_Candidate` (what the user gave, the resolved spec, the profile,
the scores, the error if any); the modality's task (`tasks/`: single texts,
text pairs, tokens for NER, images) knows how to build, profile and feed each
one:

1. **Profile** each candidate as deployed (backbone + head at the task's real
   sequence length or image size, exported for TF Serving with its tokenizer
   or image decoding, `task.profile_request`) with `profile_in_subprocess`:
   fresh child processes per candidate, so memory figures are clean; latency
   is end to end (strings or JPEG bytes in), model-only beside it.
2. **Score transferability** without fine-tuning: frozen features of a seeded
   sample of the training data, pooled exactly as the classifier pools them
   (`trials.candidate_features`; for tokens, each word's first-piece feature
   with its tag), scored by LogME, kNN and a linear probe.
3. **Fine-tune by successive halving** on KerasTuner (`tuner.py`, planned by
   `halving.plan_search`, trained by `trials.py`) over configurations: each
   backbone x each of `adaptations` (`full`, `head`, `top:K`, `lora:R`; the
   baseline `full` only). Every configuration trains the first rung at its
   adaptation's first learning rate (`SearchConfig.learning_rates_for`; the
   baseline at `baseline_learning_rate`); the better `1/reduction_factor` of
   those that meet the hard constraints also try their other rates for the
   same epochs, then continue with their best rate from their checkpoint,
   halving again at each rung up to `max_epochs`. A candidate whose profile
   breaks `max_latency_ms`, `max_memory_mb` or `max_params` cannot be
   recommended and its configurations get the first rung only; one over
   `max_train_minutes` / `max_train_memory_mb` after its first rung is not
   promoted. `head` trials train on the frozen backbone's cached features
   (`trials.fit_head_on_features`). A trial is the base
   `ExperimentConfig` with its backbone, learning rate and epochs replaced,
   trained by the driver's functions and the task's epoch metrics: what
   `text_classify`/`token_classify`/`image_classify` would train. NER is
   selected on entity F1 (`val_entity_f1`, seqeval's).
4. **Recommend** with `recommend(...)` under the constraints.
5. **Report** with `write_report` (report.md, results.json, pareto.png,
   transferability.png); report.py tells the search, the from-scratch baseline
   ("is pretraining worth it here?") and selection time against brute force
   from the facts recorded here.

**Why trials can be continued and cached.** Trials warm up over the first
tenth of an epoch and then keep the rate constant (`lr_schedule="constant"`),
so the first k epochs of any trial are exactly the first k epochs of a longer
one. A promoted trial resumes its parent's weights and optimizer state
(`fit_resumable`), and a finished trial answers every later question about its
(backbone, learning rate) up to its epochs.

**Caching** (`cache.py`). Under `cache_dir` (default `<output_dir>/cache`):
`tuner/<project>/` is the KerasTuner project, `<project>` a hash of the data
and of every trial setting (derived from the config, so a new setting changes
it); inside, trials are keyed by backbone, learning rate, epochs and a weights
fingerprint. A rerun creates no trials, a wider budget continues finished
ones, and a run killed mid-trial resumes that trial from its last backup.
`profiles/` and `transferability/` hold one JSON per (candidate, weights,
settings, machine). Failures are not cached.

**Distributed tuning.** With KerasTuner's environment variables set
(`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`), run
the same command on every machine over a shared `cache_dir`: the chief
profiles, scores, serves the oracle until the workers have run every trial,
then recommends and reports; each worker only trains the trials it is given.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError
from tfhub_finetune.selection import cache, trials
from tfhub_finetune.selection.config import ESTIMATORS, SelectionConfig
from tfhub_finetune.selection.halving import FULL, RungSummary, SearchPlan, split_key
from tfhub_finetune.selection.profile import ProfileResult, profile_in_subprocess
from tfhub_finetune.selection.recommend import (
    REFERENCE_FORM,
    Candidate,
    Recommendation,
    is_fraction_metric,
    majority_class_metric,
    paired_tester,
    recommend,
    violations,
)
from tfhub_finetune.selection.report import transferability_correlations, write_report
from tfhub_finetune.selection.tuner import chain_predictions
from tfhub_finetune.tasks import BACKBONE_MODALITY, PIPELINES

SCRATCH_BASELINES = {"text": "scratch_text_encoder", "image": "scratch_cnn"}


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
            search epochs behind the results, cached ones included.
        reused: bool. Whether any stage came from the cache.
        brute_force_seconds: float or None. Estimated brute-force time.
        brute_force_measured_seconds: float or None. The same, measured
            (only with `brute_force=True`).
        brute_force_choice: str or None. What `recommend` picks when every
            candidate is fine-tuned fully (only with `brute_force=True`).
        matches_brute_force: bool or None. Whether the recommendation is that
            choice or tied with it within noise (the tie rule).
        brute_force_recommendation: Recommendation or None. Brute force's,
            with its reason (what the report answers with).
        regret_points: float or None. Brute force's best feasible figure
            minus the full-epoch figure of the search's choice (points for
            fraction metrics).
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
    brute_force_recommendation: Recommendation | None = None
    regret_points: float | None = None
    trials_run: int = 0
    trials_reused: int = 0


def select_model(candidates: Sequence[str], train_data: str, eval_data: str = "", *,
                 output_dir: str, **settings: Any) -> SelectionResult:
    """Profiles, scores and fine-tunes candidate backbones, then recommends one.

    Args:
        candidates: list of str. Backbones: catalog names (`minilm_l6_h384`),
            `name@layers=k`, directories, TF Hub handles. The from-scratch
            baseline is added when missing.
        train_data: str. Training file (texts or text pairs: TSV/CSV/JSONL;
            tokens: CoNLL or JSONL tagged sentences) or class-folder directory
            (images).
        eval_data: str. Evaluation data; empty holds out a split.
        output_dir: str. Where the report goes.
        **settings: any field of the selection or training config by name
            (`SelectionConfig.from_settings`), e.g. `learning_rates=(1e-4,)`,
            `max_epochs=3`, `max_latency_ms=20`, `sequence_length=64`,
            `modality="tokens"` (NER, selected on `entity_f1`),
            `text_pair_column="sentence2"` (text pairs).

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
    return run_selection(SelectionConfig.from_settings(
        candidates, train_data, eval_data, output_dir=output_dir, **settings))


def run_selection(config: SelectionConfig) -> SelectionResult:
    """Runs a `SelectionConfig` (validated here): the five stages."""
    config = config.resolved().validate()
    started = time.perf_counter()
    role = trials.tuner_role()
    runs = _resolve_candidates(config)
    modality = _modality_of(config, runs)
    config.check_serving_forms(modality)  # An `auto` modality is known from here on.
    runs = _add_baseline(runs, modality)
    project = cache.project_name(config, modality)
    usable = [r for r in runs if r.spec is not None]
    # Before any work: an adaptation the modality cannot do (LoRA on CNNs) fails here.
    _set_configurations(config, usable, modality)

    if role == "worker":
        # A worker trains what the chief's oracle hands it; the chief does the rest.
        print(f"Distributed tuning: worker {os.environ.get('KERASTUNER_TUNER_ID')} "
              f"asking the chief at {os.environ.get('KERASTUNER_ORACLE_IP')}:"
              f"{os.environ.get('KERASTUNER_ORACLE_PORT')} for trials.", flush=True)
        _, trials_run, _ = _search(config, project, usable, bar=None)
        return SelectionResult(role=role, trials_run=trials_run,
                               selection_seconds=time.perf_counter() - started)

    if not _any_given(usable):
        _fail_all(runs, report=_write_failed_report(config, runs, modality, started))
    # The data is read before the progress bar starts, so a bad row's error is stderr's one line.
    tic = time.perf_counter()
    num_classes = _task(config, usable[0]).count_classes()
    seconds: dict[str, float] = {"data": time.perf_counter() - tic}
    bar = _progress_bar(config, usable)
    try:
        tic = time.perf_counter()
        for run in usable:
            bar.set_description(f"profile {run.name}")
            _profile(run, config, num_classes)
            bar.update(1)
            _echo(bar, run.profile_line())
        seconds["profile"] = time.perf_counter() - tic

        tic = time.perf_counter()
        for run in usable:
            bar.set_description(f"transferability {run.name}")
            if run.error is None:
                _transferability(run, config, modality)
                _echo(bar, run.transfer_line())
            bar.update(1)
        seconds["transferability"] = time.perf_counter() - tic

        shortlist = _shortlist(runs, config)
        if not _any_given(shortlist):
            _fail_all(runs, report=_write_failed_report(config, runs, modality, started))
        bar.set_description("fine-tune (successive halving)")
        tic = time.perf_counter()
        plan, trials_run, trials_reused = _search(config, project, shortlist, bar=bar)
        seconds["search"] = time.perf_counter() - tic

        bar.set_description("recommend and report")
        result = _recommend_and_report(config, modality, runs, shortlist, plan, project, started,
                                       seconds, trials_run, trials_reused)
        bar.update(1)
    finally:
        bar.close()
    trained = {c.figures.get("backbone") for c in result.candidates if c.metric is not None}
    if not _any_given([r for r in runs if r.backbone in trained]):
        _fail_all(runs, report=result.paths.get("report"))
    return result


# --------------------------------------------------------------------------- #
# The per-candidate contract
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Candidate:
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
    # Its configurations in the search: config key -> display name (`_set_configurations`).
    configs: dict[str, str] = dataclasses.field(default_factory=dict)

    def fail(self, stage: str, reason: str) -> None:
        reason = " ".join(str(reason).split())[:400]
        entry = f"{stage}: {reason}"
        self.error = entry if self.error is None else f"{self.error}; {entry}"

    def profile_line(self) -> str:
        p = self.profile
        if self.error or p is None:
            return f"profile   {self.name}: FAILED ({self.error})"
        cached = " [cached]" if self.profile_cached else f" ({p.profile_seconds or 0:.0f} s)"
        return (f"profile   {self.name}: {_fmt(p.latency_p50_ms, '.3g')} ms p50, "
                f"{_count(p.params)} params, {_fmt(p.peak_infer_memory_mb, '.0f')} MB "
                f"peak{cached}")

    def transfer_line(self) -> str:
        if self.error:
            return f"transfer  {self.name}: FAILED ({self.error})"
        parts = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in self.scores.items())
        took = sum(v for k, v in self.transfer.items() if k.endswith("_seconds"))
        cached = " [cached]" if self.transfer_cached else f" ({took:.0f} s)"
        return f"transfer  {self.name}: {parts}{cached}"


def _resolve_candidates(config: SelectionConfig) -> list[_Candidate]:
    """Each candidate string resolved, once, to its `BackboneSpec`, before any work.

    A name or path that names no backbone (a typo, a missing folder) is
    refused here with close names; one that resolves but whose weights
    cannot be read to fingerprint is the run's to report (the others go on).
    """
    from tfhub_finetune.backbones.catalog import resolve_backbone

    runs = []
    for given in config.search.candidates:
        run = _Candidate(backbone=given, name=given)
        try:
            run.spec = resolve_backbone(given)
        except InputError as err:
            raise InputError(f"Candidate `{given}`: {err.problem[:1].lower()}{err.problem[1:]}",
                             received={"candidates": given}, fix=err.fix) from None
        try:
            run.weights_id = cache.weights_fingerprint(run.spec)
        except InputError as err:
            run.fail("resolve", str(err))
        runs.append(run)
    _set_display_names(runs)
    return runs


def _set_display_names(runs: list[_Candidate]) -> None:
    # Paths are long in plot labels; their last part is usually unique.
    short = [Path(r.backbone.rstrip("/")).name if "/" in r.backbone else r.backbone for r in runs]
    for run, name in zip(runs, short, strict=True):
        run.name = name if short.count(name) == 1 else run.backbone


def _modality_of(config: SelectionConfig, runs: list[_Candidate]) -> str:
    found = {r.spec.modality for r in runs if r.spec is not None}
    if len(found) > 1:
        listing = ", ".join(f"{r.backbone} ({r.spec.modality})" for r in runs if r.spec is not None)
        raise InputError(
            "Candidates mix text and image backbones; one selection compares one task.",
            received={"candidates": listing},
            fix="Run text and image candidates separately.",
        )
    wanted = config.search.modality
    if wanted != "auto":
        if found and found != {BACKBONE_MODALITY[wanted]}:
            raise InputError(
                f"The candidates are {found.pop()} backbones but --modality is {wanted} "
                f"({BACKBONE_MODALITY[wanted]} backbones).",
                received={"modality": wanted},
                fix="Fix --modality or the candidate list.",
            )
        return wanted
    if found:
        return found.pop()
    # Nothing resolved: guess from the data so the failure report can still be written.
    return "image" if Path(config.base.data.train_data).is_dir() else "text"


def _add_baseline(runs: list[_Candidate], modality: str) -> list[_Candidate]:
    from tfhub_finetune.backbones.catalog import resolve_backbone

    for run in runs:
        if run.spec is not None and run.spec.source == "scratch":
            run.baseline = True
    if any(r.baseline for r in runs):
        return runs
    # The report must answer "is pretraining worth it here?".
    baseline = SCRATCH_BASELINES[BACKBONE_MODALITY[modality]]
    spec = resolve_backbone(baseline)
    run = _Candidate(backbone=baseline, name=baseline, spec=spec,
                     weights_id=cache.weights_fingerprint(spec), baseline=True, added=True)
    print(f"Adding the from-scratch baseline `{baseline}` to the candidates.", flush=True)
    runs = [*runs, run]
    _set_display_names(runs)
    return runs


def _set_configurations(config: SelectionConfig, runs: Sequence[_Candidate],
                        modality: str) -> None:
    """Each candidate's (backbone, adaptation) configurations and their display names.

    A search over `full` alone names configurations by backbone, as before
    adaptations were a choice; otherwise `<name> <adaptation>`.
    """
    keys = trials.configurations_of(
        config, [(r.backbone, r.spec) for r in runs], {r.backbone for r in runs if r.baseline},
        modality)
    adaptations = config.search.adaptations_for(modality)
    plain = [str(a) for a in adaptations] == [FULL]
    for run in runs:
        run.configs = {k: run.name if plain else f"{run.name} {split_key(k)[1]}"
                       for k in keys if split_key(k)[0] == run.backbone}


def _any_given(runs: Sequence[_Candidate]) -> bool:
    # The baseline we added is a yardstick, not a choice: alone it selects nothing.
    return any(not r.added for r in runs)


def _fail_all(runs: Sequence[_Candidate], report: Path | None = None) -> None:
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


def _task(config: SelectionConfig, run: _Candidate) -> Any:
    """The candidate's task, on the config its first trial would run with."""
    from tfhub_finetune.tasks import make_task

    s = config.search
    return make_task(config.trial(run.backbone, s.learning_rates[0], s.max_epochs, "unused"),
                     run.spec)


# --------------------------------------------------------------------------- #
# Stages 1-3: profile, transferability, search
# --------------------------------------------------------------------------- #


def _profile(run: _Candidate, config: SelectionConfig, num_classes: int) -> None:
    request = _task(config, run).profile_request(num_classes)
    options = config.profile
    path = config.cache_root / "profiles" / (cache.profile_key(
        {"backbone": run.backbone, **request}, run.weights_id, dataclasses.asdict(options)) + ".json")
    cached = cache.read(path, config.overwrite)
    if cached is not None:
        run.profile = ProfileResult.from_dict(cached)
        run.profile.name, run.profile_cached = run.name, True
        return
    result = profile_in_subprocess(**request, name=run.name, options=options,
                                   timeout_s=config.profile_timeout_s)
    run.profile = result
    if result.params is None:
        run.fail("profile", result.error or "the model could not be built")
    elif result.error is None:
        cache.write(path, result.to_dict())


def _transferability(run: _Candidate, config: SelectionConfig, modality: str) -> None:
    from tfhub_finetune.selection.transferability import score_transferability

    key = cache.transferability_key(config, modality, run.backbone, run.weights_id, ESTIMATORS)
    path = config.cache_root / "transferability" / f"{key}.json"
    cached = cache.read(path, config.overwrite)
    if cached is not None:
        run.scores, run.transfer, run.transfer_cached = cached["scores"], cached["figures"], True
        return
    try:
        features, labels, seconds = trials.candidate_features(config, run.backbone, run.spec)
        scores = score_transferability(features, labels, ESTIMATORS)
    except Exception as err:  # A candidate that cannot load is reported, not fatal.
        run.fail("transferability", f"{type(err).__name__}: {err}")
        return
    run.scores = {name: s.value for name, s in scores.items()}
    run.transfer = {"transfer_examples": int(len(features)),
                    "feature_dim": int(features.shape[1]),
                    "feature_extraction_seconds": round(seconds, 3)}
    for name, score in scores.items():
        run.transfer[f"{name}_seconds"] = score.score_seconds
        if score.error:
            run.transfer[f"{name}_error"] = score.error
    cache.write(path, {"scores": run.scores, "figures": run.transfer})


def _shortlist(runs: list[_Candidate], config: SelectionConfig) -> list[_Candidate]:
    """The candidates to fine-tune, with the hard constraints each profile already breaks.

    Latency, memory and size are known before any training and do not change
    with it, so a candidate over one of those limits cannot be recommended:
    the search gives it the first rung only (see `plan_search`).
    """
    s = config.search
    ok = [r for r in runs if r.error is None]
    pretrained = [r for r in ok if not r.baseline]
    if s.shortlist_size and len(pretrained) > s.shortlist_size:
        def rank(r: _Candidate) -> float:
            value = r.scores.get(s.shortlist_score)
            return -value if isinstance(value, (int, float)) else float("inf")

        keep = {id(r) for r in sorted(pretrained, key=rank)[: s.shortlist_size]}
        pretrained = [r for r in pretrained if id(r) in keep]
    chosen = [*pretrained, *[r for r in ok if r.baseline]]
    hard = {k: v for k, v in config.constraints.recommend_kwargs().items()
            if v is not None and k != "min_metric"}
    for run in chosen:
        run.shortlisted = True
        if run.profile is not None:
            run.breaks = violations(Candidate.from_profile(run.profile), hard)
    return chosen


def _search(config: SelectionConfig, project: str, shortlist: Sequence[_Candidate],
            bar: Any) -> tuple[SearchPlan | None, int, int]:
    keys = [k for r in shortlist for k in r.configs]
    eligible = [k for r in shortlist if not r.breaks for k in r.configs] if any(
        r.breaks for r in shortlist) else None
    return trials.run_search(
        config, project, keys,
        learning_rates=_learning_rates(config, shortlist), eligible=eligible,
        weights_ids={r.backbone: r.weights_id for r in shortlist},
        specs={r.backbone: r.spec for r in shortlist},
        names={k: name for r in shortlist for k, name in r.configs.items()},
        bar=bar, echo=lambda line: _echo(bar, line),
    )


def _learning_rates(config: SelectionConfig, runs: Sequence[_Candidate]) -> dict[str, list[float]]:
    return trials.learning_rates_of(config, [k for r in runs for k in r.configs],
                                    {r.backbone for r in runs if r.baseline})


# --------------------------------------------------------------------------- #
# Stages 4-5: recommendation and report
# --------------------------------------------------------------------------- #


def _recommend_and_report(
    config: SelectionConfig, modality: str, runs: list[_Candidate], shortlist: list[_Candidate],
    plan: SearchPlan, project: str, started: float, stage_seconds: dict[str, float],
    trials_run: int, trials_reused: int,
) -> SelectionResult:
    s, metric = config.search, config.search.metric
    constraints = config.constraints.recommend_kwargs()
    # One record per configuration (one per candidate that has none: failed, not shortlisted).
    slots = [(run, key) for run in runs
             for key in ((run.configs or [None]) if run.shortlisted else [None])]
    records = [_record(run, key, plan, config, brute=False) for run, key in slots]
    brute_records = [_record(run, key, plan, config, brute=True) for run, key in slots]
    project_dir = config.cache_root / "tuner" / project
    # The predictions behind each figure: its interval, and the paired tests of the tie rule.
    evidence = {c.name: _attach_evidence(c, r, k, plan, config, project_dir, brute=False)
                for (r, k), c in zip(slots, records, strict=True)}
    brute_evidence = {c.name: _attach_evidence(c, r, k, plan, config, project_dir, brute=True)
                      for (r, k), c in zip(slots, brute_records, strict=True)}
    # Each contender's other serving forms: rows of their own, with their own predictions.
    _add_serving_forms(records, evidence, slots, plan, config, project, brute=False)
    if s.brute_force and plan.finished:
        _add_serving_forms(brute_records, brute_evidence, slots, plan, config, project,
                           brute=True)
    # A model no better than always answering the most frequent class is not recommended.
    chance = majority_class_metric({**evidence, **brute_evidence}, metric)
    rec = recommend(records, **constraints, metric_name=metric, **s.tie_rule,
                    paired_p_value=paired_tester(evidence, metric), chance_metric=chance)

    profile_seconds = sum((r.profile.profile_seconds or 0.0) for r in runs if r.profile)
    learning_rates = _learning_rates(config, shortlist)
    estimate = _brute_force_estimate(plan, config, learning_rates, profile_seconds)
    # What the results cost, cached stages included (recorded when they ran).
    compute = {
        "profiling": profile_seconds,
        "transferability": sum(v for r in runs for k, v in r.transfer.items()
                               if k.endswith("_seconds") and isinstance(v, (int, float))),
        "fine-tuning search": sum(
            plan.seconds(e.config, e.learning_rate).get(k, 0.0)
            for rung in plan.rungs for e in rung.entries if e.status == "done"
            for k in range((plan.rungs[rung.rung - 1].epochs if rung.rung else 0) + 1,
                           e.epochs + 1)
        ),
    }
    measured = brute_rec = None
    if s.brute_force and plan.finished:
        measured = profile_seconds + sum(
            sum(plan.seconds(e.config, e.learning_rate).get(k, 0.0)
                for k in range(1, e.epochs + 1))
            for e in plan.brute_force if e.status == "done"
        )
        brute_rec = recommend(brute_records, **constraints, metric_name=metric, **s.tie_rule,
                              paired_p_value=paired_tester(brute_evidence, metric),
                              chance_metric=chance)
    # With brute force measured, the report answers with its full-epoch figures.
    answer_records, answer_rec = (brute_records, brute_rec) if brute_rec else (records, rec)
    selection_seconds = time.perf_counter() - started
    reused = _reused(runs, trials_reused)
    rungs = [_rung_dict(r, runs) for r in plan.rungs]
    correlations = transferability_correlations(_per_backbone(answer_records))
    brute = {
        "estimated_seconds": estimate,
        "measured_seconds": measured,
        "choice": brute_rec.name if brute_rec else None,
        # The same choice under the tie rule: brute force cannot tell them apart.
        "matches_recommendation": (rec.name == brute_rec.name or (
            rec.name is not None and rec.name in brute_rec.tied)) if brute_rec else None,
        "best": brute_rec.best if brute_rec else None,
        "regret": _regret(rec, brute_rec, brute_records, metric),
        "search": {"choice": rec.name, "reason": rec.reason,
                   "metrics": {c.name: c.metric for c in records},
                   "fine_tune_epochs": {c.name: c.figures.get("fine_tune_epochs")
                                        for c in records}},
        "metrics": {c.name: c.metric for c in brute_records} if brute_rec else None,
        "fine_tune_epochs": {c.name: c.figures.get("fine_tune_epochs") for c in brute_records},
        "kendall_tau": (transferability_correlations(_per_backbone(brute_records))
                        if brute_rec else None),
        "requested": s.brute_force,
        "learning_rates": len(s.learning_rates),
        "epochs": s.max_epochs,
    }
    budget = {
        "rungs (cumulative epochs)": config.rungs,
        "learning rates": list(s.learning_rates),
        "adaptations": {str(a): list(s.learning_rates_for(a))
                        for a in s.adaptations_for(modality)},
        "baseline learning rate": s.baseline_learning_rate,
        "fine-tuning epochs (search plan)": plan.planned_epochs,
        "fine-tuning epochs (brute force)": s.max_epochs * sum(
            len(v) for v in learning_rates.values()),
        "trials trained by this run": trials_run,
        "trials reused from the cache": trials_reused,
        "budget_epochs": s.budget_epochs or "no limit",
        "budget_minutes": s.budget_minutes or "no limit",
        "budget stop": plan.budget_stop or "none",
    }
    extra = {
        "settings": dataclasses.asdict(config),
        "modality": modality,
        "project": project,
        "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
        "compute_seconds": {k: round(v, 2) for k, v in compute.items()},
        "rungs": rungs,
        "brute_force": {k: brute[k] for k in ("estimated_seconds", "measured_seconds", "choice",
                                             "matches_recommendation", "metrics", "kendall_tau",
                                             "best", "regret")},
        "search_recommendation": rec.to_dict(),
        "wall_seconds": round(selection_seconds, 2),
        # The floor `recommend` applied: always answering the most frequent class.
        "chance_metric": chance,
    }
    search = _search_facts(config, modality, runs, plan, rungs, correlations, brute,
                           stage_seconds, compute, selection_seconds, trials_run, trials_reused)
    device = next((r.profile.device for r in runs if r.profile and r.profile.device), None)
    paths = write_report(
        config.output_dir, answer_records, answer_rec, device=device, budget=budget,
        # With cached stages the wall time says nothing about the selection's cost.
        selection_seconds=sum(compute.values()) if reused else selection_seconds,
        brute_force_seconds=estimate, title=config.title or _default_title(config, modality),
        extra=extra, search=search,
    )
    return SelectionResult(
        role=trials.tuner_role(), recommendation=rec, candidates=records, paths=paths,
        kendall_tau=correlations, selection_seconds=selection_seconds,
        compute_seconds=sum(compute.values()), reused=reused,
        brute_force_seconds=estimate, brute_force_measured_seconds=measured,
        brute_force_choice=brute["choice"], matches_brute_force=brute["matches_recommendation"],
        brute_force_recommendation=brute_rec, regret_points=brute["regret"],
        trials_run=trials_run, trials_reused=trials_reused,
    )


def _attach_evidence(record: Candidate, run: _Candidate, key: str | None, plan: SearchPlan,
                     config: SelectionConfig, project_dir: Path, brute: bool) -> Any:
    """Loads the predictions behind a configuration's figure; records its interval; returns them."""
    if record.metric is None or run.error is not None or not run.shortlisted or key is None:
        return None
    state = _final_state(plan, key, brute)
    predictions = chain_predictions(project_dir, state.record if state else None,
                                    state.epochs if state else 0)
    return _with_interval(record, predictions, config)


def _final_state(plan: SearchPlan, key: str, brute: bool) -> Any:
    """The configuration's state behind its figures: the search's answer, or brute force's."""
    return plan.brute_force_result(key) if brute else plan.halving_result(key)


def _add_serving_forms(records: list[Candidate], evidence: dict[str, Any],
                       slots: Sequence[tuple[_Candidate, str | None]], plan: SearchPlan,
                       config: SelectionConfig,
                       project: str, brute: bool) -> None:
    """Appends a row per extra serving form (`--serving_forms`) of each contender.

    Contenders are the configurations on the deepest rung reached (every one
    under brute force): the rest were cut on their float32 figure, which a quantized copy
    does not raise. Each form is exported from the trial's own weights and
    measured beside float32 (`serving_forms.measure_trial_forms`), cached per
    (trial, epochs, machine); its eval-set predictions join the paired tests.
    """
    from tfhub_finetune.selection.serving_forms import form_candidate, form_name

    forms = [f for f in config.serving_forms if f != REFERENCE_FORM]
    # The deepest rung reached (a budget may stop the search before the planned last one).
    reached = [r for r in plan.rungs if any(e.status == "done" for e in r.entries)]
    last = {e.config for e in reached[-1].entries if e.status == "done"} if reached else set()
    for (run, key), record in list(zip(slots, records, strict=True)):
        state = None if key is None else _final_state(plan, key, brute)
        if (not forms or record.metric is None or record.error or state is None
                or state.record is None or not (brute or key in last)):
            continue
        try:
            report, predictions = _measured_forms(config, project, run, key, state, forms)
        except Exception as err:  # A form that cannot be exported is reported, not fatal.
            for form in forms:
                records.append(Candidate(
                    name=form_name(record.name, form), error=f"serving form {form}: "
                    f"{type(err).__name__}: {' '.join(str(err).split())[:300]}",
                    figures={"serving_form_of": record.name}, backbone=record.backbone,
                    adaptation=record.adaptation, serving_form=form))
            continue
        # The kept weights are the chain's last epoch; its figure may be an earlier epoch's.
        scores = [v for v in state.record.scores[:state.epochs] if v is not None]
        scored = scores.index(max(scores)) + 1 if len(scores) == state.epochs > 0 else None
        same = scored == report.get("weights_epoch")
        for form in forms:
            row = form_candidate(record, report, form, config.search.metric, same_weights=same)
            row.figures.update(weights_trial=state.record.trial_id,
                               weights_epoch=report.get("weights_epoch"), scored_epoch=scored)
            records.append(row)
            # Predictions of other weights than the figure's would make the paired test lie.
            evidence[row.name] = _with_interval(row, predictions.get(form), config) if same \
                else None


def _measured_forms(config: SelectionConfig, project: str, run: _Candidate, key: str,
                    state: Any, forms: Sequence[str]) -> tuple[dict, dict[str, Any]]:
    """(serving report, form -> EvalPredictions) of one trial's weights, from the cache or measured."""
    import shutil
    import tempfile

    from tfhub_finetune.selection.serving_forms import measure_trial_forms
    from tfhub_finetune.stats import EvalPredictions

    record, options = state.record, config.profile
    entry = cache.serving_forms_key(project, record.trial_id, record.epochs_trained,
                                    [REFERENCE_FORM, *forms], dataclasses.asdict(options))
    folder = config.cache_root / "serving_forms" / entry
    report = cache.read(folder / "report.json", config.overwrite)
    if report is None:
        trial_dir = config.cache_root / "tuner" / project / f"trial_{record.trial_id}"
        experiment = config.trial(run.backbone, state.learning_rate, record.epochs_trained,
                                  trial_dir, adaptation=split_key(key)[1])
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="forms_", dir=folder))
        try:
            report = measure_trial_forms(experiment, run.spec, trial_dir,
                                         [REFERENCE_FORM, *forms], work, options=options)
            for file in work.glob("*.npz"):
                file.replace(folder / file.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cache.write(folder / "report.json", report)  # Last: the entry's commit.
    predictions = {f: EvalPredictions.load(folder / f"{f}.npz") for f in forms
                   if (folder / f"{f}.npz").exists()}
    return report, predictions


def _with_interval(record: Candidate, predictions: Any, config: SelectionConfig) -> Any:
    """Records the metric's 95% interval from `predictions`; returns them."""
    from tfhub_finetune.stats import bootstrap_intervals

    metric = config.search.metric
    if predictions is not None and metric in predictions.metrics and record.metric is not None:
        interval = bootstrap_intervals(predictions, [metric], seed=config.base.train.seed)
        record.figures["metric_interval"] = interval[metric].to_list()
    return predictions


def _regret(rec: Recommendation, brute_rec: Recommendation | None,
            brute_records: Sequence[Candidate], metric: str) -> float | None:
    """Brute force's best feasible figure minus the search's choice's full-epoch figure."""
    if brute_rec is None or not (rec.name and brute_rec.best):
        return None
    full = {c.name: c.metric for c in brute_records}
    if full.get(rec.name) is None or full.get(brute_rec.best) is None:
        return None
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    return round(scale * (full[brute_rec.best] - full[rec.name]), 3)


def _search_facts(config: SelectionConfig, modality: str, runs: Sequence[_Candidate],
                  plan: SearchPlan, rungs: list[dict], correlations: dict, brute: dict,
                  stage_seconds: dict[str, float], compute: dict[str, float],
                  selection_seconds: float, trials_run: int, trials_reused: int) -> dict:
    """What report.py tells about the search (its prose sections), as plain data."""
    s, metric = config.search, config.search.metric
    return {
        "metric": metric, "selection_seconds": selection_seconds,
        "stage_seconds": stage_seconds, "compute_seconds": compute, "brute_force": brute,
        "reused": {"trials": trials_reused, "profiles": sum(r.profile_cached for r in runs),
                   "transferability": sum(r.transfer_cached for r in runs)}
        if _reused(runs, trials_reused) else None,
        "baseline": next((next(iter(r.configs.values()), r.name) for r in runs if r.baseline),
                         None),
        "data": _data_facts(config, modality, runs),
        "training": {"batch_size": config.base.train.batch_size,
                     "weight_decay": config.base.train.weight_decay,
                     "learning_rates": list(s.learning_rates),
                     "adaptations": {str(a): list(s.learning_rates_for(a))
                                     for a in s.adaptations_for(modality)},
                     "baseline_learning_rate": s.baseline_learning_rate,
                     "warmup_ratio": config.base.train.warmup_ratio,
                     "seed": config.base.train.seed,
                     "early_stopping_patience": config.base.train.early_stopping_patience,
                     "objective": config.objective},
        "halving": {"rungs": config.rungs, "reduction_factor": s.reduction_factor,
                    "lr_race_rungs": s.lr_race_rungs,
                    "first_rung_only": {name: sorted(r.breaks) for r in runs if r.breaks
                                        for name in (r.configs.values() or [r.name])},
                    # Not promoted past the first rung: over --max_train_minutes/_memory_mb.
                    "over_training_limits": {_config_name(runs, k): sorted(b)
                                             for k, b in plan.training_breaks.items()},
                    "budget_epochs": s.budget_epochs, "budget_minutes": s.budget_minutes,
                    "budget_stop": plan.budget_stop},
        "transfer_examples": s.transfer_examples,
        "trials": {"run": trials_run, "reused": trials_reused, "cache": str(config.cache_root)},
        "rungs": rungs, "kendall_tau": correlations,
    }


def _reused(runs: Sequence[_Candidate], trials_reused: int) -> bool:
    return bool(trials_reused or any(r.profile_cached or r.transfer_cached for r in runs))


def _record(run: _Candidate, key: str | None, plan: SearchPlan, config: SelectionConfig,
            brute: bool) -> Candidate:
    """One configuration's record (`key`), or a candidate's that has none (`key=None`)."""
    adaptation = split_key(key)[1] if key else FULL
    figures: dict[str, Any] = {
        "backbone": run.backbone,
        "adaptation": adaptation,
        "pretrained": None if run.spec is None else run.spec.source != "scratch",
        "shortlisted": run.shortlisted,
        **run.transfer,
        # Training cost: projected minutes of a full fine-tuning (the first rung's seconds per
        # epoch x max_epochs) and the peak RSS its trials recorded.
        **(plan.training.get(key, {}) if key else {}),
    }
    breaks = sorted({*run.breaks, *(plan.training_breaks.get(key, {}) if key else {})})
    if breaks:
        figures["breaks_constraints"] = breaks
    if run.spec is not None:
        figures["description"] = run.spec.description
    error, metric = run.error, None
    if run.error is None and run.shortlisted and key is not None:
        state = _final_state(plan, key, brute)
        if state is not None and state.record is not None:
            figures["trainable_params"] = state.record.trainable_params
        if state is not None and state.status == "done":
            metric = state.score
            seconds = plan.seconds(key, state.learning_rate)
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
        figures["status"] = f"not shortlisted (by {config.search.shortlist_score})"
    name = run.configs.get(key, run.name) if key else run.name
    if run.profile is not None:
        record = Candidate.from_profile(
            dataclasses.replace(run.profile, name=name), metric=metric, scores=run.scores,
            error=error, figures=figures,
        )
        record.backbone = run.name
        return record
    return Candidate(name=name, metric=metric, error=error, figures=figures,
                     scores=dict(run.scores), backbone=run.name)


def _per_backbone(records: Sequence[Candidate]) -> list[Candidate]:
    """One record per backbone for the transferability correlations: its `full` configuration.

    The scores rank backbones (features before any training), so they are
    checked once per backbone against its full fine-tune (its first
    configuration when the search has no `full`), not once per adaptation.
    """
    chosen: dict[Any, Candidate] = {}
    for c in records:
        backbone = c.figures.get("backbone", c.name)
        if backbone not in chosen or (c.figures.get("adaptation", FULL) == FULL
                                      and chosen[backbone].figures.get("adaptation") != FULL):
            chosen[backbone] = c
    return list(chosen.values())


def _config_name(runs: Sequence[_Candidate], key: str) -> str:
    return next((r.configs[key] for r in runs if key in r.configs), key)


def _brute_force_estimate(plan: SearchPlan, config: SelectionConfig,
                          learning_rates: dict[str, list[float]],
                          profile_seconds: float) -> float | None:
    """Profiling + every (candidate, learning rate) for `max_epochs` at its measured epoch time."""
    total = profile_seconds
    for backbone, rates in learning_rates.items():
        per_config = [statistics.median(plan.seconds(backbone, lr).values())
                      for lr in rates if plan.seconds(backbone, lr)]
        if per_config:
            # An unmeasured learning rate is assumed to cost what the measured ones did.
            total += statistics.mean(per_config) * len(rates) * config.search.max_epochs
    return round(total, 1) if total else None


def _rung_dict(rung: RungSummary, runs: Sequence[_Candidate]) -> dict[str, Any]:
    names = {k: name for r in runs for k, name in r.configs.items()}
    return {
        "rung": rung.rung + 1,
        "epochs": rung.epochs,
        "entries": [{"candidate": names.get(e.config, e.config),
                     "learning_rate": e.learning_rate, "status": e.status,
                     "score": e.score, "epochs": e.epochs} for e in rung.entries],
        "promoted": [names.get(b, b) for b in rung.promoted],
        "complete": rung.complete,
    }


def _data_facts(config: SelectionConfig, modality: str, runs: Sequence[_Candidate]) -> dict:
    d, m = config.base.data, config.base.model
    sizes = sorted({int(r.profile.input_shapes.get("images", [0])[0]) for r in runs
                    if r.profile and r.profile.input_shapes.get("images")})
    return {"modality": modality, "pipeline": PIPELINES[modality],
            "train_data": d.train_data, "eval_data": d.eval_data,
            "max_train_examples": d.max_train_examples, "validation_split": d.validation_split,
            "sequence_length": m.sequence_length, "pooling": m.pooling,
            "image_size": m.image_size, "profiled_sizes": sizes, "augment": d.augment}


def _write_failed_report(config: SelectionConfig, runs: Sequence[_Candidate], modality: str,
                         started: float) -> Path:
    records = [Candidate(name=r.name, error=r.error or "not fine-tuned: every listed candidate "
                         "failed", figures={"backbone": r.backbone}, scores=dict(r.scores))
               for r in runs]
    rec = recommend(records, **config.constraints.recommend_kwargs(),
                    metric_name=config.search.metric, **config.search.tie_rule)
    paths = write_report(config.output_dir, records, rec,
                         selection_seconds=time.perf_counter() - started,
                         title=config.title or _default_title(config, modality))
    return paths["report"]


# Split names that say nothing about the task: the title looks past them.
_SPLIT_WORDS = ("train", "training", "dev", "val", "valid", "validation", "test", "data", "all")


def task_name(train_data: str) -> str:
    """The task a data path names: the file stem (without a split word), else its folder.

    Example:

    ```python
    task_name("/data/trec_train.tsv")       # 'trec'
    task_name("../shared/data/sst2/train.tsv")  # 'sst2'
    task_name("../shared/data/hymenoptera/train")  # 'hymenoptera'
    ```
    """
    path = Path(train_data.rstrip("/"))
    for part in (path, *path.parents):
        stem = part.name.split(".")[0] if part is path else part.name
        words = [w for w in stem.replace("-", "_").split("_") if w]
        kept = [w for w in words if w.lower() not in _SPLIT_WORDS]
        if kept:
            return "_".join(kept)
    return train_data


def _default_title(config: SelectionConfig, modality: str) -> str:
    d, m = config.base.data, config.base.model
    name = task_name(d.train_data)
    subset = f", {d.max_train_examples} training examples" if d.max_train_examples else ""
    shape = (f", sequence length {m.sequence_length}" if BACKBONE_MODALITY[modality] == "text"
             else (f", {m.image_size} px" if m.image_size else ""))
    return f"Model selection: {name} ({modality}{subset}{shape})"


# --------------------------------------------------------------------------- #
# Progress and formatting
# --------------------------------------------------------------------------- #


def _progress_bar(config: SelectionConfig, usable: Sequence[_Candidate]) -> Any:
    from tqdm import tqdm

    # Profiles and transferability per candidate; the search adds its trials.
    return tqdm(total=2 * len(usable) + 1, desc="select", unit="step", file=sys.stderr,
                disable=not config.progress, dynamic_ncols=True, mininterval=1.0)


def _echo(bar: Any, line: str) -> None:
    bar.write(line, file=sys.stdout) if bar is not None and not bar.disable else print(
        line, flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _count(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
