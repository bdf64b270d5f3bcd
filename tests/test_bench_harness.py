"""`make bench`'s machine bookkeeping: ISA detection, machine kinds, bf16 skipping, target summaries.

No framework is imported here (the harness imports neither TensorFlow nor
PyTorch), so these run in well under a second.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import _harness, run_all
from benchmarks import ours as ours_bench

AMX_XEON = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd \
avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: fpu
"""
AVX512_XEON = """processor	: 0
model name	: Intel(R) Xeon(R) Processor
flags		: fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 \
avx512_fp16
"""
SKYLAKE = """model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl
"""
AVX2_EPYC = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7R13 Processor
flags		: fpu sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 sha_ni
"""
ARM = "processor	: 0\nFeatures	: fp asimd evtstrm aes\n"


@pytest.mark.parametrize("cpuinfo, isa, kind", [
    (AMX_XEON, ["AMX-BF16", "AMX-INT8", "AVX512-BF16", "AVX512-FP16", "AVX512-VNNI", "AVX512F",
                "AVX-VNNI", "AVX2", "FMA"], "intel-xeon-platinum-8488c-amx"),
    (AVX512_XEON, ["AVX512-BF16", "AVX512-FP16", "AVX512-VNNI", "AVX512F", "AVX2", "FMA"],
     "intel-xeon-processor-avx512bf16"),
    (SKYLAKE, ["AVX512F", "AVX2", "FMA"], "intel-xeon-gold-6148-avx512"),
    (AVX2_EPYC, ["AVX2", "FMA"], "amd-epyc-7r13-avx2"),
])
def test_isa_and_kind_come_from_cpuinfo_on_each_machine_we_land_on(cpuinfo, isa, kind):
    machine = _harness.machine_summary(cpuinfo)
    assert machine["isa"] == isa  # AVX2-only machines no longer print an empty ISA line.
    assert machine["kind"] == kind
    assert machine["cpu"] == _harness.parse_cpuinfo(cpuinfo)[0]


def test_a_cpu_without_x86_features_still_gets_a_kind():
    model, flags = _harness.parse_cpuinfo(ARM)
    assert model == "" and "asimd" in flags
    assert _harness.isa_features(flags) == []
    assert _harness.machine_kind(model, flags).endswith("-baseline")


@pytest.mark.parametrize("probe, usable", [
    ({"float32": 80.0, "bfloat16": 231.0}, True),    # AMX Xeon: bf16 ~3x fp32.
    ({"float32": 300.0, "bfloat16": 150.0}, True),   # AVX512_BF16 without AMX: half, still runs.
    ({"float32": 110.0, "bfloat16": 2.1}, False),    # AVX2 EPYC: emulated, minutes per GEMM step.
    ({"error": "ModuleNotFoundError: No module named 'torch'"}, None),
    (None, None),
])
def test_bf16_is_skipped_only_where_the_probe_measures_it_emulated(probe, usable):
    verdict = _harness.bf16_verdict(probe)
    assert verdict["usable"] is usable
    if usable is False:
        assert "skipped" in verdict["reason"]


def test_skipped_bf16_system_is_left_out_and_said_so(tmp_path, monkeypatch, capsys):
    """The run's bf16 probe says no: torch_bf16 never starts, the output and results say why."""
    started = []

    def fake_child(module, mode, args, **kwargs):  # The child processes; their figures are made up.
        started.append((module, mode, args.get("dtype")))
        if mode == "probe_torch":
            return {"library": "torch", "float32": 110.0, "bfloat16": 2.0, "loadavg_1m": 0.1}
        return {"error": "not run in this test", "loadavg_1m": 0.1}

    monkeypatch.setattr(_harness, "run_child", fake_child)
    monkeypatch.setattr(run_all, "RESULTS_DIR", tmp_path)
    run_all.main(["--only=train", "--systems=torch_fp32,torch_bf16", "--repeats=1",
                  "--no-ablation", "--name=unit"])
    out = capsys.readouterr().out
    assert "SKIPPED torch_bf16: bf16 GEMM 2 GFLOP/s = 0.02x fp32's 110" in out
    assert [m for m in started if m[2] == "bf16"] == []
    assert ("benchmarks.torch_hf", "train", "fp32") in started
    record = json.loads((tmp_path / "unit.json").read_text())
    assert set(record["skipped"]) == {"torch_bf16"}
    assert "SKIPPED torch_bf16" in (tmp_path / "unit.md").read_text()
    assert "Targets per machine kind" in out


@pytest.mark.parametrize("served", ["bfloat16", "float32"])
def test_each_distinct_export_is_made_once_with_its_keywords(tmp_path, monkeypatch, served):
    """`ours` serves `--serving_precision=auto` (its DEFAULTS); the ablations export float32
    with the lean graph and with the Keras call; systems with equal keywords share one.
    Where `auto` served float32, the float32 ablation is ours itself: not exported again."""
    made = []

    def fake_child(module, mode, args, **kwargs):  # The child processes; their figures are made up.
        if mode == "export":
            made.append({k: args[k] for k in ("serving_precision", "lean_serving_graph")
                         if k in args})
            return {"precision": "float32", "serving_precision": "auto", "export_s": 1.0,
                    "compute_dtype": served if len(made) == 1 else "float32",
                    "saved_model": str(tmp_path / f"m{len(made)}"), "loadavg_1m": 0.1}
        return {"error": "not run in this test", "loadavg_1m": 0.1}

    monkeypatch.setattr(_harness, "run_child", fake_child)
    monkeypatch.setattr(run_all, "RESULTS_DIR", tmp_path)
    run_all.main(["--only=infer", "--systems=ours,ours_1thread", "--repeats=1", "--ablation",
                  "--name=unit"])
    keras_graph = {"serving_precision": "float32", "lean_serving_graph": False}
    if served == "float32":
        assert made == [{}, keras_graph]
        record = json.loads((tmp_path / "unit.json").read_text())
        assert "compute_dtype=float32" in record["skipped"]["ours_serve_float32"]
        assert "ours_serve_float32" not in record["systems"]
    else:
        assert made == [{}, {"serving_precision": "float32"}, keras_graph]
    assert ours_bench.DEFAULTS["serving_precision"] == "auto"
    assert ours_bench.DEFAULTS["lean_serving_graph"]


