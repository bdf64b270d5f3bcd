"""A BERT text model's serving call, lowered to a lean TensorFlow graph at export.

Keras computes a keras-hub `BertBackbone` layer by layer as training needs
it: separate query/key/value einsums with their own transposes, the query
scaled after its projection, and, under `mixed_bfloat16`, every kernel cast
from its float32 variable on every call. At serving batch sizes those extra
ops cost more than the matmuls they feed (MiniLM-L6, one sentence, 2 threads:
126 casts per call). `lower_text_model` rewrites the inference call once, at
export, the way ONNX Runtime's transformer optimizer or PyTorch's
BetterTransformer do: one fused QKV matmul per block slice with the
1/sqrt(head size) folded into the query weights, one transpose in and out, bias adds
oneDNN fuses into the matmul, LayerNorm from moments, transposes and softmax
on Eigen kernels (small work stays on one thread), and, when the model
serves in bf16, kernels stored once in bf16 with softmax, LayerNorm and the
residual stream kept in float32. Each block is cut into `SERVING_SLICES`
independent parts, Megatron-style (attention by heads, the feed-forward by
its inner units; the parts' outputs summed), so that at serving batch sizes
TensorFlow's inter-op pool runs two small chains side by side instead of
splitting every small op across the intra-op pool. Where it times faster on
the exporting CPU (`fastest_lowering`), a one-row batch of a short sentence
computes its attention products in float64 on Eigen, which keeps that work
on one thread, instead of on oneDNN, which hands every batch matmul to all.

It is a lowering, not a second model: every weight is read from the trained
Keras layers when the export runs, the head after the encoder stays the
model's own Keras layers, and `lower_text_model` checks the lowered call
against `model(...)` on a probe batch before anything uses it. A structure
it does not recognise, or outputs that differ beyond the tolerance of the
compute dtype, gives `None` (and a warning for the latter): the export then
serves the Keras call unchanged. Measured in BUILD_NOTES.md "Serving graph".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfhub_finetune.backbones.base import TEXT_INPUTS
from tfhub_finetune.layer_policies import layer_policies

logger = logging.getLogger(__name__)

# Agreement `lower_text_model` requires between the lowered and the Keras call
# on its probe batch: |lowered - keras| <= TOLERANCE * (1 + max|keras|).
# float32 differs by summation order only (~1e-7 on MiniLM-L6); bf16 by where
# the two round (kernels cast once vs per call; ~1e-3 measured).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Keras' masked softmax adds this to masked-out scores (`layers.Softmax`).
_MASKED_SCORE = -1e9
_PROBE_ROWS, _PROBE_LENGTH = 3, 13
# `fastest_lowering`: bf16 must be this much faster at BF16_BATCH rows (and no
# slower, within BF16_ONE_SLACK, at one) to serve. Rows of _TIMED_LENGTH tokens: about
# an SST-2 sentence's word pieces.
BF16_MARGIN = 1.15
BF16_BATCH = 16
BF16_ONE_SLACK = 1.10
_TIMED_LENGTH = 32
# `fastest_lowering`: a one-row batch computes its attention products in float64
# (Eigen) up to the longest of ONE_ROW_LENGTHS at which that, and every shorter
# one, timed faster than the compute dtype. Float64 work grows with the square of
# the length, oneDNN's hand-off does not: on MiniLM-L6 (AVX-512 EPYC, bf16)
# float64 won at 16-32 tokens and lost at 64 (BUILD_NOTES "One-row attention").
ONE_ROW_LENGTHS = (16, 24, 32, 48, 64)
_ONE_ROW_CALLS, _BATCH_CALLS = 10, 3  # Calls per timed round.
# Independent slices of every block (`LoweredTextModel`). Two: each slice's
# matmuls at one sentence fit oneDNN's single-threaded size (TF's
# `ExecuteSingleThreadedGemm`: operands within L2) and the two run on the
# inter-op pool at once. Measured in BUILD_NOTES.md "Serving graph".
SERVING_SLICES = 2


class LoweredTextModel(tf.Module):
    """A text model on a keras-hub BERT encoder, its inference call as a lean graph.

    Build it with `lower_text_model`; call it like the model in inference:
    a dict of `token_ids`, `padding_mask`, `segment_ids` (int32, batch x
    length) in, the model's output (float32) out. The weights are copies
    made at construction; `served_variables` lists everything a SavedModel
    of the lowered call must keep. With `slices` > 1 each block computes as
    that many independent parts (attention by groups of heads, the
    feed-forward by groups of inner units) whose outputs are summed: the
    same function, with the weights cut, not copied. A batch of one row of
    up to `float64_attention_up_to` tokens computes its attention products
    (scores and context: a few thousand multiply-adds a head) in float64,
    on TensorFlow's Eigen kernels: oneDNN takes float32 and bf16 batch
    matmuls and hands each to every intra-op thread, which on a sentence
    costs more than the work. `fastest_lowering` sets it from timings; 0
    (the default) computes every batch in the compute dtype.

    Example:

    ```python
    lowered = lower_text_model(model)  # None if the model is not lowerable
    probabilities = lowered(inputs) if lowered else model(inputs, training=False)
    ```
    """

    def __init__(self, encoder: keras_hub.models.BertBackbone, tail: keras.Function,
                 compute_dtype: str, slices: int = 1):
        super().__init__(name="lowered_text_model")
        self.compute_dtype = compute_dtype
        dtype = tf.as_dtype(compute_dtype)
        self._num_heads = int(encoder.num_heads)
        self._hidden = int(encoder.hidden_dim)

        def constant(value: Any, as_dtype: tf.DType = tf.float32) -> tf.Variable:
            return tf.Variable(tf.cast(np.asarray(value, np.float32), as_dtype), trainable=False)

        def layer_norm(layer: keras.layers.LayerNormalization) -> dict[str, Any]:
            return {"gamma": constant(layer.gamma.numpy()), "beta": constant(layer.beta.numpy()),
                    "epsilon": float(layer.epsilon)}

        self._token_embedding = constant(encoder.token_embedding.embeddings.numpy())
        self._position_embedding = constant(
            encoder.position_embedding.position_embeddings.numpy())
        self._segment_embedding = constant(encoder.segment_embedding.embeddings.numpy())
        self._embedding_norm = layer_norm(encoder.embeddings_layer_norm)
        scale = 1.0 / math.sqrt(self._hidden // self._num_heads)
        hidden = self._hidden
        self._slices = slices
        self._heads_per_slice = self._num_heads // slices
        self._blocks = []
        for block in encoder.transformer_layers:
            attention = block._self_attention_layer
            q, k, v = (attention._query_dense, attention._key_dense, attention._value_dense)
            query = q.kernel.numpy().reshape(hidden, hidden) * scale
            query_bias = q.bias.numpy().reshape(hidden) * scale
            key, key_bias = k.kernel.numpy().reshape(hidden, hidden), k.bias.numpy().reshape(hidden)
            value = v.kernel.numpy().reshape(hidden, hidden)
            value_bias = v.bias.numpy().reshape(hidden)
            out = attention._output_dense
            out_kernel = out.kernel.numpy().reshape(hidden, hidden)
            inner, outer = block._feedforward_intermediate_dense, block._feedforward_output_dense
            inner_kernel, inner_bias = inner.kernel.numpy(), inner.bias.numpy()
            outer_kernel = outer.kernel.numpy()
            width = self._heads_per_slice * (hidden // self._num_heads)
            intermediate = inner_kernel.shape[1] // slices
            parts = []
            for i in range(slices):
                heads_ = slice(i * width, (i + 1) * width)
                units = slice(i * intermediate, (i + 1) * intermediate)
                parts.append({
                    "qkv_kernel": constant(np.concatenate(
                        [query[:, heads_], key[:, heads_], value[:, heads_]], axis=1), dtype),
                    "qkv_bias": constant(np.concatenate(
                        [query_bias[heads_], key_bias[heads_], value_bias[heads_]]), dtype),
                    "out_kernel": constant(out_kernel[heads_], dtype),
                    "inner_kernel": constant(inner_kernel[:, units], dtype),
                    "inner_bias": constant(inner_bias[units], dtype),
                    "outer_kernel": constant(outer_kernel[units], dtype),
                })
            self._blocks.append({
                "slices": parts,
                "out_bias": constant(out.bias.numpy(), dtype),
                "attention_norm": layer_norm(block._self_attention_layer_norm),
                "outer_bias": constant(outer.bias.numpy(), dtype),
                "feedforward_norm": layer_norm(block._feedforward_layer_norm),
            })
        self._pooled_kernel = constant(encoder.pooled_dense.kernel.numpy(), dtype)
        self._pooled_bias = constant(encoder.pooled_dense.bias.numpy(), dtype)
        self._tail = tail
        layers = [op for op in tail.operations if isinstance(op, keras.layers.Layer)]
        # The head's own variables, read where they are (not copied: they are few).
        self._tail_variables = list({id(v): v for layer in layers for v in layer.variables}.values())
        # The head computes in the policies it had when lowered (export's serving scope),
        # whenever this module is traced.
        self._tail_policies = [(layer, layer.dtype_policy) for layer in layers]
        self.float64_attention_up_to = 0  # Tokens; 0: no separate one-row graph.
        self.max_difference: float | None = None
        self.timing: dict[str, Any] | None = None  # Set by `fastest_lowering`.

    @property
    def slices(self) -> int:
        """Independent parts each block computes in (heads and inner units split)."""
        return self._slices

    @property
    def vocabulary_size(self) -> int:
        """Token ids the lowered embedding takes."""
        return int(self._token_embedding.shape[0])

    @property
    def served_variables(self) -> list[Any]:
        """The lowered weights and the head's Keras variables: what a SavedModel must keep."""
        return [*self.variables, *self._tail_variables]

    def __call__(self, inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        return self.call(inputs, self.float64_attention_up_to)

    def call(self, inputs: dict[str, tf.Tensor], float64_attention_up_to: int) -> tf.Tensor:
        """The lowered call; one row of up to `float64_attention_up_to` tokens: float64 products."""
        ids = tf.cast(inputs["token_ids"], tf.int32)
        mask = tf.cast(inputs["padding_mask"], tf.float32)
        length = tf.shape(ids)[1]
        x = (tf.gather(self._token_embedding, ids)
             + self._position_embedding[:length][None]
             + tf.gather(self._segment_embedding, tf.cast(inputs["segment_ids"], tf.int32)))
        x = self._layer_norm(x, self._embedding_norm)
        # (batch, 1, 1, keys): masked keys get Keras' large negative score.
        score_bias = ((1.0 - mask) * _MASKED_SCORE)[:, None, None, :]

        def encode(x: tf.Tensor, products: tf.DType) -> tf.Tensor:
            bias = tf.cast(score_bias, products) if products == tf.float64 else score_bias
            for block in self._blocks:
                x = self._block(x, block, bias, products)
            return x

        compute = tf.as_dtype(self.compute_dtype)
        if not float64_attention_up_to:
            x = encode(x, compute)
        else:
            one_row = tf.logical_and(tf.equal(tf.shape(ids)[0], 1),
                                     length <= float64_attention_up_to)
            x = tf.cond(one_row, lambda: encode(x, tf.float64), lambda: encode(x, compute))
        pooled = tf.tanh(tf.nn.bias_add(tf.matmul(self._in_compute(x[:, 0]), self._pooled_kernel),
                                        self._pooled_bias))
        outputs = {"sequence_output": x, "pooled_output": tf.cast(pooled, tf.float32)}
        with layer_policies(self._tail_policies):
            return tf.cast(self._tail([outputs, inputs]), tf.float32)

    def _in_compute(self, x: tf.Tensor) -> tf.Tensor:
        return tf.cast(x, self.compute_dtype) if self.compute_dtype != "float32" else x

    def _dense(self, x: tf.Tensor, kernel: tf.Variable, bias: tf.Variable) -> tf.Tensor:
        # A 2-D MatMul + BiasAdd: the pattern TensorFlow's remapper fuses for oneDNN.
        return tf.nn.bias_add(tf.matmul(x, kernel), bias)

    def _layer_norm(self, x: tf.Tensor, norm: dict[str, Any]) -> tf.Tensor:
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + norm["epsilon"]) * norm["gamma"] + norm["beta"]

    def _block(self, x: tf.Tensor, block: dict[str, Any], score_bias: tf.Tensor,
               products: tf.DType) -> tf.Tensor:
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        heads, size = self._heads_per_slice, self._hidden // self._num_heads
        flat = tf.reshape(x, [-1, self._hidden])  # The residual stream, float32.
        inputs = self._in_compute(flat)
        attended = []
        for part in block["slices"]:
            qkv = self._dense(inputs, part["qkv_kernel"], part["qkv_bias"])
            qkv = _transpose(tf.reshape(qkv, [batch, length, 3, heads, size]), [2, 0, 3, 1, 4])
            query, key, value = tf.unstack(tf.cast(qkv, products))
            # Softmax in the score bias's dtype: float32, or float64 with float64 products.
            scores = tf.cast(tf.matmul(query, key, transpose_b=True), score_bias.dtype) + score_bias
            weights = tf.cast(_softmax(scores), products)
            context = tf.reshape(_transpose(tf.matmul(weights, value), [0, 2, 1, 3]),
                                 [-1, heads * size])
            attended.append(tf.matmul(tf.cast(context, inputs.dtype), part["out_kernel"]))
        attended = tf.nn.bias_add(tf.add_n(attended), block["out_bias"])
        flat = self._layer_norm(tf.cast(attended, tf.float32) + flat, block["attention_norm"])
        inputs = self._in_compute(flat)
        outer = []
        for part in block["slices"]:
            inner = tf.nn.gelu(self._dense(inputs, part["inner_kernel"], part["inner_bias"]),
                               approximate=True)
            outer.append(tf.matmul(inner, part["outer_kernel"]))
        outer = tf.nn.bias_add(tf.add_n(outer), block["outer_bias"])
        flat = self._layer_norm(tf.cast(outer, tf.float32) + flat, block["feedforward_norm"])
        return tf.reshape(flat, [batch, length, self._hidden])


