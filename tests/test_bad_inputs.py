"""Every bad input ends in one line on stderr and exit code 2, and loses nothing.

The corpus is `tests/bad_inputs.CASES`. One process per pipeline runs all of
its cases through the pipeline's real `cli()`; cases marked `subprocess` also
run as their own `python -m` process. Set `BAD_INPUT_TABLE=path` to write the
table `case | exit | stderr line` there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.bad_inputs import CASES, GOOD_TSV, Case, image_folders
from tests.conftest import REPO_ROOT, run_pipeline

PREVIOUS_RUN = {"metrics.json": b'{"eval": {"accuracy": 0.9}}', "params.json": b"{}"}
PREVIOUS_EXPORT = {"m/1/saved_model.pb": b"previous export", "m/1/keep.txt": b"keep"}


def _fill(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)


def _snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    shared = root / "_shared"
    _fill(shared, {"good.tsv": GOOD_TSV, "images": image_folders({"ants": 3, "bees": 3}),
                   "saved_model/README": b"predict cases fail before a model loads"})
    names = {
        "good_tsv": str(shared / "good.tsv"),
        "good_images": str(shared / "images"),
        "saved_model": str(shared / "saved_model"),
    }
    argvs, before = {}, {}
    for case in CASES:
        case_dir = root / case.name
        case_dir.mkdir()
        _fill(case_dir, case.files)
        _fill(case_dir / "model", PREVIOUS_RUN)
        _fill(case_dir / "export", PREVIOUS_EXPORT)
        before[case.name] = _snapshot(case_dir / "model"), _snapshot(case_dir / "export")
        places = {**names, "dir": str(case_dir), "model_dir": str(case_dir / "model"),
                  "export_dir": str(case_dir / "export")}
        argvs[case.name] = [arg.format(**places) for arg in case.args]

    results: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    by_pipeline = defaultdict(list)
    for case in CASES:
        by_pipeline[case.pipeline].append(case)
    for module, cases in by_pipeline.items():
        spec = root / f"{module}.cases.json"
        out = root / f"{module}.results.json"
        spec.write_text(json.dumps([argvs[c.name] for c in cases]))
        proc = subprocess.run([sys.executable, "-m", "tests.bad_inputs", module, str(spec),
                               str(out)], cwd=REPO_ROOT, env=_env(), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
        for case, result in zip(cases, json.loads(out.read_text()), strict=True):
            results[case.name].append(("in-process", result))
    for case in CASES:
        if case.subprocess:
            proc = run_pipeline(case.pipeline, *argvs[case.name], env=_env(), timeout=600)
            results[case.name].append(("python -m", {
                "code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))

    table = ["case | exit | stderr line", "--- | --- | ---"]
    for case in CASES:
        for how, result in results[case.name]:
            lines = result["stderr"].strip().splitlines()
            shown = lines[-1] if len(lines) == 1 else f"({len(lines)} lines) " + " / ".join(lines)
            table.append(f"{case.name}{' (python -m)' if how != 'in-process' else ''} | "
                         f"{result['code']} | {shown[:300]}")
    if os.environ.get("BAD_INPUT_TABLE"):
        Path(os.environ["BAD_INPUT_TABLE"]).write_text("\n".join(table) + "\n")
    return root, results, before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(corpus, case: Case):
    root, results, before = corpus
    for how, result in results[case.name]:
        stderr = result["stderr"]
        assert "Traceback" not in stderr, f"{how}:\n{stderr[-3000:]}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"{how}: stderr is not one line:\n{stderr[-3000:]}"
        assert lines[0].startswith("error: ") and result["code"] == 2, (how, result["code"], lines)
        for text in case.expect:
            assert text in lines[0], f"{how}: {text!r} not named in: {lines[0]}"
    case_dir = root / case.name
    model, export = _snapshot(case_dir / "model"), _snapshot(case_dir / "export")
    assert (model, export) == before[case.name], "the model or export folder changed"


def test_every_pipeline_and_reader_is_covered():
    pipelines = {c.pipeline for c in CASES}
    assert pipelines >= {"pipelines.text_classify", "pipelines.image_classify",
                         "pipelines.predict", "pipelines.select_model",
                         "pipelines.token_classify"}
    args = " ".join(a for c in CASES for a in c.args) + " ".join(
        name for c in CASES for name in c.files)
    for reader in (".tsv", ".csv", ".jsonl", "tfds:", ".tfrecord", "imgs", "list.csv"):
        assert reader in args, reader
    # Every pipeline has a case that runs as its own process.
    assert {c.pipeline for c in CASES if c.subprocess} == pipelines
    assert len({c.name for c in CASES}) == len(CASES)
