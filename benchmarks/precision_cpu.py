"""Training throughput on this CPU: float32 vs mixed_bfloat16, each with and without XLA.

`tfhub_finetune.distribute.set_precision("auto")` chooses a policy from a
seconds-long calibration on the CPU at hand (`tfhub_finetune.calibration`); this
script is the end-to-end check of that choice. It fine-tunes a small
BERT encoder (keras-hub `BertBackbone`, random init, hidden 384, 12 heads) plus a
dense head on random token ids with Keras `fit`, and reports training examples/s.

Protocol (why each piece is there):

- every configuration runs in its own subprocess, because the dtype policy and
  XLA/oneDNN state are process-global and a warm process would flatter whichever
  configuration runs second;
- where a short GEMM probe finds TensorFlow's bf16 matmul emulated (below
  `_harness.BF16_USEFUL_FRACTION` of fp32, e.g. an AVX2-only EPYC), the
  bf16 configurations are skipped, and the output says so;
- the order alternates between repetitions (forward, then reversed), so slow
  drift in machine load (this box is shared) does not favour one configuration;
- `--warmup_steps` untimed steps absorb tracing and XLA compilation (reported
  separately as `compile_s`, since it matters for short fine-tunes), then
  `--timed_steps` steps are timed one by one;
- the summary is the median over `--repeats` runs with the min..max spread;
  the 1-minute load average at the start of each run is recorded so contention
  from other jobs on the machine is visible, and CPU milliseconds per example
  (process CPU time over the timed steps) is reported beside examples/s because
  it moves much less than wall time when other jobs share the cores.

Usage:

```
python -m benchmarks.precision_cpu                            # seq 64 and 128, 3 repeats
python -m benchmarks.precision_cpu --seq_lens=64 --repeats=5 --num_layers=2
python -m benchmarks.precision_cpu --csv=benchmarks/results/precision_cpu.csv
```
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> (keras dtype policy, jit_compile)
CONFIGS: dict[str, tuple[str, bool]] = {
    "float32": ("float32", False),
    "mixed_bfloat16": ("mixed_bfloat16", False),
    "float32+xla": ("float32", True),
    "mixed_bfloat16+xla": ("mixed_bfloat16", True),
}

_RESULT_PREFIX = "PRECISION_CPU_RESULT "
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _measure(args: argparse.Namespace) -> dict:
    """Runs one configuration in this process and returns its measurement."""
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    policy, jit_compile = CONFIGS[args.child]
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_dtype_policy(policy)

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522,
        num_layers=args.num_layers,
        num_heads=12,
        hidden_dim=384,
        intermediate_dim=1536,
        max_sequence_length=512,
        dropout=0.1,
    )
    pooled = backbone(backbone.input)["pooled_output"]
    # Logits in float32 so the softmax/loss are not computed in bfloat16,
    # as any mixed-precision classifier head should do.
    logits = keras.layers.Dense(2, dtype="float32", name="logits")(pooled)
    model = keras.Model(backbone.input, logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )

    rng = np.random.default_rng(args.seed)
    # A few distinct batches cycled, so the timed steps do not see one cached batch.
    n = args.batch_size * 4
    features = {
        "token_ids": rng.integers(1000, 30522, size=(n, args.seq_len), dtype=np.int32),
        "padding_mask": np.ones((n, args.seq_len), dtype=np.int32),
        "segment_ids": np.zeros((n, args.seq_len), dtype=np.int32),
    }
    labels = rng.integers(0, 2, size=(n,), dtype=np.int32)
    dataset = (
        tf.data.Dataset.from_tensor_slices((features, labels))
        .batch(args.batch_size, drop_remainder=True)
        .cache()
        .repeat()
        .prefetch(2)
    )

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            self.cpu_ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            # Reading the loss as a Python float waits for the step to finish.
            self.losses.append(float(logs["loss"]))
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    timer = StepTimer()
    total_steps = args.warmup_steps + args.timed_steps
    model.fit(dataset, epochs=1, steps_per_epoch=total_steps, callbacks=[timer], verbose=0)

    step_times = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    timed = step_times[args.warmup_steps - 1 :]
    elapsed = sum(timed)
    cpu_seconds = timer.cpu_ends[-1] - timer.cpu_ends[args.warmup_steps - 1]
    return {
        "config": args.child,
        "precision": policy,
        "jit_compile": jit_compile,
        "seq_len": args.seq_len,
        "num_layers": args.num_layers,
        "batch_size": args.batch_size,
        "timed_steps": len(timed),
        "train_samples_per_sec": args.batch_size * len(timed) / elapsed,
        "train_step_time_ms": 1000.0 * statistics.median(timed),
        # CPU seconds (all threads) per example: what a run costs in work, less
        # sensitive than wall time to other jobs competing for the cores.
        "train_cpu_ms_per_example": 1000.0 * cpu_seconds / (args.batch_size * len(timed)),
        "compile_s": timer.ends[0] - timer.start,
        "params_m": model.count_params() / 1e6,
        "final_loss": timer.losses[-1],
        "error": "",
    }


def _cpu_summary() -> str:
    from benchmarks import _harness

    machine = _harness.machine_summary()
    return (f"{machine['cpu']} (kind {machine['kind']}), {machine['logical_cores']} logical cores, "
            f"ISA: {', '.join(machine['isa']) or 'none'}")


def _bf16_verdict() -> dict:
    """TensorFlow's bf16 GEMM probe (`gemm_peak.probe_tf`): skip bf16 configs where emulated."""
    from benchmarks import _harness

    probe = _harness.run_child("benchmarks.gemm_peak", "probe_tf", {}, timeout_s=600)
    return _harness.bf16_verdict(probe)


