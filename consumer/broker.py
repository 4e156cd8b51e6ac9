"""RabbitMQ: the command queue, replies and events. Knows AMQP, nothing of JupyterHub.

Topology (all durable):
- ``<command_queue>``: quorum queue with a single active consumer: any number of replicas consume
  it, the broker delivers to one of them (the others stand by and take over, in the order they
  subscribed, when it goes away), so commands for one server still run one after another. Rejected
  or too-often-redelivered commands are dead-lettered (at-least-once) through the fanout exchange
  ``<command_queue>.dlx`` to ``<command_queue>.dead``.
- ``reply_exchange`` (topic): result events, routing key ``<action>.ok`` / ``<action>.error``, with
  the command's id in a header. Launch results also go to the stream ``<command_queue>.answered``,
  the answer journal (``journal.py``).
- ``events_exchange`` (topic): lifecycle events, routing key = event type.
RPC replies go to the default exchange with routing key = the command's ``reply_to``.

Answers (replies, results, follow-ups) are published on a confirming channel of their own, replaced
by a new one when the broker refuses (nacks) a publish: seen with RabbitMQ 3.10 in a cluster, a
channel that first published to a quorum queue while that queue's leader was moving to another node
went on being refused for every publish to it for minutes, while new channels were served at once.

Replies are what callers wait for; lifecycle events only inform. Events are handed to a backlog and
published in order by one task, on a connection of their own, so that publishing them never holds up
a reply: a connection's frames all go through one writer task and its bounded queue, and in a burst
of launches becoming ready together, replies queued behind the events of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.common import FieldTable
from yarl import URL

from . import amqp_decoding, journal, metrics
from .config import Settings
from .journal import Answer, Journal

log = logging.getLogger(__name__)

# aiormq queues at most 10 frames (publishes, acks) per connection for its writer task; a publish or
# ack that finds the queue full waits for the writer's next turn. With a couple of hundred launches
# answered at once, replies waited there: overhead p95 at N = 200 in the benchmark 169–323 ms,
# against 39–89 ms with it raised.
# aio-pika offers no way to pass it, so the class default is raised for our connections; memory
# stays bounded by the commands in flight and the event backlog. Not a documented setting: the
# versions are pinned in pyproject.toml and tests/test_library_internals.py fails if it stops working.
aiormq.Connection.FRAME_BUFFER_SIZE = 4096
# A message with properties that are not UTF-8 would otherwise drop the connection, again and again.
amqp_decoding.install()

# After a lost connection aio-pika tries again at once, then every this many seconds (its default,
# 5 s, is what a node's loss cost in the cluster test: through HAProxy the first try often still
# reached the stopping node).
RECONNECT_INTERVAL = 1.0
PUBLISH_TIMEOUT = 30.0  # publishes block while the broker says the connection is blocked
EVENT_BACKLOG = 10_000  # events waiting to be published; past it they are dropped, with a warning
EVENT_FLUSH_TIMEOUT = 5.0  # at shutdown, how long the backlog gets to reach the broker
ANSWER_CHANNEL_RENEWAL = 1.0  # the answer channel is replaced at most once in this many seconds
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]
Render = Callable[[], bytes]  # an event's body, made when it is published
Event = tuple[str, str | None, Render, str]  # routing key, correlation id, body, content type
# RabbitMQ's text for a redeclaration with other arguments, e.g. "inequivalent arg
# 'x-single-active-consumer' for queue 'q' in vhost '/': received the value 'true' of type 'bool'
# but current is none".
INEQUIVALENT_ARG = re.compile(r"inequivalent arg '([^']+)' for queue '([^']*)' in vhost '([^']*)': (.*)$")


class QueueMismatch(Exception):
    """A queue exists with other arguments than the launcher declares; the message says how to migrate."""


class Broker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None  # consumes commands; declares
        self.answer_channel: AbstractRobustChannel | None = None  # publishes replies, results, follow-ups
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -ANSWER_CHANNEL_RENEWAL
        self.queue: AbstractQueue | None = None
        self.replies: AbstractExchange | None = None
        self.consumer_tag: str | None = None
        # True once deliveries arrive: AMQP does not tell a single-active-consumer subscriber
        # whether it is the active one or a standby, and a standby gets nothing.
        self._active = False
        self.events_connection: AbstractRobustConnection | None = None
        self.events_channel: AbstractChannel | None = None
        self.events: AbstractExchange | None = None
        self.event_backlog: asyncio.Queue[Event] = asyncio.Queue(EVENT_BACKLOG)
        self.events_dropped = 0
        self.event_pump: asyncio.Task[None] | None = None
        self.journal = Journal(settings.answers_queue)

    async def connect(self) -> None:
        s = self.settings
        self.connection = await _connect(s, f"jupyterhub-launcher {s.command_queue}")
        self.channel = await self.connection.channel()
        assert self.channel is not None
        await self.channel.set_qos(prefetch_count=s.max_concurrency)
        dlx = await self.channel.declare_exchange(s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await self._declare_queue(s.dead_letter_queue, {"x-queue-type": "quorum"})
        await dead.bind(dlx)
        self.queue = await self._declare_queue(
            s.command_queue,
            {
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": s.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
                "x-delivery-limit": s.delivery_limit,
                # Replicas: one consumes, the others stand by (per-server order needs one consumer).
                "x-single-active-consumer": True,
            },
        )
        # A consumer restored after a reconnect may have become a standby: active again on delivery.
        self.connection.reconnect_callbacks.add(self._became_unknown)
        self.replies = await self.channel.declare_exchange(s.reply_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        self.answer_channel = await self._answer_channel()
        journal_channel: AbstractRobustChannel = await self.connection.channel(publisher_confirms=True)
        await journal_channel.set_qos(prefetch_count=500)  # a stream consumer needs a prefetch
        stream = await self._declare_queue(s.answers_queue, journal.ARGUMENTS, journal_channel)
        await self.journal.start(journal_channel, stream, self.replies)
        # Events: a connection of their own, without publisher confirms (a lost event fails nothing).
        self.events_connection = await _connect(s, f"jupyterhub-launcher {s.command_queue} events")
        self.events_channel = await self.events_connection.channel(publisher_confirms=False)
        self.events = await self.events_channel.declare_exchange(
            s.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self.event_pump = asyncio.create_task(self._pump_events())

    async def _declare_queue(
        self, name: str, arguments: FieldTable, channel: AbstractChannel | None = None
    ) -> AbstractQueue:
        """Declare a durable queue; one that exists with other arguments stops start-up with a
        ``QueueMismatch`` that says which argument and how to migrate, not a bare PRECONDITION_FAILED."""
        assert self.connection is not None and self.channel is not None
        try:
            return await (channel or self.channel).declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as error:
            await self.connection.close()  # the broker closed the channel; nothing to restore
            raise QueueMismatch(
                _mismatch_message(name, arguments, str(error.args[0] if error.args else error))
            ) from None

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        metrics.ACTIVE_CONSUMER.set(int(value))

    def _became_unknown(self, *_: object) -> None:
        self.active = False

    async def consume(self, handler: Handler) -> None:
        assert self.queue is not None

        async def on_delivery(message: AbstractIncomingMessage) -> None:
            if not self.active:
                self.active = True
                log.info("active consumer of %s (other replicas stand by)", self.settings.command_queue)
            await handler(message)

        self.consumer_tag = await self.queue.consume(on_delivery)

    async def stop_consuming(self) -> None:
        """Cancel the subscription: the broker hands the queue to the next replica at once, while
        this one may still finish (and ack) what it was given."""
        if self.queue is not None and self.consumer_tag is not None:
            await self.queue.cancel(self.consumer_tag)
            self.consumer_tag = None
        self.active = False

    @property
    def consuming(self) -> bool:
        """Connected and registered as a consumer (active or standby) of the command queue."""
        # ``connected`` is cleared while a robust connection is down and set again once it (and
        # its channels, queues and consumers) are restored.
        return (
            self.consumer_tag is not None
            and self.connection is not None
            and self.connection.connected.is_set()
            and self.channel is not None
            and not self.channel.is_closed
        )

    async def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> bool:
        """RPC reply to ``reply_to`` (a named queue or ``amq.rabbitmq.reply-to``); False if it is gone."""
        try:
            await self._publish_answer("", reply_to, body, _properties("application/json", correlation_id), True)
        except PublishError:
            # Never log the error itself: it holds the returned message, token included.
            log.warning("reply queue %r does not exist; the reply exchange still has the result", reply_to)
            return False
        return True

    async def publish_command(self, body: bytes, message_type: str) -> None:
        """Queue a command of the launcher's own (a follow-up) on the command queue, durably."""
        properties = _properties("application/json", None)
        properties.message_type = message_type
        # mandatory: a follow-up with no queue to go to must fail, not vanish.
        await self._publish_answer("", self.settings.command_queue, body, properties, True)

    async def publish_result(self, routing_key: str, correlation_id: str | None, body: bytes, command_id: str) -> None:
        """The result event; with the command's id, so that the answer journal records it."""
        assert self.replies is not None
        properties = _properties("application/json", correlation_id)
        properties.headers = {journal.COMMAND_HEADER: command_id}
        # mandatory=False: nobody need be subscribed to results.
        await self._publish_answer(self.replies.name, routing_key, body, properties, False)

    async def _publish_answer(
        self, exchange: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties, mandatory: bool
    ) -> None:
        assert self.answer_channel is not None
        try:
            await _publish(self.answer_channel, exchange, routing_key, body, properties, mandatory)
        except DeliveryError as error:
            if not isinstance(error, PublishError):  # a nack, not a return
                self._renew_answer_channel()
            raise

    async def _answer_channel(self) -> AbstractRobustChannel:
        assert self.connection is not None
        # Returned (unroutable) replies raise, so a vanished reply queue is noticed, not ignored.
        channel: AbstractRobustChannel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        return channel

    def _renew_answer_channel(self) -> None:
        """Replace the answer channel (see the module's docstring), at most every ANSWER_CHANNEL_RENEWAL s."""
        now = asyncio.get_running_loop().time()
        if (
            self._renewing is not None and not self._renewing.done()
        ) or now - self._renewed_at < ANSWER_CHANNEL_RENEWAL:
            return
        self._renewed_at = now
        self._renewing = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            fresh = await self._answer_channel()
        except Exception as error:  # noqa: BLE001
            log.warning("could not open a new answer channel (%s); keeping the old one", type(error).__name__)
            return
        stale, self.answer_channel = self.answer_channel, fresh
        log.warning("the broker refused a publish: answers go on a new channel")
        if stale is not None:
            with contextlib.suppress(Exception):
                await stale.close()

    async def recorded_answer(self, command_id: str) -> Answer | None:
        """The launch result already published for this command, if any (see ``journal.py``)."""
        return await self.journal.recorded(command_id)

    def publish_event(self, routing_key: str, correlation_id: str | None, render: Render, content_type: str) -> None:
        """Queue a lifecycle event for publishing; events are published in the order queued.

        Its body is made by ``render`` when it is published, not here: when many launches become
        ready at once, that work then comes after their replies instead of before.
        """
        try:
            self.event_backlog.put_nowait((routing_key, correlation_id, render, content_type))
        except asyncio.QueueFull:
            self.events_dropped += 1
            metrics.EVENTS_DROPPED.inc()
            if self.events_dropped % 1000 == 1:
                log.warning("event backlog full (broker unreachable?): %d events dropped so far", self.events_dropped)

    async def _pump_events(self) -> None:
        assert self.events_channel is not None and self.events is not None
        while True:
            routing_key, correlation_id, render, content_type = await self.event_backlog.get()
            try:
                body, properties = render(), _properties(content_type, correlation_id)
                # mandatory=False: nobody need be subscribed to events.
                # wait_written: one event per writer turn, so when many launches become ready at once
                # their replies go out first and their events trickle after; and the bounded backlog,
                # not the socket's buffer, holds what the broker is not taking yet.
                await _publish(
                    self.events_channel,
                    self.events.name,
                    routing_key,
                    body,
                    properties,
                    mandatory=False,
                    wait_written=True,
                )
            except Exception as error:  # noqa: BLE001
                log.warning("could not publish event %s: %s", routing_key, type(error).__name__)
            finally:
                self.event_backlog.task_done()

    async def close(self) -> None:
        if self.event_pump is not None:
            try:
                await asyncio.wait_for(self.event_backlog.join(), EVENT_FLUSH_TIMEOUT)
            except TimeoutError:
                log.warning("%d events not published before shutdown", self.event_backlog.qsize())
            self.event_pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.event_pump
        for connection in (self.events_connection, self.connection):
            if connection is not None:
                await connection.close()


