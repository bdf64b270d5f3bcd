"""Does the search choose what brute force would, for how much less? (`make bench-selection`)

For each task one `pipelines.select_model --brute_force` run fine-tunes every
configuration (backbone x adaptation x learning rate) to `max_epochs` and records, per
epoch, the validation score, the epoch's seconds and (where the trials save
them) the per-example predictions. The search's trials are exact prefixes of
those chains (the learning rate is constant after warm-up and epoch k's batch
order depends only on the seed and k), so what the search does under any
constraint set and learning-rate rule is replayed from those curves by
`plan_search` itself, without training again. Each row compares, for one task
and constraint set:

- search min: profiling + transferability + the epochs the search trains, at
  their measured seconds;
- brute-force min: profiling + every epoch of every configuration;
- same choice: the search recommends brute force's pick, or one brute force's
  tie rule (paired test at `tie_alpha` on its full-epoch predictions) cannot
  tell from its best;
- regret: brute force's best feasible figure minus the full-epoch figure of
  the search's pick, in points.

One brute-force cache per task serves every constraint set and rule, so the
table costs one brute-force run per task (~30 min for SST-2, ~15 min for
hymenoptera on 2 quiet cores), and a rerun reuses it.

Usage:

```
python -m benchmarks.selection                 # SST-2 and hymenoptera, commits results/selection.json
python -m benchmarks.selection --quick         # three small encoders on 200 SST-2 sentences (~15 min)
python -m benchmarks.selection --work_dir=runs/bench_selection --tasks=sst2
```
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tfhub_finetune.paths import shared_dir  # noqa: E402
from tfhub_finetune.selection.config import Constraints, SearchConfig  # noqa: E402
from tfhub_finetune.selection.halving import (  # noqa: E402
    FULL,
    SearchPlan,
    TrialRecord,
    config_key,
    lr_key,
    plan_search,
    rung_epochs,
)
from tfhub_finetune.selection.recommend import (  # noqa: E402
    Candidate,
    is_fraction_metric,
    majority_class_metric,
    paired_tester,
    recommend,
    violations,
)
from tfhub_finetune.selection.tuner import TRIAL_HISTORY, trial_predictions  # noqa: E402

# Learning-rate rules replayed: settle at the check (the old rule), race one more rung
# (the default), race to the last rung.
RULES = {"settle at check": 0, "race 1 rung": 1, "race to the end": 99}


@dataclasses.dataclass
class Task:
    """One benchmark task: a select_model flag file, overrides, and constraint sets to replay."""

    name: str
    flags: list[str]
    constraint_sets: list[dict[str, float]]


def tasks(quick: bool, work_dir: Path) -> list[Task]:
    configs = REPO / "pipelines" / "configs"
    if quick:
        data = _tiny_sst2(work_dir / "data")
        flags = [
            "--candidates=scratch_text_encoder,minilm_l6_h384@layers=1,minilm_l6_h384@layers=2",
            f"--train_data={data['train']}", f"--eval_data={data['dev']}",
            "--label_names=negative,positive", "--sequence_length=32", "--batch_size=16",
            "--learning_rates=1e-3,3e-4", "--min_epochs=1", "--max_epochs=2",
            "--transfer_examples=200", "--profile_min_seconds=0.2", "--profile_batch_size=8",
        ]
        return [Task("sst2_tiny", flags, [{}, {"max_params": 8e6}])]
    shared = shared_dir()
    sst2 = [f"--flagfile={configs / 'select_sst2.flags'}",
            f"--train_data={shared / 'data/sst2/train.tsv'}",
            f"--eval_data={shared / 'data/sst2/dev.tsv'}"]
    hymenoptera = [f"--flagfile={configs / 'select_hymenoptera.flags'}",
                   f"--train_data={shared / 'data/hymenoptera/train'}",
                   f"--eval_data={shared / 'data/hymenoptera/val'}"]
    # The grid tasks search backbone x adaptation (each modality's default adaptations). They
    # share the backbone-only task's cache: its `full` trials are the grid's, continued, not redone.
    return [
        Task("sst2", sst2,
             [{"max_latency_ms": 15, "max_params": 18e6}, {}, {"max_latency_ms": 10}]),
        Task("hymenoptera", hymenoptera,
             [{"max_latency_ms": 22}, {"max_latency_ms": 30}, {}, {"max_params": 5e6}]),
        Task("sst2_grid", [*sst2, "--adaptations=full,lora:8,head",
                           f"--cache_dir={work_dir / 'sst2' / 'cache'}"],
             # The training limits are set where they bind: full fine-tuning of the larger
             # encoders projects to 5-13 min here, LoRA to 2.4-5.3, a head to about one.
             [{"max_latency_ms": 15, "max_params": 18e6}, {}, {"max_train_minutes": 4.5},
              {"max_latency_ms": 15, "max_train_minutes": 3}]),
        Task("hymenoptera_grid", [*hymenoptera, "--adaptations=full,top:2,head",
                                  f"--cache_dir={work_dir / 'hymenoptera' / 'cache'}"],
             [{"max_latency_ms": 30}, {}, {"max_train_minutes": 1.5},
              {"max_latency_ms": 30, "max_train_minutes": 1}]),
    ]


# === One brute-force run per task ===


def run_brute_force(task: Task, out: Path) -> dict[str, Any]:
    """Runs (or reuses) `select_model --brute_force` for the task; returns its results.json."""
    results = out / "results.json"
    if not results.exists():
        # The flag file's constraints do not matter: brute force trains every configuration.
        command = [sys.executable, "-m", "pipelines.select_model", *task.flags,
                   f"--output_dir={out}", "--brute_force", "--progress=false"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        print(f"[selection] {task.name}: brute force -> {out}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True)
        print(f"[selection] {task.name}: {(time.perf_counter() - started) / 60:.1f} min",
              flush=True)
    return json.loads(results.read_text(encoding="utf-8"))


@dataclasses.dataclass
class Chain:
    """One configuration's measured epochs, from its longest trial."""

    config: str  # `config_key(backbone, adaptation)`
    learning_rate: float
    scores: list[float]
    seconds: list[float]
    stopped_early: bool
    trial_dir: Path
    peak_train_rss_mb: float | None = None
    setup_seconds: float = 0.0


