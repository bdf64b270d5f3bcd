"""The from-scratch text baseline: same tokenizer, random weights.

It answers "is pretraining worth it here?": same head, same data, same
training recipe, but a small randomly initialised BERT encoder.
"""

from __future__ import annotations

import keras_hub

from tfhub_finetune.backbones.base import TextBackbone
from tfhub_finetune.backbones.catalog import resolve_backbone
from tfhub_finetune.backbones.keras_hub_source import load_tokenizer
from tfhub_finetune.backbones.spec import BackboneSpec


def load_scratch_text_backbone(spec: BackboneSpec) -> TextBackbone:
    """Builds a randomly initialised BERT encoder on a pretrained tokenizer.

    Example:

    ```python
    bb = load_scratch_text_backbone(resolve_backbone("scratch_text_encoder"))
    ```
    """
    tokenizer = load_tokenizer(resolve_backbone(spec.vocabulary_from or "minilm_l6_h384"))
    config = {"num_layers": 2, "num_heads": 2, "hidden_dim": 128, "intermediate_dim": 512}
    config.update(spec.extra)
    max_len = spec.max_sequence_length or 512
    encoder = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size,
        max_sequence_length=max_len,
        dropout=0.1,
        name="scratch_bert_backbone",
        **config,
    )
    return TextBackbone(
        spec=spec,
        encoder=encoder,
        tokenizer=tokenizer,
        hidden_dim=int(config["hidden_dim"]),
        max_sequence_length=max_len,
        vocabulary=tokenizer.vocabulary(),
        lowercase=tokenizer.lowercase,
    )