async def _connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A robust connection, or the error of its first attempt within ``amqp_connect_timeout``.

    Made here rather than by ``aio_pika.connect_robust`` so that an attempt that fails or is
    interrupted (SIGTERM at start-up) is closed, instead of leaving its reconnection task running.
    """
    connection = aio_pika.RobustConnection(
        URL(settings.amqp_url.get_secret_value()),
        client_properties={"connection_name": name},
        reconnect_interval=RECONNECT_INTERVAL,
    )
    try:
        await connection.connect(timeout=settings.amqp_connect_timeout)
    except BaseException:
        await connection.close()
        raise
    connection.reconnect_callbacks.add(_count_reconnect)
    return connection


async def _publish(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: aiormq.spec.Basic.Properties,
    mandatory: bool,
    wait_written: bool = False,
) -> None:
    """Publish, and on a confirming channel wait for the broker's confirm.

    aio-pika's ``Exchange.publish`` holds the channel's lock until the connection's writer task has
    written the frames, so concurrent replies on one channel would take turns, a few event-loop
    turns each. Unless ``wait_written``, the lock is held only to number and queue the frames; the
    confirm, the only thing a reply needs, is still awaited. What may pile up unwritten is bounded
    by the commands in flight (``max_concurrency``): a reply and a result each.
    """
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=mandatory,
        timeout=PUBLISH_TIMEOUT,
        # aiormq's Channel takes wait=; its abstract base does not declare it (the pinned internal
        # that tests/test_library_internals.py checks).
        wait=wait_written,  # type: ignore[call-arg]
    )


def _mismatch_message(name: str, arguments: FieldTable, broker_text: str) -> str:
    match = INEQUIVALENT_ARG.search(broker_text)
    if match is None:
        return f"queue {name!r} exists with other settings than this launcher declares ({broker_text})"
    argument, _, vhost, difference = match.groups()
    wanted = arguments.get(argument)
    return (
        f"queue {name!r} (vhost {vhost!r}) exists with another {argument!r} than this launcher declares"
        f" ({wanted!r}): {difference}. Queue arguments cannot be changed in place. To migrate: let the"
        f" running launcher empty it with publishers paused (rabbitmqctl list_queues name messages),"
        f" stop every replica, delete it (rabbitmqctl delete_queue {name}) and start this version, which"
        f" declares it anew; or point this version and the publishers at a new command_queue name."
        f" See the README, 'Replicas and failover'."
    )


def _properties(content_type: str, correlation_id: str | None) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        content_type=content_type,
        correlation_id=correlation_id,
        # aiormq logs a returned message without message_id whole (body included) at ERROR level.
        message_id=secrets.token_hex(16),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
    )


def _count_reconnect(connection: AbstractRobustConnection | None) -> None:
    metrics.BROKER_RECONNECTS.inc()
