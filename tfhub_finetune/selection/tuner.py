"""The KerasTuner side of model selection: an oracle that plans by `plan_search`, a tuner.

`SuccessiveHalvingOracle` subclasses `keras_tuner.Oracle` (the stock Hyperband
oracle samples configurations at random per bracket, so it cannot promise
every candidate a first rung); `SelectionTuner` subclasses `keras_tuner.Tuner`
and hands each trial to a trainer object (`fit_trial(values, trial_dir,
parent_dir, tuner_id)`), which `select.py` supplies. Both classes are created
on first access (`tuner_classes()`, or `from ...tuner import
SuccessiveHalvingOracle`): importing KerasTuner imports TensorFlow, and a
selection run checks its settings before that.
"""

from __future__ import annotations

import functools
import json
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import atomic_write_text
from tfhub_finetune.selection.halving import (
    FULL,
    HALVING,
    SearchPlan,
    TrialRecord,
    WorkItem,
    learning_rates_by_backbone,
    plan_search,
    split_key,
)

# A trial chain's per-epoch scores and times, inside its trial directory.
TRIAL_HISTORY = "epochs.json"
# A trial chain's per-epoch eval predictions (`stats.EvalPredictions`), one .npz per epoch.
TRIAL_PREDICTIONS = "eval_predictions"


def trial_predictions(trial_dir: str | Path, epoch: int) -> Any:
    """The eval predictions a trial chain made after `epoch` epochs, or None if not recorded.

    Example:

    ```python
    preds = trial_predictions(project / "trial_0003", 2)  # stats.EvalPredictions
    ```
    """
    from tfhub_finetune.stats import EvalPredictions

    path = Path(trial_dir) / TRIAL_PREDICTIONS / f"epoch_{epoch}.npz"
    return EvalPredictions.load(path) if path.exists() else None


def chain_predictions(project_dir: str | Path, record: TrialRecord | None, epochs: int) -> Any:
    """The predictions behind a chain's score at `epochs`: its best epoch up to then, or None.

    A configuration's score at a rung is the best of its epochs so far
    (`plan_search`), so its paired comparisons use that epoch's predictions.
    """
    if record is None or not record.scores or epochs < 1:
        return None
    scores = list(record.scores[:epochs])
    best = scores.index(max(scores)) + 1
    return trial_predictions(Path(project_dir) / f"trial_{record.trial_id}", best)


def _float(value: Any) -> float | None:
    # KerasTuner hands back numpy floats; reports and JSON want plain ones.
    return None if value is None else float(value)


def record_from_trial(trial: Any, objective: str) -> TrialRecord:
    """A `TrialRecord` from a `keras_tuner` Trial (hyperparameters and reported metrics)."""
    values = trial.hyperparameters.values

    def metric(name: str) -> float | None:
        return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None

    trained = int(metric("epochs_trained") or 0)
    scores = [_float(metric(f"{objective}_epoch_{k}")) for k in range(1, trained + 1)]
    initial = int(values.get("tuner/initial_epoch", 0))
    seconds = {k: _float(metric(f"epoch_{k}_seconds")) for k in range(initial + 1, trained + 1)}
    return TrialRecord(
        trial_id=trial.trial_id,
        backbone=str(values.get("backbone")),
        learning_rate=float(values.get("learning_rate", 0.0)),
        status=str(trial.status),
        target_epochs=int(values.get("tuner/epochs", 0)),
        initial_epoch=initial,
        parent_id=values.get("tuner/trial_id"),
        weights_id=str(values.get("selection/weights_id", "")),
        phase=str(values.get("selection/phase", HALVING)),
        epochs_trained=trained,
        stopped_early=bool(metric("stopped_early")),
        scores=tuple(s for s in scores if s is not None) if None not in scores else (),
        epoch_seconds={k: v for k, v in seconds.items() if v is not None},
        message=trial.message,
        # A trial made before the adaptation was a hyperparameter trained every weight.
        adaptation=str(values.get("adaptation", FULL)),
        peak_train_rss_mb=_float(metric("peak_train_rss_mb")),
        trainable_params=(None if metric("trainable_params") is None
                          else int(metric("trainable_params"))),
        setup_seconds=float(metric("setup_seconds") or 0.0),
    )


