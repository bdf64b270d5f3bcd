"""The CPU calibration behind `--precision=auto` / `--jit_compile=auto`: cache, decision, wiring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from tfhub_finetune import calibration, distribute

REPO_ROOT = Path(__file__).resolve().parent.parent
# A narrow layer keeps each real measurement to a few seconds.
HIDDEN = 64


@pytest.fixture
def restore_dtype_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real calibration into a fresh cache folder."""
    cache = tmp_path_factory.mktemp("calibration")
    return calibration.cpu_calibration(HIDDEN, cache_dir=cache, recalibrate=False)


def test_calibration_is_measured_once_then_read_from_the_cache(measured, capsys):
    assert measured.measured
    assert set(measured.seconds) == {"float32", "mixed_bfloat16"}
    assert all(value > 0 for value in measured.seconds.values())
    stamp, text = measured.path.stat().st_mtime_ns, measured.path.read_text()
    record = json.loads(text)
    assert record["key"]["hidden_size"] == HIDDEN
    assert record["runs"] == {"float32|mixed_bfloat16": measured.seconds}

    capsys.readouterr()
    again = calibration.cpu_calibration(HIDDEN, cache_dir=measured.path.parent)
    assert not again.measured and again.seconds == measured.seconds
    assert capsys.readouterr().out == ""  # A cached read is silent.
    # Not re-measured: the file was neither rewritten nor touched.
    assert measured.path.stat().st_mtime_ns == stamp and measured.path.read_text() == text
    # Another set (XLA) is measured in its own rotation and kept beside the first in the file.
    xla = calibration.cpu_calibration(HIDDEN, ("float32", "float32+xla"),
                                      cache_dir=measured.path.parent)
    assert xla.measured and xla.path == measured.path
    # A measurement says what it measures, and where it keeps it, before it starts.
    assert capsys.readouterr().out == (
        "Measuring a training step's time per precision on this CPU (float32, float32+xla); "
        f"once, then cached in {xla.path}.\n")
    assert set(xla.seconds) == {"float32", "float32+xla"}
    assert json.loads(xla.path.read_text())["runs"] == {
        "float32|mixed_bfloat16": measured.seconds, "float32|float32+xla": xla.seconds}
    assert calibration.cpu_calibration(HIDDEN, cache_dir=xla.path.parent).seconds == measured.seconds
    # Another hidden size is another workload: another file.
    assert calibration._cache_name({**record["key"], "hidden_size": 128}) != measured.path.name


def test_a_corrupted_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch):
    first = calibration.cpu_calibration(HIDDEN, cache_dir=tmp_path)
    first.path.write_text('{"key": {"cpu": "trunc')
    redone = calibration.cpu_calibration(HIDDEN, cache_dir=tmp_path)
    assert redone.measured and redone.path == first.path
    assert json.loads(first.path.read_text())["runs"]["float32|mixed_bfloat16"] == redone.seconds
    # The environment variable forces a new measurement of a valid cache.
    stamp = first.path.stat().st_mtime_ns
    monkeypatch.setenv(calibration.RECALIBRATE_ENV, "1")
    assert calibration.cpu_calibration(HIDDEN, cache_dir=tmp_path).measured
    assert first.path.stat().st_mtime_ns != stamp


def test_the_cache_file_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = calibration.cpu_calibration(HIDDEN, cache_dir=tmp_path / "new").path
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.default_cache_dir() == tmp_path / "tfhub_finetune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert calibration.default_cache_dir() == (
        calibration.Path(os.path.expanduser("~")) / ".cache" / "tfhub_finetune")


# Recorded figures (seconds per step) of the three CPU kinds we land on.
AMX = {"float32": 0.40, "mixed_bfloat16": 0.10, "float32+xla": 0.38, "mixed_bfloat16+xla": 0.12}
AVX512 = {"float32": 0.20, "mixed_bfloat16": 0.40, "float32+xla": 0.19, "mixed_bfloat16+xla": 0.35}
AVX2 = {"float32": 0.20, "mixed_bfloat16": 10.0, "float32+xla": 0.21, "mixed_bfloat16+xla": 9.0}


def test_decide_is_a_pure_function_of_the_figures():
    amx = calibration.decide(AMX, precision="auto", jit_compile=False)
    assert (amx.precision, amx.jit_compile) == ("mixed_bfloat16", False)
    assert "4.00x" in amx.reason
    assert calibration.decide(AVX512, jit_compile=False).precision == "float32"
    assert calibration.decide(AVX2, jit_compile=False).precision == "float32"
    # Just under / at the margin.
    near = {"float32": 1.29, "mixed_bfloat16": 1.0}
    assert calibration.decide(near, jit_compile=False).precision == "float32"
    assert calibration.decide(near, jit_compile=False, margin=1.25).precision == "mixed_bfloat16"
    # XLA: on only when it clears the margin at the chosen precision.
    both = calibration.decide(AMX)
    assert (both.precision, both.jit_compile) == ("mixed_bfloat16", False)
    xla_wins = {**AVX512, "float32+xla": 0.10}
    assert calibration.decide(xla_wins, precision="float32").jit_compile is True
    # Precision with XLA forced on compares the XLA figures.
    assert calibration.decide(AVX2, jit_compile=True).precision == "float32"
    # Missing figures never switch anything on; fixed choices pass through.
    assert calibration.decide({}, jit_compile="auto") == calibration.Decision(
        "float32", False, calibration.decide({}).reason)
    fixed = calibration.decide(AMX, precision="float32", jit_compile=True)
    assert (fixed.precision, fixed.jit_compile) == ("float32", True)


