"""Selection's cache: fingerprints and keys, derived from the configuration, never listed.

A trial's result depends on its data, the weights behind its backbone name
and every setting of the `ExperimentConfig` it trains with. The KerasTuner
project key is therefore a hash of the trial config's canonical JSON
(`ExperimentConfig.flat()`) minus the fields a trial varies
(`config.TRIAL_FIELDS`: a trial's hyperparameters key it inside the project)
and minus the few that cannot change a result (`NOT_COMPUTED`), plus the
data's fingerprint. A field added to any config dataclass changes the key
with no edit here, so the cache never serves a trial trained with other
settings. Profiles and transferability scores are keyed the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from tfhub_finetune.config import EXPORT_ONLY_FIELDS
from tfhub_finetune.errors import InputError
from tfhub_finetune.io_utils import atomic_write_text
from tfhub_finetune.selection.config import TRIAL_FIELDS, SelectionConfig

# Bumped when what a trial computes changes outside the config, so old caches are not reused.
# 3: serving forms of bf16-trained trials are measured on a float32 export
# (`serving_precision`); figures cached before measured a bf16 one.
# 4: text exports serve the lean BERT graph (`serving_graph`); profiles cached before
# timed the Keras call.
# 5: the lean graph runs in two slices per block with Eigen transposes and softmax;
# latencies cached before timed the single-chain graph.
# 6: training batches group by length in sorted windows (`data.text.batch_examples`), not
# length buckets: other batches, steps per epoch and so other trained weights.
CACHE_VERSION = 6
# Fields that cannot change a result: where the data lives (its content is
# fingerprinted instead), how often backups are written, progress output, and what
# only shapes an export (trials never export).
NOT_COMPUTED = ("data.train_data", "data.eval_data", "train.backup_every_steps", "runtime.verbose",
                *EXPORT_ONLY_FIELDS)


def hash_json(value: Any) -> str:
    """A short hash of `value`'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def trial_settings(config: SelectionConfig, modality: str) -> dict[str, Any]:
    """Everything that changes what a trial computes, except its hyperparameters."""
    # The template trains `full`: the adaptation is a trial hyperparameter (it keys trials inside
    # the project), and its fields stay here at that constant (`model.adaptation.kind` is not the
    # trial field `model.adaptation`), so a project made before it was one keeps its key and its
    # trials serve the `full` configurations.
    template = config.trial(backbone="", learning_rate=0.0, epochs=0, model_dir="",
                            adaptation="full").flat()
    settings = {k: v for k, v in template.items() if k not in TRIAL_FIELDS + NOT_COMPUTED}
    return {"modality": modality, "config": settings, "data": data_fingerprint(config)}


def project_name(config: SelectionConfig, modality: str) -> str:
    """The KerasTuner project of this data and these settings, e.g. `text_3f2a...`."""
    key = hash_json({"version": CACHE_VERSION, **trial_settings(config, modality)})
    return f"{modality}_{key[:16]}"


def transferability_key(config: SelectionConfig, modality: str, backbone: str,
                        weights_id: str, estimators) -> str:
    return hash_json({
        "version": CACHE_VERSION, "backbone": backbone, "weights": weights_id,
        "settings": trial_settings(config, modality),
        "examples": config.search.transfer_examples, "estimators": list(estimators),
    })


def profile_key(request: dict[str, Any], weights_id: str, options: dict[str, Any]) -> str:
    return hash_json({"version": CACHE_VERSION, "weights": weights_id, "request": request,
                      "options": options, "machine": machine()})


def serving_forms_key(project: str, trial_id: str, epochs: int, forms, options: dict[str, Any]) -> str:
    """One trial's measured serving forms: its weights (project, trial, epochs), forms, machine."""
    return hash_json({"version": CACHE_VERSION, "project": project, "trial": trial_id,
                      "epochs": epochs, "forms": list(forms), "options": options,
                      "machine": machine()})


def read(path: Path, overwrite: bool) -> Any | None:
    """The cached JSON at `path`, or None (missing, or `overwrite`)."""
    if overwrite or not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2))


# Files up to this size are hashed whole; larger ones by their size and three samples.
_WHOLE_FILE_BYTES = 64 * 1024 * 1024
_SAMPLE_BYTES = 1024 * 1024
# A folder with more files than this is fingerprinted by names and sizes alone (stat only).
_CONTENT_FILES = 20_000


@functools.cache
def path_fingerprint(path: str) -> str:
    """What a file or folder holds, independent of where and when it was copied.

    Content, never modification times: the same weights or data unpacked
    again (a fresh checkout, a re-synced share, another machine's copy) keep
    their fingerprint, so cached trials, profiles and scores stay reusable,
    while changed bytes change it. A file up to 64 MiB is hashed whole; a
    larger one by its size and 1 MiB from its start, middle and end (a
    retrained checkpoint differs in all three). A folder is the listing of its
    files' relative names and fingerprints; one of over 20,000 files (a large
    image set) is listed by names and sizes only, to stay a stat pass.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{path}"
    if p.is_file():
        return _file_fingerprint(p)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    if len(files) > _CONTENT_FILES:
        return hash_json([(str(f.relative_to(p)), f.stat().st_size) for f in files])
    return hash_json([(str(f.relative_to(p)), _file_fingerprint(f)) for f in files])


def _file_fingerprint(file: Path) -> str:
    size = file.stat().st_size
    if size <= _WHOLE_FILE_BYTES:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        for offset in (0, size // 2, size - _SAMPLE_BYTES):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def data_fingerprint(config: SelectionConfig) -> dict[str, str]:
    d = config.base.data
    return {"train": path_fingerprint(d.train_data),
            "eval": path_fingerprint(d.eval_data) if d.eval_data else ""}


def weights_fingerprint(spec: Any) -> str:
    """Spec plus the content of the files behind it, so changed weights are not reused."""
    from tfhub_finetune.paths import package_dir

    location = None
    if spec.source == "python_package":
        try:
            location = package_dir(spec.handle)
        except InputError:
            location = None
    elif Path(spec.handle).exists():
        location = Path(spec.handle)
    files = path_fingerprint(str(location)) if location is not None else ""
    return hash_json({"spec": spec.to_dict(), "files": files})[:16]


def machine() -> str:
    from tfhub_finetune.selection.profile import cpu_description

    return f"{cpu_description()} | {platform.python_version()}"
