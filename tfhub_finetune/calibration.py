"""A seconds-long CPU measurement behind `--precision=auto` and `--jit_compile=auto`.

Whether bfloat16 or XLA trains faster on a CPU depends on the CPU: bf16 GEMMs
run ~4x float32 on an AMX Xeon, ~0.5x on an AVX-512 Xeon without AMX, and are
emulated (unusable) on an AVX2-only EPYC. So `auto` on CPU is decided by
measuring, never from a table of machine names: `cpu_calibration` times one
transformer encoder layer's forward and backward pass (fused QKV projection,
attention with heads of 64, output projection, GELU feed-forward, two
LayerNorms; batch 16 x 64 tokens at the model's hidden size) in the
configurations a decision compares, out of `float32`, `mixed_bfloat16`
(float32 weights cast to bfloat16 for compute, LayerNorm and softmax in
float32, as Keras' policy does) and each with XLA, calls in rotation so the
load of shared cores falls on all alike, by process-CPU time (which other
jobs on the cores disturb far less than wall time). `decide` turns the figures into a
choice with a margin (`MARGIN`).

`onednn_calibration` measures, in a child process per setting (TensorFlow
reads `TF_ENABLE_ONEDNN_OPTS` once, when it starts), whether TensorFlow's
oneDNN CPU kernels or its Eigen ones run that step faster, and
`decide_onednn` chooses with `ONEDNN_MARGIN` (`tf_startup.choose_cpu_kernels`
applies it before TensorFlow starts).

`serving_thread_calibration` measures, in child processes (thread pools are
fixed when TensorFlow's runtime starts), whether one intra-op thread (with
one inter-op thread, or TensorFlow's default inter-op pool) serves a batch-1
call faster than TensorFlow's default pools,
on the SavedModel to be served when there is one (else on one encoder
layer, a weaker proxy); `decide_serving_threads` chooses with the same
margin.

The figures are cached per CPU model + matmul-relevant ISA flags +
TensorFlow version + hidden size, as JSON under the user cache folder
(`$XDG_CACHE_HOME/tfhub_finetune`, else `~/.cache/tfhub_finetune`), written
atomically and readable as the umask allows. A missing, unreadable or
corrupted file is measured again; so is any file when
`TFHUB_FINETUNE_RECALIBRATE=1` or `recalibrate=True`.

Example:

```python
from tfhub_finetune import calibration

figures = calibration.cpu_calibration(hidden_size=384)  # float32 and mixed_bfloat16
calibration.decide(figures.seconds, precision="auto", jit_compile=False)
# Decision(precision='mixed_bfloat16', jit_compile=False, reason='mixed_bfloat16 3.9x float32 ...')
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfhub_finetune.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

# Bumped when the workload changes, so figures of another workload are not reused.
CALIBRATION_VERSION = 4
RECALIBRATE_ENV = "TFHUB_FINETUNE_RECALIBRATE"
CONFIGS = ("float32", "mixed_bfloat16", "float32+xla", "mixed_bfloat16+xla")
# TensorFlow's switch between its oneDNN CPU kernels and its Eigen ones, read once at start.
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# `onednn_calibration`'s settings -> that variable's value in the measuring child.
ONEDNN_CONFIGS = {"onednn=off": "0", "onednn=on": "1"}
# A kernel library other than TensorFlow's default is chosen only when its step is at least
# this much faster. Unlike bf16 it changes no numerics beyond the order of sums, so the
# margin only has to cover the measurement's run-to-run spread (~10% on shared cores).
ONEDNN_MARGIN = 1.15
# `serving_thread_calibration`'s settings -> (intra-op, inter-op) threads (0: TensorFlow's
# default pool). `intra_op=1` keeps the inter-op pool, on which the lean serving graph's
# two block slices run side by side (`serving_graph.SERVING_SLICES`).
SERVING_THREAD_CONFIGS = {"threads=default": (0, 0), "threads=1": (1, 1), "intra_op=1": (1, 0)}
# bf16 or XLA is chosen only when the calibration step is at least this much
# faster. The calibration times the precision-sensitive part of a step; the
# optimizer update (float32 under either policy, ~20-35% of a MiniLM step on
# CPU) and the input pipeline do not speed up, so a 1.3x calibration gain is
# ~1.15-1.2x end to end, about the smallest gain worth bf16's rounding or
# XLA's per-shape compile time; it also keeps a seconds-long measurement on
# shared cores (run-to-run spread ~10%) from flipping the choice on noise.
MARGIN = 1.3
# A configuration whose first timed call is this many times slower than
# float32's is emulated (bf16 without bf16 hardware): it is not timed again.
_HOPELESS = 4.0
_BATCH, _SEQ, _HEAD_DIM = 16, 64, 64
_ROUNDS = 7
# Flags that change which matmul kernels run: part of the cache key.
DEFAULT_HIDDEN_SIZE = 384  # MiniLM-L6's width; the driver passes none yet.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Seconds per calibration step of each configuration, and where they are kept.

    Attributes:
        seconds: dict. Configuration (`CONFIGS`) -> least process-CPU seconds
            of one forward + backward step over the rounds.
        key: dict. What the figures depend on (CPU, ISA flags, TensorFlow
            version, hidden size, workload version).
        path: Path. The cache file.
        measured: bool. True when measured by this call, False when read
            from the cache.
    """

    seconds: dict[str, float]
    key: dict
    path: Path
    measured: bool


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `decide` chose: a Keras dtype policy name, XLA on/off, and why (one line)."""

    precision: str
    jit_compile: bool
    reason: str


def decide(
    seconds: Mapping[str, float],
    *,
    precision: str = "auto",
    jit_compile: bool | str = "auto",
    margin: float = MARGIN,
) -> Decision:
    """Chooses precision and XLA from measured step times: a pure function of the figures.

    `precision="auto"` picks `mixed_bfloat16` only when its step is at least
    `margin` times faster than float32's at the same XLA setting (without
    XLA when that is `auto` too); `jit_compile="auto"` picks XLA only when it
    is `margin` times faster at the chosen precision. A configuration missing
    from `seconds` (or not positive) counts as not faster.

    Args:
        seconds: mapping. Configuration name (`CONFIGS`) -> seconds per step.
        precision: str. `auto`, or a fixed policy name.
        jit_compile: bool or str. `auto`, or a fixed bool.
        margin: float. The speed-up a non-default choice needs.

    Returns:
        A Decision; its `reason` names the measured ratios.

    Example:

    ```python
    decide({"float32": 0.4, "mixed_bfloat16": 0.1}, jit_compile=False).precision
    # 'mixed_bfloat16'
    ```
    """

    def key(policy: str, jit: bool) -> str:
        return policy + ("+xla" if jit else "")

    def speedup(faster: str, slower: str) -> float:
        a, b = seconds.get(faster, 0.0), seconds.get(slower, 0.0)
        return b / a if a > 0 and b > 0 else 0.0

    reasons = []
    chosen = precision
    if precision == "auto":
        at_jit = jit_compile is True
        ratio = speedup(key("mixed_bfloat16", at_jit), key("float32", at_jit))
        chosen = "mixed_bfloat16" if ratio >= margin else "float32"
        reasons.append(f"mixed_bfloat16 {ratio:.2f}x float32{' with XLA' if at_jit else ''}")
    jit = jit_compile
    if jit_compile == "auto":
        ratio = speedup(key(chosen, True), key(chosen, False))
        jit = ratio >= margin
        reasons.append(f"XLA {ratio:.2f}x no XLA at {chosen}")
    reason = "; ".join(reasons) + f" (choose at >= {margin:.2f}x)"
    return Decision(precision=chosen, jit_compile=bool(jit), reason=reason)


def cpu_calibration(
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    configs: Sequence[str] = ("float32", "mixed_bfloat16"),
    *,
    recalibrate: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Calibration:
    """This CPU's step times for `configs`: from the cache, else measured (seconds) and cached.

    Only what is asked is measured, since XLA's compilation is most of the
    cost (~1-2 s for the two precisions without XLA; 3-6 s more per XLA
    configuration on a loaded 2-core Xeon). Figures are compared only
    within the rotation that measured them, so the cache keeps one entry
    per set of `configs` (a new set is measured and added beside the others).

    Args:
        hidden_size: int. The model's hidden width (a multiple of 64 is
            typical); the feed-forward is 4x it.
        configs: sequence of str. Names from `CONFIGS`. Defaults to the two
            precisions without XLA.
        recalibrate: bool or None. Measure even when cached. Defaults to
            the `TFHUB_FINETUNE_RECALIBRATE` environment variable (`1`).
        cache_dir: str, path or None. Defaults to `default_cache_dir()`.

    Returns:
        A Calibration with (at least) `configs` in its `seconds`.

    Example:

    ```python
    cpu_calibration(384).seconds["mixed_bfloat16"]
    ```
    """
    import tensorflow as tf

    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        raise ValueError(f"Unknown calibration configurations {unknown}; expected some of "
                         f"{list(CONFIGS)}.")
    key = _machine_key(tf.__version__, hidden_size, onednn_enabled())
    return _cached(key, list(dict.fromkeys(configs)), CONFIGS,
                   lambda names: _measure(int(hidden_size), names), recalibrate, cache_dir,
                   what="a training step's time per precision")


def serving_thread_calibration(
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    *,
    saved_model: str | os.PathLike | None = None,
    requests: Sequence[Mapping[str, Any]] = (),
    recalibrate: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Calibration:
    """Batch-1 latency with TensorFlow's default thread pools and with one intra-op thread.

    Thread pools are fixed when TensorFlow's runtime starts, so each setting
    is measured in a child process of its own (`SERVING_THREAD_CONFIGS`),
    in rotation and back (default, one, intra-op one, and the reverse) so
    load drift falls on all;
    each child reports the least, over rounds, of the median wall time of
    its calls (latency is what a caller waits, so wall time). Cached like
    `cpu_calibration`.

    With `saved_model` the workload is that SavedModel's own
    `serving_default`, called with `requests` in turn (one example each):
    what a batch-1 job of that model waits for, measured once per model
    graph on this machine (~1 min for a MiniLM export on 2 cores). Without
    it, one encoder layer's forward pass on one 32-token sentence (a few
    seconds, once per machine): a proxy, and a weak one, since the
    choice depends on the served graph's chain of ops (on the AVX-512 Xeon
    the layer measured one thread 1.14x faster, the served MiniLM-L6
    export 1.37x).

    Args:
        hidden_size: int. The model's hidden width (the proxy's).
        saved_model: str, path or None. A SavedModel version folder to time.
        requests: sequence of dict. With `saved_model`: `serving_default`'s
            input name -> a one-example value (a list of one str or bytes,
            or an int array), e.g. `[{"text": ["a fine film"]}]`.
        recalibrate: bool or None. As for `cpu_calibration`.
        cache_dir: str, path or None. As for `cpu_calibration`.

    Returns:
        A Calibration whose `seconds` maps `SERVING_THREAD_CONFIGS` to seconds
        per call.

    Raises:
        ValueError: for a `saved_model` without `requests`.

    Example:

    ```python
    figures = serving_thread_calibration(saved_model="exports/sst2/1",
                                         requests=[{"text": ["a fine film"]}])
    decide_serving_threads(figures.seconds)  # ((1, 0), 'intra_op=1 1.37x ...') or ((0, 0), ...)
    ```
    """
    import tensorflow as tf

    key = {**_machine_key(tf.__version__, hidden_size, onednn_enabled()),
           "workload": "serve_batch1_threads"}
    if saved_model is None:
        child, stdin = ["_serving_latency_child", str(int(hidden_size))], ""
    else:
        if not requests:
            raise ValueError("Timing a SavedModel's batch-1 calls needs at least one request.")
        graph = Path(saved_model) / "saved_model.pb"
        key = {**key, "workload": "serve_batch1_threads:saved_model",
               "model": hashlib.sha256(graph.read_bytes()).hexdigest()[:16]}
        child = ["_saved_model_latency_child", str(saved_model)]
        stdin = json.dumps([{name: _encoded(value) for name, value in request.items()}
                            for request in requests])
    return _cached(key, list(SERVING_THREAD_CONFIGS), SERVING_THREAD_CONFIGS,
                   lambda names: _measure_serving_threads(child, stdin), recalibrate, cache_dir,
                   what="batch-1 latency per thread setting"
                   + (f" of {saved_model}" if saved_model is not None else ""))


def decide_serving_threads(
    seconds: Mapping[str, float], margin: float = MARGIN
) -> tuple[tuple[int, int], str]:
    """`(intra_op, inter_op)` for batch-1 serving from measured latencies: a pure function.

    The fastest of the other `SERVING_THREAD_CONFIGS` only when it is at
    least `margin` times faster than TensorFlow's default pools (0, 0); a
    missing figure counts as not faster.

    Example:

    ```python
    decide_serving_threads({"threads=default": 0.0117, "threads=1": 0.0075})[0]  # (1, 1)
    ```
    """
    default = seconds.get("threads=default", 0.0)
    others = {name: value for name, value in seconds.items()
              if name in SERVING_THREAD_CONFIGS and name != "threads=default" and value > 0}
    if default <= 0 or not others:
        return (0, 0), "no batch-1 figures to compare: TensorFlow's default pools"
    fastest = min(others, key=others.get)
    ratio = default / others[fastest]
    threads = SERVING_THREAD_CONFIGS[fastest] if ratio >= margin else (0, 0)
    return threads, (f"{fastest} {ratio:.2f}x TensorFlow's default pools at batch 1 "
                     f"(the fastest setting is chosen at >= {margin:.2f}x)")


def onednn_calibration(
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    *,
    recalibrate: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Calibration:
    """The calibration step with TensorFlow's oneDNN CPU kernels and with its Eigen ones.

    TensorFlow turns oneDNN on by default only on CPUs with the features its
    maintainers chose (AVX512-VNNI, AVX512-BF16, AMX); elsewhere it runs Eigen,
    and which is faster is a property of the CPU (on an AVX2-only EPYC the
    oneDNN step took 0.16 s against Eigen's 0.34 s, fine-tuning MiniLM-L6 ran
    1.66x faster). The switch (`ONEDNN_ENV`) is read once when TensorFlow
    starts, so each setting (`ONEDNN_CONFIGS`) is measured in a child process
    of its own (~10 s each on 2 cores, once per machine): `cpu_calibration`'s
    encoder layer at float32 and mixed_bfloat16, which the child caches under
    its setting, so the process that then trains with it reads
    `--precision=auto`'s figures instead of measuring them again. A
    setting's figure is its faster precision (what `auto` would take there);
    0.0 where TensorFlow reported the setting did not take effect (a build
    without oneDNN). Needs no TensorFlow in this process.

    Args:
        hidden_size: int. As for `cpu_calibration`.
        recalibrate: bool or None. As for `cpu_calibration`; the children
            measure again too.
        cache_dir: str, path or None. As for `cpu_calibration`.

    Returns:
        A Calibration whose `seconds` maps `ONEDNN_CONFIGS` to process-CPU
        seconds per step.

    Raises:
        RuntimeError: when a measuring child fails.

    Example:

    ```python
    figures = onednn_calibration()
    decide_onednn(figures.seconds)  # ('1', 'oneDNN 2.07x Eigen (chosen at >= 1.15x)'), AVX2 EPYC
    ```
    """
    key = _onednn_key(hidden_size)
    recalibrate = _recalibrate_requested(recalibrate)
    return _cached(key, list(ONEDNN_CONFIGS), ONEDNN_CONFIGS,
                   lambda names: _measure_onednn(int(hidden_size), recalibrate, cache_dir),
                   recalibrate, cache_dir, what="a training step's time under oneDNN and Eigen")


def decide_onednn(
    seconds: Mapping[str, float], margin: float = ONEDNN_MARGIN
) -> tuple[str | None, str]:
    """`TF_ENABLE_ONEDNN_OPTS` from measured step times: a pure function of the figures.

    `"1"` (oneDNN) or `"0"` (Eigen) when that setting's step is at least
    `margin` times faster than the other's; None (leave TensorFlow's own
    default) when neither is, or a figure is missing.

    Example:

    ```python
    decide_onednn({"onednn=off": 0.34, "onednn=on": 0.16})[0]  # '1'
    ```
    """
    off, on = seconds.get("onednn=off", 0.0), seconds.get("onednn=on", 0.0)
    if off <= 0 or on <= 0:
        return None, "no figures for both of oneDNN and Eigen: TensorFlow's default kernels"
    if off / on >= margin:
        return ONEDNN_CONFIGS["onednn=on"], f"oneDNN {off / on:.2f}x Eigen (chosen at >= {margin:.2f}x)"
    if on / off >= margin:
        return ONEDNN_CONFIGS["onednn=off"], f"Eigen {on / off:.2f}x oneDNN (chosen at >= {margin:.2f}x)"
    return None, (f"oneDNN {off / on:.2f}x Eigen, within {margin:.2f}x: TensorFlow's default "
                  "kernels")


def onednn_enabled() -> bool | None:
    """Whether this process' TensorFlow runs its oneDNN kernels (None: TensorFlow cannot say)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # No public API says it.

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def describe_cpu_kernels() -> str:
    """`oneDNN` or `Eigen`: the CPU kernels this process' TensorFlow runs, for a report line."""
    return {True: "oneDNN", False: "Eigen", None: "unknown"}[onednn_enabled()]


