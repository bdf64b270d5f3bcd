"""The machine's measured matmul peak, float32 and bfloat16, in TensorFlow and in PyTorch.

Model FLOPs utilisation (MFU) needs a denominator. A datasheet peak is not
it on a shared, virtualised 2-core CPU whose clock and share of the cores are
unknown, so the benchmark measures the best GEMM rate this machine gives, in
the same run as the training figures (so under the same load): square and
transformer-shaped matrices (tokens x 384 x 1536 and back, the MiniLM-L6
feed-forward shapes), each timed for at least `min_seconds`, best of
`trials`. The machine peak per dtype is the best over both libraries and all
shapes. Each library runs in its own child process.

By hand: `python -m benchmarks.gemm_peak --mode=tf` (or `--mode=torch`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import _harness  # noqa: E402

# (M, K, N): C[M, N] = A[M, K] @ B[K, N].
SHAPES = ((2048, 384, 1536), (2048, 1536, 384), (2048, 2048, 2048))
PROBE_SHAPE = (256, 384, 1536)
DTYPES = ("float32", "bfloat16")
DEFAULTS = {"trials": 3, "min_seconds": 0.25, "dtypes": list(DTYPES)}


def _best_gflops(run: Callable[[], None], flops: float, trials: int, min_seconds: float) -> float:
    run()  # Warm-up: kernel selection, allocation.
    reps, elapsed = 1, 0.0
    while elapsed < min_seconds:  # Enough calls that one timing spans min_seconds.
        reps *= 2
        start = time.perf_counter()
        for _ in range(reps):
            run()
        elapsed = time.perf_counter() - start
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        best = max(best, flops * reps / (time.perf_counter() - start))
    return best / 1e9


def tf_peak(args: dict) -> dict:
    """GFLOP/s of `tf.matmul` per dtype and shape, on the CPU kernels ours trains with.

    TensorFlow starts as the pipelines start it (`tf_startup.choose_cpu_kernels`:
    oneDNN or Eigen, whichever this machine measured faster), so the peak is
    TensorFlow's best here, not its CPU-feature default.
    """
    args = {**DEFAULTS, **args}
    from tfhub_finetune import tf_startup

    tf_startup.choose_cpu_kernels()
    import tensorflow as tf

    results = {}
    for dtype in args["dtypes"]:
        for m, k, n in args.get("shapes", SHAPES):
            a = tf.cast(tf.random.normal([m, k]), dtype)
            b = tf.cast(tf.random.normal([k, n]), dtype)
            # Operands are arguments, not captures, so no graph pass can fold the
            # product; only a 1x1 corner is copied out.
            matmul = tf.function(lambda x, y: tf.matmul(x, y)[:1, :1])
            results[f"{dtype} {m}x{k}x{n}"] = _best_gflops(
                lambda f=matmul, a=a, b=b: f(a, b).numpy(), 2.0 * m * k * n, args["trials"],
                args["min_seconds"],
            )
    from tfhub_finetune.calibration import describe_cpu_kernels

    return _summary(f"tensorflow {tf.__version__} ({describe_cpu_kernels()} kernels)", results)


def torch_peak(args: dict) -> dict:
    """GFLOP/s of `torch.matmul` (oneDNN/MKL) per dtype and shape."""
    args = {**DEFAULTS, **args}
    import torch

    results = {}
    for dtype in args["dtypes"]:
        for m, k, n in args.get("shapes", SHAPES):
            a = torch.randn(m, k).to(getattr(torch, dtype))
            b = torch.randn(k, n).to(getattr(torch, dtype))
            results[f"{dtype} {m}x{k}x{n}"] = _best_gflops(
                lambda a=a, b=b: torch.matmul(a, b), 2.0 * m * k * n, args["trials"],
                args["min_seconds"],
            )
    return _summary(f"torch {torch.__version__} ({torch.get_num_threads()} threads)", results)


def _summary(library: str, results: dict[str, float]) -> dict:
    peaks = {dtype: [v for k, v in results.items() if k.startswith(dtype + " ")] for dtype in DTYPES}
    return {
        "library": library,
        "gflops": results,
        # 0.0 for a dtype not measured (bf16 skipped where the probe found it emulated).
        "peak_gflops": {dtype: max(values, default=0.0) for dtype, values in peaks.items()},
    }


def _probe(peak: Callable[[dict], dict], args: dict) -> dict:
    """fp32 and bf16 GFLOP/s of one small GEMM: one timed call after a warm-up call each."""
    result = peak({"trials": 1, "min_seconds": 0.05, "shapes": [PROBE_SHAPE], **args})
    return {"library": result["library"], **result["peak_gflops"]}


def probe_tf(args: dict) -> dict:
    return _probe(tf_peak, args)


def probe_torch(args: dict) -> dict:
    return _probe(torch_peak, args)


if __name__ == "__main__":
    sys.exit(_harness.child_main({"tf": tf_peak, "torch": torch_peak, "probe_tf": probe_tf,
                                  "probe_torch": probe_torch}))
