"""Invalid commands are answered with an error naming the field and end in the dead-letter queue."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from consumer.config import Settings
from tests.conftest import AMQP_URL, Client


async def dead_letters(
    settings: Settings, expected: int, timeout: float = 15
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The messages in ``<command_queue>.dead``, once ``expected`` of them have arrived."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.dead_letter_queue)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        give_up = asyncio.get_running_loop().time() + timeout
        while len(got) < expected and asyncio.get_running_loop().time() < give_up:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            got.append(message)
        return got


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"action": "launch", "username": "alice"}, "image", "Field required"),
        (
            {"action": "launch", "username": "alice", "image": "x", "memory": {"limit": "4X"}},
            "memory.limit",
            "not a memory quantity",
        ),
        (
            {"action": "launch", "username": "alice", "image": "x", "privileged": True},
            "privileged",
            "Extra inputs are not permitted",
        ),
        (
            {"action": "launch", "username": "alice", "image": "x", "cpu": {"request": 4, "limit": 2}},
            "cpu",
            "more than limit",
        ),
        ({"action": "launch", "username": "Alice", "image": "x"}, "username", "pattern"),
        ({"action": "remove", "username": "alice", "server_name": "Not_valid"}, "server_name", "pattern"),
        ({"action": "explode", "username": "alice"}, "action", "'explode' is not one of"),
        (b"{not json", "body", "not valid JSON"),
    ],
)
async def test_invalid_command_gets_an_error_reply_naming_the_field_and_is_dead_lettered(
    service: None, client: Client, settings: Settings, body: dict | bytes, field: str, words: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    correlation_id = await client.send(raw, message_id="bad-1")
    reply = await client.reply(correlation_id, timeout=30)

    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_command"
    assert reply["error"]["message"].startswith(f"{field}: ") or f"; {field}: " in reply["error"]["message"]
    assert words in reply["error"]["message"]
    assert any(d["field"] == field for d in reply["error"]["details"])
    dead = await dead_letters(settings, expected=1)
    assert [m.body for m in dead] == [raw]
    assert dead[0].message_id == "bad-1"


async def test_invalid_command_without_reply_to_is_still_dead_lettered_and_published_as_result(
    service: None, client: Client, settings: Settings
) -> None:
    await client.channel.default_exchange.publish(
        aio_pika.Message(b'{"action": "read"}', correlation_id="no-reply-to"), routing_key=settings.command_queue
    )
    dead = await dead_letters(settings, expected=1)
    assert [m.body for m in dead] == [b'{"action": "read"}']
    await asyncio.sleep(0.3)
    results = [(key, body) for key, body in client.results if body["_correlation_id"] == "no-reply-to"]
    assert [key for key, _ in results] == ["read.error"]
    assert results[0][1]["error"]["code"] == "invalid_command"


async def test_consumer_keeps_working_after_invalid_commands(service: None, client: Client, username: str) -> None:
    for raw in (b"", b"[]", b"null", b'{"action": "launch"}', "é".encode("latin-1")):
        reply = await client.call(raw, timeout=30)
        assert reply["error"]["code"] == "invalid_command"
    ok = await client.call({"action": "launch", "username": username, "image": "standin"})
    assert ok["ok"] is True, ok
