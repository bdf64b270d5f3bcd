"""Successive halving over configurations (backbone x adaptation), planned from finished trials alone.

`plan_search(records, ...)` is a pure function: given the trials a KerasTuner
project holds (as `TrialRecord`s), it says which rung each (configuration,
learning rate) has reached, who was promoted, and which trials to start next.
A configuration is a backbone and how much of it trains (`full`, `head`,
`top:K`, `lora:R`), named by one string, `config_key(backbone, adaptation)`:
a `full` configuration's key is the bare backbone, so trials of a search made
before adaptations were a choice are the `full` configurations' trials. The
oracle in `tuner.py` calls it on every request, so a rerun, a wider budget or
another candidate list reuses whatever finished trials fit, and nothing here
imports TensorFlow.

Example:

```python
plan = plan_search([], ["a", "b", "c|head"], [1e-4], rung_epochs(1, 4, 2))
[(w.config, w.target_epochs) for w in plan.todo]  # [('a', 1), ('b', 1), ('c|head', 1)]
```
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

# Phases of a trial: the search itself, or completing every configuration
# to `max_epochs` for the brute-force comparison.
HALVING, BRUTE_FORCE = "halving", "brute_force"
# Between a configuration key's backbone and adaptation (not in catalog names, paths or handles).
_KEY_SEPARATOR = "|"
FULL = "full"


def config_key(backbone: str, adaptation: str = FULL) -> str:
    """The one string naming a (backbone, adaptation) configuration in the search.

    `full` is the bare backbone: the key every trial had before the adaptation
    was a choice, so such a cache is reused for `full` (and never for another).

    Example:

    ```python
    config_key("minilm_l6_h384")            # 'minilm_l6_h384'
    config_key("minilm_l6_h384", "lora:8")  # 'minilm_l6_h384|lora:8'
    ```
    """
    adaptation = str(adaptation or FULL)
    return backbone if adaptation == FULL else f"{backbone}{_KEY_SEPARATOR}{adaptation}"


def split_key(key: str) -> tuple[str, str]:
    """(backbone, adaptation) of a `config_key`.

    Example:

    ```python
    split_key("minilm_l6_h384|lora:8")  # ('minilm_l6_h384', 'lora:8')
    split_key("minilm_l6_h384")         # ('minilm_l6_h384', 'full')
    ```
    """
    backbone, sep, adaptation = key.rpartition(_KEY_SEPARATOR)
    return (backbone, adaptation) if sep else (key, FULL)


def lr_key(lr: float) -> float:
    """A learning rate rounded to 6 significant digits, for comparisons.

    Learning rates come back through JSON and gRPC, so `1e-4` may return as
    `0.00010000000000000002`.
    """
    return float(f"{float(lr):.6g}")


def last_line(message: str | None) -> str:
    """The last non-empty line of a (traceback) message, at most 300 characters."""
    lines = [ln.strip() for ln in (message or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def rung_epochs(min_epochs: int, max_epochs: int, reduction_factor: int) -> list[int]:
    """Cumulative epochs at each rung: `min_epochs` times the factor, capped at `max_epochs`.

    Example:

    ```python
    rung_epochs(1, 4, 2)  # [1, 2, 4]
    rung_epochs(1, 3, 2)  # [1, 2, 3]
    ```
    """
    rungs = [min_epochs]
    while rungs[-1] < max_epochs:
        rungs.append(min(rungs[-1] * reduction_factor, max_epochs))
    return rungs


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """What the planner needs to know about one KerasTuner trial.

    Attributes:
        trial_id: str.
        backbone: str. The `backbone` hyperparameter.
        learning_rate: float. The `learning_rate` hyperparameter.
        adaptation: str. The `adaptation` hyperparameter (`full` for a
            trial made before it was one).
        status: str. KerasTuner's `TrialStatus` (`COMPLETED`, `RUNNING`, ...).
        target_epochs: int. `tuner/epochs`: the chain's epochs when done.
        initial_epoch: int. `tuner/initial_epoch`: epochs inherited.
        parent_id: str or None. `tuner/trial_id`: the trial it continues.
        weights_id: str. Fingerprint of the weights the backbone name meant.
        phase: str. `halving` or `brute_force`.
        epochs_trained: int. Epochs the chain had when the trial ended
            (below `target_epochs` when it stopped early).
        stopped_early: bool.
        scores: tuple of float. Validation metric after each chain epoch.
        epoch_seconds: dict. Epoch number -> measured seconds, for the
            epochs this trial trained (training plus evaluation).
        message: str or None. Why it failed.
        peak_train_rss_mb: float or None. The trial's peak training RSS.
        trainable_params: int or None. Weights the trial trained.
        setup_seconds: float. One-off seconds outside its epochs (a `head`
            trial's feature pass), counted once in the projected time.
    """

    trial_id: str
    backbone: str
    learning_rate: float
    status: str
    target_epochs: int
    initial_epoch: int = 0
    parent_id: str | None = None
    weights_id: str = ""
    phase: str = HALVING
    epochs_trained: int = 0
    stopped_early: bool = False
    scores: tuple[float, ...] = ()
    epoch_seconds: Mapping[int, float] = dataclasses.field(default_factory=dict)
    message: str | None = None
    adaptation: str = FULL
    peak_train_rss_mb: float | None = None
    trainable_params: int | None = None
    setup_seconds: float = 0.0

    @property
    def config(self) -> str:
        """The configuration's key (`config_key`)."""
        return config_key(self.backbone, self.adaptation)


class _KeyParts:
    """`backbone` and `adaptation` of an object whose `config` is a `config_key`."""

    config: str

    @property
    def backbone(self) -> str:
        return split_key(self.config)[0]

    @property
    def adaptation(self) -> str:
        return split_key(self.config)[1]


@dataclasses.dataclass(frozen=True)
class WorkItem(_KeyParts):
    """A trial the oracle should hand out next."""

    config: str
    learning_rate: float
    target_epochs: int
    rung: int
    phase: str
    base: TrialRecord | None = None

    @property
    def initial_epoch(self) -> int:
        return self.base.epochs_trained if self.base else 0


@dataclasses.dataclass
class ConfigState(_KeyParts):
    """Where one (configuration, learning rate) stands at a number of epochs.

    Attributes:
        status: str. `done`, `running`, `todo`, `failed` or `skipped` (the
            budget ran out before it).
        score: float or None. Best validation metric up to `epochs`.
        epochs: int. Epochs reached (fewer than asked after an early stop).
        record: TrialRecord or None. The longest finished trial of the chain.
        message: str or None. Why it failed.
    """

    config: str
    learning_rate: float
    status: str
    score: float | None = None
    epochs: int = 0
    record: TrialRecord | None = None
    message: str | None = None


@dataclasses.dataclass
class RungSummary:
    """One rung of the search: who entered, their scores, who went on."""

    rung: int
    epochs: int
    entries: list[ConfigState]
    promoted: list[str]
    complete: bool


@dataclasses.dataclass
class SearchPlan:
    """The search's state, derived from the trials alone (see `plan_search`).

    Attributes:
        todo: list of WorkItem. Trials to start now, in order.
        running: int. Trials started and not finished.
        rungs: list of RungSummary.
        halving_complete: bool. The successive-halving part has finished.
        budget_stop: str or None. Why the search stopped early, if it did.
        planned_epochs: int. Epochs the halving plan spends (cached ones included).
        brute_force: list of ConfigState. Every configuration at
            `max_epochs` (only when brute force is on).
        epoch_seconds: dict. (configuration, learning rate) -> epoch ->
            measured seconds, over every trial of that chain.
        training: dict. Configuration -> its training-cost figures, once its
            first rung has trained: `train_minutes_projected` (the first
            rung's seconds per epoch times the last rung's epochs, plus any
            one-off setup such as a head's feature pass) and
            `peak_train_rss_mb` (the highest of its trials).
        training_breaks: dict. Configuration -> {constraint: figure} for the
            training limits it breaks (`max_train_minutes`,
            `max_train_memory_mb`): such a configuration is not promoted.
    """

    todo: list[WorkItem]
    running: int
    rungs: list[RungSummary]
    halving_complete: bool
    budget_stop: str | None
    planned_epochs: int
    brute_force: list[ConfigState]
    epoch_seconds: dict[tuple[str, float], dict[int, float]] = dataclasses.field(
        default_factory=dict
    )
    training: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    training_breaks: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def seconds(self, config: str, learning_rate: float) -> dict[int, float]:
        """Epoch -> measured seconds of one configuration (empty if never trained)."""
        return self.epoch_seconds.get((config, lr_key(learning_rate)), {})

    @property
    def finished(self) -> bool:
        return not self.todo and not self.running

    def halving_result(self, config: str) -> ConfigState | None:
        """The configuration's best learning rate at the deepest rung it reached."""
        for rung in reversed(self.rungs):
            done = [s for s in rung.entries if s.config == config and s.status == "done"]
            if done:
                return max(done, key=lambda s: s.score)
        failed = [s for r in self.rungs for s in r.entries
                  if s.config == config and s.status == "failed"]
        return failed[0] if failed else None

    def brute_force_result(self, config: str) -> ConfigState | None:
        done = [s for s in self.brute_force if s.config == config and s.status == "done"]
        return max(done, key=lambda s: s.score) if done else None


def plan_search(
    records: Sequence[TrialRecord],
    candidates: Sequence[str],
    learning_rates: Sequence[float] | Mapping[str, Sequence[float]],
    rungs: Sequence[int],
    *,
    reduction_factor: int = 2,
    budget_epochs: int = 0,
    budget_seconds: float = 0.0,
    brute_force: bool = False,
    weights_ids: Mapping[str, str] | None = None,
    eligible: Collection[str] | None = None,
    lr_race_rungs: int = 1,
    max_train_minutes: float | None = None,
    max_train_memory_mb: float | None = None,
) -> SearchPlan:
    """Derives the successive-halving search's state and next trials from finished trials.

    The configuration (a backbone and its adaptation, one `config_key`) is
    the main choice and the learning rate a secondary one:

    1. Rung 0 trains every configuration at its first learning rate.
    2. The best `ceil(n / reduction_factor)` of the `n` eligible
       configurations (ranked on that rung) also try their other learning
       rates for the same epochs, the "learning-rate check".
    3. At each later rung the best `ceil(n / reduction_factor)`
       configurations (each scored by its best learning rate) continue from
       their checkpoints to the next rung's epochs: for `lr_race_rungs` rungs
       after the check with every learning rate that trained, then with the
       best one alone. A lower learning rate starts slower, so deciding it
       on the check's one-epoch scores would drop the rate that ends best.

    A configuration outside `eligible` (one whose backbone breaks a hard
    constraint such as latency or size, known from profiling before any
    training) cannot be recommended, so it gets rung 0 only: enough to place
    it in the report and on the Pareto plot, none of the budget the choice
    needs. When no configuration is eligible, all compete (the report then
    says which constraint to relax, on fully trained figures). The training
    limits (`max_train_minutes`: the first rung's measured seconds per epoch
    projected to the last rung's epochs; `max_train_memory_mb`: the peak
    training RSS its trials recorded) are known once a configuration has
    trained its first rung: one that breaks them is ranked like a failed
    one, never promoted (`SearchPlan.training_breaks` says why).

    A configuration is promoted as soon as enough of its rung has finished
    to guarantee it a place (more finished than will be dropped; KerasTuner
    Hyperband's rule), so parallel workers need not wait for the slowest. A
    trial that stopped early keeps its final score at every later rung
    without training. A rung after the first runs whole or not at all: only
    if its planned cost (epochs, or epochs times each configuration's seconds
    per epoch measured on the first rung) fits in what the budget has left;
    the first rung (with its learning-rate checks) always runs. With
    `brute_force`, once the search is done, every configuration at each of
    its learning rates is trained to the last rung.

    Being a function of the trials (not of saved oracle state) is what lets a
    rerun, a wider budget or another candidate list reuse finished trials.

    Args:
        records: TrialRecords of the project's trials.
        candidates: list of str. Configuration keys (`config_key`; a bare
            backbone is its `full` configuration), in the order rung 0 runs them.
        learning_rates: list of float (the same for every configuration), or
            dict configuration -> list of float. The first is its first try.
        rungs: list of int. Cumulative epochs per rung (`rung_epochs`).
        reduction_factor: int. Defaults to 2.
        budget_epochs: int. 0 means no limit.
        budget_seconds: float. 0 means no limit.
        brute_force: bool. Defaults to `False`.
        weights_ids: dict or None. Backbone -> weights fingerprint; trials
            made with other weights are ignored.
        eligible: collection of str or None. Configurations that may be
            chosen; None means all.
        lr_race_rungs: int. Rungs after the learning-rate check through which
            a promoted configuration's learning rates all continue before the
            best is kept: 0 decides at the check's epochs, a number at least
            `len(rungs)` at the last rung. Defaults to 1.
        max_train_minutes: float or None. Most projected minutes of a full
            fine-tuning (`rungs[-1]` epochs at one learning rate).
        max_train_memory_mb: float or None. Most peak training RSS.

    Returns:
        A `SearchPlan`.

    Example:

    ```python
    plan = plan_search([], ["a", "b", "c"], [1e-4, 3e-5], [1, 2])
    [(w.config, w.learning_rate) for w in plan.todo]
    # [('a', 0.0001), ('b', 0.0001), ('c', 0.0001)]: the 3e-5 checks wait for the ranking
    ```
    """
    weights_ids = weights_ids or {}
    lrs_of = learning_rates_by_backbone(candidates, learning_rates)
    competing = [c for c in candidates if eligible is None or c in eligible] or list(candidates)
    keys_of = {c: {lr_key(lr) for lr in lrs} for c, lrs in lrs_of.items()}
    chains: dict[tuple[str, float], list[TrialRecord]] = defaultdict(list)
    for rec in records:
        key = (rec.config, lr_key(rec.learning_rate))
        if (key[1] in keys_of.get(rec.config, ())
                and rec.weights_id == weights_ids.get(rec.backbone, rec.weights_id)):
            chains[key].append(rec)

    epoch_seconds: dict[tuple[str, float], dict[int, float]] = {}
    for key, chain in chains.items():
        for rec in sorted(chain, key=lambda r: r.trial_id):
            epoch_seconds.setdefault(key, {}).update(rec.epoch_seconds)

    def state(config: str, lr: float, epochs: int) -> ConfigState:
        chain = chains[(config, lr_key(lr))]
        completed = [r for r in chain if r.status == "COMPLETED" and r.scores]
        # A continuation that ended where its parent did (early stopping fired
        # at once) ties on epochs with the parent; it is the one that ends the chain.
        longest = max(completed, key=lambda r: (r.epochs_trained, r.stopped_early), default=None)
        if longest and (longest.epochs_trained >= epochs or longest.stopped_early):
            reached = min(epochs, longest.epochs_trained)
            return ConfigState(config, lr, "done", max(longest.scores[:reached]), reached, longest)
        if any(r.status in ("RUNNING", "INVALID", "IDLE") for r in chain):
            return ConfigState(config, lr, "running", record=longest)
        have = longest.epochs_trained if longest else 0
        failed = [r for r in chain if r.status == "FAILED" and r.target_epochs > have]
        if failed:
            return ConfigState(config, lr, "failed", record=longest,
                               message=last_line(failed[0].message))
        return ConfigState(config, lr, "todo", epochs=have, record=longest)

    # Seconds per epoch from the first rung only: fixed once it is done, so a
    # budget decision made then is the same in every later rerun.
    per_epoch = {
        key: statistics.median(v for k, v in seconds.items() if k <= rungs[0])
        for key, seconds in epoch_seconds.items() if any(k <= rungs[0] for k in seconds)
    }
    # A configuration's training cost is its first-tried rate's first rung (every
    # configuration runs that rate first), so the projection does not move when the other
    # rates are raced: the search and brute force project the same minutes.
    per_config: dict[str, float] = {}
    for config, lrs in lrs_of.items():
        tried = [per_epoch[(config, lr_key(lr))] for lr in lrs if (config, lr_key(lr)) in per_epoch]
        if tried:
            per_config[config] = tried[0]
    slowest = max(per_epoch.values(), default=0.0)
    training, training_breaks = _training_figures(
        chains, per_config, rungs[-1], max_train_minutes, max_train_memory_mb)

    def first_rung_seconds(config: str, lr: float) -> float:
        # A learning rate not tried yet costs what the configuration's others did.
        return per_epoch.get((config, lr_key(lr)), per_config.get(config, slowest))

    todo: list[WorkItem] = []
    running = 0
    summaries: list[RungSummary] = []
    budget_stop: str | None = None
    spent_epochs, spent_seconds = 0, 0.0
    halving_complete = True
    entering, size = list(candidates), len(competing)
    live: dict[str, list[float]] = {}  # Configuration -> the learning rates it still trains.
    order = {c: i for i, c in enumerate(candidates)}

    def enter(config: str, lr: float, epochs: int, previous: int, r: int) -> ConfigState:
        nonlocal running, halving_complete, spent_epochs, spent_seconds
        st = state(config, lr, epochs)
        if st.status == "todo":
            todo.append(WorkItem(config, lr, epochs, r, HALVING, st.record))
        if st.status in ("todo", "running"):
            halving_complete = False
            running += st.status == "running"
        if st.status in ("done", "todo", "running"):
            # Planned cost; an early stop only ever makes it smaller.
            trained = max((st.epochs if st.status == "done" else epochs) - previous, 0)
            spent_epochs += trained
            spent_seconds += trained * first_rung_seconds(config, lr)
        return st

    for r, epochs in enumerate(rungs):
        previous = rungs[r - 1] if r else 0
        step = epochs - previous
        configs = ([(c, lrs_of[c][0]) for c in entering] if r == 0
                   else [(c, lr) for c in entering for lr in live[c]])
        if r > 0 and (budget_epochs or budget_seconds):
            # A rung runs whole or not at all (the first rung always runs).
            # Slots not yet promoted are costed at the slowest configuration,
            # with as many learning rates as a promoted configuration brings.
            open_slots = (size - len(entering)) * max(len(live[c]) for c in entering)
            rung_seconds = step * (sum(first_rung_seconds(c, lr) for c, lr in configs)
                                   + open_slots * slowest)
            needed = (len(configs) + open_slots) * step
            over_epochs = budget_epochs and spent_epochs + needed > budget_epochs
            over_seconds = budget_seconds and spent_seconds + rung_seconds > budget_seconds
            if over_epochs or over_seconds:
                limit = f"{budget_epochs} epochs" if over_epochs else f"{budget_seconds / 60:.1f} min"
                budget_stop = (f"the budget ({limit}) ran out before rung {r + 1} ({epochs} "
                               f"epochs): {spent_epochs} epochs spent, {needed} more needed")
                entries = [ConfigState(c, lr, "skipped") for c, lr in configs]
                summaries.append(RungSummary(r, epochs, entries, [], False))
                break
        entries = [enter(c, lr, epochs, previous, r) for c, lr in configs]
        last = r == len(rungs) - 1
        keep = math.ceil(size / reduction_factor)
        by_config: dict[str, list[ConfigState]] = defaultdict(list)
        for st in entries:
            by_config[st.config].append(st)
        racing = [c for c in entering if c in competing]
        finished = [c for c in racing
                    if all(s.status in ("done", "failed") for s in by_config[c])]
        # Over a training limit: finished, but ranked like a failed configuration.
        scored = {c: None if c in training_breaks else max(
            (s.score for s in by_config[c] if s.status == "done"), default=None)
            for c in finished}
        ranked = sorted((c for c in finished if scored[c] is not None),
                        key=lambda c: (-scored[c], order[c]))
        complete = len(racing) == size and len(finished) == size
        # Promotable once at most `keep` can end above it: more finished than dropped.
        # A time budget is decided on complete rungs only (their times are all known).
        sure = max(0, len(finished) - (size - keep))
        if budget_seconds and not complete:
            sure = 0
        leaders = ranked[: min(sure, keep)]
        if r == 0:
            # The learning-rate check: the leaders also try their other rates.
            ready = []
            for c in leaders:
                checks = [enter(c, lr, epochs, previous, r) for lr in lrs_of[c][1:]]
                entries.extend(checks)
                by_config[c].extend(checks)
                if all(s.status in ("done", "failed") for s in checks):
                    ready.append(c)
            complete = complete and len(ready) == len(leaders)
        else:
            ready = leaders
        promoted = [] if last else ready
        for c in ready:
            done = [s for s in by_config[c] if s.status == "done"]
            # Until the race is over every learning rate that trained goes on.
            live[c] = ([max(done, key=lambda s: s.score).learning_rate] if r >= lr_race_rungs
                       else [s.learning_rate for s in done])
        summaries.append(RungSummary(r, epochs, entries, promoted, complete))
        if last or not promoted:
            break
        entering = promoted
        size = min(keep, len(ranked)) if complete else keep

    brute: list[ConfigState] = []
    if brute_force:
        for config in candidates:
            for lr in lrs_of[config]:
                st = state(config, lr, rungs[-1])
                if st.status == "todo" and halving_complete:
                    todo.append(WorkItem(config, lr, rungs[-1], len(rungs) - 1, BRUTE_FORCE,
                                         st.record))
                running += st.status == "running" and halving_complete
                brute.append(st)
    return SearchPlan(todo, running, summaries, halving_complete, budget_stop, spent_epochs, brute,
                      epoch_seconds, training, training_breaks)


def _training_figures(
    chains: Mapping[tuple[str, float], Sequence[TrialRecord]], per_config: Mapping[str, float],
    max_epochs: int, max_minutes: float | None, max_memory_mb: float | None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Configuration -> its training-cost figures, and -> the training limits it breaks."""
    peaks: dict[str, float] = {}
    setup: dict[str, float] = defaultdict(float)
    for (config, _), chain in chains.items():
        for rec in chain:
            if rec.status == "COMPLETED" and rec.peak_train_rss_mb is not None:
                peaks[config] = max(peaks.get(config, 0.0), float(rec.peak_train_rss_mb))
            setup[config] = max(setup[config], float(rec.setup_seconds or 0.0))
    figures: dict[str, dict[str, float]] = defaultdict(dict)
    for config, seconds in per_config.items():
        figures[config]["train_minutes_projected"] = round(
            (setup[config] + seconds * max_epochs) / 60.0, 3)
    for config, peak in peaks.items():
        figures[config]["peak_train_rss_mb"] = round(peak, 1)
    limits = {"max_train_minutes": ("train_minutes_projected", max_minutes),
              "max_train_memory_mb": ("peak_train_rss_mb", max_memory_mb)}
    breaks: dict[str, dict[str, float]] = {}
    for config, values in figures.items():
        broken = {name: values[field] for name, (field, limit) in limits.items()
                  if limit is not None and field in values and values[field] > limit}
        if broken:
            breaks[config] = broken
    return dict(figures), breaks


def learning_rates_by_backbone(
    candidates: Sequence[str], learning_rates: Sequence[float] | Mapping[str, Sequence[float]]
) -> dict[str, list[float]]:
    """Configuration -> its learning rates (first = first try), from a list or a dict.

    Example:

    ```python
    learning_rates_by_backbone(["a", "b"], [1e-4, 3e-5])  # {'a': [1e-4, 3e-5], 'b': [...]}
    ```
    """
    if isinstance(learning_rates, Mapping):
        return {b: [float(lr) for lr in learning_rates[b]] for b in candidates}
    return {b: [float(lr) for lr in learning_rates] for b in candidates}
