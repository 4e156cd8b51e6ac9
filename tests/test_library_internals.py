"""The library details the launcher relies on beyond their documented APIs, pinned.

``consumer/broker.py`` raises ``aiormq.Connection.FRAME_BUFFER_SIZE`` (the size of a connection's
write queue; at its default of 10 frames, replies of a burst waited there: overhead p95 at N = 200
in the benchmark 169-323 ms against 39-89 ms) and publishes through aio-pika's underlay (aiormq)
channel with ``wait=False``, so that a reply does not hold the channel lock until it is written.
Neither is a documented setting, so ``pyproject.toml`` pins aio-pika and aiormq to the ranges they
were checked against, and these tests fail, saying what to re-check, when an upgrade changes them.
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiormq
import pytest
from packaging.requirements import Requirement

from consumer import broker as broker_module
from consumer.broker import Broker
from consumer.config import Settings
from tests.conftest import delete_topology

ROOT = Path(__file__).resolve().parents[1]
WHY = (
    "consumer/broker.py relies on it for the reply path's speed; re-check the reply path against "
    "the new version (make bench: overhead p95 at N = 200) and update the pin in pyproject.toml"
)


def pinned(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not pinned in pyproject.toml: {WHY}")


@pytest.mark.parametrize("name", ["aio-pika", "aiormq", "pamqp"])
def test_the_installed_amqp_libraries_are_within_the_checked_ranges(name: str) -> None:
    requirement = pinned(name)
    # An upper bound: the details below were checked against these versions only.
    assert any(spec.operator == "<" for spec in requirement.specifier), f"{name} needs an upper bound: {WHY}"
    installed = version(name)
    assert requirement.specifier.contains(installed), f"{name} {installed} is outside {requirement.specifier}: {WHY}"


async def test_the_launchers_connection_gets_the_raised_write_queue(settings: Settings) -> None:
    assert broker_module.aiormq.Connection.FRAME_BUFFER_SIZE > 10
    broker = Broker(settings)
    await broker.connect()
    try:
        assert broker.channel is not None
        underlay = await broker.channel.get_underlay_channel()
        write_queue = getattr(underlay.connection, "write_queue", None)
        assert write_queue is not None, f"aiormq's Connection has no write_queue any more: {WHY}"
        assert write_queue.maxsize == aiormq.Connection.FRAME_BUFFER_SIZE, (
            f"aiormq no longer sizes a connection's write queue by Connection.FRAME_BUFFER_SIZE: {WHY}"
        )
    finally:
        await broker.close()
        await delete_topology(settings)


def test_the_underlay_publish_still_takes_wait_and_timeout() -> None:
    parameters = inspect.signature(aiormq.Channel.basic_publish).parameters
    for name in ("wait", "timeout", "mandatory", "properties"):
        assert name in parameters, f"aiormq's Channel.basic_publish lost {name!r}: {WHY}"


def test_pamqp_still_decodes_properties_through_the_lenient_decoders() -> None:
    """``consumer/amqp_decoding.py`` swaps pamqp's short-string and table decoders, which pamqp
    looks up in ``decode.METHODS`` and ``decode.TABLE_MAPPING`` for every frame."""
    from pamqp import decode

    from consumer import amqp_decoding

    amqp_decoding.install()
    reason = "pamqp no longer decodes through decode.METHODS; consumer/amqp_decoding.py needs another way"
    assert decode.METHODS.get("shortstr") is amqp_decoding.short_str, reason
    assert decode.TABLE_MAPPING.get(b"F") is amqp_decoding.field_table, reason
    # A correlation id that is not UTF-8 reads with U+FFFD instead of raising.
    assert decode.by_type(b"\x02\xff\xfe", "shortstr") == (3, "\ufffd\ufffd"), reason