@functools.cache
def tuner_classes() -> types.SimpleNamespace:
    """Defines the KerasTuner subclasses (importing KerasTuner imports TensorFlow)."""
    import keras
    import keras_tuner

    class SuccessiveHalvingOracle(keras_tuner.Oracle):
        """Successive halving where every candidate gets the first rung (see `plan_search`).

        The search space is `backbone` and `adaptation` (`Choice`s; together
        the configuration, the main choice: `candidates` are their
        `config_key`s) and `learning_rate` (a `Choice`, secondary). Trials
        carry Hyperband's `tuner/epochs`, `tuner/initial_epoch`,
        `tuner/trial_id` (the trial to continue) and `tuner/round` (the
        rung), plus `selection/phase` and `selection/weights_id`. Which trial
        comes next is `plan_search` over the finished trials, recomputed on
        every request; the saved state only keeps KerasTuner's own
        bookkeeping. An `on_trial_end(record)` hook reports finished trials
        (the chief sees every worker's trials there).

        Args:
            objective: str. Validation metric to maximise, e.g. `val_accuracy`.
            candidates: list of str. Configuration keys (`config_key`: a bare
                backbone is its `full` one; rung 0 runs them in this order).
            learning_rates: list of float, or dict configuration -> list of
                float (the first is its first try; see `plan_search`).
            rungs: list of int. Cumulative epochs per rung.
            reduction_factor: int. Defaults to 2.
            budget_epochs: int. 0: no limit.
            budget_seconds: float. 0: no limit.
            brute_force: bool. Complete every configuration afterwards.
            weights_ids: dict or None. Backbone -> weights fingerprint.
            eligible: list of str or None. Configurations that meet the hard
                constraints (the others get the first rung only); None: all.
            lr_race_rungs: int. Rungs after the learning-rate check that every
                learning rate of a promoted configuration continues (`plan_search`).
            max_train_minutes: float or None. Training limits (`plan_search`).
            max_train_memory_mb: float or None.
            seed: int or None.

        Example:

        ```python
        oracle = SuccessiveHalvingOracle("val_accuracy", ["a", "a|head"], [1e-4], rungs=[1, 2])
        ```
        """

        def __init__(self, objective: str, candidates: Sequence[str],
                     learning_rates: Sequence[float] | Mapping[str, Sequence[float]],
                     rungs: Sequence[int], *, reduction_factor: int = 2,
                     budget_epochs: int = 0, budget_seconds: float = 0.0,
                     brute_force: bool = False, weights_ids: Mapping[str, str] | None = None,
                     eligible: Sequence[str] | None = None, lr_race_rungs: int = 1,
                     max_train_minutes: float | None = None,
                     max_train_memory_mb: float | None = None, seed: int | None = None):
            lrs_of = learning_rates_by_backbone(candidates, learning_rates)
            parts = [split_key(c) for c in candidates]
            space = keras_tuner.HyperParameters()
            space.Choice("backbone", list(dict.fromkeys(b for b, _ in parts)))
            space.Choice("adaptation", list(dict.fromkeys(a for _, a in parts)))
            space.Choice("learning_rate",
                         sorted({lr for lrs in lrs_of.values() for lr in lrs}, reverse=True))
            super().__init__(
                objective=keras_tuner.Objective(objective, "max"),
                hyperparameters=space,
                allow_new_entries=False,
                tune_new_entries=False,
                seed=seed,
                # A failed candidate is reported; it must not end the search.
                max_consecutive_failed_trials=10**9,
            )
            self._space = space
            self.candidates = list(candidates)
            self.learning_rates = lrs_of
            self.eligible = None if eligible is None else list(eligible)
            self.rungs = list(rungs)
            self.reduction_factor = reduction_factor
            self.budget_epochs = budget_epochs
            self.budget_seconds = budget_seconds
            self.brute_force = brute_force
            self.weights_ids = dict(weights_ids or {})
            self.lr_race_rungs = lr_race_rungs
            self.max_train_minutes = max_train_minutes
            self.max_train_memory_mb = max_train_memory_mb
            self.on_trial_end: Callable[[TrialRecord], None] | None = None
            self.on_trial_start: Callable[[WorkItem, str], None] | None = None

        def records(self) -> list[TrialRecord]:
            return [record_from_trial(t, self.objective.name) for t in self.trials.values()]

        def plan(self) -> SearchPlan:
            return plan_search(
                self.records(), self.candidates, self.learning_rates, self.rungs,
                reduction_factor=self.reduction_factor, budget_epochs=self.budget_epochs,
                budget_seconds=self.budget_seconds, brute_force=self.brute_force,
                weights_ids=self.weights_ids, eligible=self.eligible,
                lr_race_rungs=self.lr_race_rungs, max_train_minutes=self.max_train_minutes,
                max_train_memory_mb=self.max_train_memory_mb,
            )

        def populate_space(self, trial_id: str) -> dict[str, Any]:
            plan = self.plan()
            if plan.todo:
                item = plan.todo[0]
                values: dict[str, Any] = {
                    "backbone": item.backbone,
                    "adaptation": item.adaptation,
                    "learning_rate": item.learning_rate,
                    "tuner/epochs": item.target_epochs,
                    "tuner/initial_epoch": item.initial_epoch,
                    "tuner/round": item.rung,
                    "selection/phase": item.phase,
                    "selection/weights_id": self.weights_ids.get(item.backbone, ""),
                }
                if item.base is not None:
                    values["tuner/trial_id"] = item.base.trial_id
                if self.on_trial_start is not None:
                    self.on_trial_start(item, trial_id)
                return {"status": "RUNNING", "values": values}
            if plan.running:
                return {"status": "IDLE"}
            return {"status": "STOPPED"}

        @keras_tuner.synchronized
        def end_trial(self, trial: Any) -> None:
            super().end_trial(trial)
            if self.on_trial_end is not None:
                self.on_trial_end(record_from_trial(self.trials[trial.trial_id],
                                                     self.objective.name))

        def set_state(self, state: dict[str, Any]) -> None:
            super().set_state(state)
            # The space is this run's configurations and learning rates, not the saved run's.
            self.hyperparameters = self._space.copy()

        def reload(self) -> None:
            super().reload()
            # A trial left RUNNING by a killed run resumes from its backup.
            for trial in self.trials.values():
                if trial.status == "RUNNING" and trial.trial_id not in self._retry_queue:
                    self._retry_queue.append(trial.trial_id)

    class SelectionTuner(keras_tuner.Tuner):
        """Runs trials for `SuccessiveHalvingOracle` with `fit_resumable`.

        `run_trial` builds the candidate's classifier through its modality's
        task, restores the parent trial's backup when the trial continues one,
        trains to `tuner/epochs` with the epoch-seeded data order, and returns
        the best validation metric plus per-epoch scores and times (the
        oracle plans from those).

        Args:
            oracle: SuccessiveHalvingOracle.
            trainer: `_TrialTrainer`. Knows the data and training settings.
            **kwargs: `directory`, `project_name`, `overwrite` (KerasTuner's).
        """

        def __init__(self, oracle: Any, trainer: Any, **kwargs: Any):
            super().__init__(oracle=oracle, hypermodel=None, **kwargs)
            oracle_file = Path(self.project_dir) / "oracle.json"
            if (not kwargs.get("overwrite") and not self._is_worker() and not oracle.trials
                    and oracle_file.exists()):
                # KerasTuner reloads only when this tuner id saved state (tuner0.json,
                # chief.json); a project started under another id would be overwritten.
                oracle.reload()
            self.trainer = trainer
            self.trials_run = 0
            self._asked_without_trial = False

        def pre_create_trial(self) -> None:
            # Two requests without a trial in between: the oracle said IDLE
            # (waiting for a rung to finish); do not hammer it.
            if self._asked_without_trial:
                time.sleep(1.0)
            self._asked_without_trial = True

        def on_trial_begin(self, trial: Any) -> None:
            self._asked_without_trial = False
            super().on_trial_begin(trial)

        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            values = trial.hyperparameters.values
            parent = values.get("tuner/trial_id")
            parent_dir = Path(self.get_trial_dir(parent)) if parent else None
            metrics = self.trainer.fit_trial(values, Path(self.get_trial_dir(trial.trial_id)),
                                             parent_dir, self.tuner_id)
            self.trials_run += 1
            return metrics

    class _EpochRecorder(keras.callbacks.Callback):
        """Times each epoch, records the monitored metric, stops on patience.

        Patience counts over the whole chain (the parent's epochs included),
        which Keras' EarlyStopping cannot: it restarts at every `fit`.
        """

        def __init__(self, history: TrialHistory, monitor: str, patience: int, tuner_id: str):
            super().__init__()
            self.history, self.monitor, self.patience = history, monitor, patience
            self.tuner_id = tuner_id
            self._start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            if self.monitor not in logs:
                raise InputError(
                    "The monitored metric is not in the training logs.",
                    received={"metric": self.monitor, "logs": sorted(logs)},
                )
            self.history.add(epoch + 1, float(logs[self.monitor]),
                             time.perf_counter() - self._start, self.tuner_id)
            scores = self.history.scores()
            from tfhub_finetune.training import monitor_mode

            best = (max if monitor_mode(self.monitor) == "max" else min)(scores)
            since_best = len(scores) - 1 - scores.index(best)
            if self.patience and since_best >= self.patience:
                self.history.stopped_at = epoch + 1
                self.model.stop_training = True
            self.history.save()

    class EvalPredictionsRecorder(keras.callbacks.Callback):
        """Saves each epoch's per-example eval predictions, so trials compare on the same examples.

        Writes `<trial_dir>/eval_predictions/epoch_<k>.npz` (`trial_predictions`
        reads it). When the monitored metric is not in the logs (fit ran
        without `validation_data`), it puts the metrics it computed there, so
        this one prediction pass is the validation.

        Args:
            dataset: tf.data.Dataset. The eval split, in file order.
            targets: array. The eval targets in the same order.
            kind: str. `classification`, `regression` or `multi_label`.
            trial_dir: Path. The trial's directory.
        """

        def __init__(self, dataset: Any, targets: Any, kind: str, trial_dir: Path):
            super().__init__()
            self.dataset, self.targets, self.kind = dataset, targets, kind
            self.directory = Path(trial_dir) / TRIAL_PREDICTIONS

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            from tfhub_finetune import stats

            outputs = self.model.predict(self.dataset, verbose=0)
            preds = stats.EvalPredictions.from_outputs(self.kind, self.targets, outputs)
            preds.save(self.directory / f"epoch_{epoch + 1}.npz")
            if logs is not None:
                for name, value in stats.metric_values(preds).items():
                    logs.setdefault(f"val_{name}", value)

    for cls in (SuccessiveHalvingOracle, SelectionTuner, _EpochRecorder, EvalPredictionsRecorder):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return types.SimpleNamespace(
        SuccessiveHalvingOracle=SuccessiveHalvingOracle,
        SelectionTuner=SelectionTuner,
        EpochRecorder=_EpochRecorder,
        EvalPredictionsRecorder=EvalPredictionsRecorder,
    )


