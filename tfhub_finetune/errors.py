"""How a run ends when it does not succeed: one line, and an exit code that says why.

Every mistake a user can make (a bad flag, a missing file, a malformed row, an
unknown backbone) raises `InputError`. Pipelines catch it in one place and print
its message as a single line with exit code 2; anything else is a bug and keeps
its traceback. A run stopped by SIGTERM after its backup raises `Preempted`:
one line, exit code 143, and the same command resumes it.
"""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable
from typing import Any


class InputError(ValueError):
    """A problem with what the user gave us, reported as one line.

    Messages follow the Keras form: the problem, then `Received: name=value`,
    then what is accepted or how to fix it.

    Example:

    ```python
    raise InputError(
        "Unknown backbone.", received={"backbone": "minilm_l7"},
        fix="Expected one of: minilm_l6_h384, ...",
    )
    ```
    """

    def __init__(
        self,
        problem: str,
        *,
        received: dict[str, Any] | None = None,
        fix: str | None = None,
    ):
        self.problem = problem
        self.received = dict(received or {})
        self.fix = fix
        super().__init__(format_error(problem, received=received, fix=fix))


# 128 + SIGTERM: what a shell or scheduler reports for a process SIGTERM ended,
# so "preempted" reads the same whether the backup finished or not.
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)


class Preempted(BaseException):
    """Training stopped on SIGTERM after a backup; rerunning the same command resumes.

    A `BaseException`, like `KeyboardInterrupt`: it is not an error for generic
    `except Exception` handlers (KerasTuner's trial loop, for one) to record and
    continue from; it must reach the pipeline, which exits with
    `PREEMPTED_EXIT_CODE`.

    Attributes:
        state: dict. The committed backup (`epoch`, `step_in_epoch`,
            `global_step`, ...).
    """

    def __init__(self, state: dict, steps_per_epoch: int):
        self.state = dict(state)
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        where = (f"epoch {epoch + 1}, step {step} of {steps_per_epoch}" if step
                 else f"the end of epoch {epoch}")
        super().__init__(
            f"Interrupted at step {state['global_step']} ({where}) by SIGTERM; the backup is "
            "saved. Rerun the same command to resume."
        )


def format_error(
    problem: str, *, received: dict[str, Any] | None = None, fix: str | None = None
) -> str:
    """Formats `problem. Received: k=v. fix` on one line."""
    parts = [problem.rstrip()]
    if received:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in received.items())
        parts.append(f"Received: {shown}.")
    if fix:
        parts.append(fix.rstrip())
    return " ".join(" ".join(p.split()) for p in parts)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def close_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to `n` entries of `choices` that look like `name`."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    return matches


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`Did you mean: a, b?` followed by the accepted values, or the accepted values alone."""
    choices = sorted(choices)
    close = close_names(name, choices)
    accepted = f"Expected one of: {', '.join(choices)}."
    if close:
        return f"Did you mean: {', '.join(close)}? {accepted}"
    return accepted