def test_batch1_threads_are_decided_from_measured_latencies():
    # Recorded: the AVX-512 Xeon (one thread 7.5 vs 11.7 ms p50) and the AMX Xeon (13.5 vs 11.2).
    threads, reason = calibration.decide_serving_threads(
        {"threads=default": 0.0117, "threads=1": 0.0075})
    assert threads == (1, 1) and "1.56x" in reason
    assert calibration.decide_serving_threads(
        {"threads=default": 0.0112, "threads=1": 0.0135})[0] == (0, 0)
    # Within the margin, or a figure missing: TensorFlow's default pools.
    assert calibration.decide_serving_threads({"threads=default": 0.012, "threads=1": 0.010})[0] == (0, 0)
    assert calibration.decide_serving_threads({"threads=1": 0.001})[0] == (0, 0)
    # The fastest setting wins: one intra-op thread beside the default inter-op pool (where the
    # lean graph's two slices run at once), as measured on the EPYC (8.6 vs 10.9 ms; 1+1 9.4).
    threads, reason = calibration.decide_serving_threads(
        {"threads=default": 0.0109, "threads=1": 0.0094, "intra_op=1": 0.0080}, margin=1.25)
    assert threads == (1, 0) and reason.startswith("intra_op=1 1.36x")


def test_batch1_threads_are_timed_on_the_served_model_itself(tmp_path, monkeypatch):
    """`set_serving_threads` with a SavedModel times its own signature in each thread setting's
    child, on the given requests (strings, bytes and numbers travel to the children; a request
    it refuses is left out), cached per model graph, not under the proxy layer's key."""
    import tensorflow as tf

    class Parse(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string),
                                      tf.TensorSpec([None, 3], tf.int32)])
        def serve(self, text, ids):
            return {"value": tf.strings.to_number(text) + tf.cast(tf.reduce_sum(ids, 1), tf.float32)}

    module = Parse()
    path = tmp_path / "model" / "1"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "tfhub_finetune"
    requests = [{"text": ["12"], "ids": [[1, 2, 3]]}, {"text": [b"4.5"], "ids": [[0, 0, 1]]},
                {"text": ["not a number"], "ids": [[0, 0, 0]]}]
    distribute.set_serving_threads(1, saved_model=path, requests=requests)
    figures = calibration.serving_thread_calibration(saved_model=path, requests=requests,
                                                     cache_dir=cache)
    assert not figures.measured  # set_serving_threads measured it, on the model.
    assert set(figures.seconds) == set(calibration.SERVING_THREAD_CONFIGS)
    assert all(0 < value < 1 for value in figures.seconds.values())
    assert figures.key["workload"] == "serve_batch1_threads:saved_model"
    assert len(figures.key["model"]) == 16
    assert [p.name for p in cache.iterdir()] == [figures.path.name]  # The proxy never ran.

    with pytest.raises(RuntimeError, match="answered none of the timing requests"):
        calibration.serving_thread_calibration(saved_model=path, requests=requests[2:],
                                               cache_dir=cache, recalibrate=True)
    with pytest.raises(ValueError, match="needs at least one request"):
        calibration.serving_thread_calibration(saved_model=path, cache_dir=cache)


def test_a_thread_calibration_that_cannot_run_leaves_tensorflows_default_pools(
        tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("The serving-thread calibration child failed: no output")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibration, "_measure_serving_threads", broken)
    with caplog.at_level("WARNING", logger="tfhub_finetune.distribute"):
        threads = distribute.set_serving_threads(1)
    assert "could not run" in caplog.text and "no output" in caplog.text
    # This test process's runtime has started, so the pools are whatever they already were.
    import tensorflow as tf

    assert threads == (tf.config.threading.get_intra_op_parallelism_threads(),
                       tf.config.threading.get_inter_op_parallelism_threads())


def test_accelerators_are_decided_without_measuring():
    assert distribute.accelerator_precision(True, [])[0] == "mixed_bfloat16"
    assert distribute.accelerator_precision(False, [(8, 0), (7, 5)])[0] == "mixed_float16"
    assert distribute.accelerator_precision(False, [(8, 0), (6, 1)])[0] == "float32"
    assert distribute.accelerator_precision(False, []) is None


