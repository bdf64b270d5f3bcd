"""What must be settled before TensorFlow starts: which CPU kernels it runs, measured.

TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it is imported, and by
default turns its oneDNN kernels on only on CPUs with AVX512-VNNI,
AVX512-BF16 or AMX; elsewhere it runs Eigen's. Which is faster depends on
the CPU, not on that list: on an AVX2-only AMD EPYC, with TensorFlow's
default (Eigen), fine-tuning MiniLM-L6 ran at 30 examples/s and with oneDNN
at 51 (1.66x, fresh processes in alternation). So `choose_cpu_kernels`
decides by measuring (`calibration.onednn_calibration`: two child
processes, ~20 s once per machine, then cached) and sets the variable for
this process and its children. A value the user set is kept.

The pipelines call it just before their first `import tensorflow`
(`pipelines.flags.prepare_tensorflow_startup`). In your own code, call it
before anything imports TensorFlow:

```python
from tfhub_finetune import tf_startup

tf_startup.choose_cpu_kernels()  # e.g. 'TF_ENABLE_ONEDNN_OPTS=1: oneDNN 2.07x Eigen ...'
import tensorflow as tf
```

TF Serving's model server runs the same TensorFlow runtime and reads the
same variable: export it in the server's environment to match.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from tfhub_finetune import calibration

logger = logging.getLogger(__name__)


def choose_cpu_kernels(
    hidden_size: int = calibration.DEFAULT_HIDDEN_SIZE,
    *,
    recalibrate: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Sets `TF_ENABLE_ONEDNN_OPTS` to the kernels measured faster here, before TensorFlow starts.

    Leaves things as they are when the variable is already set (the user's
    choice), when TensorFlow is already imported (too late to change), or when
    neither setting is `calibration.ONEDNN_MARGIN` times faster than the
    other (TensorFlow's default stays). A failed measurement is logged and
    changes nothing: either kernel library computes the same model.

    Args:
        hidden_size: int. The calibration layer's width (the model's).
        recalibrate: bool or None. As for `calibration.cpu_calibration`.
        cache_dir: str, path or None. As for `calibration.cpu_calibration`.

    Returns:
        One line: what this process runs and why.

    Example:

    ```python
    choose_cpu_kernels()  # before `import tensorflow`
    ```
    """
    env = calibration.ONEDNN_ENV
    if env in os.environ:
        return f"{env}={os.environ[env]} from the environment: kept"
    if "tensorflow" in sys.modules:
        return "TensorFlow has started: its CPU kernels stay as they are"
    try:
        figures = calibration.onednn_calibration(hidden_size, recalibrate=recalibrate,
                                                 cache_dir=cache_dir)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, AttributeError,
            subprocess.SubprocessError) as error:
        logger.warning("CPU kernels: TensorFlow's default; the oneDNN calibration could not run "
                       "(%s).", error)
        return f"TensorFlow's default CPU kernels (calibration failed: {error})"
    value, reason = calibration.decide_onednn(figures.seconds)
    source = "measured now" if figures.measured else f"cached in {figures.path}"
    if value is None:
        line = f"{env} unset: {reason}; {source}"
    else:
        os.environ[env] = value
        line = f"{env}={value}: {reason}; {source}"
    # Debug, not info: a pipeline's stderr is one line when it fails (the driver prints the
    # kernels in use on stdout).
    logger.debug("CPU kernels: %s", line)
    return line
