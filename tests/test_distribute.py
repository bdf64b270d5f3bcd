"""Tests for `tfhub_finetune.distribute`: one per strategy branch that runs here, plus
precision, XLA and the two training-equivalence checks.

Anything that needs several logical devices, a cluster or its own `TF_CONFIG`
runs in a fresh subprocess: logical devices and collective ops can only be
configured before TensorFlow initialises its runtime, which this pytest process
has long done by then. Subprocesses see no GPU (`CUDA_VISIBLE_DEVICES=-1`) so the
same tests mean the same thing on a GPU machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfhub_finetune import calibration, distribute
from tfhub_finetune.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT = "TEST_RESULT "


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="-1",
    )
    env.update(extra)
    return env


def _run_script(tmp_path: Path, name: str, code: str, timeout: int = 120) -> dict:
    """Runs `code` in a fresh Python; returns the dict it printed after `RESULT`."""
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO_ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    pytest.fail(f"{name} exited {done.returncode} without a result:\n{done.stderr[-3000:]}")


def _error(fn) -> str | None:
    try:
        fn()
    except InputError as err:
        return str(err)
    return None


@pytest.fixture
def restore_dtype_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


# === Single-device branches (in process) ===


def test_cpu_strategy_is_one_device_on_cpu():
    strategy = distribute.get_distribution_strategy("cpu")
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert "CPU:0" in strategy.extended.worker_devices[0]
    assert distribute.is_chief(strategy)
    assert "OneDeviceStrategy" in distribute.describe_strategy(strategy)


def test_auto_uses_the_gpu_if_there_is_one_else_the_cpu():
    strategy = distribute.get_distribution_strategy("AUTO")
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        assert isinstance(strategy, tf.distribute.MirroredStrategy)
    else:
        assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
        assert ("GPU:0" if gpus else "CPU:0") in strategy.extended.worker_devices[0]
        # One flagfile for all machines: an all-reduce choice is ignored on one device.
        one = distribute.get_distribution_strategy("auto", all_reduce="nccl")
        assert isinstance(one, tf.distribute.OneDeviceStrategy)


def test_gpu_without_gpu_is_an_input_error():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("This machine has a GPU; the error branch cannot happen here.")
    with pytest.raises(InputError, match="sees no GPU"):
        distribute.get_distribution_strategy("gpu")


def test_unknown_names_suggest_the_closest():
    message = _error(lambda: distribute.get_distribution_strategy("mirorred"))
    assert "Unknown distribution. Received: distribution='mirorred'." in message
    assert "Did you mean: mirrored" in message
    message = _error(lambda: distribute.get_distribution_strategy("auto", all_reduce="ncl"))
    assert "all_reduce='ncl'" in message and "Did you mean: nccl" in message
    assert "a boolean" in _error(lambda: distribute.get_distribution_strategy(False))


def test_flag_combinations_that_cannot_work():
    assert "negative" in _error(lambda: distribute.get_distribution_strategy("auto", num_gpus=-1))
    assert "more GPUs" in _error(
        lambda: distribute.get_distribution_strategy("mirrored", num_gpus=64)
    )
    assert "does not apply" in _error(
        lambda: distribute.get_distribution_strategy("multi_worker", num_gpus=1)
    )
    assert "ring" in _error(
        lambda: distribute.get_distribution_strategy("mirrored", all_reduce="ring")
    )
    assert "only applies to mirrored and multi_worker" in _error(
        lambda: distribute.get_distribution_strategy("cpu", all_reduce="nccl")
    )
    assert "not `tpu`" in _error(
        lambda: distribute.get_distribution_strategy("cpu", tpu_address="x")
    )


@pytest.mark.parametrize("address", [None, "local"])
def test_tpu_without_a_tpu_is_an_input_error(address):
    with pytest.raises(InputError, match="No TPU found"):
        distribute.get_distribution_strategy("tpu", tpu_address=address)


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{cluster: 1}", "not valid JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', 'needs a "cluster" object and a "task" object'),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
            "out of range",
        ),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', '"host:port"'),
        (
            '{"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
            'no "worker" job',
        ),
        (
            '{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
            "parameter_server",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "boss", "index": 0}}',
            "must name a job",
        ),
    ],
)
def test_multi_worker_rejects_missing_or_malformed_tf_config(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(InputError, match=expected):
        distribute.get_distribution_strategy("multi_worker")


def test_parameter_server_needs_ps_jobs_and_the_chief_process(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    )
    with pytest.raises(InputError, match='no "chief" job'):
        distribute.get_distribution_strategy("parameter_server")
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"chief": ["a:1"], "worker": ["b:1"], "ps": ["c:1"]}, '
        '"task": {"type": "ps", "index": 0}}',
    )
    with pytest.raises(InputError, match="this process is a `ps` task"):
        distribute.get_distribution_strategy("parameter_server")


def test_chief_writes_into_model_dir_and_cleanup_never_touches_it(tmp_path):
    strategy = distribute.get_distribution_strategy("cpu")
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    assert distribute.worker_model_dir(model_dir, strategy) == str(model_dir)
    distribute.cleanup_worker_model_dir(model_dir, model_dir)
    distribute.cleanup_worker_model_dir(tmp_path, model_dir)  # not one of ours: left alone
    assert model_dir.is_dir()


def test_per_replica_batch_on_one_replica():
    strategy = distribute.get_distribution_strategy("cpu")
    assert distribute.per_replica_batch(32, strategy) == 32
    assert "positive integer" in _error(lambda: distribute.per_replica_batch(0, strategy))


@pytest.mark.parametrize(
    "auto_shard, policy",
    [("auto", "AUTO"), ("data", "DATA"), ("file", "FILE"), ("OFF", "OFF")],
)
def test_distribute_dataset_sets_the_shard_policy(auto_shard, policy):
    strategy = distribute.get_distribution_strategy("cpu")
    dataset = distribute.distribute_dataset(strategy, tf.data.Dataset.range(8).batch(4), auto_shard)
    assert dataset.options().experimental_distribute.auto_shard_policy == getattr(
        tf.data.experimental.AutoShardPolicy, policy
    )
    assert dataset.cardinality().numpy() == 2  # still a plain dataset: fit sees its length


def test_distribute_dataset_rejects_unknown_policy():
    strategy = distribute.get_distribution_strategy("cpu")
    message = _error(
        lambda: distribute.distribute_dataset(strategy, tf.data.Dataset.range(2), "files")
    )
    assert "auto_shard='files'" in message and "Did you mean: file?" in message


def test_file_sources_are_counted_for_the_fallback_message(tmp_path):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"part-{i}.tfrecord"))
        with tf.io.TFRecordWriter(files[-1]) as writer:
            writer.write(b"x")
    assert distribute._file_sources(tf.data.TFRecordDataset(files)) == (True, 3)
    interleaved = tf.data.Dataset.from_tensor_slices(files[:2]).interleave(tf.data.TFRecordDataset)
    assert distribute._file_sources(interleaved.batch(2)) == (True, 2)
    in_memory = tf.data.Dataset.from_tensor_slices(np.zeros((4, 2))).batch(2)
    assert distribute._file_sources(in_memory) == (False, None)


# === Precision and XLA ===


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_set_precision_sets_the_global_policy(restore_dtype_policy, precision):
    assert distribute.set_precision(precision) == precision
    assert keras.config.dtype_policy().name == precision
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert layer.kernel.dtype == "float32"  # variables stay float32 under mixed policies


def test_mixed_float16_compile_adds_loss_scaling_and_bfloat16_does_not(restore_dtype_policy):
    for precision, scaled in [("mixed_float16", True), ("mixed_bfloat16", False)]:
        distribute.set_precision(precision)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1, dtype="float32")]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) is scaled
        x = np.ones((8, 4), "float32")
        loss = model.fit(x, np.ones((8, 1), "float32"), epochs=1, verbose=0).history["loss"][0]
        assert np.isfinite(loss)


@pytest.fixture(scope="module")
def calibration_cache(tmp_path_factory):
    """One CPU calibration cache for this module's `auto` tests (never the user's)."""
    return tmp_path_factory.mktemp("calibration_cache")


def test_auto_precision_follows_the_measurement(restore_dtype_policy, calibration_cache,
                                                monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(calibration_cache))
    with caplog.at_level("INFO", logger="tfhub_finetune.distribute"):
        chosen = distribute.set_precision("auto")
    assert chosen == distribute.resolve_precision("auto")
    assert keras.config.dtype_policy().name == chosen
    if not tf.config.list_physical_devices("GPU"):
        # The CPU's own calibration decides, cached under XDG_CACHE_HOME.
        figures = calibration.cpu_calibration()
        assert not figures.measured
        assert figures.path.parent == calibration_cache / "tfhub_finetune"
        assert chosen == calibration.decide(figures.seconds, jit_compile=False).precision
        line = next(r.getMessage() for r in caplog.records if "precision=auto" in r.getMessage())
        assert "mixed_bfloat16" in line and "x float32" in line and str(figures.path) in line
    else:
        assert chosen in ("mixed_float16", "float32")
    assert "Did you mean: mixed_float16" in _error(lambda: distribute.set_precision("mixed_float"))


def test_resolve_jit_compile_on_one_device(calibration_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(calibration_cache))
    strategy = distribute.get_distribution_strategy("cpu")
    assert distribute.resolve_jit_compile("TRUE", strategy) is True
    assert distribute.resolve_jit_compile(False, strategy) is False
    # An explicit CPU device: the calibration decides, at the policy in force.
    chosen = distribute.resolve_jit_compile("auto", strategy)
    figures = calibration.cpu_calibration(configs=("float32", "float32+xla"))
    assert not figures.measured  # resolve_jit_compile measured and cached them
    assert chosen is calibration.decide(figures.seconds, precision="float32").jit_compile
    if tf.config.list_logical_devices("GPU"):
        assert distribute.resolve_jit_compile("auto") is True
    assert "Invalid value for `jit_compile`" in _error(
        lambda: distribute.resolve_jit_compile("xla")
    )


# === Several devices / processes (subprocesses) ===

_MIRRORED_SCRIPT = """
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
from tfhub_finetune import calibration, distribute
from tfhub_finetune.errors import InputError