# Transposes and softmax run on TensorFlow's Eigen kernels rather than oneDNN's.
# A oneDNN op hands its work to every intra-op thread whatever its size: on a
# sentence's tensors that hand-off costs more than the work (MiniLM, one
# sentence, 2 threads: a transpose ~80 us against ~12 us on one thread), where
# Eigen's cost model keeps small work on the calling thread. Transposes go as
# integers of the same width (oneDNN's kernel takes only float types).
_SAME_WIDTH_INT = {tf.float64: tf.int64, tf.float32: tf.int32, tf.bfloat16: tf.int16}


def _transpose(x: tf.Tensor, perm: list[int]) -> tf.Tensor:
    return tf.bitcast(tf.transpose(tf.bitcast(x, _SAME_WIDTH_INT[x.dtype]), perm), x.dtype)


def _softmax(scores: tf.Tensor) -> tf.Tensor:
    exp = tf.exp(scores - tf.reduce_max(scores, axis=-1, keepdims=True))
    return exp / tf.reduce_sum(exp, axis=-1, keepdims=True)


def lower_text_model(model: keras.Model, compute_dtype: str | None = None,
                     slices: int | None = None) -> LoweredTextModel | None:
    """Lowers a text model's inference call on a keras-hub BERT encoder, checked, or None.

    Recognised: a functional model on `token_ids`, `padding_mask`,
    `segment_ids` whose encoder is one `keras_hub.models.BertBackbone`
    (post-LayerNorm blocks, approximate GELU, no quantized or LoRA layers)
    called once on those inputs, followed by any Keras layers (the head).
    The lowered graph computes in the encoder's compute dtype at the time of
    the call (`export.serving_precision_scope` sets it) and is checked
    against `model(...)` on a probe batch with padding and both segments.

    Args:
        model: keras.Model. From `build_text_classifier` or
            `build_token_classifier`, with LoRA adapters merged.
        compute_dtype: str or None. `float32` or `bfloat16`; defaults to
            the encoder's compute dtype. The check compares with
            `model(...)` as it computes, with the tolerance of the lower
            precision of the two.
        slices: int or None. Independent parts per block; the largest
            count up to this that divides the heads and the inner units is
            used. Defaults to `SERVING_SLICES`.

    Returns:
        A `LoweredTextModel`, or None when the structure is not recognised or
        the check fails (logged as a warning).

    Example:

    ```python
    with serving_precision_scope(model):
        lowered = lower_text_model(model)
    ```
    """
    found = _bert_encoder(model)
    if found is None:
        return None
    encoder, tail = found
    keras_dtype = _compute_dtype(encoder)
    if keras_dtype is None:
        return None
    compute_dtype = compute_dtype or keras_dtype
    if compute_dtype not in TOLERANCE:
        raise ValueError(f"compute_dtype must be one of {sorted(TOLERANCE)}. "
                         f"Received: compute_dtype={compute_dtype!r}")
    lowered = LoweredTextModel(encoder, tail, compute_dtype, _usable_slices(encoder, slices or SERVING_SLICES))
    difference = _difference_from_keras(lowered, model, [_probe_inputs(encoder)], 0, keras_dtype)
    if difference is None:
        return None
    lowered.max_difference = difference
    return lowered


