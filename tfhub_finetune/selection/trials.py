"""Selection's trials: each one a `text_classify`/`token_classify`/`image_classify` run, on KerasTuner.

`TrialTrainer.fit_trial` trains one trial exactly as the training pipelines
train: the task the config names (`tasks.make_task`), the driver's one
compile recipe (`driver.compile_model`) and `driver.fit_task`
(`training.fit_resumable` over the task's epoch-seeded batches), on
`SelectionConfig.trial(...)`: the base config with the trial's backbone,
learning rate, epochs and model_dir. The task's epoch metrics come from the
same callbacks (`driver.epoch_metric_callbacks`: `val_entity_f1` for NER);
only the rest differ (the per-epoch record and chain-long patience the oracle
plans from, and per-example predictions where the task has them). `run_search` runs, serves
or works for the KerasTuner search; `candidate_features` extracts frozen
features for the transferability scores through the same task.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.selection.config import SelectionConfig
from tfhub_finetune.selection.halving import (
    FULL,
    SearchPlan,
    TrialRecord,
    WorkItem,
    config_key,
    last_line,
    split_key,
)
from tfhub_finetune.selection.tuner import (
    TRIAL_HISTORY,
    TRIAL_PREDICTIONS,
    TrialHistory,
    tuner_classes,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrialTrainer:
    """Trains one trial: builds the task and model, restores the parent, fits, reports.

    Attributes:
        config: SelectionConfig.
        specs: dict. Backbone string -> its resolved `BackboneSpec`.
    """

    config: SelectionConfig
    specs: Mapping[str, Any]

    def fit_trial(self, values: Mapping[str, Any], trial_dir: Path, parent_dir: Path | None,
                  tuner_id: str) -> dict[str, float]:
        import keras

        from tfhub_finetune import driver, training
        from tfhub_finetune.adaptation import count_trainable
        from tfhub_finetune.memory import PeakMemory
        from tfhub_finetune.tasks import make_task

        config = self.config
        backbone, lr = str(values["backbone"]), float(values["learning_rate"])
        adaptation = str(values.get("adaptation", FULL))
        target, initial = int(values["tuner/epochs"]), int(values.get("tuner/initial_epoch", 0))
        history_path = trial_dir / TRIAL_HISTORY
        if not _continue_parent(trial_dir, parent_dir):
            initial = 0
        history = TrialHistory(history_path)

        keras.backend.clear_session()
        # A fresh model per trial (cleared session): keras-hub's enable_lora runs once per layer,
        # and a continued LoRA trial gets its adapters back from the parent's backup.
        experiment = config.trial(backbone, lr, target, trial_dir, adaptation).validate()
        training.set_seed(experiment.train.seed)
        task = make_task(experiment, self.specs.get(backbone))
        task.prepare_train()
        model = task.build_model()
        recorder = tuner_classes().EpochRecorder(
            history, config.objective, experiment.train.early_stopping_patience, tuner_id
        )
        meter = PeakMemory()
        meter.reset()
        setup_seconds = 0.0
        # SIGTERM raises errors.Preempted (a BaseException, so KerasTuner does not record a
        # failed trial): the trial stays RUNNING and the next run resumes it from the backup.
        if rides_on_features(experiment):
            # The frozen backbone's features once per backbone (cached in the project); the
            # head trains on them and, sharing its layers with `model`, is `model`'s head.
            _, setup_seconds = fit_head_on_features(
                model, task, experiment, trial_dir, trial_dir.parent / FEATURES_DIR,
                [recorder])
            # What a run of this configuration costs once: one forward pass (however cached).
            setup_seconds = setup_seconds if initial == 0 else 0.0
        else:
            driver.compile_model(model, experiment, task.steps_per_epoch,
                                 task.labels.num_classes)
            # The task's epoch metrics first (val_entity_f1), as the training pipelines log them.
            callbacks = driver.epoch_metric_callbacks(task, experiment)
            kind = driver.prediction_kind(experiment.model.task)
            if kind is not None:
                # Per-example predictions each epoch (for paired tests); this pass is the
                # validation.
                callbacks.append(tuner_classes().EvalPredictionsRecorder(
                    task.eval_dataset(), task.eval_targets(), kind, trial_dir))
            driver.fit_task(model, task, experiment, trial_dir, [*callbacks, recorder],
                            validate=False)
        peak_mb = meter.peak_mb()
        scores = history.scores()
        if not scores:
            raise RuntimeError("The trial finished without a single evaluated epoch.")
        metrics: dict[str, float] = {
            config.objective: max(scores),
            "epochs_trained": float(len(scores)),
            "stopped_early": float(history.stopped_at is not None),
            # What a configuration's training costs in memory and size (`max_train_memory_mb`).
            "peak_train_rss_mb": round(peak_mb, 1),
            "trainable_params": float(count_trainable(model)),
            # One-off cost outside the epochs (a head's feature pass), for the projected time.
            "setup_seconds": round(setup_seconds, 3),
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


# Inside a KerasTuner project: each backbone's frozen features, for its `head` trials.
FEATURES_DIR = "features"


def rides_on_features(experiment: Any) -> bool:
    """Whether a trial trains its head on cached features: `head`, one label per example.

    The frozen backbone computes the same features every epoch, so they are
    computed once; a `head` trial then costs about one forward pass. Token
    classification (a tag per word piece) and regression/multi-label keep the
    normal path. Training images are not augmented on this path (the
    features are of the images as they are).
    """
    m = experiment.model
    return m.adaptation.kind == "head" and m.task == "single_label"


def features_model(model: Any) -> Any:
    """`model` up to its head's input: the pooled features the head reads.

    Masked mean, [CLS] or the pooler for text, global average for images,
    every position's encoding for tokens, as the classifier pools them.
    """
    import keras

    return keras.Model(model.input, model.get_layer("head_logits").input)


def head_model(model: Any) -> Any:
    """The classifier's head alone, on a features input, sharing `model`'s head layers.

    Training it trains `model`'s head: the same `head_dropout`, `head_logits`
    and output activation objects, so `model` then predicts with the new weights.
    """
    import keras

    logits = model.get_layer("head_logits")
    features = keras.Input(tuple(logits.input.shape[1:]), name="features")
    names = {layer.name for layer in model.layers}
    x = model.get_layer("head_dropout")(features) if "head_dropout" in names else features
    output = "probabilities" if "probabilities" in names else "scores"
    return keras.Model(features, model.get_layer(output)(logits(x)), name="head_on_features")


def cached_features(model: Any, task: Any, directory: Path, key: str) -> dict[str, Any]:
    """Frozen features of the whole training and evaluation data, computed once per `key`.

    Reuses the transferability stage's extractor (`extract_features`) over
    the task's own datasets: the training split unaugmented, the evaluation
    split in file order (so predictions line up with `eval_targets`). Saved
    as `<directory>/<key>.npz`, written atomically.

    Returns:
        dict: `train_x`, `train_y`, `eval_x` (float32 / class ids) and
        `seconds` (the extraction's time when it ran).
    """
    import numpy as np

    from tfhub_finetune.selection.transferability import extract_features

    path = directory / f"{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return {name: data[name] for name in data.files} | {
                "seconds": float(data["seconds"])}
    tic = time.perf_counter()
    extractor = features_model(model)
    everything = 2**62  # extract_features stops at the end of the data.
    train_x, train_y = extract_features(extractor, task.feature_dataset(), everything)
    eval_x, _ = extract_features(extractor, task.eval_dataset(), everything)
    seconds = time.perf_counter() - tic
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, train_x=train_x, train_y=train_y, eval_x=eval_x, seconds=seconds)
    os.replace(tmp, path)
    return {"train_x": train_x, "train_y": train_y, "eval_x": eval_x, "seconds": seconds}


def fit_head_on_features(model: Any, task: Any, experiment: Any, trial_dir: Path,
                         features_dir: Path, callbacks: list) -> tuple[Any, float]:
    """Trains `model`'s head on cached frozen features, as `driver.fit_task` would train it.

    The same compile recipe (`driver.compile_model`), `training.fit_resumable`
    (backups, resume, continuation from a parent's backup), epoch-seeded
    shuffles and per-epoch eval predictions (`EvalPredictionsRecorder`, which
    puts `val_<metric>` in the logs); only the inputs are features.

    Returns:
        (the head model, the feature extraction's seconds).
    """
    import math

    import numpy as np
    import tensorflow as tf

    from tfhub_finetune import driver, training
    from tfhub_finetune.config import keras_verbose
    from tfhub_finetune.selection.cache import hash_json
    from tfhub_finetune.tasks.base import epoch_seed, eval_batch_size

    m = experiment.model
    # The project fixes every other setting the features depend on (data, length, pooling).
    key = hash_json({"backbone": m.backbone, "spec": task.spec.to_dict()})
    data = cached_features(model, task, features_dir, key)
    head = head_model(model)
    batch = experiment.train.batch_size
    steps = math.ceil(len(data["train_x"]) / batch)
    driver.compile_model(head, experiment, steps, task.labels.num_classes)

    def epoch_dataset(epoch: int) -> tf.data.Dataset:
        order = np.random.default_rng(epoch_seed(experiment, epoch)).permutation(
            len(data["train_x"]))
        return tf.data.Dataset.from_tensor_slices(
            (data["train_x"][order], data["train_y"][order])).batch(batch)

    evaluation = tf.data.Dataset.from_tensor_slices(data["eval_x"]).batch(
        eval_batch_size(experiment))
    recorder = tuner_classes().EvalPredictionsRecorder(
        evaluation, task.eval_targets(), driver.prediction_kind(m.task), trial_dir)
    training.fit_resumable(
        head, epoch_dataset, epochs=experiment.train.epochs, steps_per_epoch=steps,
        model_dir=trial_dir, callbacks=[recorder, *callbacks],
        backup_every_steps=experiment.train.backup_every_steps,
        verbose=keras_verbose(experiment.runtime.verbose),
    )
    return head, data["seconds"]


def _continue_parent(trial_dir: Path, parent_dir: Path | None) -> bool:
    """Copies the parent's backup and history into a new trial; False when it must start over."""
    from tfhub_finetune.training import BACKUP_STATE

    backup = trial_dir / "backup"
    if parent_dir is None or (backup / BACKUP_STATE).exists():
        return True
    if not (parent_dir / "backup" / BACKUP_STATE).exists():
        logger.warning("Trial %s: parent backup missing; training from scratch.", trial_dir.name)
        return False
    # Continue the parent: its weights, optimizer state and history.
    shutil.copytree(parent_dir / "backup", backup, dirs_exist_ok=True)
    if (parent_dir / TRIAL_HISTORY).exists():
        shutil.copy2(parent_dir / TRIAL_HISTORY, trial_dir / TRIAL_HISTORY)
    if (parent_dir / TRIAL_PREDICTIONS).exists():
        shutil.copytree(parent_dir / TRIAL_PREDICTIONS, trial_dir / TRIAL_PREDICTIONS,
                        dirs_exist_ok=True)
    return True


def candidate_features(config: SelectionConfig, backbone: str, spec: Any) -> tuple[Any, Any, float]:
    """Frozen features of a seeded training sample: what the classifier's head reads.

    Texts and images: one pooled vector per example, pooled exactly as the
    classifier pools it. Tokens: one vector per word (its first word piece,
    where the token head reads its tag), labelled with the word's tag;
    `transfer_examples` then counts words.

    Returns:
        (features, labels, extraction seconds).
    """
    import gc

    import keras

    from tfhub_finetune import training
    from tfhub_finetune.selection.transferability import extract_features
    from tfhub_finetune.tasks import make_task

    keras.backend.clear_session()
    experiment = config.trial(backbone, config.search.learning_rates[0], config.search.max_epochs,
                              "unused")
    training.set_seed(experiment.train.seed)
    task = make_task(experiment, spec)
    task.prepare_train()
    model = task.build_model()
    # For tokens, every position's encoding (extract_features keeps the labelled ones).
    extractor = features_model(model)
    tic = time.perf_counter()
    features, labels = extract_features(extractor, task.feature_dataset(),
                                        config.search.transfer_examples)
    seconds = time.perf_counter() - tic
    del model, extractor, task
    keras.backend.clear_session()
    gc.collect()
    return features, labels, seconds


def learning_rates_of(config: SelectionConfig, configurations: Sequence[str],
                      baselines: set[str]) -> dict[str, list[float]]:
    """Configuration -> learning rates to try, the first first (the baseline has its own).

    Each adaptation has its own (`SearchConfig.learning_rates_for`): a head or
    LoRA wants steps 10-100x a full fine-tune's.
    """
    s = config.search
    out = {}
    for key in configurations:
        backbone, adaptation = split_key(key)
        out[key] = ([s.baseline_learning_rate] if backbone in baselines
                    else list(s.learning_rates_for(adaptation)))
    return out


def configurations_of(config: SelectionConfig, backbones: Sequence[tuple[str, Any]],
                      baselines: set[str], modality: str,
                      echo: Callable[[str], None] = print) -> list[str]:
    """The configuration keys the search compares: each backbone x each adaptation it can do.

    The from-scratch baseline trains `full` only (its features are random:
    freezing or adapting them answers nothing). A backbone that cannot do an
    adaptation its modality can (a TF Hub SavedModel, one opaque layer, has
    no `top:K` or `lora:R`) skips it with a line saying so; an adaptation the
    whole modality cannot do (`lora:R` on image CNNs) fails the run before
    any work, with `check_adaptation`'s one-line error.

    Args:
        backbones: list of (backbone string, resolved `BackboneSpec`).
        baselines: set of str. The from-scratch baselines among them.
        modality: str. The selection modality.
    """
    from tfhub_finetune.adaptation import check_adaptation
    from tfhub_finetune.errors import InputError

    adaptations = config.search.adaptations_for(modality)
    keys = []
    for backbone, spec in backbones:
        if backbone in baselines:
            keys.append(config_key(backbone))
            continue
        for adaptation in adaptations:
            if adaptation.kind == "lora" and spec.modality == "image":
                check_adaptation(adaptation, spec)  # Raises: no image CNN has LoRA.
            try:
                check_adaptation(adaptation, spec)
            except InputError as err:
                echo(f"skip      {backbone} {adaptation}: {str(err).splitlines()[0]}")
                continue
            keys.append(config_key(backbone, str(adaptation)))
    return keys


def tuner_role() -> str:
    """`local`, `chief` or `worker`, from KerasTuner's environment variables."""
    from tfhub_finetune.errors import InputError

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


def run_search(
    config: SelectionConfig, project: str, configurations: Sequence[str], *,
    learning_rates: Mapping[str, list[float]], eligible: list[str] | None,
    weights_ids: Mapping[str, str], specs: Mapping[str, Any], names: Mapping[str, str],
    bar: Any = None, echo: Callable[[str], None] = print,
) -> tuple[SearchPlan | None, int, int]:
    """Runs (or serves, or works for) the KerasTuner search; returns (plan, run, reused).

    Args:
        configurations: configuration keys (`config_key`), in rung-0 order.
        eligible: configurations that may be recommended (None: all); the
            others get the first rung only.
        weights_ids, specs: by backbone.
        names: display name by configuration key.
        bar: tqdm bar or None (a worker, or no progress shown).
    """
    classes = tuner_classes()
    s = config.search
    oracle = classes.SuccessiveHalvingOracle(
        config.objective, list(configurations), dict(learning_rates), config.rungs,
        reduction_factor=s.reduction_factor, budget_epochs=s.budget_epochs,
        budget_seconds=s.budget_minutes * 60.0, brute_force=s.brute_force,
        weights_ids=dict(weights_ids), eligible=eligible, lr_race_rungs=s.lr_race_rungs,
        **config.constraints.training(), seed=config.base.train.seed,
    )
    role = tuner_role()
    tuner = classes.SelectionTuner(
        oracle, TrialTrainer(config, specs), directory=str(config.cache_root / "tuner"),
        project_name=project,
        # Workers never delete the shared project; the chief or a local run may.
        overwrite=config.overwrite and role != "worker",
    )
    if role == "worker":
        tuner.search(verbose=0)
        return None, tuner.trials_run, 0

    reused = sum(1 for t in oracle.trials.values() if t.status == "COMPLETED")
    if bar is not None:
        racing = len(eligible) if eligible is not None else len(configurations)
        bar.total = bar.n + _planned_trials(oracle.plan(), config, len(configurations), racing,
                                            learning_rates) + 1
        bar.refresh()
        oracle.on_trial_start, oracle.on_trial_end = _progress_callbacks(config, names, bar, echo)
    if role == "chief":
        print(f"Distributed tuning: chief serving the oracle on "
              f"{os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')}"
              "; start the workers with the same command.", flush=True)
    tuner.search(verbose=0)
    # Counted on the oracle: on a chief, the workers trained them.
    finished = sum(1 for t in oracle.trials.values() if t.status == "COMPLETED")
    return oracle.plan(), finished - reused, reused


def _progress_callbacks(config: SelectionConfig, names: Mapping[str, str], bar: Any,
                        echo: Callable[[str], None]):
    def started(item: WorkItem, trial_id: str) -> None:
        bar.set_description(f"fine-tune {names.get(item.config, item.config)} "
                            f"lr={item.learning_rate:g} to {item.target_epochs} ep")

    def ended(record: TrialRecord) -> None:
        bar.update(1)
        name = names.get(record.config, record.config)
        took = sum(record.epoch_seconds.values())
        if record.status == "COMPLETED" and record.scores:
            stop = " (stopped early)" if record.stopped_early else ""
            echo(f"trial {record.trial_id} {name} lr={record.learning_rate:g} epochs "
                 f"{record.initial_epoch}->{record.epochs_trained}: {config.objective} "
                 f"{max(record.scores):.4f}{stop} ({took:.0f} s)")
        else:
            echo(f"trial {record.trial_id} {name} lr={record.learning_rate:g}: "
                 f"{record.status} {last_line(record.message)}")

    return started, ended


def _planned_trials(plan: SearchPlan, config: SelectionConfig, shortlisted: int, racing: int,
                    learning_rates: Mapping[str, list[float]]) -> int:
    """Trials a search from here will start (for the progress bar; an estimate)."""
    s = config.search
    sizes = math.ceil((racing or shortlisted) / s.reduction_factor)
    # The first rung, the leaders' learning-rate checks, then the later rungs.
    total = shortlisted + sizes * (len(s.learning_rates) - 1)
    for r, _ in enumerate(config.rungs[1:], start=1):
        # While the learning rates race, each promoted backbone trains all of them.
        total += sizes * (len(s.learning_rates) if r <= s.lr_race_rungs else 1)
        sizes = math.ceil(sizes / s.reduction_factor)
    if s.brute_force:
        total += sum(len(v) for v in learning_rates.values())
    done = sum(1 for r in plan.rungs for e in r.entries if e.status == "done")
    return max(total - done, len(plan.todo))