def error(fn):
    try:
        fn()
    except InputError as err:
        return str(err)
    return None


out = {}
mirrored = distribute.get_distribution_strategy("mirrored")
out["mirrored_replicas"] = mirrored.num_replicas_in_sync
out["mirrored_devices"] = list(mirrored.extended.worker_devices)
out["describe"] = distribute.describe_strategy(mirrored)
out["auto"] = distribute.describe_strategy(distribute.get_distribution_strategy("auto"))
out["per_replica_32"] = distribute.per_replica_batch(32, mirrored)
out["per_replica_33"] = error(lambda: distribute.per_replica_batch(33, mirrored))
out["jit_auto"] = distribute.resolve_jit_compile("auto", mirrored)
out["jit_true"] = error(lambda: distribute.resolve_jit_compile(True, mirrored))
out["nccl_on_cpu"] = error(lambda: distribute.get_distribution_strategy("mirrored", all_reduce="nccl"))

# (a) Same global batch on 1 device and on 2 mirrored replicas: same losses and weights.
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 8)).astype("float32")
y = rng.integers(0, 3, size=96).astype("int32")
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def train(strategy, initial=None):
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(3),
        ])
        if initial is not None:
            model.set_weights(initial)
        start = [w.copy() for w in model.get_weights()]
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    history = model.fit(
        distribute.distribute_dataset(strategy, dataset), epochs=3, verbose=0, shuffle=False
    )
    return model, start, history.history["loss"], model.evaluate(dataset, verbose=0)


