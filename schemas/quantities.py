"""Resource quantities with JupyterHub's meaning.

JupyterHub's ``mem_limit`` reads ``K``/``M``/``G``/``T`` as powers of 1024, and KubeSpawner passes
them on; Kubernetes' binary suffixes ``Ki``/``Mi``/``Gi``/``Ti`` mean the same, so both are accepted.
Decimal Kubernetes suffixes (``k``, ``m`` for milli) are refused rather than silently misread.
"""

from __future__ import annotations

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
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|K|M|G|T)?$")


def parse_memory(value: str | int | float) -> int:
    """Bytes for a memory quantity such as ``512M``, ``1G``, ``1.5Gi`` or ``1073741824``."""
    if isinstance(value, bool):
        raise ValueError("a memory quantity must be a number of bytes or a string like '512M'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise ValueError(
                f"{value!r} is not a memory quantity: use bytes or a number with K, M, G, T "
                "(powers of 1024, as JupyterHub) or Ki, Mi, Gi, Ti"
            )
        number, unit = float(match["number"]), match["unit"] or ""
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{value!r} must be more than 0 bytes")
    return size