def _last_metric(meta: Mapping[str, Any], name: str) -> float | None:
    """A metric's last value in a KerasTuner trial.json, or None."""
    observations = meta.get("metrics", {}).get("metrics", {}).get(name, {}).get("observations")
    return float(observations[-1]["value"][0]) if observations else None


def load_chains(project: Path) -> dict[tuple[str, float], Chain]:
    """(configuration, learning rate) -> its longest completed chain in a KerasTuner project.

    A trial made before the adaptation was a hyperparameter has none: it trained `full`.
    """
    chains: dict[tuple[str, float], Chain] = {}
    for trial_dir in sorted(project.glob("trial_*")):
        meta_path, history_path = trial_dir / "trial.json", trial_dir / TRIAL_HISTORY
        if not (meta_path.exists() and history_path.exists()):
            continue
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("status") != "COMPLETED":
            continue
        values = meta["hyperparameters"]["values"]
        history = json.loads(history_path.read_text(encoding="utf-8"))
        epochs = {int(k): v for k, v in history["epochs"].items()}
        ordered = [epochs[k] for k in sorted(epochs)]
        key = (config_key(str(values["backbone"]), str(values.get("adaptation", FULL))),
               lr_key(values["learning_rate"]))
        chain = Chain(key[0], key[1], [e["score"] for e in ordered],
                      [e["seconds"] for e in ordered], history.get("stopped_at") is not None,
                      trial_dir, _last_metric(meta, "peak_train_rss_mb"),
                      _last_metric(meta, "setup_seconds") or 0.0)
        if key not in chains or len(chain.scores) > len(chains[key].scores):
            chains[key] = chain
    return chains


# === Replaying the search ===


def replay(chains: Mapping[tuple[str, float], Chain], candidates: Sequence[str],
           learning_rates: Mapping[str, Sequence[float]], rungs: Sequence[int],
           reduction_factor: int, eligible: Sequence[str] | None,
           lr_race_rungs: int, training: Mapping[str, float | None] | None = None,
           ) -> tuple[SearchPlan, float]:
    """The search's plan from the brute-force curves, and the seconds it would train.

    Args:
        candidates: configuration keys (`config_key`).
        training: `max_train_minutes` / `max_train_memory_mb` (`plan_search`).
    """
    records: list[TrialRecord] = []
    while True:
        plan = plan_search(records, candidates, learning_rates, rungs,
                           reduction_factor=reduction_factor, eligible=eligible,
                           lr_race_rungs=lr_race_rungs, **(training or {}))
        if not plan.todo:
            return plan, sum(v for r in records for v in r.epoch_seconds.values())
        for item in plan.todo:
            chain = chains.get((item.config, lr_key(item.learning_rate)))
            common = dict(trial_id=f"{len(records):04d}", backbone=item.backbone,
                          adaptation=item.adaptation, learning_rate=item.learning_rate,
                          target_epochs=item.target_epochs, initial_epoch=item.initial_epoch,
                          parent_id=item.base.trial_id if item.base else None)
            if chain is None:
                records.append(TrialRecord(**common, status="FAILED",
                                           message="not in the brute-force cache"))
                continue
            reached = min(item.target_epochs, len(chain.scores))
            records.append(TrialRecord(
                **common, status="COMPLETED", epochs_trained=reached,
                stopped_early=chain.stopped_early and reached < item.target_epochs,
                scores=tuple(chain.scores[:reached]),
                epoch_seconds={k: chain.seconds[k - 1]
                               for k in range(item.initial_epoch + 1, reached + 1)},
                peak_train_rss_mb=chain.peak_train_rss_mb,
                setup_seconds=chain.setup_seconds if item.initial_epoch == 0 else 0.0,
            ))


