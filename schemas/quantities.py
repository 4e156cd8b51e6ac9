"""Resource quantities with JupyterHub's meaning.

JupyterHub's ``mem_limit`` reads ``K``/``M``/``G``/``T`` as powers of 1024, and KubeSpawner passes
them on; Kubernetes' binary suffixes ``Ki``/``Mi``/``Gi``/``Ti`` mean the same, so both are accepted.
Decimal Kubernetes suffixes (``k``, ``m`` for milli) are refused rather than silently misread.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
# More than any single machine has (the largest have 32 TiB): a bigger number is a mistake, and
# numbers like 1e308 would otherwise reach the hub as bytes.
MAX_MEMORY = 64 * 1024**4
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|K|M|G|T)?$")


def parse_memory(value: str | float) -> int:
    """Bytes for a memory quantity such as ``512M``, ``1G``, ``1.5Gi`` or ``1073741824``."""
    if isinstance(value, bool):
        # ValueError: callers (pydantic validators) report only ValueError as the field's error.
        raise ValueError("a memory quantity must be a number of bytes or a string like '512M'")  # noqa: TRY004
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a memory quantity must be a finite number")
        number, unit = value, ""
    else:
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise ValueError(
                f"{_clip(value)} is not a memory quantity: use bytes or a number with K, M, G, T "
                "(powers of 1024, as JupyterHub) or Ki, Mi, Gi, Ti"
            )
        number, unit = float(match["number"]), match["unit"] or ""
    size = number * _UNITS[unit]  # a float for long digit strings: can be inf, never an error here
    if size > MAX_MEMORY:
        raise ValueError(f"{_clip(value)} is more than the most memory a server can have, 64 TiB")
    size = int(size)
    if size <= 0:
        raise ValueError(f"{_clip(value)} must be more than 0 bytes")
    return size


def _clip(value: str | float, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
