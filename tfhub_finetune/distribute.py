"""Distribution strategies, numeric precision and XLA: the one place they are decided.

Every `tf.distribute.Strategy` the package trains under is made by
`get_distribution_strategy`; pipelines turn their `--distribution`,
`--num_gpus`, `--all_reduce` and `--tpu` flags into one call to it, and their
`--precision` and `--jit_compile` flags into `set_precision` and
`resolve_jit_compile`. Everything a user can get wrong raises
`tfhub_finetune.errors.InputError`.

Contracts the rest of the package relies on:

- **The batch flag is the global batch.** Datasets are batched with the global
  batch size; `tf.distribute` splits each batch across replicas (and, with
  several workers, across workers). `per_replica_batch` checks that it divides.
- **Only the chief writes** checkpoints, TensorBoard logs, metrics and exports.
  Other workers still run the same callbacks (TensorFlow's multi-worker guidance:
  every worker saves, since saving can involve collective ops all must join)
  but into `worker_model_dir`'s throw-away directory, removed afterwards with
  `cleanup_worker_model_dir`.
- **Precision is set before the model is built.** Keras reads the global dtype
  policy when layers are created, and `compile` decides on loss scaling from the
  model's policy.

Example:

```python
from tfhub_finetune import distribute

strategy = distribute.get_distribution_strategy("auto")  # the program's first TF call
distribute.check_keras_fit_support(strategy)
precision = distribute.set_precision("auto", strategy=strategy)
batch = distribute.per_replica_batch(32, strategy)  # validates 32 divides
with strategy.scope():
    model = build_model()
    model.compile(..., jit_compile=distribute.resolve_jit_compile("auto", strategy))
train = distribute.distribute_dataset(strategy, train_ds, auto_shard="auto")
out_dir = distribute.worker_model_dir(model_dir, strategy)
model.fit(train, callbacks=make_callbacks(out_dir))
distribute.cleanup_worker_model_dir(out_dir, model_dir)
```
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from tfhub_finetune.errors import InputError, did_you_mean
from tfhub_finetune.integers import parse_int

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("auto", "cpu", "gpu", "mirrored", "multi_worker", "parameter_server", "tpu")
ALL_REDUCE = ("auto", "nccl", "ring", "hierarchical_copy")
AUTO_SHARD = ("auto", "data", "file", "off")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")

_WORKER_DIR_PREFIX = "tfhub_finetune_worker_"

# tf.data source ops that FILE auto-sharding can split by file.
_FILE_READER_OPS = frozenset(
    {
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "TextLineDataset",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "ArrayRecordDataset",
    }
)


# === Strategies ===


def get_distribution_strategy(
    distribution: str = "auto",
    num_gpus: int | None = None,
    all_reduce: str = "auto",
    tpu_address: str | None = None,
) -> tf.distribute.Strategy:
    """Returns the `tf.distribute.Strategy` named by `distribution`.

    Call it at program start, before any other TensorFlow op runs:
    `MultiWorkerMirroredStrategy` configures collective ops, which TensorFlow only
    allows before its runtime initialises, and logical-device setups (as in the
    tests) must also come first.

    Branches:

    - `auto`: `MirroredStrategy` over all visible GPUs if there are several, a
      `OneDeviceStrategy` on the GPU if there is one, else on the CPU. It never
      spans machines: with `TF_CONFIG` set it warns and stays local.
    - `cpu` / `gpu`: `OneDeviceStrategy` on `/cpu:0` / `/gpu:0`.
    - `mirrored`: `MirroredStrategy` over `num_gpus` GPUs (all by default); with
      no GPU, over every logical CPU device (several only if they were
      configured with `tf.config.set_logical_device_configuration`).
    - `multi_worker`: `MultiWorkerMirroredStrategy` on the cluster in `TF_CONFIG`
      (`{"cluster": {"chief": [...], "worker": ["host:port", ...]},
      "task": {"type": "worker", "index": 0}}`). Each worker uses every local
      GPU it sees (limit it with `CUDA_VISIBLE_DEVICES`), or its CPU. Every
      worker runs the same program. The strategy is a subclass whose `reduce`
      works around two Keras 3 bugs that otherwise break `fit` with several
      workers (see `_KerasMultiWorkerMirroredStrategy`).
    - `parameter_server`: `ParameterServerStrategy` on the `TF_CONFIG` cluster
      (`chief`, `worker` and `ps` jobs), made in the chief (coordinator) process.
      Keras 3 `Model.fit` cannot train with it: unlike tf.keras 2, Keras 3's
      trainer does not schedule steps through a
      `tf.distribute.coordinator.ClusterCoordinator`, and `fit` fails with "To
      use this dataset, you need to pass this dataset to
      ClusterCoordinator.create_per_worker_dataset". It is supported for custom
      training loops driven by a `ClusterCoordinator`; the `fit`-based pipelines
      reject it through `check_keras_fit_support`.
    - `tpu`: `TPUStrategy` on the TPU at `tpu_address` (`"local"` for a TPU VM,
      a name or `grpc://` address for a TPU node), via `TPUClusterResolver`.

    `all_reduce` picks how gradients are summed across replicas:

    | all_reduce          | mirrored                    | multi_worker                 |
    |---------------------|-----------------------------|------------------------------|
    | `auto`              | TF's choice on GPUs (NCCL   | `CommunicationImplementation |
    |                     | when usable), else          | .AUTO`                       |
    |                     | `ReductionToOneDevice`      |                              |
    | `nccl`              | `NcclAllReduce` (GPUs only) | `.NCCL` (GPUs only)          |
    | `hierarchical_copy` | `HierarchicalCopyAllReduce` | not accepted                 |
    | `ring`              | not accepted                | `.RING`                      |

    Other strategies accept only `auto`; `distribution=auto` ignores it when it
    finds a single device.

    Args:
        distribution: str. One of `auto`, `cpu`, `gpu`, `mirrored`,
            `multi_worker`, `parameter_server`, `tpu` (case-insensitive).
            Defaults to `"auto"`.
        num_gpus: int or None. How many local GPUs `auto`/`mirrored` use; `None`
            means all visible, `0` means CPU. Only meaningful for `auto`,
            `gpu` (must be 1) and `mirrored`. Defaults to `None`.
        all_reduce: str. One of `auto`, `nccl`, `ring`, `hierarchical_copy`.
            Defaults to `"auto"`.
        tpu_address: str or None. Where the TPU is, for `tpu` only. Defaults to
            `None`.

    Returns:
        The strategy. `describe_strategy(strategy)` says what it is in words.

    Raises:
        InputError: for an unknown name, an all-reduce the strategy cannot use,
            a device count the machine does not have, a missing or malformed
            `TF_CONFIG`, or an unreachable TPU.

    Example:

    ```python
    strategy = get_distribution_strategy("mirrored", num_gpus=4, all_reduce="nccl")
    strategy.num_replicas_in_sync  # 4
    ```
    """
    distribution = _choice("distribution", distribution, DISTRIBUTIONS)
    all_reduce = _choice("all_reduce", all_reduce, ALL_REDUCE)
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, int)):
        raise InputError("`num_gpus` must be an integer or None.", received={"num_gpus": num_gpus})
    if num_gpus is not None and num_gpus < 0:
        raise InputError(
            "`num_gpus` cannot be negative.",
            received={"num_gpus": num_gpus},
            fix="Use 0 for CPU, or leave it unset to use every visible GPU.",
        )
    if num_gpus is not None and distribution in ("multi_worker", "parameter_server", "tpu"):
        raise InputError(
            f"`num_gpus` does not apply to distribution={distribution}.",
            received={"num_gpus": num_gpus, "distribution": distribution},
            fix="Each worker uses every GPU it can see; limit them with "
            "CUDA_VISIBLE_DEVICES and leave --num_gpus unset.",
        )
    if tpu_address and distribution != "tpu":
        raise InputError(
            "A TPU address was given but the distribution is not `tpu`.",
            received={"tpu_address": tpu_address, "distribution": distribution},
            fix="Pass --distribution=tpu, or drop --tpu.",
        )

    if distribution == "multi_worker":
        return _multi_worker_strategy(all_reduce)
    if distribution == "parameter_server":
        _require_all_reduce_auto(all_reduce, distribution)
        return _parameter_server_strategy()
    if distribution == "tpu":
        _require_all_reduce_auto(all_reduce, distribution)
        return _tpu_strategy(tpu_address)

    if distribution == "auto" and os.environ.get("TF_CONFIG"):
        logger.warning(
            "TF_CONFIG is set but --distribution=auto trains on this machine only; "
            "pass --distribution=multi_worker to train across the cluster it describes."
        )
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if num_gpus is not None and num_gpus > len(gpus):
        raise InputError(
            f"Asked for more GPUs than TensorFlow can see ({len(gpus)}).",
            received={"num_gpus": num_gpus},
            fix="Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or lower --num_gpus.",
        )
    if num_gpus is not None:
        gpus = gpus[:num_gpus]

    if distribution == "cpu":
        if num_gpus:
            raise InputError(
                "distribution=cpu cannot use GPUs.",
                received={"distribution": distribution, "num_gpus": num_gpus},
                fix="Use --distribution=gpu or mirrored, or drop --num_gpus.",
            )
        _require_all_reduce_auto(all_reduce, distribution)
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if distribution == "gpu":
        if not gpus:
            raise InputError(
                "distribution=gpu but TensorFlow sees no GPU.",
                received={"distribution": distribution, "num_gpus": num_gpus},
                fix="Check `nvidia-smi` and that the CUDA build of TensorFlow is installed, "
                "or use --distribution=auto to fall back to the CPU.",
            )
        if num_gpus is not None and num_gpus > 1:
            raise InputError(
                "distribution=gpu is one device.",
                received={"num_gpus": num_gpus},
                fix="Use --distribution=mirrored to train on several GPUs.",
            )
        _require_all_reduce_auto(all_reduce, distribution)
        return tf.distribute.OneDeviceStrategy(gpus[0])
    if distribution == "mirrored":
        devices = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(
            devices=devices,
            cross_device_ops=_mirrored_cross_device_ops(all_reduce, on_gpus=bool(gpus)),
        )
    # auto
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(
            devices=gpus, cross_device_ops=_mirrored_cross_device_ops(all_reduce, on_gpus=True)
        )
    if all_reduce != "auto":
        # Not an error: the same flagfile should run on an 8-GPU and a 1-GPU machine.
        logger.info("all_reduce=%s unused: distribution=auto found one device.", all_reduce)
    return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """One line saying which strategy this is, on what, for logs and benchmarks.

    Example:

    ```python
    describe_strategy(get_distribution_strategy("cpu"))
    # 'OneDeviceStrategy on /job:localhost/replica:0/task:0/device:CPU:0 (1 replica)'
    ```
    """
    # TF's own class names (CollectiveAllReduceStrategy, TPUStrategyV2) are not the
    # names users know.
    public_names = [
        (tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
        (tf.distribute.ParameterServerStrategy, "ParameterServerStrategy"),
        (tf.distribute.TPUStrategy, "TPUStrategy"),
        (tf.distribute.MirroredStrategy, "MirroredStrategy"),
        (tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"),
    ]
    name = next((n for cls, n in public_names if isinstance(strategy, cls)), "Default strategy")
    devices = _worker_devices(strategy)
    replicas = strategy.num_replicas_in_sync
    text = f"{name} on {', '.join(devices) or 'the cluster'} ({replicas} replica{'s' * (replicas != 1)})"
    resolver = strategy.cluster_resolver
    if resolver is not None and resolver.task_type:
        workers = _num_workers(strategy)
        text += f", task {resolver.task_type}:{resolver.task_id} of {workers} worker(s)"
    return text


def check_keras_fit_support(strategy: tf.distribute.Strategy) -> None:
    """Raises if Keras 3 `Model.fit` cannot train under `strategy`.

    Only `ParameterServerStrategy` is refused: Keras 3's trainer does not drive a
    `ClusterCoordinator`, so `fit` cannot run its steps (see
    `get_distribution_strategy`).

    Raises:
        InputError: for a `ParameterServerStrategy`.

    Example:

    ```python
    strategy = get_distribution_strategy(FLAGS.distribution)
    check_keras_fit_support(strategy)  # before building anything
    ```
    """
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        raise InputError(
            "Keras 3 `Model.fit` cannot train with ParameterServerStrategy: it needs a "
            "`tf.distribute.coordinator.ClusterCoordinator` to schedule steps on workers, "
            "which Keras 3 does not provide.",
            received={"distribution": "parameter_server"},
            fix="Use --distribution=multi_worker (synchronous, all workers run fit), or write "
            "a custom loop with ClusterCoordinator.schedule.",
        )


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process is the one that writes outputs.

    The chief is the `chief` task if the cluster has one, else worker 0. Every
    single-machine strategy (and the coordinator of a parameter-server cluster)
    is its own chief.

    Args:
        strategy: tf.distribute.Strategy or None. Defaults to the current
            strategy (`tf.distribute.get_strategy()`).

    Example:

    ```python
    if is_chief(strategy):
        write_metrics_json(model_dir, metrics)
    ```
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


def worker_model_dir(
    model_dir: str | os.PathLike, strategy: tf.distribute.Strategy | None = None
) -> str:
    """Where this worker writes: `model_dir` for the chief, a fresh temporary dir otherwise.

    Non-chief workers must still write (so collective ops inside saving line up
    across workers), but their copies are never read. Pass the result to every
    callback that writes (checkpoints, BackupAndRestore, TensorBoard, CSV logs)
    and remove it afterwards with `cleanup_worker_model_dir`.

    Args:
        model_dir: str or path. The run's output directory.
        strategy: tf.distribute.Strategy or None. Defaults to the current strategy.

    Returns:
        `str(model_dir)` on the chief (created if missing); on other workers a new
        directory under the system temp dir, named after the task.

    Example:

    ```python
    out_dir = worker_model_dir("runs/sst2", strategy)
    try:
        model.fit(train, callbacks=[keras.callbacks.ModelCheckpoint(f"{out_dir}/best.keras")])
    finally:
        cleanup_worker_model_dir(out_dir, "runs/sst2")
    ```
    """
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        os.makedirs(model_dir, exist_ok=True)
        return str(model_dir)
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"{_WORKER_DIR_PREFIX}{resolver.task_type}_{resolver.task_id}_")


def cleanup_worker_model_dir(path: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Removes a non-chief worker's directory from `worker_model_dir`; a no-op on the chief.

    Only a directory that `worker_model_dir` created (in the temp dir, with its
    prefix) is ever deleted, so passing the real `model_dir` by mistake is safe.

    Args:
        path: what `worker_model_dir` returned.
        model_dir: the run's output directory passed to `worker_model_dir`.
    """
    path = Path(path)
    if path.resolve() == Path(model_dir).resolve():
        return
    if not path.name.startswith(_WORKER_DIR_PREFIX):
        return
    if path.resolve().parent != Path(tempfile.gettempdir()).resolve():
        return
    shutil.rmtree(path, ignore_errors=True)


# === Data ===


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy) -> int:
    """Each replica's share of the global batch; the global batch must divide evenly.

    The `--batch_size` flag is the global batch: the dataset is batched with it and
    `tf.distribute` hands each of the `num_replicas_in_sync` replicas an equal
    slice. Keras averages the loss over the global batch, so results do not depend
    on the number of replicas, but only if every replica gets the same share.

    Args:
        global_batch: int. The batch size summed over all replicas and workers.
        strategy: tf.distribute.Strategy.

    Returns:
        `global_batch // strategy.num_replicas_in_sync`.

    Raises:
        InputError: if `global_batch` is not positive or not a multiple of the
            replica count.

    Example:

    ```python
    per_replica_batch(64, mirrored_over_8_gpus)  # 8
    ```
    """
    replicas = strategy.num_replicas_in_sync
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise InputError(
            "The batch size must be a positive integer.", received={"batch_size": global_batch}
        )
    if global_batch % replicas:
        lower = max(replicas, global_batch - global_batch % replicas)
        upper = lower + replicas if lower < global_batch else lower
        raise InputError(
            f"The global batch size must divide evenly across the {replicas} replicas.",
            received={"batch_size": global_batch, "num_replicas": replicas},
            fix=f"Use a multiple of {replicas}, e.g. {lower}"
            + (f" or {upper}." if upper != lower else "."),
        )
    return global_batch // replicas


def distribute_dataset(
    strategy: tf.distribute.Strategy, dataset: tf.data.Dataset, auto_shard: str = "auto"
) -> tf.data.Dataset:
    """Sets how `dataset` is split across workers, ready for `Model.fit`.

    Returns `dataset` with `tf.data.Options().experimental_distribute.auto_shard_policy`
    set, not a `DistributedDataset`: Keras `fit` calls
    `strategy.experimental_distribute_dataset` itself and, given a plain dataset,
    keeps its cardinality for progress bars and `steps_per_epoch`. Batch
    `dataset` with the global batch size first.

    Sharding only matters with several workers (`multi_worker`); within one
    machine the strategy splits each global batch across replicas whatever the
    policy.

    - `auto`: TF tries FILE and falls back to DATA. This logs when the fallback
      will happen (the dataset reads no files, or fewer files than workers).
    - `file`: each worker reads a disjoint subset of the input files. Needs a
      dataset built from file readers (TFRecord, text lines) with at least one
      file per worker.
    - `data`: every worker reads the whole input and keeps every n-th element.
    - `off`: every worker sees everything; use this only if you sharded the
      dataset yourself with `dataset.shard(num_workers, worker_index)`.

    Args:
        strategy: tf.distribute.Strategy.
        dataset: tf.data.Dataset. Batched with the global batch size.
        auto_shard: str. One of `auto`, `data`, `file`, `off`. Defaults to `"auto"`.

    Returns:
        The dataset with its sharding option set.

    Raises:
        InputError: for an unknown policy, or `file` on a dataset that cannot be
            split by file across the workers.

    Example:

    ```python
    files = tf.data.Dataset.list_files("train-*.tfrecord", shuffle=False)
    ds = files.interleave(tf.data.TFRecordDataset).map(parse).batch(global_batch)
    model.fit(distribute_dataset(strategy, ds, auto_shard="file"))
    ```
    """
    auto_shard = _choice("auto_shard", auto_shard, AUTO_SHARD)
    policy = {
        "auto": tf.data.experimental.AutoShardPolicy.AUTO,
        "data": tf.data.experimental.AutoShardPolicy.DATA,
        "file": tf.data.experimental.AutoShardPolicy.FILE,
        "off": tf.data.experimental.AutoShardPolicy.OFF,
    }[auto_shard]
    workers = _num_workers(strategy)
    if workers > 1 and auto_shard in ("auto", "file"):
        reads_files, num_files = _file_sources(dataset)
        problem = None
        if not reads_files:
            problem = "the dataset reads no files (it was built from in-memory tensors or a file list read with tf.io.read_file)"
        elif num_files is not None and num_files < workers:
            problem = f"the dataset reads {num_files} file(s), fewer than the {workers} workers"
        if problem and auto_shard == "file":
            raise InputError(
                f"auto_shard=file cannot split this dataset by file: {problem}.",
                received={"auto_shard": auto_shard, "num_workers": workers},
                fix="Use --auto_shard=data, or write the data as at least one TFRecord file per worker.",
            )
        if problem:
            logger.warning(
                "auto_shard=auto falls back from FILE to DATA sharding: %s. Every one of the %d "
                "workers reads and preprocesses the whole dataset and keeps 1/%d of it. For large "
                "inputs, write at least one TFRecord file per worker, or shard the dataset "
                "yourself before the expensive map (dataset.shard) and pass --auto_shard=off.",
                problem,
                workers,
                workers,
            )
    if workers > 1 and auto_shard == "off":
        logger.warning(
            "auto_shard=off with %d workers: every worker trains on the same examples unless "
            "the dataset was sharded by hand with dataset.shard(num_workers, worker_index).",
            workers,
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


# === Precision and XLA ===


def resolve_precision(
    precision: str = "auto", strategy: tf.distribute.Strategy | None = None,
    hidden_size: int | None = None,
) -> str:
    """Turns a `--precision` value into a Keras dtype policy name.

    `auto` chooses what trains fastest on the hardware in use:

    - TPU (`TPUStrategy`): `mixed_bfloat16`, the TPU's native matmul type.
    - GPUs, all of compute capability >= 7.0 (Volta and later, with float16
      Tensor Cores): `mixed_float16`. Keras `compile` adds dynamic loss scaling.
    - Older GPUs: `float32` (float16 there is emulated and slower).
    - CPU: measured, not looked up. `calibration.cpu_calibration` times an
      encoder layer's forward + backward in float32 and mixed_bfloat16 on
      this CPU (seconds, once; cached per CPU model, ISA flags and TensorFlow
      version) and `calibration.decide` picks `mixed_bfloat16` only when it
      is at least `calibration.MARGIN` (1.3x) faster. Measured so far
      (BUILD_NOTES.md "Precision and XLA on CPU"): 1.3-1.7x on an AMX Xeon
      under load (end to end 1.3-1.5x less CPU per example on MiniLM-L6:
      bf16 chosen); an
      AVX512_BF16 Xeon without AMX ran bf16 at ~0.5x float32 in
      `benchmarks/precision_cpu.py` (float32 chosen); an AVX2-only EPYC
      emulates bf16 (float32 chosen, after one timed call).

    Args:
        precision: str. One of `auto`, `float32`, `mixed_bfloat16`,
            `mixed_float16`. Defaults to `"auto"`.
        strategy: tf.distribute.Strategy or None. Lets `auto` recognise TPUs.
            Defaults to `None`.
        hidden_size: int or None. The model's hidden width for the CPU
            calibration. Defaults to `calibration.DEFAULT_HIDDEN_SIZE` (384).

    Returns:
        A Keras dtype policy name: `float32`, `mixed_bfloat16` or `mixed_float16`.

    Raises:
        InputError: for an unknown name.

    Example:

    ```python
    resolve_precision("auto")  # 'mixed_bfloat16' on an AMX Xeon, 'mixed_float16' on an A100
    ```
    """
    precision = _choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    return _auto_precision(strategy, hidden_size)[0]


def set_precision(
    precision: str = "auto", strategy: tf.distribute.Strategy | None = None,
    hidden_size: int | None = None,
) -> str:
    """Sets the global Keras dtype policy; call it before building the model.

    Layers take the global policy when they are created, so a model built
    before this call keeps float32. Loss scaling needs nothing more: under
    `mixed_float16`, Keras 3 `Model.compile` wraps the optimizer in
    `keras.optimizers.LossScaleOptimizer` (dynamic scaling) whenever the model's
    policy is `mixed_float16` (`auto_scale_loss=True` by default; see
    `keras/src/trainers/trainer.py`, `compile`). bfloat16 has float32's exponent
    range and needs no loss scaling. Classification heads should still compute
    their logits in float32 (`dtype="float32"` on the last layer).

    Args:
        precision: str. One of `auto`, `float32`, `mixed_bfloat16`,
            `mixed_float16`; see `resolve_precision` for what `auto` picks.
            Defaults to `"auto"`.
        strategy: tf.distribute.Strategy or None. Lets `auto` recognise TPUs.
            Defaults to `None`.
        hidden_size: int or None. The model's hidden width for the CPU
            calibration (`resolve_precision`). Defaults to 384.

    Returns:
        The policy name that was set.

    Raises:
        InputError: for an unknown name.

    Example:

    ```python
    set_precision("mixed_float16")
    model = build_text_classifier(...)
    model.compile(optimizer="adamw", ...)  # optimizer is now a LossScaleOptimizer
    ```
    """
    import keras

    precision = _choice("precision", precision, PRECISIONS)
    if precision == "auto":
        chosen, reason = _auto_precision(strategy, hidden_size)
        logger.info("precision=auto -> %s: %s", chosen, reason)
    else:
        chosen = precision
    keras.mixed_precision.set_dtype_policy(chosen)
    return chosen


def resolve_jit_compile(
    flag: bool | str = "auto", strategy: tf.distribute.Strategy | None = None,
    hidden_size: int | None = None,
) -> bool:
    """Turns a `--jit_compile` value into the `jit_compile` argument of `compile`.

    `auto` means XLA only where it pays and works:

    - one GPU: on (fused kernels; what Keras itself does on GPU);
    - CPU: measured. The same calibration as `resolve_precision`
      (`calibration.cpu_calibration`, cached) times the encoder layer with
      and without XLA at the dtype policy in force (call `set_precision`
      first) and turns XLA on only when it is at least `calibration.MARGIN`
      (1.3x) faster. The calibration's steady state leaves out XLA's
      compile time, paid again for every batch shape (length-grouped
      training: a shape per batch width; 427 s of warm-up for 12 steps
      once on a loaded 2-core Xeon), which the margin must cover;
      measured so far on an AMX Xeon 1.08x at float32 and 0.57-0.59x at
      mixed_bfloat16 (off), ~1.05x in
      `benchmarks/precision_cpu.py` on an AVX-512 Xeon (off);
    - several replicas (`mirrored`, `multi_worker`): off, and an explicit
      `True` is an error. Keras 3 itself disables XLA under `tf.distribute`, and
      forcing it fails in `fit` with "Trying to access resource ... located in
      device CPU:1 from device CPU:0" (mirrored variables live on each replica's
      device, which one XLA cluster cannot address);
    - TPU: off here, since TPUStrategy compiles every step with XLA anyway.

    Args:
        flag: bool or str. `True`/`False`, or `auto`, `true`, `false`, `1`, `0`,
            `yes`, `no` (case-insensitive). Defaults to `"auto"`.
        strategy: tf.distribute.Strategy or None. Defaults to the current strategy.
        hidden_size: int or None. The model's hidden width for the CPU
            calibration. Defaults to 384.

    Returns:
        Whether to compile the train step with XLA.

    Raises:
        InputError: for an unrecognised value, or `True` with several replicas.

    Example:

    ```python
    model.compile(..., jit_compile=resolve_jit_compile("auto", strategy))
    ```
    """
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(flag, str):
        text = flag.strip().lower()
        values = {
            "auto": "auto",
            "true": True,
            "1": True,
            "yes": True,
            "false": False,
            "0": False,
            "no": False,
        }
        if text not in values:
            raise InputError(
                "Invalid value for `jit_compile`.",
                received={"jit_compile": flag},
                fix="Expected one of: auto, true, false.",
            )
        flag = values[text]
    elif not isinstance(flag, bool):
        raise InputError(
            "Invalid value for `jit_compile`.",
            received={"jit_compile": flag},
            fix="Expected True, False or 'auto'.",
        )
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False
    multi_replica = strategy.num_replicas_in_sync > 1 or _num_workers(strategy) > 1
    if flag is True and multi_replica:
        raise InputError(
            "XLA (jit_compile=True) does not work with Keras 3 `fit` under a multi-replica "
            "strategy: mirrored variables live on several devices, which one XLA cluster cannot "
            "address.",
            received={"jit_compile": True, "num_replicas": strategy.num_replicas_in_sync},
            fix="Use --jit_compile=auto (off with several replicas) or train on one device.",
        )
    if flag != "auto":
        return flag
    if multi_replica:
        return False
    if any("GPU" in device.upper() for device in _worker_devices(strategy)):
        return True
    import keras

    from tfhub_finetune import calibration

    policy = keras.config.dtype_policy().name
    if policy not in ("float32", "mixed_bfloat16"):  # mixed_float16 on a CPU: not calibrated.
        return False
    figures = calibration.cpu_calibration(hidden_size or calibration.DEFAULT_HIDDEN_SIZE,
                                          (policy, policy + "+xla"))
    decision = calibration.decide(figures.seconds, precision=policy, jit_compile="auto")
    logger.info("jit_compile=auto -> %s: %s; %s", decision.jit_compile, decision.reason,
                _calibration_source(figures))
    return decision.jit_compile


# === Serving threads ===

# TensorFlow's intra-op / inter-op pools for batch-1 serving are measured, not looked up: a
# batch-1 forward pass of a small encoder is a chain of small ops, and whether handing each
# to a two-thread pool costs more than the second thread gives back depends on the machine
# (one thread each: 7.5 vs 11.7 ms p50 on an AVX-512 Xeon; no better on the AMX Xeon,
# 13.5 vs 11.2 ms; BUILD_NOTES.md "Serving levers"), and on the served graph: a one-layer
# proxy measured 1.14x on the AVX-512 Xeon where the MiniLM export served 1.37x faster with
# one thread. `calibration.serving_thread_calibration` times both in child processes, on the
# SavedModel itself when given one (cached per model graph and machine). TF Serving's flags for one thread:
# `--tensorflow_intra_op_parallelism=1 --tensorflow_inter_op_parallelism=1`
# (or `--tensorflow_session_parallelism=1` alone, which sets both).


def set_serving_threads(batch_size: int, intra_op: int = -1, inter_op: int = -1, *,
                        saved_model: str | os.PathLike | None = None,
                        requests: Sequence[Mapping[str, Any]] = ()) -> tuple[int, int]:
    """Sizes TensorFlow's thread pools for serving calls of `batch_size` inputs.

    Must run before TensorFlow's runtime starts (the first op, or loading a
    SavedModel); later it cannot change them and leaves them as they are
    (logged).

    Args:
        batch_size: int. Inputs per call.
        intra_op: int. Threads per op; 0 is TensorFlow's default (one per
            core), -1 picks: at batch 1 the fastest of one thread each and
            one intra-op thread beside the default inter-op pool where the
            machine's calibration measures it at least `calibration.MARGIN`
            faster (`calibration.serving_thread_calibration`, cached), else 0.
        inter_op: int. Ops run at once; same conventions.
        saved_model: str, path or None. The SavedModel version folder to be
            served: with `requests`, the calibration times its own batch-1
            calls (else a one-layer proxy that can mispredict; see
            `serving_thread_calibration`).
        requests: sequence of dict. One-example `serving_default` inputs,
            e.g. the job's first rows: `[{"text": ["a fine film"]}]`.

    Returns:
        The `(intra_op, inter_op)` set, 0 meaning TensorFlow's default.

    Raises:
        InputError: for a count below -1.

    Example:

    ```python
    set_serving_threads(1)  # (1, 0), (1, 1) or (0, 0), as measured here: TF Serving's flags
    ```
    """
    for name, value in (("intra_op", intra_op), ("inter_op", inter_op)):
        if not isinstance(value, int) or value < -1:
            raise InputError(
                f"Invalid thread count for `{name}`.",
                received={name: value},
                fix="Expected -1 (auto: measured at batch size 1, else TensorFlow's default), 0 "
                "(TensorFlow's default) or a positive count.",
            )
    auto = (0, 0)
    if batch_size == 1 and -1 in (intra_op, inter_op):
        from tfhub_finetune import calibration

        try:
            figures = calibration.serving_thread_calibration(
                saved_model=saved_model if requests else None, requests=requests)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as error:
            # No measurement, no pinning: TensorFlow's default pools serve correctly anywhere.
            logger.warning("threads=auto at batch 1 -> TensorFlow's default pools: the thread "
                           "calibration could not run (%s).", error)
        else:
            auto, reason = calibration.decide_serving_threads(figures.seconds)
            logger.info("threads=auto at batch 1 -> intra-op %s, inter-op %s: %s; %s", auto[0],
                        auto[1], reason, _calibration_source(figures))
    intra, inter = (auto[i] if value == -1 else value for i, value in enumerate((intra_op, inter_op)))
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # The runtime has started: its pools are fixed now.
        logger.info("TensorFlow's runtime has started; its thread pools stay as they are.")
        return (tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads())
    return intra, inter


# === Helpers ===


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, bool):
            hint = " (a YAML or flag parser may have turned a word such as `off` into a boolean; quote it)"
        raise InputError(
            f"`{name}` must be a string{hint}.",
            received={name: value},
            fix=f"Expected one of: {', '.join(choices)}.",
        )
    text = value.strip().lower()
    if text not in choices:
        raise InputError(
            f"Unknown {name.replace('_', ' ')}.",
            received={name: value},
            fix=did_you_mean(text, choices),
        )
    return text


def _require_all_reduce_auto(all_reduce: str, where: str) -> None:
    if all_reduce != "auto":
        raise InputError(
            f"`all_reduce` only applies to mirrored and multi_worker; {where} has no all-reduce to choose.",
            received={"all_reduce": all_reduce},
            fix="Leave --all_reduce=auto.",
        )


def _mirrored_cross_device_ops(
    all_reduce: str, *, on_gpus: bool
) -> tf.distribute.CrossDeviceOps | None:
    if all_reduce == "ring":
        raise InputError(
            "all_reduce=ring is a multi-worker collective; MirroredStrategy does not use it.",
            received={"all_reduce": all_reduce},
            fix="Use nccl or hierarchical_copy on one machine, or --distribution=multi_worker.",
        )
    if all_reduce in ("nccl", "hierarchical_copy") and not on_gpus:
        raise InputError(
            f"all_reduce={all_reduce} needs GPUs; this MirroredStrategy is on CPU devices.",
            received={"all_reduce": all_reduce},
            fix="Use --all_reduce=auto on CPUs.",
        )
    if all_reduce == "nccl":
        return tf.distribute.NcclAllReduce()
    if all_reduce == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    # auto: TF probes NCCL on GPUs and falls back to hierarchical copy itself; on CPU
    # devices say what TF would pick anyway, so it is not left to a warning.
    return None if on_gpus else tf.distribute.ReductionToOneDevice()


def _read_tf_config(distribution: str, jobs: tuple[str, ...], required: tuple[str, ...]) -> dict:
    """Parses and checks `TF_CONFIG` before TensorFlow does, for one-line errors."""
    example = (
        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        if distribution == "multi_worker"
        else '{"cluster": {"chief": ["h0:2222"], "worker": ["h1:2222"], "ps": ["h2:2222"]}, '
        '"task": {"type": "chief", "index": 0}}'
    )
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise InputError(
            f"distribution={distribution} needs the TF_CONFIG environment variable.",
            received={"TF_CONFIG": raw},
            fix=f"Set it on every process, e.g. TF_CONFIG='{example}'.",
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InputError(
            f"TF_CONFIG is not valid JSON ({error.msg} at position {error.pos}).",
            received={"TF_CONFIG": raw},
            fix=f"Expected e.g. {example}.",
        ) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise InputError(
            'TF_CONFIG needs a "cluster" object and a "task" object.',
            received={"TF_CONFIG": raw},
            fix=f"Expected e.g. {example}.",
        )
    unknown = sorted(set(cluster) - set(jobs))
    if unknown:
        fix = f"distribution={distribution} accepts jobs: {', '.join(jobs)}."
        if "ps" in unknown:
            fix += " A cluster with `ps` jobs is for --distribution=parameter_server."
        raise InputError(
            f"TF_CONFIG has jobs this strategy does not use: {unknown}.",
            received={"TF_CONFIG": raw},
            fix=fix,
        )
    for job in required:
        if not cluster.get(job):
            raise InputError(
                f'TF_CONFIG\'s cluster has no "{job}" job, which distribution={distribution} needs.',
                received={"TF_CONFIG": raw},
                fix=f"Expected e.g. {example}.",
            )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(_is_address(a) for a in addresses):
            raise InputError(
                f'TF_CONFIG job "{job}" must be a list of "host:port" strings.',
                received={"TF_CONFIG": raw},
                fix=f"Expected e.g. {example}.",
            )
    if len(cluster.get("chief", [])) > 1:
        raise InputError("TF_CONFIG may have at most one chief.", received={"TF_CONFIG": raw})
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster or isinstance(index, bool) or not isinstance(index, int):
        raise InputError(
            'TF_CONFIG\'s "task" must name a job of the cluster and an integer index.',
            received={"TF_CONFIG": raw},
            fix=f"Expected e.g. {example}.",
        )
    if not 0 <= index < len(cluster[task_type]):
        raise InputError(
            f'TF_CONFIG\'s task index is out of range for job "{task_type}" '
            f"({len(cluster[task_type])} task(s)).",
            received={"TF_CONFIG": raw},
        )
    return config


def _is_address(address: Any) -> bool:
    if not isinstance(address, str) or ":" not in address:
        return False
    host, _, port = address.rpartition(":")
    number = parse_int(port)
    return bool(host) and number is not None and 0 < number < 65536


def _multi_worker_strategy(all_reduce: str) -> tf.distribute.Strategy:
    _read_tf_config("multi_worker", jobs=("chief", "worker"), required=("worker",))
    if all_reduce == "hierarchical_copy":
        raise InputError(
            "all_reduce=hierarchical_copy is for MirroredStrategy on one machine.",
            received={"all_reduce": all_reduce},
            fix="Use ring, nccl or auto with --distribution=multi_worker.",
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[all_reduce]
    return _KerasMultiWorkerMirroredStrategy(
        cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation
        ),
    )


class _KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras 3 `fit` passes it.

    With two or more workers, Keras 3.15 `fit`/`evaluate` on the TF backend fail
    with a stock `MultiWorkerMirroredStrategy` (keras-team/keras#20329, #20585):

    - `TensorFlowTrainer._maybe_symbolic_build` reduces the whole first batch, a
      dict or tuple of per-replica tensors, in one `strategy.reduce` call, and
      the collective reduce only takes a single value ("Attempt to convert a
      value ({'token_ids': PerReplica...}) with an unsupported type");
    - `reduce_per_replica` reduces the scalar loss and metrics with `axis=0`
      ("Invalid reduction dimension 0 for input with 0 dimensions").

    Reducing a nest leaf by leaf (TF's own `reduce` has a TODO for nests) and a
    scalar across replicas when asked for axis 0 is what both calls mean, and is
    how `MirroredStrategy` already behaves, so the fix lives here, in the one
    place strategies are made, rather than in patched Keras internals. The
    symbolic build all-reduces the first batch, so every worker's first batch
    must have the same shapes (true for DATA sharding of a batched dataset).
    `tests/test_distribute.py` trains two workers through `fit` with it.
    """

    def reduce(self, reduce_op, value, axis=None):
        if not isinstance(value, (tf.distribute.DistributedValues, tf.Tensor, tf.Variable)) and (
            tf.nest.is_nested(value)
        ):
            return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
        if axis is not None and all(
            getattr(t, "shape", None) is not None and t.shape.rank == 0
            for t in self.experimental_local_results(value)
        ):
            axis = None
        return super().reduce(reduce_op, value, axis)


