"""RabbitMQ: the command queue, replies and events. Knows AMQP, nothing of JupyterHub.

Topology (all durable):
- ``<command_queue>``: quorum queue; rejected or too-often-redelivered commands are dead-lettered
  (at-least-once) through the fanout exchange ``<command_queue>.dlx`` to ``<command_queue>.dead``.
- ``reply_exchange`` (topic): result events, routing key ``<action>.ok`` / ``<action>.error``.
- ``events_exchange`` (topic): lifecycle events, routing key = event type.
RPC replies go to the default exchange with routing key = the command's ``reply_to``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.exceptions import PublishError

from .config import Settings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 30.0  # publishes block while the broker says the connection is blocked
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Broker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractQueue | None = None
        self.replies: AbstractExchange | None = None
        self.events: AbstractExchange | None = None
        self.consumer_tag: str | None = None

    async def connect(self) -> None:
        s = self.settings
        self.connection = await aio_pika.connect_robust(
            s.amqp_url.get_secret_value(),
            client_properties={"connection_name": f"jupyterhub-launcher {s.command_queue}"},
        )
        # Returned (unroutable) replies raise, so a vanished reply queue is noticed, not ignored.
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)  # type: ignore[assignment]
        assert self.channel is not None
        await self.channel.set_qos(prefetch_count=s.max_concurrency)
        dlx = await self.channel.declare_exchange(
            s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await self.channel.declare_queue(
            s.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx)
        self.queue = await self.channel.declare_queue(
            s.command_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": s.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
                "x-delivery-limit": s.delivery_limit,
            },
        )
        self.replies = await self.channel.declare_exchange(
            s.reply_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # Events are informative (a lost one fails nothing): their own channel without publisher
        # confirms, so a launch does not wait a broker round trip per event, nor queue its reply
        # behind other launches' events on the confirming channel.
        self.events_channel = await self.connection.channel(publisher_confirms=False)
        self.events = await self.events_channel.declare_exchange(
            s.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def consume(self, handler: Handler) -> None:
        assert self.queue is not None
        self.consumer_tag = await self.queue.consume(handler)

    async def stop_consuming(self) -> None:
        if self.queue is not None and self.consumer_tag is not None:
            await self.queue.cancel(self.consumer_tag)
            self.consumer_tag = None

    async def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> bool:
        """RPC reply to ``reply_to`` (a named queue or ``amq.rabbitmq.reply-to``); False if it is gone."""
        assert self.channel is not None
        try:
            await self.channel.default_exchange.publish(
                _message(body, "application/json", correlation_id),
                routing_key=reply_to,
                mandatory=True,
                timeout=PUBLISH_TIMEOUT,
            )
        except PublishError:
            # Never log the error itself: it holds the returned message, token included.
            log.warning("reply queue %r does not exist; the reply exchange still has the result", reply_to)
            return False
        return True

    async def publish_result(self, routing_key: str, correlation_id: str | None, body: bytes) -> None:
        assert self.replies is not None
        await self.replies.publish(
            _message(body, "application/json", correlation_id),
            routing_key=routing_key,
            mandatory=False,  # nobody need be subscribed to results
            timeout=PUBLISH_TIMEOUT,
        )

    async def publish_event(self, routing_key: str, correlation_id: str | None, body: bytes, content_type: str) -> None:
        assert self.events is not None
        await self.events.publish(
            _message(body, content_type, correlation_id),
            routing_key=routing_key,
            mandatory=False,  # nobody need be subscribed to events
            timeout=PUBLISH_TIMEOUT,
        )

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def _message(body: bytes, content_type: str, correlation_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type=content_type,
        correlation_id=correlation_id,
        # aiormq logs a returned message without message_id whole (body included) at ERROR level.
        message_id=uuid.uuid4().hex,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
