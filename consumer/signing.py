"""The launcher's signature on the ``user_options`` it sends, which the hub-side spawner checks.

A plain JupyterHub user's own token may POST ``user_options`` for their own servers; the spawner
cannot tell who sent them. It therefore applies options only when they carry an HMAC made with a
key that the launcher and the hub share (``spawner_signing_key`` here, ``launcher_signing_key`` on
the spawner), over the user, the server name, the options and the time of signing. A signed set is
good for one user's one server, for a few minutes.

The spawner (``consumer/spawner.py``, loaded by JupyterHub without this package) repeats the
canonical form below; the tests sign here and verify there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

# The key in user_options that holds the signature; the spawner removes it before applying them.
SIGNATURE_KEY = "launcher_signature"
VERSION = "v1"
# The key of the progress event in which the spawner says which options its spawn applied.
OPTIONS_EVENT_KEY = "launcher_options"
# The key, in that event, of the server's URL (what the hub's "ready" event will say).
URL_EVENT_KEY = "launcher_url"


def _canonical_json(value: Any) -> bytes:
    """One JSON text with sorted keys and no spaces, so that both sides agree byte for byte."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def canonical(username: str, server_name: str, signed_at: int, options: dict[str, Any]) -> bytes:
    """The bytes that are signed."""
    return _canonical_json({"options": options, "server": server_name, "time": signed_at, "user": username})


def signature(key: str, username: str, server_name: str, signed_at: int, options: dict[str, Any]) -> str:
    mac = hmac.new(key.encode(), canonical(username, server_name, signed_at, options), hashlib.sha256)
    return f"{VERSION}.{signed_at}.{mac.hexdigest()}"


def options_digest(options: dict[str, Any]) -> str:
    """The digest the spawner reports for ``options`` once applied (unsigned, as it stores them):
    SHA-256 over their canonical JSON, the first 32 hex digits."""
    unsigned = {k: v for k, v in options.items() if k != SIGNATURE_KEY}
    return hashlib.sha256(_canonical_json(unsigned)).hexdigest()[:32]


class SignedOptions(dict[str, Any]):
    """Options with their signature, equal to the same options however (or whether) signed.

    The launch workflow asks "is the server running with these options?" by comparing the options
    it sends with those the hub stored; a re-run signs again at a later time, and the spawner
    stores the options without their signature.
    """

    def _unsigned(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k != SIGNATURE_KEY}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        return self._unsigned() == {k: v for k, v in other.items() if k != SIGNATURE_KEY}

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # a dict: unhashable, as before


def signed_options(
    key: str, username: str, server_name: str, options: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """``options`` plus their signature for ``username``'s server ``server_name``; unchanged
    (unsigned) when no key is configured."""
    if not key:
        return options
    unsigned = {k: v for k, v in options.items() if k != SIGNATURE_KEY}
    signed_at = int(time.time() if now is None else now)
    return SignedOptions(unsigned, **{SIGNATURE_KEY: signature(key, username, server_name, signed_at, unsigned)})