def _candidate(record: Mapping[str, Any], chain: Chain | None, epochs: int,
               training: Mapping[str, float]) -> Candidate:
    # The training figures are the replayed plan's (`plan_search` projects them), so the
    # search and brute force judge --max_train_minutes on the same minutes.
    figures = {**record.get("figures", {}), **training, "fine_tune_epochs": epochs}
    if chain is not None:
        figures["learning_rate"] = chain.learning_rate
        figures["seconds_per_epoch"] = sorted(chain.seconds)[len(chain.seconds) // 2]
    best = max(chain.scores[:epochs]) if chain else None
    return Candidate(record["name"], best, record.get("latency_ms"), record.get("memory_mb"),
                     record.get("params"), figures=figures, backbone=record.get("backbone"),
                     adaptation=record.get("adaptation"),
                     serving_form=record.get("serving_form"))


def _predictions(chain: Chain | None, epochs: int) -> Any:
    if chain is None:
        return None
    scores = chain.scores[:epochs]
    return trial_predictions(chain.trial_dir, scores.index(max(scores)) + 1)


def compare(results: Mapping[str, Any], project: Path, constraints: Mapping[str, float],
            lr_race_rungs: int, tie_alpha: float = 0.05) -> dict[str, Any]:
    """One row: the replayed search against brute force under `constraints`."""
    # The search settings (a nested `search` section since SelectionConfig holds a base config).
    settings = results["extra"]["settings"].get("search", results["extra"]["settings"])
    metric = settings["metric"]
    records = [c for c in results["candidates"]
               if c.get("figures", {}).get("shortlisted") and not c.get("error")]
    # One record per configuration; a results.json from before adaptations has full ones only.
    key_of = {c["name"]: config_key(c["figures"]["backbone"], c["figures"].get("adaptation", FULL))
              for c in records}
    # Each adaptation's learning rates, derived as the search derives them.
    rates = SearchConfig(learning_rates=tuple(settings["learning_rates"]),
                         adaptation_learning_rates=tuple(
                             (k, tuple(v)) for k, v in settings.get("adaptation_learning_rates", ())))
    lrs = {key_of[c["name"]]: ([settings["baseline_learning_rate"]]
                               if c["figures"].get("pretrained") is False
                               else list(rates.learning_rates_for(
                                   c["figures"].get("adaptation", FULL)))) for c in records}
    rungs = rung_epochs(settings["min_epochs"], settings["max_epochs"],
                        settings["reduction_factor"])
    limits = Constraints(**constraints)
    # What profiling tells before any training; the training limits are the search's own to
    # apply after the first rung (`plan_search`), so they do not pre-empt it here.
    hard = {k: v for k, v in limits.recommend_kwargs().items()
            if v is not None and k != "min_metric" and k not in limits.training()}
    breaks = [c["name"] for c in records if violations(Candidate.from_dict(c), hard)]
    eligible = [key_of[c["name"]] for c in records if c["name"] not in breaks] if breaks else None
    chains = load_chains(project)
    plan, search_train = replay(chains, [key_of[c["name"]] for c in records], lrs, rungs,
                                settings["reduction_factor"], eligible, lr_race_rungs,
                                limits.training())

    search, brute, search_preds, brute_preds = [], [], {}, {}
    for record in records:
        key = key_of[record["name"]]
        state = plan.halving_result(key)
        chain = chains.get((key, lr_key(state.learning_rate))) if state else None
        done = state is not None and state.status == "done"
        training = plan.training.get(key, {})
        search.append(_candidate(record, chain if done else None, state.epochs if done else 0,
                                 training))
        search_preds[record["name"]] = _predictions(chain, state.epochs) if done else None
        full = [chains[(key, lr_key(lr))] for lr in lrs[key] if (key, lr_key(lr)) in chains]
        top = max(full, key=lambda c: max(c.scores[:rungs[-1]]), default=None)
        brute.append(_candidate(record, top, rungs[-1], training))
        brute_preds[record["name"]] = _predictions(top, rungs[-1])
    kwargs = dict({k: v for k, v in limits.recommend_kwargs().items() if v is not None},
                  metric_name=metric, tie_alpha=tie_alpha,
                  chance_metric=majority_class_metric({**search_preds, **brute_preds}, metric))
    search_rec = recommend(search, **kwargs, paired_p_value=paired_tester(search_preds, metric))
    brute_rec = recommend(brute, **kwargs, paired_p_value=paired_tester(brute_preds, metric))

    brute_metric = {c.name: c.metric for c in brute}
    # The same choice under the tie rule: brute force cannot tell the two apart.
    same = search_rec.name == brute_rec.name or (
        search_rec.name is not None and search_rec.name in brute_rec.tied)
    scale = 100 if is_fraction_metric(metric) else 1
    regret = (None if not (search_rec.name and brute_rec.best)
              else scale * (brute_metric[brute_rec.best] - brute_metric[search_rec.name]))
    fixed = sum(results["extra"]["compute_seconds"].get(k, 0.0) for k in ("profiling",))
    transfer = results["extra"]["compute_seconds"].get("transferability", 0.0)
    brute_train = sum(sum(c.seconds[:rungs[-1]]) for key, c in chains.items()
                      if key[0] in lrs and key[1] in {lr_key(x) for x in lrs[key[0]]})
    return {
        "constraints": dict(constraints),
        "learning_rate_rule": lr_race_rungs,
        "search_minutes": round((fixed + transfer + search_train) / 60, 2),
        "brute_force_minutes": round((fixed + brute_train) / 60, 2),
        "search_choice": search_rec.name,
        "brute_force_choice": brute_rec.name,
        "brute_force_best": brute_rec.best,
        "same_choice": same,
        "regret_points": None if regret is None else round(regret, 2),
        "search_epochs": plan.planned_epochs,
        "search_reason": search_rec.reason,
        "brute_force_reason": brute_rec.reason,
    }


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| task | constraints | lr rule | search min | brute-force min | same choice "
             "(tie rule) | regret (points) |", "|---|---|---|---:|---:|---|---:|"]
    for row in rows:
        limits = ", ".join(f"{k}={v:g}" for k, v in row["constraints"].items()) or "none"
        rule = next(k for k, v in RULES.items() if v == row["learning_rate_rule"])
        same = "yes" if row["same_choice"] else f"no ({row['search_choice']} vs " \
                                                  f"{row['brute_force_choice']})"
        regret = "—" if row["regret_points"] is None else f"{row['regret_points']:.1f}"
        lines.append(f"| {row['task']} | {limits} | {rule} | {row['search_minutes']:.1f} | "
                     f"{row['brute_force_minutes']:.1f} | {same} | {regret} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny task: proves it runs.")
    parser.add_argument("--tasks", default="", help="Comma-separated task names (default all).")
    parser.add_argument("--work_dir", default="", help="Where brute-force runs are cached.")
    parser.add_argument("--tie_alpha", type=float, default=0.05)
    parser.add_argument("--json", default="", help="Results file (default results/selection"
                        "[_quick].json).")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or REPO / "runs" / ("bench_selection_quick" if args.quick
                                                      else "bench_selection"))
    wanted = {t for t in args.tasks.split(",") if t}
    rows: list[dict[str, Any]] = []
    for task in tasks(args.quick, work_dir):
        if wanted and task.name not in wanted:
            continue
        out = work_dir / task.name
        results = run_brute_force(task, out)
        # Where the run kept its trials: its --cache_dir, else `<output_dir>/cache`.
        cache_dir = results["extra"]["settings"].get("cache_dir") or out / "cache"
        project = Path(cache_dir) / "tuner" / results["extra"]["project"]
        for constraints in task.constraint_sets:
            for rule in RULES.values():
                rows.append({"task": task.name,
                             **compare(results, project, constraints, rule, args.tie_alpha)})
    print(table(rows))
    path = Path(args.json or REPO / "benchmarks" / "results" /
                ("selection_quick.json" if args.quick else "selection.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run of some tasks keeps the other tasks' rows (and when they were made).
    kept = []
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        ran = {row["task"] for row in rows}
        kept = [{"created_utc": earlier.get("created_utc"), **row}
                for row in earlier.get("rows", []) if row["task"] not in ran]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps({"created_utc": now, "load_average_1m": os.getloadavg()[0],
                                "rows": kept + [{"created_utc": now, **row} for row in rows]},
                               indent=2) + "\n", encoding="utf-8")
    return rows


def _tiny_sst2(folder: Path) -> dict[str, str]:
    """The first 200 training and 100 dev sentences of SST-2 (as the tests' tiny runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    sst2 = shared_dir() / "data" / "sst2"
    paths = {}
    for name, count in (("train", 200), ("dev", 100)):
        lines = (sst2 / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[name] = str(folder / f"{name}.tsv")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
