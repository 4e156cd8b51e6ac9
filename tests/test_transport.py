"""Coalesced AMQP writes: what a loop turn writes leaves in one send, and nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import pytest

from consumer import transport
from consumer.transport import CoalescingWriter
from tests.conftest import AMQP_URL


class RecordingTransport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def writer() -> tuple[CoalescingWriter, RecordingTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    sink = RecordingTransport()
    protocol.connection_made(sink)
    return CoalescingWriter(sink, protocol, reader, loop), sink


async def test_what_one_loop_turn_writes_leaves_in_one_send_at_the_next_turn() -> None:
    coalescing, sink = writer()
    coalescing.write(b"publish-1")
    coalescing.write(b"publish-2")
    coalescing.writelines([b"ack", b"-3"])
    assert sink.sent == []
    await asyncio.sleep(0)
    assert sink.sent == [b"publish-1publish-2ack-3"]
    coalescing.write(b"next")
    await asyncio.sleep(0)
    assert sink.sent == [b"publish-1publish-2ack-3", b"next"]


async def test_drain_and_close_send_what_is_buffered_first() -> None:
    coalescing, sink = writer()
    coalescing.write(b"close-frame")
    await coalescing.drain()
    assert sink.sent == [b"close-frame"]
    coalescing.write(b"last")
    coalescing.close()
    assert sink.sent == [b"close-frame", b"last"] and sink.closed
    await asyncio.sleep(0)  # the turn's flush finds nothing left to send
    assert sink.sent == [b"close-frame", b"last"]


async def test_a_burst_of_publishes_reaches_rabbitmq_whole_and_in_order_in_a_few_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sends: list[int] = []
    original = CoalescingWriter.flush

    def counting_flush(self: CoalescingWriter) -> None:
        if self._pending:
            sends.append(len(self._pending))
        original(self)

    monkeypatch.setattr(CoalescingWriter, "flush", counting_flush)
    connection = await transport.connect(AMQP_URL, "test burst")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"test-burst-{uuid.uuid4().hex[:8]}", exclusive=True)
        underlay = await channel.get_underlay_channel()
        sends.clear()
        # Published at once, as a burst of replies is; each awaits its broker confirm.
        await asyncio.gather(
            *(underlay.basic_publish(str(n).encode(), routing_key=queue.name, wait=False) for n in range(200))
        )
        received = []
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                received.append(int(message.body))
                if len(received) == 200:
                    break
    assert received == list(range(200))
    # 200 publishes (3 frames each) went out in a handful of sends, not 200.
    assert sum(sends) >= 200 and len(sends) <= 20, sends


async def test_an_amqps_url_keeps_aiormqs_own_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def fake_connect_robust(url: str, **kwargs: Any) -> None:
        seen.update(kwargs, url=url)

    monkeypatch.setattr(aio_pika, "connect_robust", fake_connect_robust)
    await transport.connect("amqps://broker.example:5671/", "tls")
    assert seen == {"url": "amqps://broker.example:5671/", "client_properties": {"connection_name": "tls"}}


async def test_a_plain_amqp_connection_carries_its_name_and_the_coalescing_transport() -> None:
    connection = await transport.connect(AMQP_URL, "test named")
    async with connection:
        assert isinstance(connection, transport.CoalescingConnection)
        assert connection.kwargs["client_properties"] == {"connection_name": "test named"}
        assert isinstance(connection.kwargs["transport_factory"], transport.CoalescingTCP)
        assert "transport_factory" not in str(connection.url)
