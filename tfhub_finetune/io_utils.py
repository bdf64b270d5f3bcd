"""Atomic file writes: a kill never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` on success.

    For files, `os.replace` makes the switch atomic. For directories (SavedModel
    exports), an existing target is moved aside first, then removed, so readers
    see either the old or the new complete directory.

    Example:

    ```python
    with atomic_path("model_dir/best.weights.h5") as tmp:
        model.save_weights(tmp)
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if not is_dir else ""
    tmp = path.parent / f".{path.name.split('.')[0]}.tmp{os.getpid()}{suffix}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if is_dir and path.exists():
            old = path.parent / f".{path.name}.old{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        raise
