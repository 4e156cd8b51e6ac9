"""Answers the broker refuses (nacks), against the real RabbitMQ: published again after a pause, on
a new channel, instead of running the command again."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import aio_pika
import pytest

from consumer.config import Settings
from tests.conftest import AMQP_URL, running_service, unique


async def test_an_answer_the_broker_refuses_is_published_again_without_running_the_command_again(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer")
    username = unique("nobody")
    async with running_service(settings):
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            # A reply queue that is full and refuses more: the broker nacks the launcher's reply.
            full = await channel.declare_queue(
                exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
            )
            await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=full.name)
            correlation_id = uuid.uuid4().hex
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps({"action": "read", "username": username}).encode(),
                    correlation_id=correlation_id,
                    reply_to=full.name,
                    message_id=uuid.uuid4().hex,
                ),
                routing_key=settings.command_queue,
            )
            async with asyncio.timeout(20):
                while caplog.text.count("the broker refused the answer") < 2:
                    await asyncio.sleep(0.05)
            filler = await full.get(timeout=5)
            assert filler is not None and filler.body == b"filler"
            await filler.ack()  # room for the reply now: the next attempt is taken
            async with asyncio.timeout(20):
                while (reply := await full.get(fail=False)) is None:
                    await asyncio.sleep(0.05)
            await reply.ack()

        assert reply.correlation_id == correlation_id
        assert json.loads(reply.body)["action"] == "read"
    assert caplog.text.count(f"read {username}/: started") == 1, "the command ran again"
    assert "answers go on a new channel" in caplog.text
