"""The broker layer against the real RabbitMQ: lifecycle events go through a backlog that never holds
up a reply, keeps its order, reaches the broker at shutdown, and drops (with a warning) past its bound."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import aio_pika
import pytest

from consumer.broker import Broker
from consumer.config import Settings
from tests.conftest import AMQP_URL, delete_topology, make_settings

NO_HUB = SimpleNamespace(url="http://127.0.0.1:9/", token="unused")  # the broker never talks to it


@pytest.fixture
async def broker_settings() -> AsyncIterator[Settings]:
    settings = make_settings(NO_HUB)  # type: ignore[arg-type]
    yield settings
    await delete_topology(settings)


async def subscribe(connection: aio_pika.abc.AbstractConnection, exchange: str) -> aio_pika.abc.AbstractQueue:
    channel = await connection.channel()
    events = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(events, "#")
    return queue


async def collect(queue: aio_pika.abc.AbstractQueue, count: int, timeout: float = 20) -> list[dict[str, int]]:
    received: list[dict[str, int]] = []
    async with asyncio.timeout(timeout):
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                received.append(json.loads(message.body))
                if len(received) == count:
                    break
    return received


def event(n: int) -> tuple[str, str, Callable[[], bytes], str]:
    return ("launch.progress", f"c-{n}", lambda: json.dumps({"n": n}).encode(), "application/json")


async def test_queued_events_are_published_in_order_even_when_the_broker_closes_right_after(
    broker_settings: Settings,
) -> None:
    broker = Broker(broker_settings)
    await broker.connect()
    subscriber = await aio_pika.connect(AMQP_URL)
    async with subscriber:
        queue = await subscribe(subscriber, broker_settings.events_exchange)
        for n in range(500):
            broker.publish_event(*event(n))
        await broker.close()
        received = await collect(queue, 500)
    assert [e["n"] for e in received] == list(range(500))


async def test_a_reply_is_not_held_up_by_the_event_backlog(broker_settings: Settings) -> None:
    broker = Broker(broker_settings)
    await broker.connect()
    try:
        subscriber = await aio_pika.connect(AMQP_URL)
        async with subscriber:
            channel = await subscriber.channel()
            reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for n in range(5000):
                broker.publish_event(*event(n))
            assert await broker.reply(reply_queue.name, "c-reply", b'{"ok": true}')
            # Confirmed while most events still wait: the reply did not queue behind them.
            assert broker.event_backlog.qsize() > 2500
            message = await reply_queue.get(timeout=5, fail=True)
            assert message is not None and message.correlation_id == "c-reply"
    finally:
        await broker.close()


def test_events_past_the_backlog_bound_are_dropped_with_a_warning(
    broker_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker(broker_settings)
    broker.event_backlog = asyncio.Queue(maxsize=2)  # not connected: nothing drains it
    with caplog.at_level(logging.WARNING, logger="consumer.broker"):
        for n in range(5):
            broker.publish_event(*event(n))
    assert broker.event_backlog.qsize() == 2
    assert broker.events_dropped == 3
    assert [r.getMessage() for r in caplog.records] == [
        "event backlog full (broker unreachable?): 1 events dropped so far"
    ]