def _run_child(args: argparse.Namespace, config: str, seq_len: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.precision_cpu",
        f"--child={config}",
        f"--seq_len={seq_len}",
        f"--num_layers={args.num_layers}",
        f"--batch_size={args.batch_size}",
        f"--warmup_steps={args.warmup_steps}",
        f"--timed_steps={args.timed_steps}",
        f"--seed={args.seed}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    load = os.getloadavg()[0]
    base = {"config": config, "seq_len": seq_len, "loadavg_1m": round(load, 2)}
    try:
        done = subprocess.run(
            command,
            cwd=_REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.child_timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.child_timeout_s}s"}
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return {**json.loads(line[len(_RESULT_PREFIX) :]), **base}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**base, "error": f"exit {done.returncode}: {tail}"}


def _summarise(results: list[dict], seq_lens: list[int]) -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        baseline = None
        for config in CONFIGS:
            runs = [r for r in results if r["seq_len"] == seq_len and r["config"] == config]
            ok = [r["train_samples_per_sec"] for r in runs if not r.get("error")]
            row = {"seq_len": seq_len, "config": config, "runs": len(ok)}
            if ok:
                median = statistics.median(ok)
                row.update(
                    median=median,
                    low=min(ok),
                    high=max(ok),
                    spread_pct=100.0 * (max(ok) - min(ok)) / median,
                    step_ms=statistics.median(
                        r["train_step_time_ms"] for r in runs if not r.get("error")
                    ),
                    compile_s=statistics.median(r["compile_s"] for r in runs if not r.get("error")),
                    cpu_ms=statistics.median(
                        r["train_cpu_ms_per_example"] for r in runs if not r.get("error")
                    ),
                    load=statistics.median(r["loadavg_1m"] for r in runs if not r.get("error")),
                )
                if config == "float32":
                    baseline = median
                row["vs_float32"] = median / baseline if baseline else float("nan")
            else:
                row["error"] = next((r["error"] for r in runs if r.get("error")), "no runs")
            rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'seq':>4}  {'config':<19} {'examples/s':>10} {'min..max':>15} {'spread':>7} "
        f"{'step_ms':>8} {'compile_s':>9} {'vs fp32':>8} {'cpu_ms/ex':>9} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "median" not in row:
            print(f"{row['seq_len']:>4}  {row['config']:<19} error: {row['error']}")
            continue
        span = f"{row['low']:.1f}..{row['high']:.1f}"
        print(
            f"{row['seq_len']:>4}  {row['config']:<19} {row['median']:>10.1f} {span:>15} "
            f"{row['spread_pct']:>6.1f}% {row['step_ms']:>8.0f} {row['compile_s']:>9.1f} "
            f"{row['vs_float32']:>7.2f}x {row['cpu_ms']:>9.1f} {row['load']:>5.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lens", default="64,128", help="Comma-separated sequence lengths.")
    parser.add_argument("--seq_len", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--timed_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child_timeout_s", type=int, default=900)
    parser.add_argument("--csv", default="", help="Also write every run to this CSV file.")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Before TensorFlow is imported (here or in the children): keep the output readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.child:
        print(_RESULT_PREFIX + json.dumps(_measure(args)), flush=True)
        return 0

    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; expected some of {sorted(CONFIGS)}")
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s]

    print(f"CPU: {_cpu_summary()}")
    if any(CONFIGS[c][0] != "float32" for c in configs):
        verdict = _bf16_verdict()
        print(f"bf16: {verdict['reason']}")
        if verdict["usable"] is False:
            skipped = [c for c in configs if CONFIGS[c][0] != "float32"]
            print(f"SKIPPED {', '.join(skipped)}: no bf16 hardware.")
            configs = [c for c in configs if c not in skipped]
    print(
        f"Model: BertBackbone(layers={args.num_layers}, hidden=384, heads=12, ff=1536) + Dense(2); "
        f"batch {args.batch_size}; {args.warmup_steps} warm-up + {args.timed_steps} timed steps; "
        f"{args.repeats} repeats, alternating order."
    )
    results: list[dict] = []
    for seq_len in seq_lens:
        for repeat in range(args.repeats):
            order = configs if repeat % 2 == 0 else configs[::-1]
            for position, config in enumerate(order):
                result = _run_child(args, config, seq_len)
                result.update(repeat=repeat, order=position)
                results.append(result)
                shown = (
                    f"{result['train_samples_per_sec']:.1f} examples/s, "
                    f"{result['train_cpu_ms_per_example']:.1f} cpu ms/example, "
                    f"compile {result['compile_s']:.1f}s"
                    if not result.get("error")
                    else result["error"]
                )
                print(
                    f"  seq {seq_len} repeat {repeat} #{position} {config:<19} {shown} "
                    f"(load {result['loadavg_1m']})",
                    flush=True,
                )

    rows = _summarise(results, seq_lens)
    print()
    _print_table(rows)

    from tfhub_finetune import calibration
    from tfhub_finetune.distribute import resolve_precision

    chosen = resolve_precision("auto")
    figures = calibration.cpu_calibration().seconds
    print(f"Calibration (calibration.cpu_calibration): mixed_bfloat16 "
          f"{figures['float32'] / figures['mixed_bfloat16']:.2f}x float32")
    fastest = {}
    for seq_len in seq_lens:
        measured = [r for r in rows if r["seq_len"] == seq_len and "median" in r]
        if measured:
            fastest[seq_len] = max(measured, key=lambda r: r["median"])["config"]
    print(f"\nFastest measured: {fastest}")
    print(f"set_precision('auto') picks on this machine: {chosen}")

    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = sorted({k for r in results for k in r})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(results)
        print(f"Wrote {len(results)} runs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