@pytest.mark.parametrize("resolved", ["mixed_bfloat16", "float32"])
def test_training_ablation_is_skipped_where_auto_chose_it(tmp_path, monkeypatch, resolved):
    started = []

    def fake_child(module, mode, args, **kwargs):  # The child processes; their figures are made up.
        started.append(args.get("flags"))
        if mode == "train" and args.get("flags") == run_all.OURS_FLAGS:
            return {"precision": resolved, "examples_per_s": 10.0, "cpu_ms_per_example": 100.0,
                    "warmup_s": 1.0, "examples": 8, "timed_s": 1.0, "loadavg_1m": 0.1}
        return {"error": "not run in this test", "loadavg_1m": 0.1}

    monkeypatch.setattr(_harness, "run_child", fake_child)
    monkeypatch.setattr(run_all, "RESULTS_DIR", tmp_path)
    run_all.main(["--only=train", "--systems=ours", "--repeats=2", "--ablation", "--name=unit"])
    float32_runs = started.count(["--precision=float32"])
    assert float32_runs == (0 if resolved == "float32" else 2)
    assert started.count(run_all.OURS_FLAGS) == 2


def test_targets_and_peak_memory_are_summarised_per_repetition():
    runs = []
    for repeat, (ours, t2, t1) in enumerate([(60.0, 25.0, 30.0), (50.0, 28.0, 20.0), (70.0, 30.0, 31.0)]):
        for system, value in (("ours", ours), ("torch_fp32", t2), ("torch_fp32_1thread", t1)):
            runs.append({"kind": "train", "system": system, "repeat": repeat, "examples_per_s": value,
                         "cpu_ms_per_example": 1000 / value, "peak_rss_mib": 900.0 if system == "ours"
                         else 1200.0, "examples": 8, "timed_s": 1.0})
    summary = run_all.summarise(runs, ["ours", "torch_fp32", "torch_fp32_1thread"])
    targets = run_all.check_targets(summary)
    # Per repetition against that repetition's best PyTorch: 2.0x, 1.79x, 2.26x -> median 2.0x.
    assert targets["train"]["ratio"] == pytest.approx(2.0)
    assert targets["train"]["met"] is True
    assert targets["infer_batch"]["met"] is None
    memory = summary["ratios"]["train_peak_rss_mib"]["torch_fp32"]["ours_vs_peer"]
    assert memory == pytest.approx(1200 / 900)  # >1: ours uses less.


def test_float_forms_meet_float_pytorch_and_int8_forms_every_pytorch_configuration():
    """torch_int8 is faster than torch_fp32 here: it must be the bar of our int8 form,
    and must not be the bar of our float32 SavedModel."""
    throughput = {"ours": 150.0, "ours_tflite_int8": 600.0, "torch_fp32": 100.0,
                  "torch_int8": 200.0}
    runs = [{"kind": "infer", "system": system, "repeat": repeat,
             "batch_examples_per_s": value, "batch_cpu_ms_per_example": 1000 / value,
             "batch1": {"p50_ms": 1000 / value, "p95_ms": 1500 / value}}
            for repeat in range(3) for system, value in throughput.items()]
    targets = run_all.check_targets(run_all.summarise(runs, list(throughput)))
    assert targets["infer_batch"]["ratio"] == pytest.approx(1.5)  # against torch_fp32
    assert targets["infer_batch_int8"]["ratio"] == pytest.approx(3.0)  # against torch_int8
    assert targets["infer_latency_int8"]["met"] is True
    assert "vs torch_int8" in targets["infer_batch_int8"]["text"]


def test_a_run_of_some_kinds_keeps_the_kind_files_other_rows(tmp_path):
    """`--only=train` after `--only=infer`: one file per machine kind holds both."""
    path = tmp_path / "kind.json"
    old_runs = [{"kind": "infer", "system": "torch_bf16", "repeat": 0},
                {"kind": "train", "system": "ours", "repeat": 0}]
    path.write_text(json.dumps({"date": "2026-12-01", "runs": old_runs}))
    new_runs = [{"kind": "train", "system": "ours", "repeat": 0, "examples_per_s": 9.0}]
    systems = [s for s in run_all.SYSTEMS if s.name == "ours"]
    args = run_all._parse(["--only=train"])
    runs, merged = run_all._merged(path, new_runs, systems, ["train"], args)
    assert [(r["kind"], r["system"]) for r in runs] == [("infer", "torch_bf16"), ("train", "ours")]
    assert runs[1]["examples_per_s"] == 9.0 and runs[0]["date"] == "2026-12-01"
    assert [s.name for s in merged] == ["ours", "torch_bf16"]
    args = run_all._parse(["--only=train", "--no-merge"])
    assert run_all._merged(path, new_runs, systems, ["train"], args)[0] == new_runs
