"""Shared fixtures. Tests that need ../shared fail (never skip) when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The suite's CPU calibrations are measured beside the other worker's tests, so they live in the
# suite's own cache (kept between runs), never in the one a user's pipelines read and trust.
os.environ["XDG_CACHE_HOME"] = str(REPO_ROOT / ".pytest_cache" / "xdg")

from tfhub_finetune import tf_startup  # noqa: E402
from tfhub_finetune.paths import shared_dir  # noqa: E402

# In-process tests run on the CPU kernels a pipeline would (measured once into that cache).
tf_startup.choose_cpu_kernels()


def require_shared_path(relative: str) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        pytest.fail(
            f"Shared data/weights missing: {path} not found. These tests need the read-only "
            "shared/ folder beside the repo root (or TFHUB_FINETUNE_SHARED).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    return require_shared_path("data/sst2")


@pytest.fixture(scope="session")
def tiny_sst2(tmp_path_factory, sst2_dir) -> dict[str, str]:
    """The first 200 training and 100 dev sentences of SST-2 (selection's tiny runs)."""
    folder = tmp_path_factory.mktemp("sst2_tiny")
    for name, count in (("train", 200), ("dev", 100)):
        lines = (sst2_dir / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train": str(folder / "train.tsv"), "dev": str(folder / "dev.tsv")}


@pytest.fixture(scope="session")
def minilm_l3_dir() -> Path:
    return require_shared_path("weights/paraphrase_minilm_l3_v2")


def run_pipeline(module: str, *args: str, timeout: int = 600, env: dict | None = None):
    """Runs `python -m <module> <args>` from the repo root; returns CompletedProcess."""
    # As a user runs it: the pipeline's own default keeps TensorFlow's C++ logs quiet.
    full_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
