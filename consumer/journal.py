"""The answer journal: launch results kept in a RabbitMQ stream, so that a launch run again after
its replica died between sending the reply and acking the command answers with the same reply
(the same token), not a second one.

The stream ``<command_queue>.answered`` is bound to the reply exchange for ``launch.*``, so every
launch result the broker confirmed is in it, with the command's id in a header. Every replica
(active or standby) reads it from ``WINDOW`` seconds ago on and keeps id → result in memory for that
long. A redelivered launch first catches up (it publishes a marker to the stream and waits until it
reads it back, so everything written before is read) and, when its command is recorded, answers
with the recorded result instead of running again. Knows AMQP only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

log = logging.getLogger(__name__)

COMMAND_HEADER = "x-launcher-command"  # on results: the id of the command they answer
MARKER_HEADER = "x-launcher-marker"
# How long a result is looked for. A command comes back unacked within seconds of its replica's
# death, unless no replica consumed for longer; then it runs again and answers anew.
WINDOW = 900.0
# The stream keeps results longer than any replica looks, in small segments: retention drops whole
# segments, and the default segment (500 MB) would keep everything.
ARGUMENTS: dict[str, object] = {
    "x-queue-type": "stream",
    "x-max-age": "1h",
    "x-stream-max-segment-size-bytes": 8_000_000,
}
CATCH_UP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Answer:
    routing_key: str
    correlation_id: str | None
    body: bytes


class Journal:
    def __init__(self, name: str) -> None:
        self.name = name  # the stream
        self.answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self.markers: dict[str, asyncio.Future[None]] = {}
        self.channel: AbstractRobustChannel | None = None

    async def start(self, channel: AbstractRobustChannel, stream: AbstractQueue, replies: AbstractExchange) -> None:
        """Bind the declared stream to the reply exchange and read it, on ``channel`` (confirming,
        with a prefetch: a stream consumer needs one), from ``WINDOW`` ago."""
        self.channel = channel
        await stream.bind(replies, "launch.*")
        since = datetime.now(timezone.utc) - timedelta(seconds=WINDOW)
        await stream.consume(self._on_entry, arguments={"x-stream-offset": since})

    async def _on_entry(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        marker = headers.get(MARKER_HEADER)
        command = headers.get(COMMAND_HEADER)
        if isinstance(marker, (str, bytes)):
            future = self.markers.pop(marker.decode() if isinstance(marker, bytes) else marker, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(command, (str, bytes)):
            key = command.decode() if isinstance(command, bytes) else command
            now = time.monotonic()
            self.answers[key] = (now, Answer(message.routing_key or "", message.correlation_id, message.body))
            self.answers.move_to_end(key)
            while self.answers and next(iter(self.answers.values()))[0] < now - WINDOW:
                self.answers.popitem(last=False)
        await message.ack()

    async def recorded(self, command_id: str) -> Answer | None:
        """The result recorded for ``command_id``, after reading everything written before this call;
        None if there is none (or the stream could not be read in time: the command runs again)."""
        assert self.channel is not None
        marker = secrets.token_hex(8)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.markers[marker] = future
        try:
            await self.channel.default_exchange.publish(
                aio_pika.Message(b"", headers={MARKER_HEADER: marker}), routing_key=self.name, timeout=CATCH_UP_TIMEOUT
            )
            await asyncio.wait_for(future, CATCH_UP_TIMEOUT)
        except Exception as error:
            log.warning("answer journal not read in time (%s); the command runs again", type(error).__name__)
            return None
        finally:
            self.markers.pop(marker, None)
        entry = self.answers.get(command_id)
        return entry[1] if entry is not None else None
