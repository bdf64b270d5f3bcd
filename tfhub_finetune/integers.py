"""Integers as data files and flags write them: ASCII digits with an optional minus sign.

`str.isdigit` is the wrong test for "can `int()` read this": it accepts
superscripts and other Unicode digits `int()` refuses (`²`), and
`lstrip("-")` before it accepts `--1`. Every reader and flag that tells an
integer from a name asks `parse_int` instead.

Example:

```python
parse_int("7"), parse_int("-3"), parse_int("²"), parse_int("--1"), parse_int("1.0")
# (7, -3, None, None, None)
```
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?[0-9]+")


def parse_int(value: object) -> int | None:
    """The integer `value` spells (surrounding whitespace allowed), else None.

    An `int` (not a bool) is returned as it is; anything else is read as text.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def is_index(value: object) -> bool:
    """True for a column given as a 0-based index (or any integer: the check of >= 0 is the caller's)."""
    return parse_int(value) is not None
