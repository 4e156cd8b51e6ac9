"""The launcher's side of signed options: its key, and what it sends."""

from __future__ import annotations

import json

from consumer.config import load_settings
from consumer.signing import (
    OPTIONS_EVENT_KEY,
    SIGNATURE_KEY,
    URL_EVENT_KEY,
    canonical,
    options_digest,
    signed_options,
)
from consumer.spawner import (
    OPTIONS_EVENT_KEY as SPAWNER_OPTIONS_EVENT_KEY,
    SIGNATURE_KEY as SPAWNER_SIGNATURE_KEY,
    URL_EVENT_KEY as SPAWNER_URL_EVENT_KEY,
    _signature_mac,
    options_digest as spawner_options_digest,
)


def test_the_key_loads_from_launcher_spawner_signing_key_and_is_never_shown() -> None:
    settings = load_settings(environ={"LAUNCHER_SPAWNER_SIGNING_KEY": "s3cret-key"})
    assert settings.spawner_signing_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(settings) and "s3cret-key" not in str(settings.model_dump())


def test_launcher_and_spawner_agree_on_what_is_signed() -> None:
    """The spawner cannot import this package (JupyterHub loads it alone): it repeats the form."""
    options = {"cpu": {"limit": 0.5}, "env": {"TEXT": "é \ud800 {x}"}, "vols": [{"pvc": "claim-a", "mount": "/w"}]}
    signed = signed_options("key", "alice", "gpu-1", options, now=1700000000)
    version, signed_at, mac = signed[SIGNATURE_KEY].split(".")
    assert (version, signed_at) == ("v1", "1700000000")
    assert mac == _signature_mac("key", "alice", "gpu-1", 1700000000, options)
    assert SPAWNER_SIGNATURE_KEY == SIGNATURE_KEY
    assert (
        canonical("alice", "gpu-1", 1, {"b": 1, "a": 2.0})
        == b'{"options":{"a":2.0,"b":1},"server":"gpu-1","time":1,"user":"alice"}'
    )


def test_launcher_and_spawner_agree_on_the_digest_of_applied_options() -> None:
    """The spawner reports the options it applied (unsigned, as the hub decoded them from JSON)
    by digest; the launcher's digest of what it sent, signed, must be the same."""
    options = {"image": "i", "cpu": {"limit": 2.0}, "env": {"TEXT": "é \ud800 {x}"}, "vols": [{"pvc": "a"}]}
    signed = signed_options("key", "alice", "", options, now=1700000000)
    as_the_hub_sees_them = {k: v for k, v in json.loads(json.dumps(signed)).items() if k != SIGNATURE_KEY}
    assert options_digest(signed) == spawner_options_digest(as_the_hub_sees_them) == options_digest(options)
    assert options_digest(signed) != options_digest({**options, "image": "j"})
    assert SPAWNER_OPTIONS_EVENT_KEY == OPTIONS_EVENT_KEY
    assert SPAWNER_URL_EVENT_KEY == URL_EVENT_KEY