def _parameter_server_strategy() -> tf.distribute.Strategy:
    config = _read_tf_config(
        "parameter_server", jobs=("chief", "worker", "ps"), required=("chief", "worker", "ps")
    )
    task_type = config["task"]["type"]
    if task_type != "chief":
        raise InputError(
            f"distribution=parameter_server runs the training program on the chief only; this "
            f"process is a `{task_type}` task.",
            received={"task": config["task"]},
            fix="Start worker and ps tasks as servers: tf.distribute.Server(cluster_resolver."
            "cluster_spec(), job_name=..., task_index=..., protocol='grpc').join().",
        )
    return tf.distribute.ParameterServerStrategy(
        tf.distribute.cluster_resolver.TFConfigClusterResolver()
    )


def _tpu_strategy(tpu_address: str | None) -> tf.distribute.Strategy:
    address = tpu_address or ""
    fix = "Pass --tpu=local on a TPU VM, or the TPU's name or grpc:// address for a TPU node."
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        if address not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError, tf.errors.UnavailableError) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise InputError(
            f"No TPU found ({first_line[:160]}).", received={"tpu_address": tpu_address}, fix=fix
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _worker_devices(strategy: tf.distribute.Strategy) -> list[str]:
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        # The default strategy has no device list; ops go to the first GPU if any.
        gpus = tf.config.list_logical_devices("GPU")
        return [gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name]
    try:
        return list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):
        return []


