"""The answer journal against the real RabbitMQ: a redelivered launch finds the answer already
published for it even when it asks while the connection (and the journal's channel) is being
restored, as happens right after a broker node is lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from consumer.broker import Broker
from consumer.config import Settings
from tests.conftest import AMQP_URL, delete_topology, make_settings, unique
from tests.support.tcpcut import TcpCut

NO_HUB = SimpleNamespace(url="http://127.0.0.1:9/", token="unused")  # the broker never talks to it


@pytest.fixture
async def cut_broker() -> AsyncIterator[tuple[Broker, TcpCut, Settings]]:
    address = urlsplit(AMQP_URL)
    async with TcpCut(address.hostname or "127.0.0.1", address.port or 5672) as cut:
        settings = make_settings(NO_HUB, amqp_url=f"amqp://guest:guest@127.0.0.1:{cut.port}/")  # type: ignore[arg-type]
        broker = Broker(settings)
        await broker.connect()
        try:
            yield broker, cut, settings
        finally:
            await broker.close()
            await delete_topology(settings)


async def test_a_recorded_answer_is_found_when_asked_while_the_connection_is_being_restored(
    cut_broker: tuple[Broker, TcpCut, Settings],
) -> None:
    broker, cut, _ = cut_broker
    command_id = unique("cmd-")
    body = json.dumps({"ok": True, "token": "first"}).encode()
    await broker.publish_result("launch.ok", "corr-1", body, command_id)

    cut.cut()  # the connection drops: every channel, the journal's included, must be reopened
    await asyncio.sleep(0.2)
    assert broker.connection is not None and not broker.connection.connected.is_set()
    asking = asyncio.create_task(broker.recorded_answer(command_id))
    await asyncio.sleep(1.5)  # asked while down: it waits for the journal's channel instead of giving up
    assert not asking.done()
    cut.mend()
    answer = await asyncio.wait_for(asking, 30)

    assert answer is not None
    assert (answer.routing_key, answer.correlation_id, answer.body) == ("launch.ok", "corr-1", body)


async def test_an_unpublished_command_has_no_recorded_answer(cut_broker: tuple[Broker, TcpCut, Settings]) -> None:
    broker, _, _ = cut_broker
    await broker.publish_result("launch.ok", "corr-2", b"{}", unique("cmd-"))
    assert await broker.recorded_answer(unique("cmd-")) is None
