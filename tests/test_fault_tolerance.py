"""A pipeline killed (SIGKILL) or stopped (SIGTERM) mid-run resumes exactly where it was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, run_pipeline
from tfhub_finetune import training
from tfhub_finetune.errors import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def _args(model_dir, sst2_dir, minilm_l3_dir):
    return [
        f"--backbone={minilm_l3_dir}",
        f"--train_data={sst2_dir / 'train.tsv'}",
        f"--eval_data={sst2_dir / 'dev.tsv'}",
        f"--model_dir={model_dir}",
        "--max_train_examples=480",
        "--epochs=2",
        "--batch_size=16",
        "--sequence_length=48",
        "--learning_rate=1e-4",
        "--pooling=mean",
        "--backup_every_steps=8",
        "--bucketing=false",
        "--verbose=0",
    ]


def _history(model_dir):
    lines = (model_dir / "backup" / "backup_log.jsonl").read_text().splitlines()
    return {json.loads(line)["global_step"]: json.loads(line) for line in lines}


def _start_and_interrupt(args, model_dir, sig):
    """Starts the pipeline, waits for its first committed backup, then sends `sig`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.text_classify", *args], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    state = model_dir / "backup" / "backup_state.json"
    deadline = time.time() + 600
    while not state.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no backup within 10 minutes"
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sst2_dir, minilm_l3_dir):
    model_dir = tmp_path_factory.mktemp("whole")
    proc = run_pipeline("pipelines.text_classify", *_args(model_dir, sst2_dir, minilm_l3_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return metrics, _history(model_dir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_at_saved_step(tmp_path, sst2_dir, minilm_l3_dir, uninterrupted, sig):
    whole_metrics, whole_history = uninterrupted
    model_dir = tmp_path / "run"
    args = _args(model_dir, sst2_dir, minilm_l3_dir)
    code, out, err = _start_and_interrupt(args, model_dir, sig)
    saved = json.loads((model_dir / "backup" / "backup_state.json").read_text())
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        # A preempted run is a failure a scheduler restarts: backup saved, exit 143, one line.
        assert code == PREEMPTED_EXIT_CODE == 143, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            f"error: Interrupted at step {saved['global_step']} (epoch {saved['epoch'] + 1}, "
            f"step {saved['step_in_epoch']} of 30) by SIGTERM; the backup is saved. Rerun the "
            "same command to resume."), err[-2000:]
        assert "Traceback" not in err
        # The partial epoch was neither evaluated, logged nor checkpointed as a whole one.
        assert not (model_dir / "metrics.json").exists()
        assert not (model_dir / "model.keras").exists()
        log = model_dir / "training_log.csv"
        logged = log.read_text().splitlines() if log.exists() else []
        assert len(logged) == (1 + saved["epoch"] if saved["epoch"] else 0), logged
        if (model_dir / "best.json").exists():
            assert json.loads((model_dir / "best.json").read_text())["epoch"] <= saved["epoch"]

    proc = run_pipeline("pipelines.text_classify", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"global step {saved['global_step']}," in proc.stdout, proc.stdout
    print(f"{sig.name}: resumed at global step {saved['global_step']}, "
          f"learning rate {saved['learning_rate']:.6g}")
    # The learning rate at the resumed step equals the uninterrupted run's at that step:
    # read from its backup log where it backed up that step, else from its schedule, which
    # is first checked against every step it logged.
    steps_per_epoch = min(s for s, e in whole_history.items() if e["epoch"] == 1 and
                          e["step_in_epoch"] == 0)
    total = 2 * steps_per_epoch
    schedule = training.WarmupLinearDecay(1e-4, total, int(round(total * 0.1)))
    for step, entry in whole_history.items():
        assert float(schedule(step)) == pytest.approx(entry["learning_rate"], rel=1e-5)
    expected = whole_history.get(saved["global_step"], {}).get(
        "learning_rate", float(schedule(saved["global_step"])))
    assert saved["learning_rate"] == pytest.approx(expected, rel=1e-5)
    # One row per epoch, with the learning rate, however the run was interrupted.
    rows = (model_dir / "training_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "0", "1"], rows
    assert "learning_rate" in rows[0].split(",")
    resumed = json.loads((model_dir / "metrics.json").read_text())
    print(f"dev accuracy: uninterrupted {whole_metrics['eval']['accuracy']:.4f}, "
          f"resumed {resumed['eval']['accuracy']:.4f}")
    assert abs(resumed["eval"]["accuracy"] - whole_metrics["eval"]["accuracy"]) <= 0.01
