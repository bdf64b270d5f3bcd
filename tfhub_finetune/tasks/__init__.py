"""Tasks: what a modality needs from the generic train driver (data, model, report)."""

from __future__ import annotations

from typing import Any


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