def _installed_tensorflow_version() -> str:
    """TensorFlow's version from its distribution's metadata: without importing it."""
    from importlib import metadata

    for name in ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "unknown"


def _measure_onednn(hidden: int, recalibrate: bool,
                    cache_dir: str | os.PathLike | None) -> dict[str, float]:
    """Each `ONEDNN_CONFIGS` setting's faster-precision step, in a child process of its own."""
    import subprocess
    import sys

    seconds = {}
    for name, value in ONEDNN_CONFIGS.items():
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from tfhub_finetune.calibration import "
             "_onednn_child as child; child(int(sys.argv[1]), sys.argv[2], sys.argv[3] == '1')",
             str(hidden), str(cache_dir or ""), "1" if recalibrate else "0"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, ONEDNN_ENV: value, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"The oneDNN calibration child ({ONEDNN_ENV}={value}) failed: "
                               f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        report = json.loads(lines[-1])
        took_effect = report["onednn"] in (None, value == "1")
        seconds[name] = round(min(report["seconds"].values()), 6) if took_effect else 0.0
    return seconds


def _onednn_child(hidden: int, cache_dir: str, recalibrate: bool) -> None:
    """Prints this process' oneDNN state and its `cpu_calibration` figures, as JSON."""
    figures = cpu_calibration(hidden, cache_dir=cache_dir or None, recalibrate=recalibrate)
    print(json.dumps({"onednn": onednn_enabled(), "seconds": figures.seconds}), flush=True)


