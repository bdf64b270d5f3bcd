"""The optimizer's share of a training step, side by side: FusedAdamW against its earlier forms.

On MiniLM-L6's 22.7M trainable variables (`build_text_classifier` on
`minilm_l6_h384`), with gradients shaped as fine-tuning makes them (dense,
and the word embedding's sparse: 32 x 25 rows), one `apply_gradients` per
call inside a `tf.function`, with `make_optimizer`'s settings (warm-up +
decay, weight decay 0.01 except biases/LayerNorm, global norm clipping 1.0):

- `fused`: `training.FusedAdamW` as shipped (one-pass decay, `l2_loss` norm,
  `ResourceApplyAdam`);
- `fused_keras_decay_norm`: the same update with Keras' weight-decay and
  global-norm passes (FusedAdamW before them);
- `keras_adamw`: Keras' AdamW.

Calls rotate between the optimizers (load on the shared cores falls on all
alike); wall and process-CPU time per call are summed per optimizer.

Usage: `python -m benchmarks.optimizer_step [--calls=30]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import _harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf

    from tfhub_finetune import training
    from tfhub_finetune.backbones.loader import load_backbone
    from tfhub_finetune.builders.text_classifier import build_text_classifier

    class FusedKerasDecayNorm(training.FusedAdamW):
        _apply_weight_decay = keras.optimizers.AdamW._apply_weight_decay
        _clip_gradients = keras.optimizers.AdamW._clip_gradients

    model = build_text_classifier(load_backbone(_harness.CATALOG_NAME), 2)
    variables = model.trainable_variables
    rng = tf.random.Generator.from_seed(0)
    grads = []
    for v in variables:
        if "embedding" in v.path and v.shape[0] > 10_000:  # Word embeddings: a sparse gradient.
            rows = tf.cast(rng.uniform([800], 0, v.shape[0], tf.int32), tf.int32)
            grads.append(tf.IndexedSlices(rng.normal([800, v.shape[1]]) * 1e-3, rows,
                                          tf.constant(v.shape, tf.int32)))
        else:
            grads.append(rng.normal(v.shape) * 1e-3)

    def optimizer(cls):
        opt = training.make_optimizer(5e-5, total_steps=1000)
        if cls is not training.FusedAdamW:
            fresh = cls(learning_rate=opt._learning_rate, weight_decay=0.01, epsilon=1e-6,
                        global_clipnorm=1.0)
            fresh.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "layer_norm",
                                                       "LayerNorm"])
            opt = fresh
        opt.build(variables)
        return tf.function(lambda: opt.apply_gradients(zip(grads, variables, strict=True)))

    steps = {"fused": optimizer(training.FusedAdamW),
             "fused_keras_decay_norm": optimizer(FusedKerasDecayNorm),
             "keras_adamw": optimizer(keras.optimizers.AdamW)}
    names = list(steps)
    for step in steps.values():  # Trace and warm up.
        step()
        step()
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for call in range(args.calls):
        for name in names[call % len(names):] + names[: call % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name] += time.perf_counter() - w
            cpu[name] += time.process_time() - c
    print(f"{_harness.machine_summary()['kind']}; {sum(int(tf.size(v)) for v in variables) / 1e6:.1f}M "
          f"variables; {args.calls} calls each; load {_harness.loadavg_1m()}")
    print(f"{'optimizer':<24} {'wall ms/step':>12} {'cpu ms/step':>12} {'cpu vs fused':>12}")
    for name in names:
        print(f"{name:<24} {1000 * wall[name] / args.calls:>12.1f} {1000 * cpu[name] / args.calls:>12.1f} "
              f"{cpu[name] / cpu['fused']:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
