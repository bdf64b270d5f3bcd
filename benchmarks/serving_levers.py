"""Serving levers side by side: length-sorted chunks inside `serving_default`, and threads.

Two questions, each answered in one run so the machine's load is shared:

1. **Chunking** (mode `chunks`, one process): the raw-string serving function
   of `tfhub_finetune.export` built in-process on MiniLM-L6 (`minilm_l6_h384`,
   sequence length 128), once per variant: `unchunked` (the whole batch padded
   to its longest row, as before), and `_call_in_length_chunks` with several
   rows per chunk, padded to the bucket edge (`bucket`) or to the chunk's
   longest row (`exact`). Batch-64 examples/s and CPU ms per example over
   SST-2 sentences, batch-1 p50/p95; every batch goes to every variant in a
   rotating order, so the load of the shared cores falls on all alike. Each variant's probabilities are
   checked against `unchunked` (max abs difference reported).
2. **Threads** (mode `threads`, one child per setting): the chunked function's
   batch-1 and batch-64 figures with TensorFlow's intra-op / inter-op pools set
   as TF Serving's `--tensorflow_intra_op_parallelism` /
   `--tensorflow_inter_op_parallelism` would (`tf.config.threading`, before the
   runtime starts: the same session options).

`chunk16_xla` is the opt-in XLA export (`serving_jit_compile=True`); its
warm-up column is mostly XLA compilation (one per chunk shape met).

Usage: `python -m benchmarks.serving_levers [--repeats=3] [--only=chunks,threads]
[--variants=chunk16_exact,chunk16_xla]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import _harness  # noqa: E402

# name: (chunk_rows, pad to the training buckets' edges, XLA); 0 rows = unchunked.
VARIANTS = {
    "unchunked": (0, False, False),
    "chunk16_exact": (16, False, False),  # What the default export ships.
    "chunk16_bucket": (16, True, False),
    "chunk8_exact": (8, False, False),
    "chunk32_exact": (32, False, False),
    # `export_text_classifier(serving_jit_compile=True)`: bucket widths, power-of-two rows, XLA.
    "chunk16_xla": (16, True, True),
}
THREADS = ((0, 0), (1, 1), (2, 1), (1, 2))  # (intra, inter); 0 = TensorFlow's default.
DEFAULTS = {"infer_examples": 512, "latency_calls": 100, "infer_batch_size": 64, "seed": 7,
            "repeats": 3, "variants": list(VARIANTS), "intra_op": 0, "inter_op": 0}


def _serve_functions(variants: list[str]):
    import tensorflow as tf

    from tfhub_finetune import export
    from tfhub_finetune.backbones.loader import load_backbone
    from tfhub_finetune.builders.text_classifier import build_text_classifier
    from tfhub_finetune.data.text import bucket_widths, pack_inputs

    backbone = load_backbone(_harness.CATALOG_NAME)
    model = build_text_classifier(backbone, 2)
    tok = backbone.tokenizer
    ids = {"start_id": int(tok.start_id), "end_id": int(tok.end_id), "pad_id": int(tok.pad_id)}
    max_positions = int(backbone.max_sequence_length)
    widths = bucket_widths(max_positions)

    def make(rows: int, bucket: bool, jit: bool):
        # The XLA variant is built as the export builds it (`serving_shapes`, one jit function).
        row_counts, xla_widths = export.serving_shapes(128) if jit else (None, None)
        call = tf.function(lambda x: model(x, training=False), jit_compile=True) if jit else None

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(text):
            inputs = pack_inputs(tok.tokenize(text), sequence_length=128, **ids)
            if not rows:
                return export._call_or_empty(model, inputs, tf.shape(inputs["token_ids"])[0])
            return export._call_in_length_chunks(
                model, inputs, pad_id=ids["pad_id"], chunk_rows=rows,
                widths=xla_widths or (widths if bucket else None), row_counts=row_counts,
                call=call)
        return serve

    return {name: make(*VARIANTS[name]) for name in variants}


def _predictor(function):
    import tensorflow as tf

    return lambda batch: function(tf.constant(batch)).numpy()


def chunks(args: dict) -> dict:
    """Every variant in this process, call by call in rotation, `repeats` passes.

    Each batch (and each single sentence) goes to every variant in turn,
    in a rotating order, so load from other jobs on the shared cores falls
    on all variants alike; wall and process-CPU time are summed per variant.
    """
    import numpy as np

    args = {**DEFAULTS, **args}
    _threads(args)
    texts, _ = _harness.sample_sst2(args["infer_examples"], args["seed"])
    functions = {name: _predictor(f) for name, f in _serve_functions(list(args["variants"])).items()}
    names = list(functions)
    reference = functions["unchunked"](texts[:64]) if "unchunked" in functions else None
    diffs = {name: float(np.max(np.abs(f(texts[:64]) - reference)))
             for name, f in functions.items() if reference is not None}
    warmup_s = {}
    for name, f in functions.items():  # Warm-up: every batch and single once (XLA compiles).
        started = time.perf_counter()
        for start in range(0, len(texts), 64):
            f(texts[start:start + 64])
        for text in texts[: int(args["latency_calls"])]:
            f([text])
        warmup_s[name] = time.perf_counter() - started
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    single = {name: [] for name in names}
    bs, turn = int(args["infer_batch_size"]), 0
    for _ in range(args["repeats"]):
        for start in range(0, len(texts), bs):
            turn += 1
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                w, c = time.perf_counter(), time.process_time()
                functions[name](texts[start:start + bs])
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c
        for text in texts[: int(args["latency_calls"])]:
            turn += 1
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                w = time.perf_counter()
                functions[name]([text])
                single[name].append(time.perf_counter() - w)
    n = len(texts) * args["repeats"]
    return {
        "variants": {name: {"batch_examples_per_s": n / wall[name],
                            "batch_cpu_ms_per_example": 1000.0 * cpu[name] / n,
                            "warmup_s": warmup_s[name],
                            **_harness.latency_stats(single[name])} for name in names},
        "max_abs_diff_vs_unchunked": diffs,
    }


def threads(args: dict) -> dict:
    """The shipped chunking (`export.SERVING_CHUNK_ROWS` rows, exact widths) under one thread setting."""
    from tfhub_finetune import export

    args = {**DEFAULTS, **args}
    _threads(args)
    texts, _ = _harness.sample_sst2(args["infer_examples"], args["seed"])
    name = f"chunk{export.SERVING_CHUNK_ROWS}_exact"
    VARIANTS.setdefault(name, (export.SERVING_CHUNK_ROWS, False))
    function = _serve_functions([name])[name]
    return _harness.inference_protocol(_predictor(function), texts, args)


def _threads(args: dict) -> None:
    import tensorflow as tf

    if args["intra_op"]:
        tf.config.threading.set_intra_op_parallelism_threads(int(args["intra_op"]))
    if args["inter_op"]:
        tf.config.threading.set_inter_op_parallelism_threads(int(args["inter_op"]))


def _median_runs(runs: list[dict]) -> dict:
    return {
        "batch_examples_per_s": statistics.median(r["batch_examples_per_s"] for r in runs),
        "batch_examples_per_s_all": [round(r["batch_examples_per_s"], 1) for r in runs],
        "p50_ms": statistics.median(r["batch1"]["p50_ms"] for r in runs),
        "p95_ms": statistics.median(r["batch1"]["p95_ms"] for r in runs),
        "p50_ms_all": [round(r["batch1"]["p50_ms"], 2) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="chunks,threads")
    parser.add_argument("--infer_examples", type=int, default=512)
    parser.add_argument("--latency_calls", type=int, default=100)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="Comma-separated variants of mode `chunks`.")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(set(variants) - set(VARIANTS))}; expected "
                     f"some of {list(VARIANTS)}")
    common = {"infer_examples": args.infer_examples, "latency_calls": args.latency_calls}
    print(f"Machine: {_harness.machine_summary()['cpu']}; load {_harness.loadavg_1m()}", flush=True)
    if "chunks" in args.only:
        started = time.perf_counter()
        result = _harness.run_child("benchmarks.serving_levers", "chunks",
                                    {**common, "repeats": args.repeats, "variants": variants},
                                    timeout_s=1800)
        if result.get("error"):
            print("chunks: ERROR", result["error"])
        else:
            base_name = next(n for n in ("unchunked", *variants) if n in result["variants"])
            base = result["variants"][base_name]
            print(f"\n{'variant':<16} {'b64 ex/s':>9} {'vs ' + base_name:>17} {'b64 cpu ms/ex':>13} "
                  f"{'b1 p50 ms':>9} {'b1 p95 ms':>9} {'warm-up s':>9} {'max |diff|':>10}")
            for name, v in result["variants"].items():
                ratio = v["batch_examples_per_s"] / base["batch_examples_per_s"]
                diff = result["max_abs_diff_vs_unchunked"].get(name, float("nan"))
                print(f"{name:<16} {v['batch_examples_per_s']:>9.1f} {ratio:>16.2f}x "
                      f"{v['batch_cpu_ms_per_example']:>13.2f} {v['p50_ms']:>9.2f} "
                      f"{v['p95_ms']:>9.2f} {v['warmup_s']:>9.1f} {diff:>10.1e}")
            print(f"({(time.perf_counter() - started) / 60:.1f} min, load {_harness.loadavg_1m()})")
    if "threads" in args.only:
        rows: dict[tuple[int, int], list[dict]] = {t: [] for t in THREADS}
        for repeat in range(args.repeats):
            order = THREADS if repeat % 2 == 0 else THREADS[::-1]
            for intra, inter in order:
                result = _harness.run_child("benchmarks.serving_levers", "threads",
                                            {**common, "intra_op": intra, "inter_op": inter},
                                            timeout_s=900)
                if not result.get("error"):
                    rows[(intra, inter)].append(result)
                else:
                    print(f"threads {intra}/{inter}: ERROR {result['error']}")
        print(f"\n{'intra/inter':<12} {'b1 p50 ms':>9} {'b1 p95 ms':>9} {'b64 ex/s':>9}  per-rep p50")
        for (intra, inter), results in rows.items():
            if not results:
                continue
            m = _median_runs(results)
            label = f"{intra or 'def'}/{inter or 'def'}"
            print(f"{label:<12} {m['p50_ms']:>9.2f} {m['p95_ms']:>9.2f} "
                  f"{m['batch_examples_per_s']:>9.1f}  {m['p50_ms_all']}")
        print(f"(load {_harness.loadavg_1m()}; 'def' = TensorFlow's default)")
    return 0


if __name__ == "__main__":
    if "--mode" in " ".join(sys.argv):
        sys.exit(_harness.child_main({"chunks": chunks, "threads": threads}))
    sys.exit(main())
