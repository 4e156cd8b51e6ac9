"""Real RabbitMQ (127.0.0.1:5672) and a real JupyterHub, isolated per test by unique names."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import aio_pika
import pytest

from consumer.config import Settings
from consumer.service import serve
from tests.support.localhub import LocalHub

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# Many services run side by side in the tests (in this process and as subprocesses that inherit
# this environment): none takes the default health port unless a test gives it one.
os.environ.setdefault("LAUNCHER_HEALTH_PORT", "0")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def hub() -> Iterator[LocalHub]:
    with LocalHub() as running:
        yield running


def make_settings(hub: LocalHub, **overrides: Any) -> Settings:
    name = unique("test-")
    values: dict[str, Any] = {
        "jupyterhub_url": hub.url,
        "jupyterhub_api_token": hub.token,
        "spawner_signing_key": getattr(hub, "signing_key", ""),  # stand-in hubs (test_broker) have none
        "amqp_url": AMQP_URL,
        "command_queue": f"{name}.commands",
        "reply_exchange": f"{name}.replies",
        "events_exchange": f"{name}.events",
        "launch_timeout": 60,
        "shutdown_grace": 5,
        "status_check_interval": 0.5,
        "health_port": 0,
        **overrides,
    }
    return Settings.model_validate(values)


async def delete_topology(settings: Settings, amqp_url: str = AMQP_URL) -> None:
    """Quorum queues are Raft clusters: left behind, hundreds of them load the broker."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in (settings.command_queue, settings.dead_letter_queue, settings.answers_queue):
            await channel.queue_delete(queue)
        for exchange in (settings.reply_exchange, settings.events_exchange, settings.dead_letter_exchange):
            await channel.exchange_delete(exchange)


@pytest.fixture
async def settings(hub: LocalHub) -> AsyncIterator[Settings]:
    made = make_settings(hub)
    yield made
    await delete_topology(made)


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[None]:
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, started))
    await asyncio.wait({task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # start-up failed: raise its error here
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[None]:
    async with running_service(settings):
        yield


class Client:
    """A publisher as a platform service would write one: RPC calls plus event subscriptions."""

    def __init__(self, settings: Settings, durable_replies: bool = False) -> None:
        self.settings = settings
        self.durable_replies = durable_replies
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.results: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.event_messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def __aenter__(self) -> Self:
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url.get_secret_value())
        self.channel = await self.connection.channel(on_return_raises=True)
        if self.durable_replies:
            # Outlives a broker restart: a reply sent before this client has reconnected waits for it.
            self.reply_queue = await self.channel.declare_queue(unique("test-replies-"), durable=True)
        else:
            self.reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.reply_queue.consume(self._on_reply, no_ack=True)
        replies = await self.channel.declare_exchange(
            self.settings.reply_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        events = await self.channel.declare_exchange(
            self.settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        results_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await results_queue.bind(replies, "#")
        await results_queue.consume(self._on_result, no_ack=True)
        events_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await events_queue.bind(events, "#")
        await events_queue.consume(self._on_event, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.durable_replies:
            await self.reply_queue.delete(if_unused=False, if_empty=False)
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(json.loads(message.body))

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.results.append(
            (message.routing_key or "", json.loads(message.body) | {"_correlation_id": message.correlation_id})
        )

    async def _on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.event_messages.append(message)
        self.events.append(json.loads(message.body))

    async def send(self, body: dict[str, Any] | bytes, correlation_id: str | None = None, **properties: Any) -> str:
        correlation_id = correlation_id or uuid.uuid4().hex
        self.replies[correlation_id] = asyncio.get_running_loop().create_future()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=self.reply_queue.name,
                message_id=properties.pop("message_id", uuid.uuid4().hex),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **properties,
            ),
            routing_key=self.settings.command_queue,
            mandatory=True,  # a command with no queue to go to fails the test instead of vanishing
        )
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = 90) -> dict[str, Any]:
        return await asyncio.wait_for(asyncio.shield(self.replies[correlation_id]), timeout)

    async def call(self, body: dict[str, Any] | bytes, timeout: float = 90, **properties: Any) -> dict[str, Any]:
        return await self.reply(await self.send(body, **properties), timeout)

    def events_for(self, correlation_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("correlationid") == correlation_id]

    async def wait_for_event(self, correlation_id: str, event_type: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not any(e["type"] == event_type for e in self.events_for(correlation_id)):
                await asyncio.sleep(0.05)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings) as connected:
        yield connected


@pytest.fixture
def username() -> str:
    return unique("u")