def _onednn_key(hidden_size: int) -> dict:
    """`onednn_calibration`'s cache key: read without importing TensorFlow."""
    return {**_machine_key(_installed_tensorflow_version(), hidden_size), "workload": "onednn"}


def _recalibrate_requested(recalibrate: bool | None) -> bool:
    """`recalibrate` as given, else whether `TFHUB_FINETUNE_RECALIBRATE` asks for it."""
    if recalibrate is not None:
        return bool(recalibrate)
    return os.environ.get(RECALIBRATE_ENV, "").strip().lower() in ("1", "true", "yes")


def _machine_key(tensorflow_version: str, hidden_size: int, onednn: bool | None = None) -> dict:
    """What figures depend on; `onednn` is the kernels of the process that measures them."""
    model, flags = _cpu_identity()
    return {"version": CALIBRATION_VERSION, "cpu": model, "isa": sorted(set(_ISA_FLAGS) & flags),
            "tensorflow": tensorflow_version, "hidden_size": int(hidden_size), "onednn": onednn}


def _cached(key: dict, configs: list[str], allowed: Collection[str],
            measure: Callable[[list[str]], dict[str, float]], recalibrate: bool | None,
            cache_dir: str | os.PathLike | None, what: str) -> Calibration:
    """The figures for `configs` under `key`: from the cache file, else measured and cached.

    A measurement takes seconds to a minute, so it says so on stdout first (`what` names it);
    stderr stays for errors, and a child's last stdout line stays its report.
    """
    recalibrate = _recalibrate_requested(recalibrate)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / _cache_name(key)
    group = "|".join(sorted(configs))
    cached = _read_cache(path, key, allowed)
    if not recalibrate and cached is not None and group in cached:
        return Calibration(seconds=cached[group], key=key, path=path, measured=False)
    print(f"Measuring {what} on this CPU ({', '.join(configs)}); once, then cached in "
          f"{path}.", flush=True)
    started = time.perf_counter()
    seconds = measure(configs)
    # Figures are compared only within the rotation that measured them: one entry per set.
    record = {"key": key, "runs": {**(cached or {}), group: seconds},
              "measured_s": round(time.perf_counter() - started, 1),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    except OSError as error:  # A read-only home must not stop training.
        logger.warning("Could not cache the CPU calibration at %s: %s", path, error)
    return Calibration(seconds=seconds, key=key, path=path, measured=True)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tfhub_finetune`, else `~/.cache/tfhub_finetune`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfhub_finetune"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags from `/proc/cpuinfo` text (the first processor's).

    Example:

    ```python
    parse_cpuinfo(Path("/proc/cpuinfo").read_text())  # ('Intel(R) Xeon(R) ...', {'avx2', ...})
    ```
    """
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _cpu_identity() -> tuple[str, frozenset[str]]:
    import platform

    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", frozenset()
    return model or platform.processor() or platform.machine() or "cpu", flags


def _cache_name(key: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", key["cpu"].lower()).strip("-")[:48] or "cpu"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"cpu-calibration-{slug}-{digest}.json"


def _read_cache(path: Path, key: dict,
                allowed: Collection[str] = CONFIGS) -> dict[str, dict[str, float]] | None:
    """The cached runs (`"float32|mixed_bfloat16"` -> seconds), or None to measure."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        runs = {str(group): {str(k): float(v) for k, v in seconds.items()}
                for group, seconds in record["runs"].items()}
        if record["key"] != key:
            raise ValueError("made for another machine, TensorFlow or workload")
        if any(group != "|".join(sorted(seconds)) or not set(seconds) <= set(allowed)
               for group, seconds in runs.items()):
            raise ValueError("unknown configurations")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("Measuring the CPU calibration again: %s unusable (%s).", path, error)
        return None
    return runs


def _measure(hidden: int, configs: list[str]) -> dict[str, float]:
    """Least process-CPU seconds per step of each configuration, calls in rotation.

    CPU time, not wall time: on shared cores a nice'd process is preempted
    for long stretches, and the least wall time of a few rounds then favours
    the configuration with the shorter step (an AMX Xeon: bf16 4.1x float32
    by wall time at load 7, 1.7x at load 2; end to end 1.5x less CPU per
    example).
    """
    steps = {name: _step(hidden, name) for name in configs}
    for step in steps.values():  # Tracing, XLA compilation, oneDNN primitive creation.
        step()
    first = {name: _timed(step) for name, step in steps.items()}

    def hopeless(name: str) -> bool:
        # Emulated bf16 would spend minutes here: its first timed call already says enough.
        twin = name.replace("mixed_bfloat16", "float32")
        return twin in first and first[name] > _HOPELESS * first[twin]

    live = [name for name in configs if not hopeless(name)]
    best = dict(first)
    for turn in range(_ROUNDS):
        for name in live[turn % len(live):] + live[: turn % len(live)]:
            best[name] = min(best[name], _timed(steps[name]))
    return {name: round(value, 6) for name, value in best.items()}


def _timed(step) -> float:
    started = time.process_time()
    step()
    return time.process_time() - started


def _step(hidden: int, config: str, *, batch: int = _BATCH, seq: int = _SEQ,
          backward: bool = True):
    """One encoder layer's forward (+ backward) under `config`, as a no-argument callable."""
    import tensorflow as tf

    policy, _, xla = config.partition("+")
    compute = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float32
    heads = max(1, hidden // _HEAD_DIM)
    init = tf.random.stateless_normal
    weights = [tf.Variable(0.02 * init(shape, seed=(i, 0)), name=f"w{i}") for i, shape in enumerate(
        [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)])]
    biases = [tf.Variable(tf.zeros([n])) for n in (3 * hidden, hidden, 4 * hidden, hidden)]
    norms = [tf.Variable(tf.ones([hidden])) for _ in range(2)] + [tf.Variable(tf.zeros([hidden]))
                                                                   for _ in range(2)]
    variables = weights + biases + norms
    x = init((batch, seq, hidden), seed=(9, 9))

    def layer_norm(value, gain, bias):
        value = tf.cast(value, tf.float32)  # Keras computes LayerNorm in float32 under bf16.
        mean, variance = tf.nn.moments(value, axes=[-1], keepdims=True)
        return tf.cast((value - mean) * tf.math.rsqrt(variance + 1e-12) * gain + bias, compute)

    def dense(value, i):
        return tf.matmul(value, tf.cast(weights[i], compute)) + tf.cast(biases[i], compute)

    @tf.function(jit_compile=bool(xla))
    def step():
        with tf.GradientTape() as tape:
            h = tf.cast(x, compute)
            qkv = tf.reshape(dense(h, 0), [batch, seq, 3, heads, hidden // heads])
            q, k, v = tf.unstack(qkv, axis=2)
            scores = tf.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / (hidden // heads) ** 0.5)
            probs = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32)), compute)
            attended = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", probs, v), [batch, seq, hidden])
            h = layer_norm(h + dense(attended, 1), norms[0], norms[2])
            ff = dense(tf.nn.gelu(dense(h, 2), approximate=False), 3)
            out = layer_norm(h + ff, norms[1], norms[3])
            loss = tf.reduce_mean(tf.square(tf.cast(out, tf.float32)))
        if not backward:
            return loss
        grads = tape.gradient(loss, variables)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return lambda: step().numpy()


def _measure_serving_threads(child: list[str], stdin: str = "") -> dict[str, float]:
    """Seconds per batch-1 call with each of `SERVING_THREAD_CONFIGS`, one child process each.

    `child` is this module's child function and its first argument; the
    intra-op and inter-op counts are appended, `stdin` is given to it.
    """
    import subprocess
    import sys

    best: dict[str, float] = {}
    names = list(SERVING_THREAD_CONFIGS)
    for name in names + names[::-1]:  # In rotation and back, so load drift falls on all.
        intra, inter = SERVING_THREAD_CONFIGS[name]
        done = subprocess.run(
            [sys.executable, "-c", f"import sys; from tfhub_finetune.calibration import "
             f"{child[0]} as child; child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))",
             child[1], str(intra), str(inter)],
            input=stdin, capture_output=True, text=True, timeout=600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"The serving-thread calibration child failed: "
                               f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        best[name] = min(best.get(name, float("inf")), float(lines[-1]))
    return {name: round(value, 6) for name, value in best.items()}


def _encoded(value: Any) -> dict:
    """One request input as JSON: a list of str or bytes as base64, else a nested number list."""
    import base64

    import numpy as np

    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in value):
        return {"dtype": "string", "b64": [
            base64.b64encode(v.encode("utf-8") if isinstance(v, str) else v).decode("ascii")
            for v in value]}
    array = np.asarray(value)
    return {"dtype": str(array.dtype), "values": array.tolist()}


def _decoded(value: dict) -> Any:
    import base64

    import numpy as np

    if value["dtype"] == "string":
        return np.array([base64.b64decode(v) for v in value["b64"]], dtype=object)
    return np.asarray(value["values"], dtype=value["dtype"])


def _timed_calls(call: Callable[[int], Any], count: int) -> float:
    """The least, over 5 rounds of 20 calls, of the median wall time; `call(i)` runs call i."""
    import statistics

    for i in range(10):  # Tracing, oneDNN primitive creation.
        call(i % count)
    medians = []
    for _ in range(5):
        times = []
        for i in range(20):
            started = time.perf_counter()
            call(i % count)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return min(medians)


def _set_pools(intra_op: int, inter_op: int) -> None:
    """Sizes this child's TensorFlow pools before its runtime starts (0: TensorFlow's default)."""
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def _serving_latency_child(hidden: str, intra_op: int, inter_op: int) -> None:
    """Prints the proxy's batch-1 seconds per call with these pools (0: TF's default)."""
    _set_pools(intra_op, inter_op)
    call = _step(int(hidden), "float32", batch=1, seq=32, backward=False)
    print(_timed_calls(lambda i: call(), 1), flush=True)


def _saved_model_latency_child(path: str, intra_op: int, inter_op: int) -> None:
    """Prints a SavedModel's batch-1 seconds per call on the requests read from stdin."""
    import sys

    requests = [{name: _decoded(value) for name, value in request.items()}
                for request in json.loads(sys.stdin.read())]
    import tensorflow as tf

    with contextlib.suppress(ImportError):  # The ops of exports that tokenize in the graph.
        import tensorflow_text  # noqa: F401
    _set_pools(intra_op, inter_op)
    serve = tf.saved_model.load(path).signatures["serving_default"]

    def served(inputs: dict) -> bool:
        try:
            for output in serve(**inputs).values():
                output.numpy()
        except tf.errors.InvalidArgumentError:  # E.g. a file in an image folder that is none.
            return False
        return True

    specs = serve.structured_input_signature[1]  # Name -> TensorSpec: numbers take its dtype.
    inputs = [{name: tf.constant(value, dtype=specs[name].dtype if name in specs else None)
               for name, value in request.items()} for request in requests]
    inputs = [request for request in inputs if served(request)]
    if not inputs:
        raise SystemExit("The SavedModel answered none of the timing requests.")
    print(_timed_calls(lambda i: served(inputs[i]), len(inputs)), flush=True)