def _num_workers(strategy: tf.distribute.Strategy) -> int:
    resolver = strategy.cluster_resolver
    if resolver is None or isinstance(strategy, tf.distribute.TPUStrategy):
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def _file_sources(dataset: tf.data.Dataset) -> tuple[bool, int | None]:
    """Whether `dataset` reads files, and how many if the file list is a constant."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    by_name = {node.name: node for node in graph.node}
    readers = [node for node in nodes if node.op in _FILE_READER_OPS]
    if not readers:
        return False, None
    # The reader (or the file-list dataset the readers are interleaved over) takes a
    # constant string vector; its length is the file count. Globs and computed lists
    # are not counted.
    candidates = [n for n in graph.node if n.op == "TensorSliceDataset"] + readers
    for node in candidates:
        for name in node.input:
            source = by_name.get(name.split(":")[0].lstrip("^"))
            if source is None or source.op != "Const":
                continue
            tensor = source.attr["value"].tensor
            if tensor.dtype == tf.string.as_datatype_enum:
                dims = [d.size for d in tensor.tensor_shape.dim]
                return True, dims[0] if dims else 1
    return True, None


def _auto_precision(
    strategy: tf.distribute.Strategy | None, hidden_size: int | None = None
) -> tuple[str, str]:
    gpus = tf.config.list_physical_devices("GPU")
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        for gpu in gpus
    ]
    chosen = accelerator_precision(isinstance(strategy, tf.distribute.TPUStrategy), capabilities)
    if chosen is not None:
        return chosen
    from tfhub_finetune import calibration

    figures = calibration.cpu_calibration(hidden_size or calibration.DEFAULT_HIDDEN_SIZE)
    decision = calibration.decide(figures.seconds, precision="auto", jit_compile=False)
    return decision.precision, f"{decision.reason}; {_calibration_source(figures)}"


def accelerator_precision(
    tpu: bool, gpu_capabilities: list[tuple[int, int]]
) -> tuple[str, str] | None:
    """`auto`'s policy and reason on a TPU or GPUs, from what they are; None on CPU.

    Example:

    ```python
    accelerator_precision(False, [(8, 0)])  # ('mixed_float16', 'GPU compute capability 8.0 ...')
    ```
    """
    if tpu:
        return "mixed_bfloat16", "TPU"
    if not gpu_capabilities:
        return None
    lowest = min(tuple(c) for c in gpu_capabilities)
    if lowest >= (7, 0):
        return (
            "mixed_float16",
            f"GPU compute capability {lowest[0]}.{lowest[1]} has float16 Tensor Cores",
        )
    return "float32", f"GPU compute capability {lowest[0]}.{lowest[1]} < 7.0 has no fast float16"


def _calibration_source(figures) -> str:
    how = "measured now, cached in" if figures.measured else "calibration cached in"
    return f"{how} {figures.path} (set TFHUB_FINETUNE_RECALIBRATE=1 to measure again)"
