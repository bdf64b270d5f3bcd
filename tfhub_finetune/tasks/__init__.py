"""Tasks: what a modality needs from the generic train driver (data, model, report)."""

from __future__ import annotations

from typing import Any

# What a run's inputs are, and the pipeline that trains each (model selection's modalities).
PIPELINES = {"text": "text_classify", "text_pair": "text_classify",
             "tokens": "token_classify", "image": "image_classify"}
MODALITIES = tuple(PIPELINES)
# The backbone modality each input modality needs (`BackboneSpec.modality`).
BACKBONE_MODALITY = {"text": "text", "text_pair": "text", "tokens": "text", "image": "image"}
# The metrics each modality's trials log (`val_<metric>`) that selection can maximise.
SELECTION_METRICS = {
    "text": ("accuracy", "macro_f1", "f1"), "text_pair": ("accuracy", "macro_f1", "f1"),
    "image": ("accuracy", "macro_f1", "f1"), "tokens": ("entity_f1",),
}


def data_modality(config: Any) -> str | None:
    """The modality an `ExperimentConfig`'s data settings name, or None when the backbone decides.

    Token classification is `tokens`; a `text_pair_column` makes `text_pair`;
    otherwise text or image depends on the backbone.

    Example:

    ```python
    data_modality(ExperimentConfig(data=DataConfig(text_pair_column="2")))  # 'text_pair'
    ```
    """
    if config.model.task == "token_classification":
        return "tokens"
    if config.data.text_pair_column:
        return "text_pair"
    return None


def make_task(config: Any, spec: Any = None, **kwargs: Any) -> Any:
    """The task for `config`: token classification by `model.task`, else by backbone modality.

    Args:
        config: ExperimentConfig.
        spec: BackboneSpec or None. The resolved backbone; None resolves
            `config.model.backbone`.
        **kwargs: passed to the task (e.g. `tfds_fallback` for text).

    Example:

    ```python
    task = make_task(config)  # TextClassificationTask for a text backbone
    ```
    """
    from tfhub_finetune.backbones.catalog import resolve_backbone

    spec = spec or resolve_backbone(config.model.backbone)
    if config.model.task == "token_classification":
        from tfhub_finetune.tasks.token_classification import TokenClassificationTask

        return TokenClassificationTask(config, spec=spec, **kwargs)
    if spec.modality == "image":
        from tfhub_finetune.tasks.image_classification import ImageClassificationTask

        return ImageClassificationTask(config, spec=spec, **kwargs)
    from tfhub_finetune.tasks.text_classification import TextClassificationTask

    return TextClassificationTask(config, spec=spec, **kwargs)