def _difference_from_keras(lowered: LoweredTextModel, model: keras.Model,
                           probes: list[dict[str, tf.Tensor]], float64_attention_up_to: int,
                           keras_dtype: str) -> float | None:
    """Max |lowered - keras| over `probes`; None (warned) past the tolerance of the two dtypes."""
    call = tf.function(lowered.call)
    tolerance = max(TOLERANCE[lowered.compute_dtype], TOLERANCE[keras_dtype])
    largest = 0.0
    for probe in probes:
        expected = np.asarray(tf.cast(model(probe, training=False), tf.float32))
        actual = np.asarray(call(probe, float64_attention_up_to))
        difference = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
        limit = tolerance * (1.0 + float(np.max(np.abs(expected), initial=0.0)))
        if not difference <= limit:  # NaN fails too.
            logger.warning(
                "The lean serving graph differs from the Keras model by %.3g (limit %.3g) on a "
                "probe batch; serving the Keras call instead.", difference, limit)
            return None
        largest = max(largest, difference)
    return largest


def fastest_lowering(model: keras.Model, rounds: int = 7, float64_attention: bool = True
                     ) -> LoweredTextModel | None:
    """`lower_text_model` in float32 and in bfloat16, timed side by side here; the faster.

    What `serving_precision="auto"` serves. bf16 matmuls run ~4x float32 on
    an AMX Xeon, ~1.3x on an AVX512_BF16 EPYC, ~0.5x on an AVX-512 Xeon
    without bf16 hardware and are emulated on AVX2: so both lowerings are
    timed on this CPU (a batch of 1 and one of `BF16_BATCH`, `rounds`
    alternations, ~3 s), and bf16 serves only when it is at least
    `BF16_MARGIN` faster at the batch and no slower at one sentence (within
    `BF16_ONE_SLACK`: on bf16 hardware the two are level there, to within
    the noise of a shared machine; without it bf16 is 1.5x slower or worse).
    Then the chosen lowering's one-row form (`float64_attention_up_to`) is
    timed the same way (~3 s). The figures go into the lowering's `timing`
    (the model card). They hold for the CPU the export ran on: export again
    with `float32` for a fleet of another kind.

    Args:
        model: keras.Model. As for `lower_text_model`, its layers computing
            in float32 (`export.serving_precision_scope`).
        rounds: int. Alternations of the two timings. Defaults to 7.
        float64_attention: bool. Also time and choose the one-row float64
            form; False keeps every batch in the compute dtype (an XLA
            export, whose kernels these timings do not measure).

    Returns:
        The faster `LoweredTextModel` (float32 on a tie), or None when the
        model cannot be lowered.

    Example:

    ```python
    with serving_precision_scope(model):
        lowered = fastest_lowering(model)
    lowered.compute_dtype, lowered.timing  # 'bfloat16', {'median_ms': {...}, ...}
    ```
    """
    float32 = lower_text_model(model, "float32")
    if float32 is None:
        return None
    try:
        bfloat16 = lower_text_model(model, "bfloat16")
    except (tf.errors.OpError, RuntimeError) as error:  # No bf16 kernel on this CPU.
        logger.info("bf16 serving graph unavailable here (%s); serving float32.", error)
        bfloat16 = None
    if bfloat16 is None:
        chosen = float32
        chosen.timing = {"reason": "no bf16 lowering on this CPU"}
    else:
        ms = _time_side_by_side({"float32": float32, "bfloat16": bfloat16},
                                float32.vocabulary_size, rounds)
        faster = (ms["bfloat16"]["batch"] * BF16_MARGIN <= ms["float32"]["batch"]
                  and ms["bfloat16"]["one"] <= ms["float32"]["one"] * BF16_ONE_SLACK)
        chosen = bfloat16 if faster else float32
        chosen.timing = {
            "rule": f"bfloat16 when >= {BF16_MARGIN}x faster at batch {BF16_BATCH} and no slower "
                    f"(within {BF16_ONE_SLACK - 1:.0%}) at batch 1",
            "median_ms": ms,
            "shapes": {"one": [1, _TIMED_LENGTH], "batch": [BF16_BATCH, _TIMED_LENGTH]},
        }
    chosen.timing["threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    if float64_attention:
        _choose_float64_attention(chosen, model, rounds)
    return chosen


def _choose_float64_attention(lowered: LoweredTextModel, model: keras.Model, rounds: int) -> None:
    """Sets `lowered.float64_attention_up_to` from one-row timings of both forms here.

    One row of each of `ONE_ROW_LENGTHS` tokens, in rotation: float64 serves
    up to the longest length at which it, and at every shorter one, was
    faster (a wrong call near the crossover costs a few percent; the gain
    at short sentences is 10-20%), if it also agrees with the Keras call on
    one-row probes. Figures in `lowered.timing["float64_attention"]`.
    """
    calls = {"compute": lambda inputs: lowered.call(inputs, 0),
             "float64": lambda inputs: lowered.call(inputs, max(ONE_ROW_LENGTHS))}
    shapes = {str(length): (1, length) for length in ONE_ROW_LENGTHS}
    ms = _time_side_by_side(calls, lowered.vocabulary_size, rounds, shapes)
    up_to = 0
    for length in ONE_ROW_LENGTHS:
        if ms["float64"][str(length)] >= ms["compute"][str(length)]:
            break
        up_to = length
    if up_to:
        encoder, _ = _bert_encoder(model)
        probe = _probe_inputs(encoder)
        rows = [{name: value[r:r + 1] for name, value in probe.items()} for r in range(_PROBE_ROWS)]
        difference = _difference_from_keras(lowered, model, rows, up_to, _compute_dtype(encoder))
        if difference is not None:
            lowered.float64_attention_up_to = up_to
            lowered.max_difference = max(lowered.max_difference, difference)
    lowered.timing["float64_attention"] = {
        "rule": f"a one-row batch computes its attention products in float64 up to the longest "
                f"timed length at which that, and every shorter one, was faster than "
                f"{lowered.compute_dtype}",
        "median_ms": ms, "shapes": {name: list(shape) for name, shape in shapes.items()},
    }


def _time_side_by_side(calls: dict[str, Callable[[dict[str, tf.Tensor]], tf.Tensor]],
                       vocabulary_size: int, rounds: int,
                       shapes: dict[str, tuple[int, int]] | None = None,
                       ) -> dict[str, dict[str, float]]:
    """Median ms per call of each call at each `(rows, length)` shape, alternating.

    `shapes` defaults to one row and `BF16_BATCH` rows of `_TIMED_LENGTH`.
    """
    rng = np.random.default_rng(0)
    shapes = shapes or {"one": (1, _TIMED_LENGTH), "batch": (BF16_BATCH, _TIMED_LENGTH)}
    inputs = {}
    for shape, (rows, length) in shapes.items():
        ids = rng.integers(0, vocabulary_size, (rows, length))
        inputs[shape] = {"token_ids": tf.constant(ids, tf.int32),
                         "padding_mask": tf.ones((rows, length), tf.int32),
                         "segment_ids": tf.zeros((rows, length), tf.int32)}
    functions = {name: tf.function(call) for name, call in calls.items()}
    for function in functions.values():
        for x in inputs.values():
            function(x)
            function(x)
    samples = {name: {shape: [] for shape in shapes} for name in functions}
    for round_ in range(rounds):
        names = list(functions) if round_ % 2 == 0 else list(functions)[::-1]
        for name in names:
            for shape, x in inputs.items():
                calls = []
                for _ in range(_ONE_ROW_CALLS if shapes[shape][0] == 1 else _BATCH_CALLS):
                    start = time.perf_counter()
                    functions[name](x).numpy()
                    calls.append(time.perf_counter() - start)
                samples[name][shape].append(float(np.median(calls)) * 1e3)
    return {name: {shape: round(float(np.median(v)), 3) for shape, v in per.items()}
            for name, per in samples.items()}


def _bert_encoder(model: keras.Model) -> tuple[keras_hub.models.BertBackbone, keras.Function] | None:
    """The model's BertBackbone and a `keras.Function` of what follows it, if recognisable."""
    if not isinstance(getattr(model, "input", None), dict) or not set(TEXT_INPUTS) <= set(
            model.input):
        return None
    encoders = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(encoders) != 1 or type(encoders[0]) is not keras_hub.models.BertBackbone:
        return None
    encoder = encoders[0]
    if any(getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False)
           for layer in encoder._flatten_layers(include_self=False, recursive=True)):
        return None
    for block in encoder.transformer_layers:
        activation = getattr(block._feedforward_intermediate_dense.activation, "__name__", "")
        if block.normalize_first or activation != "gelu_approximate":
            return None
    # The call in this model (a backbone shared by several models has one node per
    # model): the one fed this model's own inputs.
    own = {id(model.input[n]) for n in TEXT_INPUTS}
    nodes = [node for node in encoder._inbound_nodes
             if {id(t) for t in keras.tree.flatten(node.arguments.args)} == own]
    if len(nodes) != 1:
        return None
    node = nodes[0]
    outputs = keras.tree.pack_sequence_as(encoder.output, node.output_tensors)
    # A `keras.Function`, not a `keras.Model`: a Model casts its inputs to the
    # dtypes its input tensors were traced with (bf16 for a model built under
    # mixed_bfloat16) even when the export serves in float32.
    tail = keras.Function([outputs, dict(model.input)], model.outputs[0])
    return encoder, tail


