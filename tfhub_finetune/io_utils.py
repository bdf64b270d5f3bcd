"""Atomic, shareable file writes: a kill never leaves a half-written file behind.

Every writer in the package goes through here: `atomic_write_text` (JSON,
Markdown), `atomic_path` (anything a library writes to a path: weights,
`.keras` files, PNGs) and `staging_dir` (SavedModel exports, renamed into
place by their writer). Temporary names are hidden (a leading dot: TF Serving
and `ls` skip them), sit beside the target (same file system, so the rename
is atomic) and carry the host and process id, so `remove_stale_staging` can
tell a folder left by a killed export from another export still writing.
What is written is readable as the umask allows (folders 755 and files 644
under umask 022), like any other file the user creates: an export is meant to
be served by another user's TF Serving.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A staging folder from another host (shared file system), or one named
# before names carried a process id, is stale once this old.
STALE_AFTER_SECONDS = 24 * 3600


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _temp_name(label: str, suffix: str = "") -> str:
    return f".{label}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output_dir(path: str | Path, flag: str, *, is_file: bool = False) -> None:
    """Raises InputError unless `path` is, or can be made as, a writable folder.

    With `is_file=True`, `path` names a file to write and its folder is checked.
    Pipelines call it before any data is read or model loaded, so a bad
    `--model_dir`/`--export_dir`/`--output` costs a second, not a training run.
    """
    from tfhub_finetune.errors import InputError

    target = Path(path).expanduser()
    if not is_file and target.exists() and not target.is_dir():
        raise InputError(f"--{flag} is a file, not a folder.", received={flag: str(path)},
                         fix="Give a folder path (it is created if missing).")
    existing = target.parent if is_file else target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--{flag} is inside a file, not a folder.",
                         received={flag: str(path), "file": str(existing)},
                         fix="Give a folder path.")
    try:
        # Tried, not os.access'ed: root passes permission checks that a read-only mount fails.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InputError(f"--{flag} is not writable ({err.strerror}).",
                         received={flag: str(path), "folder": str(existing)},
                         fix="Choose a folder you can write to, or fix its permissions.") from None


def check_export_name(name: str) -> str:
    """Returns `name` if it is a plain folder name for `<export_dir>/<name>/<version>`.

    Raises:
        InputError: for slashes, a leading '.', an empty name or a number (a version).
    """
    from tfhub_finetune.errors import InputError

    if not name or name.startswith(".") or "/" in name or "\\" in name or name.isdigit():
        raise InputError(
            "Invalid model name for the export path.",
            received={"model_name": name},
            fix="Use a plain folder name (no slashes, not starting with '.', not a number).",
        )
    return name


def read_json_file(path: str | Path, *, fix: str) -> Any:
    """A JSON file this package wrote (params, labels, backup state), parsed.

    Files are written atomically, so a damaged one was damaged from outside (a
    truncated copy, an edit): that is said in one line naming the file, with `fix`.

    Raises:
        InputError: the file cannot be read or is not valid JSON.
    """
    import json

    from tfhub_finetune.errors import InputError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        problem = getattr(err, "strerror", None) or getattr(err, "msg", None) or type(err).__name__
        raise InputError(f"{path} is unreadable or damaged ({problem}).",
                         received={"file": str(path)}, fix=fix) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to a hidden file beside `path`, then renames it over `path`.

    Example:

    ```python
    atomic_write_text("runs/x/metrics.json", json.dumps(metrics))
    ```
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` on success.

    The temporary name keeps `path`'s suffixes (Keras checks `.weights.h5`).
    For files, `os.replace` makes the switch atomic. For directories, an
    existing target is moved aside first, then removed, so readers see either
    the old or the new complete directory. On an error the temporary is
    removed and the target is untouched.

    Example:

    ```python
    with atomic_path("model_dir/best.weights.h5") as tmp:
        model.save_weights(tmp)
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, dot, _ = path.name.partition(".")
    suffix = "" if is_dir else ("." + path.name.partition(".")[2] if dot else "")
    tmp = path.parent / _temp_name(stem, suffix)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def move_into_place(tmp: str | Path, path: str | Path) -> None:
    """Renames `tmp` to `path`; an existing folder at `path` is swapped out, then removed."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and path.exists():
        old = path.parent / _temp_name(f"{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def staging_dir(parent: str | Path, label: str) -> Path:
    """Creates a fresh hidden folder in `parent` to write an export into.

    Mode `0777 & ~umask` (755 under umask 022), where `tempfile.mkdtemp`
    would give 0700, which a TF Serving process running as another user
    cannot read once the folder is renamed to a version. Folders a killed
    export left under the same label are removed first
    (`remove_stale_staging`). The caller renames the folder into place or
    removes it.

    Args:
        parent: str or Path. Created if missing.
        label: str. Name part, e.g. `"export"` gives `.export-<host>-<pid>-<random>.tmp`.

    Returns:
        The new folder.

    Example:

    ```python
    tmp = staging_dir("exports/sst2", "export")
    tf.saved_model.save(module, str(tmp))
    os.rename(tmp, "exports/sst2/3")
    ```
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent, label)
    path = parent / _temp_name(label)
    path.mkdir(mode=0o777)  # mkdir applies the umask.
    return path


def remove_stale_staging(parent: str | Path, label: str,
                         max_age_s: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Removes `.<label>-*.tmp` folders in `parent` whose writer is gone.

    A folder named by this host's process `pid` is stale when that process no
    longer exists; another export that is still writing is left alone. A
    folder from another host, or from before names carried a pid (e.g.
    `.export-k2j4x9.tmp`), is stale once older than `max_age_s`.

    Returns:
        The folders removed.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(label)}-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
    removed = []
    now = time.time()
    for path in parent.glob(f".{label}-*.tmp"):
        match = pattern.match(path.name)
        if match and match["host"] == _host():
            stale = not _process_alive(int(match["pid"]))
        else:
            try:
                stale = now - path.stat().st_mtime > max_age_s
            except FileNotFoundError:
                continue
        if stale:
            _remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, another user's.
        return True
    return True