keras.utils.set_random_seed(0)
single, start, loss_single, eval_single = train(distribute.get_distribution_strategy("cpu"))
double, _, loss_mirrored, eval_mirrored = train(mirrored, initial=start)
out["steps"] = int(single.optimizer.iterations.numpy())
out["loss_single"], out["loss_mirrored"] = loss_single, loss_mirrored
out["eval_single"], out["eval_mirrored"] = eval_single, eval_mirrored
out["max_weight_diff"] = max(
    float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), double.get_weights())
)
out["max_weight_change"] = max(
    float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), start)
)
print("TEST_RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    return _run_script(tmp_path_factory.mktemp("mirrored"), "mirrored", _MIRRORED_SCRIPT)


def test_mirrored_over_two_logical_cpus(mirrored_run):
    assert mirrored_run["mirrored_replicas"] == 2
    assert [d[-5:] for d in mirrored_run["mirrored_devices"]] == ["CPU:0", "CPU:1"]
    assert (
        "MirroredStrategy" in mirrored_run["describe"] and "2 replicas" in mirrored_run["describe"]
    )
    # auto mirrors GPUs only; logical CPU devices split one CPU and gain nothing.
    assert mirrored_run["auto"].startswith("OneDeviceStrategy")
    assert "auto" in mirrored_run["nccl_on_cpu"] and "needs GPUs" in mirrored_run["nccl_on_cpu"]


def test_global_batch_must_divide_across_replicas(mirrored_run):
    assert mirrored_run["per_replica_32"] == 16
    assert "Received: batch_size=33, num_replicas=2." in mirrored_run["per_replica_33"]
    assert "multiple of 2, e.g. 32 or 34" in mirrored_run["per_replica_33"]


def test_xla_is_off_and_refused_with_several_replicas(mirrored_run):
    assert mirrored_run["jit_auto"] is False
    assert "multi-replica" in mirrored_run["jit_true"]


def test_mirrored_matches_one_device_with_the_same_global_batch(mirrored_run):
    assert mirrored_run["steps"] == 18
    assert mirrored_run["max_weight_change"] > 1e-2  # training really moved the weights
    np.testing.assert_allclose(
        mirrored_run["loss_mirrored"], mirrored_run["loss_single"], rtol=1e-5
    )
    np.testing.assert_allclose(
        mirrored_run["eval_mirrored"], mirrored_run["eval_single"], rtol=1e-5
    )
    assert mirrored_run["max_weight_diff"] < 1e-5


_PARAMETER_SERVER_SCRIPT = """
import json, os, socket

import keras
import numpy as np
import tensorflow as tf
from tfhub_finetune import calibration, distribute
from tfhub_finetune.errors import InputError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


cluster = {job: [f"127.0.0.1:{free_port()}"] for job in ("chief", "worker", "ps")}
# The worker and ps servers live in this process: enough for the chief to connect.
spec = tf.train.ClusterSpec(cluster)
for job in ("worker", "ps"):
    tf.distribute.Server(spec, job_name=job, task_index=0, protocol="grpc", start=True)
os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})

out = {}
strategy = distribute.get_distribution_strategy("parameter_server")
out["type"] = type(strategy).__name__
out["is_chief"] = distribute.is_chief(strategy)
try:
    distribute.check_keras_fit_support(strategy)
except InputError as err:
    out["fit_support"] = str(err)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
data = tf.data.Dataset.from_tensor_slices((np.ones((8, 4), "float32"), np.ones((8, 1), "float32")))
try:
    model.fit(data.batch(4).repeat(), steps_per_epoch=1, verbose=0)
    out["keras_fit"] = "ran"
except Exception as err:
    out["keras_fit"] = f"{type(err).__name__}: {err}"
print("TEST_RESULT " + json.dumps(out), flush=True)
os._exit(0)  # the in-process servers never shut down on their own
"""


def test_parameter_server_strategy_and_why_fit_refuses_it(tmp_path):
    out = _run_script(tmp_path, "parameter_server", _PARAMETER_SERVER_SCRIPT)
    assert out["type"] == "ParameterServerStrategyV2"
    assert out["is_chief"] is True
    assert "ClusterCoordinator" in out["fit_support"]
    # The reason `check_keras_fit_support` exists: if Keras ever drives a
    # ClusterCoordinator itself, this fails and the refusal can go.
    assert "ClusterCoordinator.create_per_worker_dataset" in out["keras_fit"]


_WORKER_SCRIPT = """
import json, logging, os, sys

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from tfhub_finetune import calibration, distribute

# First TensorFlow call of the program: collective ops must be configured before
# the runtime starts.
strategy = distribute.get_distribution_strategy("multi_worker", all_reduce="ring")

import keras
import numpy as np
import tensorflow as tf
from tfhub_finetune.builders.text_classifier import build_text_classifier
from tfhub_finetune.errors import InputError

model_dir, result_path = sys.argv[1], sys.argv[2]
out = {"is_chief": distribute.is_chief(strategy), "describe": distribute.describe_strategy(strategy)}
global_batch = 8
out["per_replica"] = distribute.per_replica_batch(global_batch, strategy)

# Identical random token ids on both workers; DATA sharding gives each half of every batch.
rng = np.random.default_rng(0)
n, seq = 64, 16
features = {
    "token_ids": rng.integers(1000, 20000, size=(n, seq), dtype=np.int32),
    "padding_mask": np.ones((n, seq), dtype=np.int32),
    "segment_ids": np.zeros((n, seq), dtype=np.int32),
}
labels = rng.integers(0, 2, size=(n,), dtype=np.int32)
dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(global_batch).repeat()
try:
    distribute.distribute_dataset(strategy, dataset, auto_shard="file")
except InputError as err:
    out["file_shard_error"] = str(err)
train = distribute.distribute_dataset(strategy, dataset, auto_shard="auto")

with strategy.scope():
    model = build_text_classifier("scratch_text_encoder", num_classes=2)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        jit_compile=distribute.resolve_jit_compile("auto", strategy),
    )
initial = [w.copy() for w in model.get_weights()]

out_dir = distribute.worker_model_dir(model_dir, strategy)
out["out_dir"] = out_dir
callbacks = [
    keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "ckpt.weights.h5"), save_weights_only=True),
    keras.callbacks.CSVLogger(os.path.join(out_dir, "training_log.csv")),
]
try:
    history = model.fit(train, epochs=2, steps_per_epoch=3, callbacks=callbacks, verbose=0)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"loss": history.history["loss"][-1]}, f)
    out["files_before_cleanup"] = sorted(os.listdir(out_dir))
finally:
    distribute.cleanup_worker_model_dir(out_dir, model_dir)
out["out_dir_exists_after_cleanup"] = os.path.isdir(out_dir)
out["steps"] = int(model.optimizer.iterations.numpy())
out["weight_change"] = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), initial))
np.savez(result_path, *model.get_weights())
print("TEST_RESULT " + json.dumps(out), flush=True)
"""


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_two_workers_train_identically_and_only_the_chief_writes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER_SCRIPT))
    model_dir = tmp_path / "model_dir"
    # Non-chief temp dirs land here, so even a killed worker leaves nothing in /tmp.
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    logs = []
    try:
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            log = open(tmp_path / f"worker{index}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(model_dir), str(tmp_path / f"w{index}.npz")],
                    cwd=REPO_ROOT,
                    env=_subprocess_env(TF_CONFIG=json.dumps(tf_config), TMPDIR=str(worker_tmp)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + 240
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()

    results = []
    for index, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        lines = [line for line in output.splitlines() if line.startswith(RESULT)]
        assert process.returncode == 0 and lines, f"worker {index} failed:\n{output[-3000:]}"
        results.append(json.loads(lines[-1][len(RESULT) :]))
    chief, other = results

    assert chief["is_chief"] is True and other["is_chief"] is False
    assert (
        "MultiWorkerMirroredStrategy" in chief["describe"] and "of 2 worker(s)" in chief["describe"]
    )
    assert chief["per_replica"] == 4
    assert chief["steps"] == other["steps"] == 6
    assert chief["weight_change"] > 1e-4

    first, second = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(first.files) == len(second.files) > 0
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])

    # Only the chief's directory is the model_dir, and it holds everything.
    assert chief["out_dir"] == str(model_dir)
    assert Path(other["out_dir"]).resolve().parent == worker_tmp.resolve()
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "ckpt.weights.h5",
        "metrics.json",
        "training_log.csv",
    ]
    assert other["files_before_cleanup"] == chief["files_before_cleanup"]  # it wrote, elsewhere
    assert other["out_dir_exists_after_cleanup"] is False
    assert chief["out_dir_exists_after_cleanup"] is True

    # In-memory data cannot be split by file: FILE is refused, AUTO says it falls back.
    assert "auto_shard=file cannot split this dataset by file" in chief["file_shard_error"]
    assert "falls back from FILE to DATA sharding" in outputs[0]


