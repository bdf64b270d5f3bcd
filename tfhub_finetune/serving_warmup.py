"""TF Serving warm-up requests stored in a SavedModel (`assets.extra/tf_serving_warmup_requests`).

TF Serving replays the `PredictionLog` records of this TFRecord file when it
loads a model version, before the version takes traffic, and refuses the
version if one of them fails. So the per-shape work of the first requests
(XLA compilation of each chunk shape, oneDNN primitive creation) happens at
load, not on a client's request, and an XLA export on a server started
without `--xla_cpu_compilation_enabled` fails to load, saying why, instead
of failing every request. The records are TF Serving's own protos
(`tensorflow_serving.apis`), read back by `read_warmup_requests` for tests
and for clients that replay them elsewhere.

Example:

```python
from tfhub_finetune import serving_warmup

serving_warmup.write_warmup_requests("exports/sst2/1", [{"text": ["a fine film"]}])
serving_warmup.read_warmup_requests("exports/sst2/1")  # [{'text': array([b'a fine film'], ...)}]
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
# TF Serving reads at most this many records (`saved_model_warmup_util.cc`'s kMaxNumRecords).
MAX_WARMUP_RECORDS = 1000


def warmup_file(saved_model_dir: str | os.PathLike) -> Path:
    """Where TF Serving looks for the warm-up records of a SavedModel version folder."""
    return Path(saved_model_dir) / ASSETS_EXTRA / WARMUP_FILE


def write_warmup_requests(
    saved_model_dir: str | os.PathLike,
    requests: Sequence[Mapping[str, Any]],
    *,
    signature_name: str = "serving_default",
) -> Path:
    """Writes Predict requests for TF Serving to replay when it loads `saved_model_dir`.

    Args:
        saved_model_dir: str or path. A SavedModel version folder (staged or
            published).
        requests: sequence of dict. Input name -> value (a tensor, an array
            or a nested list), one dict per request, in replay order.
        signature_name: str. The signature every request calls.

    Returns:
        The file written.

    Raises:
        ValueError: for no requests or more than TF Serving reads.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    if not requests or len(requests) > MAX_WARMUP_RECORDS:
        raise ValueError(f"Expected 1 to {MAX_WARMUP_RECORDS} warm-up requests. "
                         f"Received: {len(requests)} requests.")
    file = warmup_file(saved_model_dir)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(file)) as writer:
        for inputs in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=signature_name))
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(
                    value.numpy() if isinstance(value, tf.Tensor) else value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return file


def read_warmup_requests(saved_model_dir: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """The Predict requests of a SavedModel's warm-up file, as TF Serving parses them.

    Returns:
        One dict per request (input name -> array; strings as bytes), in
        file order; `[]` where the SavedModel has no warm-up file.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    file = warmup_file(saved_model_dir)
    if not file.exists():
        return []
    requests = []
    for record in tf.data.TFRecordDataset(str(file)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        requests.append({name: tf.make_ndarray(proto)
                         for name, proto in log.predict_log.request.inputs.items()})
    return requests
