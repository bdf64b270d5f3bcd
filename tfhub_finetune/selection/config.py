"""Model selection's configuration: a base `ExperimentConfig` plus what only selection has.

A trial *is* a `text_classify` / `image_classify` run: `SelectionConfig.trial`
is the base config with the backbone, learning rate, epochs and model
directory replaced (`dataclasses.replace`), and the settings selection fixes
for every trial (the monitored metric, a constant rate after warm-up, silent
progress). Everything else (batch size, warm-up, weight decay, clipping,
dropout, pooling, augmentation, ...) comes from the same dataclasses and the
same flags as the training pipelines, validated once by
`ExperimentConfig.validate()`.

Example:

```python
config = SelectionConfig.from_settings(
    ["minilm_l6_h384@layers=2", "scratch_text_encoder"], "train.tsv", "dev.tsv",
    output_dir="runs/select", sequence_length=64, learning_rates=(1e-4,), max_latency_ms=20,
).validate()
config.trial("minilm_l6_h384@layers=2", 1e-4, epochs=2, model_dir="runs/t0").train.epochs  # 2
config.trial("minilm_l6_h384", 1e-3, 1, "runs/t1", adaptation="lora:8").model.adaptation.rank  # 8
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfhub_finetune.config import (
    DEFAULT_MONITORS,
    QUANTIZATIONS,
    TFLITE_SUFFIX,
    Adaptation,
    ExperimentConfig,
)
from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.selection.halving import lr_key, rung_epochs
from tfhub_finetune.selection.profile import ProfileOptions
from tfhub_finetune.selection.recommend import (
    CONSTRAINTS,
    PREFER,
    REFERENCE_FORM,
    validate_constraints,
)
from tfhub_finetune.tasks import MODALITIES as TASK_MODALITIES
from tfhub_finetune.tasks import SELECTION_METRICS, data_modality

MODALITIES = ("auto", *TASK_MODALITIES)
METRICS = ("auto", *dict.fromkeys(m for ms in SELECTION_METRICS.values() for m in ms))
ESTIMATORS = ("logme", "knn_accuracy", "linear_probe_accuracy")
# What `--serving_forms` may list: the float32 export, each `--export_quantized` mode, and
# the text classifier's TFLite file of each (images' int8 form is TFLite already).
TEXT_CLASSIFIER_FORMS = tuple(mode + TFLITE_SUFFIX for mode in QUANTIZATIONS[1:])
SERVING_FORMS = (REFERENCE_FORM, *QUANTIZATIONS[1:], *TEXT_CLASSIFIER_FORMS)


def serving_forms_of(modality: str | None) -> tuple[str, ...]:
    """The forms `--serving_forms` may list for `modality`: all, less the text classifier's own
    (`int8_tflite`) for inputs known not to be text (image, tokens).

    `auto` keeps them all (the candidates decide; `run_selection` checks again).
    """
    text = modality in ("auto", "text", "text_pair")
    return tuple(f for f in SERVING_FORMS if text or f not in TEXT_CLASSIFIER_FORMS)


def export_mode(form: str) -> str:
    """The `--export_quantized` mode that writes serving form `form` (`int8_tflite` -> `int8`)."""
    return form.removesuffix(TFLITE_SUFFIX)

# The base-config fields each trial sets (`trial()`); the cache key leaves them out.
TRIAL_FIELDS = ("mode", "model_dir", "model.backbone", "model.adaptation", "train.learning_rate",
                "train.epochs")
# What a search compares when --adaptations is not given, by backbone modality: LoRA is
# keras-hub's adapter for transformers; CNNs have none, their usual partial fine-tune is the top
# stages. `head` rides on cached features (about one forward pass), so it is always worth a rung.
DEFAULT_ADAPTATIONS = {"text": ("full", "lora:8", "head"), "image": ("full", "top:2", "head")}
# Each adaptation's learning rates: `learning_rates` (full's) times this, unless
# `adaptation_learning_rates` names its own. Fewer trained weights take larger steps: on the SST-2
# demo after one epoch LoRA r=8 reached 0.835 at 1e-3 but 0.585 at 1e-4, the head 0.794 at 1e-2
# but 0.502 at 1e-4 (BUILD_NOTES); top:K trains whole blocks, as full does.
ADAPTATION_LR_SCALE = {"full": 1.0, "top": 1.0, "lora": 10.0, "head": 100.0}
# Limits on a configuration's training cost, known after its first rung (`plan_search`).
TRAINING_CONSTRAINTS = ("max_train_minutes", "max_train_memory_mb")
# Base-config defaults that differ for selection (the pipeline sets the same flag defaults).
SELECTION_DEFAULTS = {"early_stopping_patience": 2}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """What to compare and how hard to search.

    Attributes:
        candidates: tuple of str. Backbones to compare: catalog names,
            `name@layers=k`, local directories, TF Hub handles. The modality's
            from-scratch baseline is added when missing.
        modality: str. `text`, `text_pair` (two texts per example),
            `tokens` (a tag per word: token classification) or `image`;
            `auto` takes `tokens` or `text_pair` from the data settings
            (`task="token_classification"`, a `text_pair_column`), else text
            or image from the candidates.
        metric: str. `accuracy`, `macro_f1`, `f1` (of class 1, two classes:
            GLUE's MRPC F1) or `entity_f1` (token classification: entity-level
            F1 as seqeval computes it) on the evaluation data; trials monitor
            `val_<metric>`. `auto`: `entity_f1` for tokens, else `accuracy`.
        learning_rates: tuple of float. Peak learning rates for the pretrained
            candidates trained `full` (the secondary choice): every
            configuration trains the first rung at its first one; the leaders
            of that rung also try the others. Other adaptations scale them
            (`ADAPTATION_LR_SCALE`) unless `adaptation_learning_rates` names theirs.
        adaptations: tuple of Adaptation. How much of each pretrained backbone
            trains, compared with the backbone (strings are parsed); empty:
            the modality's `DEFAULT_ADAPTATIONS`. The from-scratch baseline
            trains `full` only.
        adaptation_learning_rates: tuple of (str, tuple of float). An
            adaptation (`lora:8`) or kind (`lora`, `head`) -> its own learning
            rates, overriding the scaled ones; given as a dict or as
            `head=1e-2/3e-3` strings (the flag's form).
        baseline_learning_rate: float. The from-scratch baseline's rate.
        min_epochs: int. Epochs of the first rung.
        max_epochs: int. Epochs of a full fine-tuning (the last rung, and what
            brute force trains every candidate for).
        reduction_factor: int. Each rung keeps the best 1/factor.
        budget_epochs: int. Most fine-tuning epochs, all trials (0: no limit).
        budget_minutes: float. Most fine-tuning minutes (0: no limit).
        brute_force: bool. Also fine-tune every configuration to `max_epochs`;
            the report then answers with those figures, the search's answer and
            its regret as a section.
        lr_race_rungs: int. Rungs after the learning-rate check through which
            every rate of a promoted backbone continues before the best goes on
            alone (`plan_search`; 0: settled on the check's scores).
        prefer: str. The cost ties are broken on: `latency`, `params`,
            `memory` or `train_time` (`recommend`).
        tie_alpha: float. Candidates a paired test on the same evaluation
            examples does not find worse than the best at this level tie with
            it, and the cheapest of them is recommended; 0 turns ties off.
        shortlist_size: int. Fine-tune only the best N by `shortlist_score`
            (plus the baseline); 0 fine-tunes all.
        shortlist_score: str. Transferability score that ranks the shortlist.
        transfer_examples: int. Training examples used for transferability.
    """

    candidates: tuple[str, ...] = ()
    modality: str = "auto"
    metric: str = "auto"
    learning_rates: tuple[float, ...] = (5e-5,)
    adaptations: tuple[Adaptation, ...] = ()
    adaptation_learning_rates: tuple[tuple[str, tuple[float, ...]], ...] = ()
    baseline_learning_rate: float = 1e-3
    min_epochs: int = 1
    max_epochs: int = 4
    reduction_factor: int = 2
    budget_epochs: int = 0
    budget_minutes: float = 0.0
    brute_force: bool = False
    lr_race_rungs: int = 1
    prefer: str = "latency"
    tie_alpha: float = 0.05
    shortlist_size: int = 0
    shortlist_score: str = "logme"
    transfer_examples: int = 500

    def __post_init__(self):
        # The edge: strings from flags or callers become typed values, once.
        object.__setattr__(self, "adaptations",
                           tuple(Adaptation.parse(a) for a in self.adaptations))
        object.__setattr__(self, "adaptation_learning_rates",
                           _parse_adaptation_rates(self.adaptation_learning_rates))

    @property
    def rungs(self) -> list[int]:
        return rung_epochs(self.min_epochs, self.max_epochs, self.reduction_factor)

    def adaptations_for(self, modality: str) -> tuple[Adaptation, ...]:
        """The adaptations compared: the given ones, else the modality's default.

        Args:
            modality: str. A selection modality (`text`, `image`, ...) or a
                backbone modality (`text`, `image`).
        """
        if self.adaptations:
            return self.adaptations
        kind = "image" if modality == "image" else "text"
        return tuple(Adaptation.parse(a) for a in DEFAULT_ADAPTATIONS[kind])

    def learning_rates_for(self, adaptation: Adaptation | str) -> tuple[float, ...]:
        """An adaptation's learning rates, first first: its own if given, else full's scaled.

        Example:

        ```python
        SearchConfig(learning_rates=(1e-4, 3e-5)).learning_rates_for("lora:8")  # (0.001, 0.0003)
        ```
        """
        adaptation = Adaptation.parse(adaptation)
        given = dict(self.adaptation_learning_rates)
        for name in (str(adaptation), adaptation.kind):
            if name in given:
                return given[name]
        scale = ADAPTATION_LR_SCALE[adaptation.kind]
        return tuple(lr_key(lr * scale) for lr in self.learning_rates)

    @property
    def tie_rule(self) -> dict[str, Any]:
        """`recommend`'s tie-breaking settings as keyword arguments."""
        return {"prefer": self.prefer, "tie_alpha": self.tie_alpha}


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Hard limits on the recommendation (None: no limit); `recommend`'s keyword arguments."""

    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_params: float | None = None
    min_metric: float | None = None
    max_train_minutes: float | None = None
    max_train_memory_mb: float | None = None

    def as_kwargs(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    def recommend_kwargs(self) -> dict[str, float | None]:
        """The constraints `recommend` knows (its `CONSTRAINTS` table), as its keyword arguments.

        The training limits are the search's own (`plan_search` promotes no
        configuration over them); `recommend` gets them once its table has them.
        """
        return {k: v for k, v in self.as_kwargs().items() if k in CONSTRAINTS}

    def training(self) -> dict[str, float | None]:
        """The training limits, `plan_search`'s keyword arguments."""
        return {name: getattr(self, name) for name in TRAINING_CONSTRAINTS}


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Everything one selection run needs.

    Attributes:
        base: ExperimentConfig. What every trial trains with, as
            `text_classify`/`image_classify` would (its backbone, learning
            rate, epochs and model_dir are set per trial).
        search: SearchConfig. Candidates, learning rates, rungs, budgets.
        constraints: Constraints.
        profile_options: ProfileOptions or None. None uses
            `ProfileOptions(train_batch_size=<base batch size>)`.
        output_dir: str. Where report.md, results.json and the plots go.
        cache_dir: str. Cache and KerasTuner root; empty: `<output_dir>/cache`.
        overwrite: bool. Ignore and replace cached results.
        title: str. Report title; empty derives one from the data.
        progress: bool. Show a tqdm progress bar on stderr.
        profile_timeout_s: float. Limit per candidate's profile.
        serving_forms: tuple of str. Forms the recommendation may serve:
            `float32` (the export, always), `int8` (`quantized_export`:
            Keras int8 for text and tokens, TFLite for images) and, for text
            classifiers, `int8_tflite` (the same int8 network as a TFLite
            file, served by `tflite_text.TfliteTextClassifier`); each is
            measured for each contender, its own candidate row.
    """

    base: ExperimentConfig
    search: SearchConfig
    constraints: Constraints = dataclasses.field(default_factory=Constraints)
    profile_options: ProfileOptions | None = None
    output_dir: str = ""
    cache_dir: str = ""
    overwrite: bool = False
    title: str = ""
    progress: bool = True
    profile_timeout_s: float = 1800.0
    serving_forms: tuple[str, ...] = (REFERENCE_FORM,)

    @classmethod
    def from_settings(cls, candidates, train_data: str, eval_data: str = "", *,
                      output_dir: str, **settings: Any) -> SelectionConfig:
        """Builds a config from flat setting names, each routed to the dataclass that has it.

        Any field of `SearchConfig`, `Constraints`, `SelectionConfig` or of the
        base config's sections (`DataConfig`, `ModelConfig`, `TrainConfig`,
        `RuntimeConfig`) may be given by its name, e.g. `sequence_length=64`,
        `clip_norm=0.5`, `max_epochs=3`, `max_latency_ms=20`.

        Raises:
            InputError: for a name no dataclass has (with the closest names).
        """
        owners = _setting_owners()
        settings = {**SELECTION_DEFAULTS, **settings, "candidates": tuple(candidates),
                    "train_data": train_data, "eval_data": eval_data, "output_dir": output_dir}
        unknown = sorted(set(settings) - set(owners))
        if unknown:
            raise InputError("Unknown selection setting.", received={"setting": unknown[0]},
                             fix=did_you_mean(unknown[0], sorted(owners)))
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in settings.items():
            grouped.setdefault(owners[name], {})[name] = value
        base = ExperimentConfig()
        sections = {s: dataclasses.replace(getattr(base, s), **grouped.get(s, {}))
                    for s in ("data", "model", "train", "runtime")}
        return cls(
            base=dataclasses.replace(base, **sections),
            search=SearchConfig(**grouped.get("search", {})),
            constraints=Constraints(**grouped.get("constraints", {})),
            **grouped.get("selection", {}),
        ).resolved()

    def resolved(self) -> SelectionConfig:
        """This config with the modality the data settings name and an `auto` metric resolved.

        `modality="tokens"` trains token classification (the base task
        becomes `token_classification`); `task="token_classification"` or a
        `text_pair_column` under `modality="auto"` make `tokens` or
        `text_pair`; otherwise `auto` stays for the candidates to decide (text
        or image). An `auto` metric becomes what the base task's
        `monitor="auto"` watches (`config.DEFAULT_MONITORS`: `entity_f1` for
        tokens, `accuracy` for labels). Idempotent.

        Raises:
            InputError: for an unknown modality or metric, or a modality the
                data settings contradict.
        """
        s, base = self.search, self.base
        _one_of("modality", s.modality, MODALITIES)
        _one_of("metric", s.metric, METRICS)
        modality = s.modality
        if modality == "tokens" and base.model.task == "single_label":  # The default head.
            base = dataclasses.replace(
                base, model=dataclasses.replace(base.model, task="token_classification"))
        named = data_modality(base)
        if modality == "auto":
            modality = named or "auto"
        elif named != modality and (named or modality in ("tokens", "text_pair")):
            if named:
                _bad("modality", modality, f"--modality={modality} contradicts the data "
                     f"settings, which make the inputs {named}.",
                     f"Give --modality={named} (or auto), or change the data flags.")
            needs = {"tokens": "the token classification task (not --task)",
                     "text_pair": "--text_pair_column (the second text's column)"}[modality]
            _bad("modality", modality, f"--modality={modality} needs {needs}.",
                 "Fix the data flags, or give --modality=auto.")
        metric = s.metric
        if metric == "auto":  # What the base task's `--monitor=auto` watches, as a selection metric.
            metric = DEFAULT_MONITORS.get(base.model.task, "val_accuracy").removeprefix("val_")
        return dataclasses.replace(self, base=base,
                                   search=dataclasses.replace(s, modality=modality, metric=metric))

    # === Derived values ===

    def check_serving_forms(self, modality: str) -> None:
        """Refuses a text classifier's form (`int8_tflite`) for image or token inputs.

        `validate` calls it with `--modality`; `run_selection` again once the
        candidates have decided an `auto` one.

        Raises:
            InputError: naming `serving_forms`.
        """
        forms = self.serving_forms
        if set(forms) - set(serving_forms_of(modality)):
            _bad("serving_forms", ",".join(forms), f"{', '.join(TEXT_CLASSIFIER_FORMS)} is a text "
                 f"classifier's form; {modality} inputs have none (images' int8 form is TFLite "
                 "already).", f"Drop it: e.g. --serving_forms={REFERENCE_FORM},int8.")

    @property
    def objective(self) -> str:
        """The Keras log name the search maximises, e.g. `val_accuracy`."""
        return f"val_{self.search.metric}"

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir or Path(self.output_dir) / "cache")

    @property
    def rungs(self) -> list[int]:
        return self.search.rungs

    @property
    def profile(self) -> ProfileOptions:
        return self.profile_options or ProfileOptions(train_batch_size=self.base.train.batch_size)

    def trial(self, backbone: str, learning_rate: float, epochs: int,
              model_dir: str | Path, adaptation: Adaptation | str = "full") -> ExperimentConfig:
        """The `ExperimentConfig` one trial (or a feature extraction) runs with.

        The base with the trial's fields (`TRIAL_FIELDS`) replaced, monitoring
        the search's metric, the rate constant after warm-up (so k epochs are
        the start of any longer trial) and no progress bar (selection draws
        its own).
        """
        b = self.base
        return dataclasses.replace(
            b, mode="train_and_eval", model_dir=str(model_dir),
            model=dataclasses.replace(b.model, backbone=backbone,
                                      adaptation=Adaptation.parse(adaptation)),
            train=dataclasses.replace(b.train, learning_rate=learning_rate, epochs=epochs,
                                      monitor=self.objective, lr_schedule="constant"),
            runtime=dataclasses.replace(b.runtime, verbose="0"),
        )

    # === Validation ===

    def validate(self) -> SelectionConfig:
        """Checks every value before any work; raises `InputError` naming the setting.

        The base config is checked by `ExperimentConfig.validate()` (the same
        bounds as the training pipelines), as the trial it becomes.

        Returns:
            self, so `SelectionConfig(...).validate()` chains.
        """
        s = self.search
        if not s.candidates or not all(isinstance(c, str) and c.strip() for c in s.candidates):
            _bad("candidates", list(s.candidates), "Give at least one candidate backbone.",
                 "E.g. --candidates=minilm_l6_h384,scratch_text_encoder.")
        duplicates = sorted({c for c in s.candidates if s.candidates.count(c) > 1})
        if duplicates:
            _bad("candidates", ",".join(duplicates), "A candidate is listed twice.",
                 "List each backbone once.")
        if not self.output_dir:
            _bad("output_dir", "", "An output directory is required.", "Set --output_dir.")
        _one_of("modality", s.modality, MODALITIES)
        _one_of("metric", s.metric, METRICS)
        if s.metric == "auto":
            _bad("metric", s.metric, "The metric is unresolved.",
                 "Call SelectionConfig.resolved() first (from_settings does).")
        # Under `auto` the candidates decide between text and image: their metrics are allowed.
        allowed = SELECTION_METRICS.get(s.modality) or tuple(dict.fromkeys(
            SELECTION_METRICS["text"] + SELECTION_METRICS["image"]))
        if s.metric not in allowed:
            owner = next(m for m, names in SELECTION_METRICS.items() if s.metric in names)
            inputs = "text or image" if s.modality == "auto" else s.modality
            _bad("metric", s.metric, f"`{s.metric}` is not a metric of {inputs} selection.",
                 f"Expected one of: {', '.join(allowed)}"
                 + (f"; or select for {owner} (--modality={owner})." if s.modality == "auto"
                    else "."))
        _one_of("shortlist_score", s.shortlist_score, ESTIMATORS)
        _one_of("prefer", s.prefer, tuple(PREFER))
        if not (isinstance(s.tie_alpha, (int, float)) and 0 <= s.tie_alpha < 1):
            _bad("tie_alpha", s.tie_alpha, "`tie_alpha` must be a significance level in [0, 1).",
                 "E.g. --tie_alpha=0.05 (0 turns the tie rule off).")
        for name in ("min_epochs", "max_epochs", "transfer_examples"):
            value = getattr(s, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _bad(name, value, f"`{name}` must be a positive integer.")
        for name in ("budget_epochs", "shortlist_size", "lr_race_rungs"):
            value = getattr(s, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _bad(name, value, f"`{name}` must be an integer >= 0.")
        if not isinstance(s.reduction_factor, int) or s.reduction_factor < 2:
            _bad("reduction_factor", s.reduction_factor,
                 "`reduction_factor` must be an integer >= 2 (2 keeps the better half).")
        if s.min_epochs > s.max_epochs:
            raise InputError(
                "`min_epochs` is larger than `max_epochs`: the first rung would train longer "
                "than a full fine-tuning.",
                received={"min_epochs": s.min_epochs, "max_epochs": s.max_epochs},
                fix="Give min_epochs <= max_epochs.",
            )
        if not s.learning_rates:
            _bad("learning_rates", [], "Give at least one learning rate.", "E.g. --learning_rates=1e-4.")
        for lr in s.learning_rates:
            if not _rate(lr):
                _bad("learning_rates", list(s.learning_rates),
                     "Learning rates must be numbers in (0, 1).", "E.g. --learning_rates=1e-4,3e-5.")
        if len({lr_key(lr) for lr in s.learning_rates}) != len(s.learning_rates):
            _bad("learning_rates", list(s.learning_rates), "A learning rate is listed twice.")
        duplicated = sorted({str(a) for a in s.adaptations if s.adaptations.count(a) > 1})
        if duplicated:
            _bad("adaptations", ",".join(duplicated), "An adaptation is listed twice.",
                 "List each once, e.g. --adaptations=full,lora:8,head.")
        for name, rates in s.adaptation_learning_rates:
            if not rates or not all(_rate(lr) for lr in rates):
                _bad("adaptation_learning_rates", f"{name}={'/'.join(map(str, rates))}",
                     "Learning rates must be numbers in (0, 1).", "E.g. head=1e-2/3e-3.")
        for adaptation in s.adaptations_for(s.modality):
            rates = s.learning_rates_for(adaptation)
            if not all(_rate(lr) for lr in rates):
                _bad("learning_rates", list(s.learning_rates),
                     f"Scaled for {adaptation} (x{ADAPTATION_LR_SCALE[adaptation.kind]:g}) a "
                     "learning rate leaves (0, 1).",
                     f"Give {adaptation}'s own: --adaptation_learning_rates={adaptation.kind}=1e-2.")
        if not _rate(s.baseline_learning_rate):
            _bad("baseline_learning_rate", s.baseline_learning_rate,
                 "The learning rate must be a number in (0, 1).",
                 "E.g. --baseline_learning_rate=1e-3.")
        if not (isinstance(s.budget_minutes, (int, float)) and s.budget_minutes >= 0):
            _bad("budget_minutes", s.budget_minutes, "`budget_minutes` must be >= 0 (0: no limit).")
        forms = self.serving_forms
        for form in forms:
            _one_of("serving_forms", form, SERVING_FORMS)
        if REFERENCE_FORM not in forms or len(set(forms)) != len(forms):
            _bad("serving_forms", ",".join(forms), f"List each serving form once, {REFERENCE_FORM} "
                 "included: the other forms are measured against it.",
                 f"E.g. --serving_forms={','.join(SERVING_FORMS)}.")
        self.check_serving_forms(s.modality)
        if not self.profile_timeout_s > 0:
            _bad("profile_timeout_s", self.profile_timeout_s, "`profile_timeout_s` must be positive.")
        # The same rules `recommend` applies, checked before hours of work.
        validate_constraints(self.constraints.recommend_kwargs(), s.metric)
        for name in TRAINING_CONSTRAINTS:
            value = getattr(self.constraints, name)
            if value is not None and not (isinstance(value, (int, float))
                                          and math.isfinite(value) and value > 0):
                _bad(name, value, f"`{name}` must be positive; no training fits a budget of "
                     f"{value}.", "Give a positive budget or leave it unset.")
        # The base, with the bounds every pipeline uses, as the first trial would run it.
        self.trial(s.candidates[0], s.learning_rates[0], s.max_epochs, self.cache_root).validate()
        return self


def _setting_owners() -> dict[str, str]:
    """Flat setting name -> which dataclass holds it, derived from the classes."""
    base = ExperimentConfig()
    owners: dict[str, str] = {}
    trial_names = {name.rpartition(".")[2] for name in TRIAL_FIELDS}
    for section in ("data", "model", "train", "runtime"):
        owners.update({f.name: section for f in dataclasses.fields(getattr(base, section))
                       if f.name not in trial_names})
    owners.update({f.name: "search" for f in dataclasses.fields(SearchConfig)})
    owners.update({f.name: "constraints" for f in dataclasses.fields(Constraints)})
    owners.update({f.name: "selection" for f in dataclasses.fields(SelectionConfig)
                   if f.name not in ("base", "search", "constraints")})
    return owners


def _parse_adaptation_rates(given: Any) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """`adaptation_learning_rates` from a dict, pairs or `head=1e-2/3e-3` strings, canonical."""
    pairs = given.items() if isinstance(given, Mapping) else given
    parsed: dict[str, tuple[float, ...]] = {}
    for pair in pairs:
        if isinstance(pair, str):
            name, sep, text = pair.partition("=")
            try:
                rates = tuple(float(v) for v in text.split("/") if v.strip())
            except ValueError:
                rates = ()
            if not sep or not rates:
                _bad("adaptation_learning_rates", pair, "Expected ADAPTATION=LR[/LR...].",
                     "E.g. --adaptation_learning_rates=head=1e-2/3e-3,lora=1e-3.")
        else:
            name, rates = pair
        name = str(name).strip().lower()
        # A kind alone (`lora`) names every rank; else it is one adaptation (`lora:8`).
        key = name if name in ADAPTATION_LR_SCALE else str(Adaptation.parse(name))
        parsed[key] = tuple(float(lr) for lr in rates)
    return tuple(sorted(parsed.items()))


def _rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1


def _bad(name: str, value: Any, problem: str, fix: str | None = None) -> None:
    raise InputError(problem, received={name: value}, fix=fix)


def _one_of(name: str, value: Any, choices) -> None:
    if value not in choices:
        _bad(name, value, f"Invalid value for `{name}`.", did_you_mean(str(value), choices))
