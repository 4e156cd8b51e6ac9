"""Message properties that are not UTF-8 must not break the command connection.

AMQP short strings (``correlation_id``, ``reply_to``, ``message_id``, ``content_type``, …) and the
keys of the ``headers`` table are bytes on the wire. pamqp decodes them as strict UTF-8, so one
message whose publisher put other bytes there raised in aiormq's frame reader (aiormq 7.2,
pamqp 4.0): the connection dropped, every command in flight was redelivered, and the message came
back on the new connection, again and again until the queue's delivery limit dead-lettered it.

Decoded leniently instead, such a message reaches the worker and is answered like any other:
undecodable bytes in a short string become U+FFFD, and a headers table that cannot be decoded reads
as empty (the launcher reads no headers; the broker keeps the original for the dead-letter queue).
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import decode

_strict_short_str = decode.short_str
_strict_field_table = decode.field_table


def short_str(value: bytes) -> tuple[int, str]:
    try:
        return _strict_short_str(value)
    except UnicodeDecodeError:
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    try:
        return _strict_field_table(value)
    except UnicodeDecodeError:
        (length,) = struct.unpack_from(">I", value)
        return length + 4, {}


def install() -> None:
    """Make pamqp's decoders lenient for this process (they are looked up per frame)."""
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = field_table
    decode.TABLE_MAPPING[b"F"] = field_table
