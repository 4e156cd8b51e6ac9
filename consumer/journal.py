"""The answer journal: launch results kept in a RabbitMQ stream, so that a launch run again after
its replica died between sending the reply and acking the command answers with the same reply
(the same token), not a second one.

The stream ``<command_queue>.answered`` is bound to the reply exchange for ``launch.*``, so every
launch result the broker confirmed is in it, with the command's id in a header. Nothing reads it
while all goes well: a redelivered launch (the only kind that can have been answered already)
catches up first. It publishes a marker to the stream and reads, from where the last catch-up
stopped (at first from ``WINDOW`` seconds ago), until the marker comes back, so everything written
before is read; a recorded result is then sent again instead of running the launch. The many
redeliveries of a failover share catch-ups. Knows AMQP only.

After a lost connection, redeliveries can arrive as soon as the command consumer is restored, while
the journal's own channel is still being reopened (aio-pika restores channels one after another): a
catch-up waits for its channel (``RobustChannel.ready()``) and tries again, for up to
``RESTORE_WAIT`` seconds in all. Running the launch again instead would answer with a new token
while its caller may hold the first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from pamqp.common import FieldTable

log = logging.getLogger(__name__)

COMMAND_HEADER = "x-launcher-command"  # on results: the id of the command they answer
MARKER_HEADER = "x-launcher-marker"
# How far back a first catch-up reads. A command comes back within seconds of its replica's death
# (a minute or two if its host vanished), unless no replica consumed for longer; then it runs again
# and answers anew.
WINDOW = 600.0
# The stream keeps results longer than any replica looks, in small segments: retention drops whole
# segments, and the default segment (500 MB) would keep everything.
ARGUMENTS: FieldTable = {
    "x-queue-type": "stream",
    "x-max-age": "1h",
    "x-stream-max-segment-size-bytes": 8_000_000,
}
CATCH_UP_TIMEOUT = 10.0
# How long a redelivered launch waits, in all, for the journal to be read (its channel restored after
# a lost connection, a catch-up cut short retried) before it runs again. A robust connection comes
# back within a second or two when a broker node is left; a broker gone for longer than this
# means the launch runs again and answers anew (the token-hygiene rule revokes the first token).
RESTORE_WAIT = 30.0
RETRY_PAUSE = 0.25


@dataclass(frozen=True)
class Answer:
    routing_key: str
    correlation_id: str | None
    body: bytes


class Journal:
    def __init__(self, name: str) -> None:
        self.name = name  # the stream
        self.answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self.channel: AbstractRobustChannel | None = None
        self.stream: AbstractQueue | None = None
        self.next_offset: int | None = None  # where the next catch-up starts reading
        self.lock = asyncio.Lock()
        self.caught_up_from = -1.0  # loop time at which the last finished catch-up's marker was sent

    async def start(self, channel: AbstractRobustChannel, stream: AbstractQueue, replies: AbstractExchange) -> None:
        """Bind the declared stream to the reply exchange; it is read on ``channel`` (confirming,
        with a prefetch: a stream consumer needs one) when a catch-up needs it."""
        self.channel, self.stream = channel, stream
        await stream.bind(replies, "launch.*")

    async def recorded(self, command_id: str) -> Answer | None:
        """The result recorded for ``command_id``, after reading everything written before this call;
        None if there is none (or the stream could not be read in time: the command runs again)."""
        try:
            await asyncio.wait_for(self._catch_up_when_ready(asyncio.get_running_loop().time()), RESTORE_WAIT)
        except Exception as error:  # noqa: BLE001
            log.warning("answer journal not read in time (%s); the command runs again", type(error).__name__)
            return None
        entry = self.answers.get(command_id)
        return entry[1] if entry is not None else None

    async def _catch_up_when_ready(self, asked: float) -> None:
        """``_catch_up``, once the journal's channel is open, again after a failed attempt (a
        channel not restored yet, a connection lost mid-way); bounded by the caller."""
        assert self.channel is not None
        while True:
            await self.channel.ready()  # returns at once while the channel is open
            try:
                await self._catch_up(asked)
                return
            except Exception as error:  # noqa: BLE001
                log.info("answer journal: catch-up failed (%s); trying again", type(error).__name__)
            await asyncio.sleep(RETRY_PAUSE)

    async def _catch_up(self, asked: float) -> None:
        async with self.lock:
            if self.caught_up_from > asked:
                return  # a catch-up that began after this was asked has finished: it covers it
            assert self.channel is not None and self.stream is not None
            marker = secrets.token_hex(8)
            seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def on_entry(message: AbstractIncomingMessage) -> None:
                self._record(message, marker, seen)
                await message.ack()

            start: int | datetime = (
                self.next_offset if self.next_offset is not None else (datetime.now(UTC) - timedelta(seconds=WINDOW))
            )
            sent = asyncio.get_running_loop().time()
            await self.channel.default_exchange.publish(
                aio_pika.Message(b"", headers={MARKER_HEADER: marker}), routing_key=self.name, timeout=CATCH_UP_TIMEOUT
            )
            tag = await self.stream.consume(on_entry, arguments={"x-stream-offset": start})
            try:
                await asyncio.wait_for(seen, CATCH_UP_TIMEOUT)
            finally:
                with contextlib.suppress(Exception):
                    await self.stream.cancel(tag)
            self.caught_up_from = sent

    def _record(self, message: AbstractIncomingMessage, marker: str, seen: asyncio.Future[None]) -> None:
        headers = message.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self.next_offset = max(self.next_offset or 0, offset + 1)
        found = _text(headers.get(MARKER_HEADER))
        command = _text(headers.get(COMMAND_HEADER))
        if found is not None:
            if found == marker and not seen.done():
                seen.set_result(None)
            return
        if command is None:
            return
        now = time.monotonic()
        self.answers[command] = (now, Answer(message.routing_key or "", message.correlation_id, message.body))
        self.answers.move_to_end(command)
        while self.answers and next(iter(self.answers.values()))[0] < now - WINDOW:
            self.answers.popitem(last=False)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None