def test_serving_threads_at_batch_1_are_what_this_machine_measures(tmp_path):
    """TensorFlow's default pools except at batch 1, where the calibration (measured on this
    machine, cached) decides; explicit counts win; after the runtime starts nothing changes."""
    from tfhub_finetune import calibration

    # A fresh process: thread pools are fixed once TensorFlow's runtime starts.
    script = (
        "import tensorflow as tf\n"
        "from tfhub_finetune.distribute import set_serving_threads\n"
        "pools = lambda: (tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
        "print(set_serving_threads(64), pools())\n"
        "print(set_serving_threads(1, inter_op=2), pools())\n"
        "tf.constant(1.0) + 1.0\n"
        "print(set_serving_threads(1, 3, 3))\n"  # Too late now: left as they are.
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cached = calibration.serving_thread_calibration(cache_dir=tmp_path / "tfhub_finetune")
    assert not cached.measured  # The child measured and cached it (child processes per setting).
    assert set(cached.seconds) == set(calibration.SERVING_THREAD_CONFIGS)
    assert all(0 < value < 1 for value in cached.seconds.values())
    assert cached.key["workload"] == "serve_batch1_threads"
    intra = calibration.decide_serving_threads(cached.seconds)[0][0]
    lines = done.stdout.strip().splitlines()
    # The first batch-1 call measured (a fresh cache), and said so before it did.
    assert [line for line in lines if line.startswith("Measuring ")] == [
        f"Measuring batch-1 latency per thread setting on this CPU "
        f"({', '.join(calibration.SERVING_THREAD_CONFIGS)}); once, then cached in {cached.path}."]
    assert [line for line in lines if not line.startswith("Measuring ")] == [
        "(0, 0) (0, 0)", f"({intra}, 2) ({intra}, 2)", f"({intra}, 2)"]
    with pytest.raises(InputError, match="intra_op"):
        distribute.set_serving_threads(1, intra_op=-2)
