"""Launches that expire: a launch with ``ttl`` is removed ``ttl`` seconds after it became ready.

The schedule lives in RabbitMQ only, durably, so it outlives restarts of the launcher and of the
broker. A message expires only at the head of its queue, so one queue with per-message TTLs would
hold a 1-minute expiry behind a 24-hour one queued before it. Instead there is a ladder of quorum
queues, each with ONE fixed ``x-message-ttl`` (1 s, 4 s, 16 s, ... 4^8 s), so within each queue the
head is always the first to expire. Expired messages are dead-lettered (at-least-once) to the
``due`` queue; its consumer puts each entry into the largest wait queue that still lets it come
back ``HOLD`` seconds or more before it is due (120 s: 64+16+4+4+1+1, then 30 s held), and holds it, unacked,
for those last seconds, then removes the server and acks. Entries therefore arrive on time,
give or take milliseconds, whatever else is waiting; and since the last ``HOLD`` seconds are
waited in the launcher, a broker that is down for less than that at the wrong moment delays no
removal. A launcher that stops hands its held entries back (unacked), and the next one takes them.

Queues (all durable quorum queues, named after ``command_queue``): ``<command_queue>.expiry.due``
and ``<command_queue>.expiry.wait-<N>s``. They are declared with the first launch that has a ttl,
and afterwards at every start-up (found by the ``due`` queue).

An old schedule never removes a newer server: at expiry the server's ``started`` time (from the
hub's model) must still be the one recorded when the launch became ready, and no launch of the
same server may have happened since: every launch issues a token noted
naming its server (``cleanup.token_note``), and the hub numbers tokens in order, so a launch token
newer than the one recorded means a later launch (of a running server, which keeps its
``started``). An explicit remove leaves nothing to remove. The hub forgets expired tokens, so a
later launch that returned the running server is seen only while its token lives
(``user_token_lifetime``); a later launch that started the server anew is always seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from datetime import datetime, UTC
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, ValidationError

from schemas import LaunchCommand, RemoveCommand

from .broker import Broker
from .config import Settings
from .cleanup import is_launch_token
from .hub import HubClient
from .worker import KeyedLocks, emit_event
from .workflows import CommandFailed, Workflows

log = logging.getLogger(__name__)

LADDER = tuple(4**k for k in range(9))  # wait queues' TTLs in seconds: 1, 4, 16, ... 65536
# The last seconds before an entry is due are waited in the launcher (unacked): a broker restart
# shorter than this delays no removal (a node restart took ~10 s here, and aio-pika reconnects
# every 5 s).
HOLD = 30.0
RETRY_AFTER = 10.0  # a removal that failed (hub down) is tried again this much later
MAX_ATTEMPTS = 360  # ... for about an hour, then given up with an error in the log
PREFETCH = 1000  # entries in hand at once: those due within HOLD and those being removed
HUB_TIMEOUT = 30.0  # for the hub reads that record a schedule
_TOKEN_ID = re.compile(r"^a?(\d+)$")  # JupyterHub's API token ids: "a" + a growing number


class Entry(BaseModel):
    """One scheduled removal, as stored in the queues (JSON)."""

    username: str
    server_name: str
    due: float  # Unix time when the server is to be removed
    ttl: float
    started: str | None = None  # the server's "started" in the hub's model when the launch became ready
    token_id: int | None = None  # the newest launch token of this server then (this launch's own)
    correlation_id: str | None = None  # the launch's; the removal's events carry it
    attempts: int = 0
    not_before: float | None = None  # a failed removal's next try


class Expiry:
    def __init__(
        self, settings: Settings, broker: Broker, hub: HubClient, workflows: Workflows, locks: KeyedLocks
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.hub = hub
        self.workflows = workflows
        self.locks = locks  # the worker's: a removal waits for (and holds up) the server's commands
        prefix = f"{settings.command_queue}.expiry"
        self.due_queue = f"{prefix}.due"
        self.wait_queues = {seconds: f"{prefix}.wait-{seconds}s" for seconds in LADDER}
        self.channel: AbstractChannel | None = None
        self.consumer_tag: str | None = None
        self.queue: AbstractQueue | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Lock()

    @property
    def queues(self) -> list[str]:
        return [self.due_queue, *self.wait_queues.values()]

    async def start(self) -> None:
        """Resume consuming the schedule, if there is one (the ``due`` queue exists)."""
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            try:
                await channel.declare_queue(self.due_queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return  # no launch has had a ttl yet: declared with the first one
        await self._ensure_topology()

    async def _ensure_topology(self) -> None:
        async with self._ready:
            if self.channel is not None:
                return
            assert self.broker.connection is not None
            channel = await self.broker.connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=PREFETCH)
            quorum = {"x-queue-type": "quorum"}
            due = await channel.declare_queue(self.due_queue, durable=True, arguments=quorum)
            for seconds, name in self.wait_queues.items():
                await channel.declare_queue(
                    name,
                    durable=True,
                    arguments={
                        **quorum,
                        "x-message-ttl": seconds * 1000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": self.due_queue,
                        "x-dead-letter-strategy": "at-least-once",  # nothing lost between queues
                        "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
                    },
                )
            self.queue = due
            self.consumer_tag = await due.consume(self._on_due)
            self.channel = channel
            log.info("expiry schedule: consuming %s", self.due_queue)

    async def stop(self) -> None:
        """Stop handling entries; those in hand go back to the queue when the connection closes."""
        if self.queue is not None and self.consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self.consumer_tag)
            self.consumer_tag = None
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks))

    # ---- scheduling ----------------------------------------------------------------------------

    async def schedule(
        self, command: LaunchCommand, result: dict[str, Any], correlation_id: str | None
    ) -> dict[str, Any]:
        """Record the removal of a launch that became ready just now; the result with ``expires_at``."""
        assert command.ttl is not None
        due = time.time() + command.ttl
        hub = self.hub.until(asyncio.get_running_loop().time() + HUB_TIMEOUT)
        try:
            server, tokens = await asyncio.gather(
                hub.get_server(command.username, command.server_name), hub.list_tokens(command.username)
            )
        except Exception as error:  # noqa: BLE001
            # The server runs and has no schedule: say so; the launch can be sent again (it is idempotent).
            raise CommandFailed(
                "hub_unavailable", f"the server is running but its ttl could not be recorded: {type(error).__name__}"
            ) from None
        entry = Entry(
            username=command.username,
            server_name=command.server_name,
            due=due,
            ttl=command.ttl,
            started=(server or {}).get("started"),
            token_id=_newest_launch_token(tokens, command.username, command.server_name),
            correlation_id=correlation_id,
        )
        await self._ensure_topology()
        await self._route(entry)
        return {**result, "expires_at": _iso(due)}

    async def _route(self, entry: Entry) -> None:
        """Put the entry into the longest wait that ends HOLD seconds or more before it is due (or
        straight into ``due``, to be held)."""
        assert self.channel is not None
        left = _left(entry) - HOLD
        fitting = [seconds for seconds in LADDER if seconds <= left]
        target = self.wait_queues[fitting[-1]] if fitting else self.due_queue
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                entry.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=target,
        )

    # ---- expiring ------------------------------------------------------------------------------

    async def _on_due(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            entry = Entry.model_validate_json(message.body)
        except ValidationError:
            log.error("dropped an expiry entry that cannot be read")
            await _settle(message.reject(requeue=False))
            return
        try:
            left = _left(entry)
            if left - HOLD >= LADDER[0]:
                await self._route(entry)  # another hop; acked only once the next queue has it
            else:
                await asyncio.sleep(max(left, 0))  # the last seconds, held unacked
                if not await self._expire(entry):
                    entry.attempts += 1
                    if entry.attempts >= MAX_ATTEMPTS:
                        log.error(
                            "gave up removing expired server %s/%s after %d attempts",
                            entry.username,
                            entry.server_name,
                            entry.attempts,
                        )
                    else:
                        entry.not_before = time.time() + RETRY_AFTER
                        await self._route(entry)
        except asyncio.CancelledError:
            raise  # shutting down: unacked, so the broker gives it back
        except Exception as error:  # noqa: BLE001
            log.warning("expiry entry for %s/%s requeued: %s", entry.username, entry.server_name, type(error).__name__)
            await _settle(message.nack(requeue=True))
            await asyncio.sleep(1)  # not a hot loop while the broker or hub is in trouble
            return
        await _settle(message.ack())

    async def _expire(self, entry: Entry) -> bool:
        """Remove the server unless something newer superseded the entry; False to try again later."""
        label = f"{entry.username}/{entry.server_name}"
        async with self.locks.hold((entry.username, entry.server_name)):
            hub = self.hub.until(asyncio.get_running_loop().time() + HUB_TIMEOUT)
            try:
                server, tokens = await asyncio.gather(
                    hub.get_server(entry.username, entry.server_name), hub.list_tokens(entry.username)
                )
            except Exception as error:  # noqa: BLE001
                log.warning(
                    "expiry of %s: hub unavailable (%s); trying again in %g s", label, type(error).__name__, RETRY_AFTER
                )
                return False
            reason = _superseded(entry, server, tokens)
            if reason:
                log.info("expiry of %s skipped: %s", label, reason)
                return True
            late = time.time() - entry.due
            log.info("%s expired (ttl %g s): removing it, %.1f s after its time", label, entry.ttl, late)

            def emit(event_type: str, data: dict[str, Any]) -> None:
                self._emit(entry, event_type, {**data, "reason": "expired", "ttl": entry.ttl})

            command = RemoveCommand(action="remove", username=entry.username, server_name=entry.server_name)
            try:
                await self.workflows.remove(command, emit)
            except CommandFailed as error:
                log.warning("expiry of %s: %s; trying again in %g s", label, error, RETRY_AFTER)
                return False
            return True

    def _emit(self, entry: Entry, event_type: str, data: dict[str, Any]) -> None:
        subject = f"{entry.username}/{entry.server_name}"
        emit_event(self.broker, self.settings, subject, entry.correlation_id, event_type, data)


def _superseded(entry: Entry, server: dict[str, Any] | None, tokens: list[dict[str, Any]]) -> str:
    """Why the entry no longer applies ("" if it does)."""
    if not server or (not server.get("ready") and not server.get("pending")):
        return "not running (removed since)"
    if server.get("pending") == "stop":
        return "being stopped"
    if entry.started is not None and server.get("started") != entry.started:
        return f"a newer server (started {server.get('started')}, the expiring one {entry.started})"
    newest = _newest_launch_token(tokens, entry.username, entry.server_name)
    if entry.token_id is not None and newest is not None and newest > entry.token_id:
        return "launched again since"
    return ""


def _newest_launch_token(tokens: list[dict[str, Any]], username: str, server_name: str) -> int | None:
    numbers = [
        int(match.group(1))
        for token in tokens
        if is_launch_token(token, username, server_name) and (match := _TOKEN_ID.match(str(token.get("id", ""))))
    ]
    return max(numbers, default=None)


def _left(entry: Entry) -> float:
    """Seconds until the entry is due (or may be tried again)."""
    return max(entry.due, entry.not_before or 0) - time.time()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _settle(settling: Any) -> None:
    """Ack/nack; one whose channel is gone is settled by the broker (it redelivers)."""
    try:
        await settling
    except Exception as error:  # noqa: BLE001
        log.info("expiry entry not settled (%s); the broker redelivers it", type(error).__name__)