def _usable_slices(encoder: keras_hub.models.BertBackbone, slices: int) -> int:
    """The largest count up to `slices` that divides both the heads and the inner units."""
    return max(s for s in range(1, max(1, int(slices)) + 1)
               if encoder.num_heads % s == 0 and encoder.intermediate_dim % s == 0)


def _compute_dtype(encoder: keras.Model) -> str | None:
    """The one compute dtype of the encoder's weighted layers, or None if they differ."""
    dtypes = {layer.compute_dtype for layer in encoder._flatten_layers(include_self=False)
              if layer.weights}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in TOLERANCE else None


def _probe_inputs(encoder: keras_hub.models.BertBackbone) -> dict[str, tf.Tensor]:
    """Rows of random ids, the later ones padded, segments 0 then 1: what serving sends."""
    rng = np.random.default_rng(0)
    length = min(_PROBE_LENGTH, int(encoder.max_sequence_length))
    ids = rng.integers(0, int(encoder.vocabulary_size), (_PROBE_ROWS, length))
    real = np.array([[t < length - 4 * r for t in range(length)] for r in range(_PROBE_ROWS)])
    segments = np.where(np.arange(length) >= length // 2, 1, 0) if encoder.num_segments > 1 else 0
    return {
        "token_ids": tf.constant(np.where(real, ids, 0), tf.int32),
        "padding_mask": tf.constant(real, tf.int32),
        "segment_ids": tf.constant(np.broadcast_to(segments, (_PROBE_ROWS, length)) * real,
                                   tf.int32),
    }
