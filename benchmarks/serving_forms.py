"""Re-measure the serving forms of a trained run, with float32 TFLite beside them.

    python -m benchmarks.serving_forms --model_dir=runs/int8_hymenoptera \
        --export_dir=runs/exports [--rounds=2]

Takes the latest `<name>/<v>` (float32) and `<name>_int8/<v>` exports of
`--model_dir` (written by `--export_quantized=int8`; for text also its
`<name>_int8_tflite/<v>` file), and for an image or text model also converts
the trained weights to a float32 TFLite file, so the table tells the TFLite
runtime's share of a speed-up from int8's. Each round measures
every form once, in order; figures are the medians over rounds and the
machine's load average is recorded. Writes
`<model_dir>/serving_forms_benchmark.json` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--model_name", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from tfhub_finetune import export, quantized_export
    from tfhub_finetune.config import ExperimentConfig
    from tfhub_finetune.data.labels import LabelVocabulary
    from tfhub_finetune.io_utils import atomic_write_text
    from tfhub_finetune.selection.serving_forms import measure_serving_forms, summary_lines
    from tfhub_finetune.tasks import make_task

    model_dir = Path(args.model_dir)
    config = ExperimentConfig.load(model_dir / "params.json")
    task = make_task(config)
    task.prepare_eval(LabelVocabulary.load(model_dir / "labels.json"))
    name = args.model_name or model_dir.resolve().name
    forms = {
        "float32": export.resolve_saved_model(Path(args.export_dir) / name),
        "int8": _latest(Path(args.export_dir) / (name + quantized_export.QUANTIZED_SUFFIX)),
    }
    int8_tflite = quantized_export.tflite_form(forms["int8"])
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(task, "image_size", None) or int8_tflite is not None:
            model = task.build_model()
            model.load_weights(str(model_dir / "best.weights.h5"))
            folder = Path(tmp) / "float32_tflite"
            export.export_tflite(model, folder / quantized_export.TFLITE_FILE)
            if int8_tflite is not None:
                # The card and vocabulary say how the file's token ids are made.
                shutil.copytree(int8_tflite / export.ASSETS_EXTRA, folder / export.ASSETS_EXTRA)
            forms = {"float32": forms["float32"], "float32_tflite": folder, "int8": forms["int8"]}
            if int8_tflite is not None:
                forms["int8_tflite"] = int8_tflite
        reports = [measure_serving_forms(task, forms) for _ in range(args.rounds)]
    report = _median_report(reports)
    atomic_write_text(model_dir / "serving_forms_benchmark.json", json.dumps(report, indent=2))
    print("\n".join(summary_lines(report)))
    print(f"load average {report['load_average']}; {report['device']}; rounds={args.rounds}")


def _latest(root: Path) -> Path:
    versions = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    return root / str(versions[-1])


def _median_report(reports: list[dict]) -> dict:
    """The first report with every timing and ratio replaced by its median over rounds."""
    report = json.loads(json.dumps(reports[0], default=str))
    for name, row in report["forms"].items():
        for key in ("latency_p50_ms", "latency_p95_ms", "throughput_eps"):
            row[key] = statistics.median(r["forms"][name][key] for r in reports)
        for key in ("latency_p50_ratio", "latency_p95_ratio", "throughput_ratio"):
            values = [r["forms"][name]["vs_reference"][key] for r in reports]
            row["vs_reference"][key] = statistics.median(values)
            row["vs_reference"][key + "_range"] = [min(values), max(values)]
    report["load_average"] = [r["load_average"] for r in reports]
    report["rounds"] = len(reports)
    report["cpu_count"] = os.cpu_count()
    return report


if __name__ == "__main__":
    main()
