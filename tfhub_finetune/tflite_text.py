"""Serve a text classifier's TFLite file on raw strings, in the application's process.

`quantized_export.export_quantized_text_classifier` writes, beside the Keras
int8 SavedModels, `<model_name>_int8_tflite/<version>/model.tflite`: the same
network with TFLite dynamic-range int8 weights, taking token ids, plus the
token-id twin's `assets.extra` (vocabulary and model card). TF Serving does
not load it; this class does what the raw-string SavedModel's
`serving_default` does, outside TensorFlow's graph:

1. tokenize and pack each text with `text_client.TextClient` (pure Python,
   id for id as training tokenized);
2. sort the batch by length and run it in chunks of
   `export.SERVING_CHUNK_ROWS` rows, each padded only to its own longest
   row (as the SavedModel's length-sorted chunks do);
3. put the rows back in request order.

Example:

```python
from tfhub_finetune.tflite_text import TfliteTextClassifier

classifier = TfliteTextClassifier.from_folder("exports/sst2_int8_tflite/1")
classifier.predict(["a gorgeous, witty film", "dull"])  # (2, classes) probabilities
classifier.labels  # ["negative", "positive"]
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tfhub_finetune.export import (
    ASSETS_EXTRA,
    MODEL_CARD_FILE,
    SERVING_CHUNK_ROWS,
    run_tflite,
    tflite_interpreter,
)
from tfhub_finetune.quantized_export import TFLITE_FILE
from tfhub_finetune.text_client import TextClient


class TfliteTextClassifier:
    """A text classifier's `model.tflite` behind raw strings in, probabilities out.

    Args:
        tflite_file: str or path. A `.tflite` file from `export.export_tflite`
            of a text model (inputs `token_ids`, `padding_mask`, `segment_ids`).
        client: TextClient. The tokenizer the model was trained with.
        labels: list of str. Class names in id order.
        num_threads: int or None. Interpreter threads; None: one per core.
        chunk_rows: int. Rows per length-sorted chunk. Defaults to
            `export.SERVING_CHUNK_ROWS`.

    Example:

    ```python
    classifier = TfliteTextClassifier.from_folder("exports/sst2_int8_tflite/1")
    probabilities = classifier.predict(["a fine film"])
    ```
    """

    def __init__(self, tflite_file: str | os.PathLike, client: TextClient, labels: Sequence[str],
                 *, num_threads: int | None = None, chunk_rows: int = SERVING_CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"`chunk_rows` must be at least 1. Received: chunk_rows={chunk_rows}.")
        self.client = client
        self.labels = list(labels)
        self.chunk_rows = int(chunk_rows)
        self._interpreter = tflite_interpreter(model_path=os.fspath(tflite_file),
                                               num_threads=num_threads or os.cpu_count())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, num_threads: int | None = None
                    ) -> TfliteTextClassifier:
        """Reads `model.tflite`, the vocabulary and the model card of a TFLite text folder.

        Args:
            folder: str or path. `<model_name>_int8_tflite/<version>`.
            num_threads: int or None. As for the constructor.

        Example:

        ```python
        classifier = TfliteTextClassifier.from_folder("exports/sst2_int8_tflite/1")
        ```
        """
        folder = Path(folder)
        card = json.loads((folder / ASSETS_EXTRA / MODEL_CARD_FILE).read_text(encoding="utf-8"))
        return cls(folder / TFLITE_FILE, TextClient.from_saved_model(folder), card["labels"],
                   num_threads=num_threads)

    def predict(self, texts: Sequence[str | bytes],
                text_pairs: Sequence[str | bytes] | None = None) -> np.ndarray:
        """Class probabilities of each text (or pair), `(len(texts), classes)` float32.

        Example:

        ```python
        classifier.predict(["a fine film", "dull"]).argmax(-1)  # e.g. [1, 0]
        ```
        """
        return self.predict_ids(self.client.encode(texts, text_pairs))

    def predict_ids(self, inputs: Mapping[str, Sequence[Sequence[int]] | np.ndarray]) -> np.ndarray:
        """The same on packed token ids (`TextClient.encode`'s or the token-id SavedModel's inputs).

        Rows are run in length-sorted chunks, each cut to its own longest
        row, and returned in input order.
        """
        arrays = {k: np.asarray(v, np.int32) for k, v in inputs.items()}
        if arrays["padding_mask"].size == 0:
            output = self._interpreter.get_output_details()[0]
            return np.zeros((0, *output["shape_signature"][1:]), np.float32)
        lengths = arrays["padding_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = None
        for start in range(0, len(order), self.chunk_rows):
            rows = order[start : start + self.chunk_rows]
            width = max(int(lengths[rows].max()), 1)
            chunk = run_tflite(self._interpreter, {k: v[rows, :width] for k, v in arrays.items()})
            if out is None:
                out = np.empty((len(order), *chunk.shape[1:]), chunk.dtype)
            out[rows] = chunk
        return out
