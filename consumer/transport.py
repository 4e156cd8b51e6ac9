"""AMQP connections whose socket writes are coalesced: what one event-loop turn writes, one send sends.

aiormq writes every frame (a publish, an ack, a heartbeat) to the socket on its own, and each write
is a system call that, on loopback, also runs the broker's side of TCP. When the hub marks dozens of
servers ready within a few milliseconds, their replies, results and acks were hundreds of sends: in
the benchmark, about half of the consumer's CPU in those bursts, while the last replies of a burst
waited for it. Here a turn's writes are buffered and sent together at the start of the next turn,
so no write waits for a timer, only for the turn that produced it to end.

aiormq opens connections through a ``TransportFactory``; aio-pika passes one on once it is declared
a connection parameter (``CoalescingConnection``). TLS (``amqps://``) keeps aiormq's own transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import ConnectionParameter
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

STREAM_LIMIT = 2**16  # asyncio.open_connection's default read buffer limit


class CoalescingWriter(asyncio.StreamWriter):
    """A StreamWriter that sends what is written during a loop turn in one write, next turn."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._turn_loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._turn_loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self.transport.is_closing():
            super().write(data)

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTCP(TransportFactory):
    """aiormq's plain TCP transport, with a CoalescingWriter."""

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=kwargs.pop("limit", STREAM_LIMIT), loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(lambda: protocol, url.host, url.port, **kwargs)
        except OSError as error:
            raise AMQPConnectionError(*error.args) from error
        return reader, CoalescingWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]


class CoalescingConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, passing ``transport_factory`` on to aiormq."""

    PARAMETERS = (
        *aio_pika.RobustConnection.PARAMETERS,
        ConnectionParameter(name="transport_factory", parser=lambda factory: factory, is_kwarg=True),
    )


async def connect(url: str, connection_name: str) -> aio_pika.abc.AbstractRobustConnection:
    """A robust connection (what ``aio_pika.connect_robust`` makes); over plain TCP, with coalesced
    writes. Made here, not by ``connect_robust``, which would put the factory in the URL's query."""
    client_properties = {"connection_name": connection_name}
    if URL(url).scheme != "amqp":
        return await aio_pika.connect_robust(url, client_properties=client_properties)
    connection = CoalescingConnection(URL(url), client_properties=client_properties, transport_factory=CoalescingTCP())
    await connection.connect()
    return connection