def test_explicit_precision_and_jit_never_calibrate(tmp_path, monkeypatch, restore_dtype_policy):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    strategy = distribute.get_distribution_strategy("cpu")
    assert distribute.set_precision("float32", strategy) == "float32"
    assert distribute.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert distribute.resolve_jit_compile("false", strategy) is False
    assert distribute.resolve_jit_compile(True, strategy) is True
    assert not any(tmp_path.rglob("*"))
    assert keras.config.dtype_policy().name == "float32"


def test_onednn_is_decided_from_measured_steps():
    off_faster = {"onednn=off": 0.20, "onednn=on": 0.30}
    assert calibration.decide_onednn({"onednn=off": 0.34, "onednn=on": 0.16})[0] == "1"
    assert calibration.decide_onednn(off_faster)[0] == "0"
    assert calibration.decide_onednn({"onednn=off": 0.34, "onednn=on": 0.32})[0] is None
    # A setting that did not take effect (0.0) or was not measured never wins.
    assert calibration.decide_onednn({"onednn=off": 0.34, "onednn=on": 0.0})[0] is None
    assert calibration.decide_onednn({"onednn=on": 0.1})[0] is None
    assert "1.50x" in calibration.decide_onednn(off_faster)[1]


def test_onednn_is_measured_in_a_child_per_setting_and_cached(tmp_path):
    figures = calibration.onednn_calibration(HIDDEN, cache_dir=tmp_path)
    assert figures.measured and set(figures.seconds) == set(calibration.ONEDNN_CONFIGS)
    # Both settings ran (this TensorFlow has oneDNN kernels on x86) and took real time.
    assert all(0 < seconds < 10 for seconds in figures.seconds.values()), figures.seconds
    again = calibration.onednn_calibration(HIDDEN, cache_dir=tmp_path)
    assert not again.measured and again.seconds == figures.seconds
    # Each child left its precision figures, keyed by its kernels, for the process that trains.
    child_keys = [json.loads(path.read_text())["key"] for path in tmp_path.glob("*.json")
                  if path != figures.path]
    assert sorted(key["onednn"] for key in child_keys) == [False, True]


def test_choose_cpu_kernels_sets_the_variable_before_tensorflow_starts(tmp_path):
    env_name = calibration.ONEDNN_ENV
    _seed_onednn_cache(tmp_path, {"onednn=off": 0.34, "onednn=on": 0.16})  # An AVX2 EPYC's.
    script = ("import os, sys; from tfhub_finetune import tf_startup; "
              f"line = tf_startup.choose_cpu_kernels(cache_dir={str(tmp_path)!r}); "
              f"print(line); print(os.environ.get({env_name!r}), 'tensorflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != env_name}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    line, state = done.stdout.strip().splitlines()
    assert "oneDNN 2.12x Eigen" in line and "cached" in line
    assert state == "1 False"  # Set, and TensorFlow still unimported: read from the cache.
    # A user's own setting is kept, whatever was measured.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, env_name: "0"}, timeout=120, check=True)
    assert done.stdout.strip().splitlines() == [f"{env_name}=0 from the environment: kept",
                                                "0 False"]


def _seed_onednn_cache(folder: Path, seconds: dict) -> None:
    key = calibration._onednn_key(calibration.DEFAULT_HIDDEN_SIZE)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "runs": {"|".join(sorted(seconds)): seconds}}
    (folder / calibration._cache_name(key)).write_text(json.dumps(record))


@pytest.mark.parametrize("seconds,enabled", [
    ({"onednn=off": 0.16, "onednn=on": 0.34}, "False"),
    ({"onednn=off": 0.34, "onednn=on": 0.16}, "True"),
])
def test_pipelines_import_tensorflow_with_the_kernels_measured_faster(tmp_path, seconds, enabled):
    # Both outcomes, so the test holds whichever TensorFlow's own default is on this CPU.
    _seed_onednn_cache(tmp_path / "tfhub_finetune", seconds)
    script = ("from pipelines import flags; flags.prepare_tensorflow_startup(); "
              "import tensorflow; from tfhub_finetune import calibration; "
              "print(calibration.onednn_enabled())")
    env = {**{k: v for k, v in os.environ.items() if k != calibration.ONEDNN_ENV},
           "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, check=True, cwd=REPO_ROOT)
    assert done.stdout.strip().splitlines()[-1] == enabled


def test_choosing_kernels_adds_no_line_to_a_failing_pipelines_stderr(tmp_path):
    # The kernel choice runs at TensorFlow's import, before the data is read: a bad row found
    # after it must still end with exactly one stderr line (the decision goes to debug logs).
    _seed_onednn_cache(tmp_path / "cache" / "tfhub_finetune", {"onednn=off": 0.34, "onednn=on": 0.16})
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\nfine film\t1\ndull film\tnot-a-label\n", encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items()
              if k not in (calibration.ONEDNN_ENV, "TF_CPP_MIN_LOG_LEVEL")},
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.text_classify", "--backbone=minilm_l6_h384",
         f"--train_data={data}", f"--model_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: Row 3 of ") and "CPU kernels: oneDNN" in done.stdout
