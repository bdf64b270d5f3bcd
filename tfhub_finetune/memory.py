"""Peak memory of this process per phase: the RSS high-water mark, reset where Linux allows.

`VmHWM` in `/proc/self/status` is the peak resident set size; writing `5` to
`/proc/self/clear_refs` resets it to the current RSS, so a phase's own peak
can be read (Linux >= 4.0). Where that is not possible, the fallback is
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which only grows: a phase then
reads the process's peak so far. On a GPU, TensorFlow's allocator peak
(`get_memory_info`) is read as well.
"""

from __future__ import annotations

import contextlib
import resource
import sys

_MIB = 1024.0 * 1024.0


class PeakMemory:
    """Peak RSS of this process per phase.

    Example:

    ```python
    meter = PeakMemory()
    before = meter.current_mb()
    meter.reset()
    model.fit(...)
    grew_by = meter.peak_mb() - before
    ```
    """

    def __init__(self):
        self._can_reset = _can_reset_hwm()
        self.method = (
            "peak RSS (VmHWM, reset per phase via /proc/self/clear_refs) minus the RSS before "
            "the model was built"
            if self._can_reset
            else "peak RSS (getrusage ru_maxrss, monotone; training measured after inference) "
            "minus the RSS before the model was built"
        )
        self._gpu = _first_gpu()
        if self._gpu:
            self.method += "; GPU: TF allocator peak (get_memory_info)"

    @property
    def resets(self) -> bool:
        """Whether `reset` really resets the peak (else `peak_mb` is the process's peak)."""
        return self._can_reset

    def current_mb(self) -> float:
        value = _proc_status_kb("VmRSS")
        if value is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return value / 1024.0

    def reset(self) -> None:
        if self._can_reset:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
        if self._gpu:
            import tensorflow as tf

            with contextlib.suppress(Exception):  # Older TF lacks it; peaks then accumulate.
                tf.config.experimental.reset_memory_stats(self._gpu)

    def peak_mb(self) -> float:
        value = _proc_status_kb("VmHWM") if self._can_reset else None
        if value is None:  # ru_maxrss is in KiB on Linux.
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return value / 1024.0

    def device_peak_mb(self) -> float | None:
        if not self._gpu:
            return None
        import tensorflow as tf

        try:
            return round(tf.config.experimental.get_memory_info(self._gpu)["peak"] / _MIB, 4)
        except Exception:
            return None


def process_peak_mb() -> float:
    """This process's RSS high-water mark since it started (or the last reset), MiB.

    `VmHWM` where `/proc` has it, else `ru_maxrss` (KiB on Linux, bytes on
    macOS). Reads only: unlike `PeakMemory()`, which probes the reset, it
    leaves the peak in place, so a process can report its whole run's peak.
    """
    value = _proc_status_kb("VmHWM")
    if value is not None:
        return value / 1024.0
    scale = _MIB if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _proc_status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    if _proc_status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _first_gpu() -> str | None:
    import tensorflow as tf

    return "GPU:0" if tf.config.list_physical_devices("GPU") else None