def __getattr__(name: str) -> Any:
    # PEP 562: the KerasTuner subclasses are built on first access.
    if name in ("SuccessiveHalvingOracle", "SelectionTuner"):
        return getattr(tuner_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrialHistory:
    """A trial chain's per-epoch record in `<trial_dir>/epochs.json`, written atomically.

    Keyed by epoch number, so an epoch redone after a resume replaces its
    entry instead of adding one.
    """

    def __init__(self, path: Path):
        self.path = path
        self.epochs: dict[int, dict[str, Any]] = {}
        self.stopped_at: int | None = None
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.epochs = {int(k): v for k, v in data["epochs"].items()}
            self.stopped_at = data.get("stopped_at")

    def add(self, epoch: int, score: float, seconds: float, tuner_id: str) -> None:
        self.epochs[epoch] = {"score": score, "seconds": round(seconds, 3), "tuner_id": tuner_id}
        # Later epochs belong to an abandoned future (e.g. after a resume).
        self.epochs = {k: v for k, v in self.epochs.items() if k <= epoch}

    def scores(self) -> list[float]:
        return [self.epochs[k]["score"] for k in sorted(self.epochs)]

    def save(self) -> None:
        data = {"epochs": {str(k): v for k, v in sorted(self.epochs.items())},
                "stopped_at": self.stopped_at}
        atomic_write_text(self.path, json.dumps(data, indent=2))
