"""Messages that used to stall the consumer are answered and dead-lettered, and it keeps serving;
numbers no cluster takes are refused by the schema; copies join a command only when they are it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import aiormq
import pamqp.encode
import pytest

from consumer import amqp_decoding, worker
from consumer.config import Settings
from tests.conftest import Client, delete_topology, make_settings, running_service, unique
from tests.support.localhub import LocalHub
from tests.test_invalid_commands import dead_letters

CONCURRENCY = 3  # the consumer's prefetch: this many stuck commands stopped it


def launch_body(extra: str, username: str = "alice") -> bytes:
    """A launch as raw JSON text, for what json.dumps would not write (Infinity, lone surrogates)."""
    return f'{{"action": "launch", "username": "{username}", "image": "standin", {extra}}}'.encode()


KILLERS = {
    # RecursionError while reading the body for the error reply.
    "json nested 10,000 deep": launch_body('"json": ' + "[" * 10_000 + "]" * 10_000),
    # A lone surrogate: json.loads took it, then the reply could not be serialised.
    "lone surrogate username": b'{"action": "launch", "username": "\\ud800", "image": "standin"}',
    # float('1000…0') is inf, and int(inf) raised OverflowError inside validation.
    "400-digit memory string": launch_body('"memory": {"limit": "1' + "0" * 400 + '"}'),
}


@pytest.fixture
async def few_slots(hub: LocalHub) -> AsyncIterator[Settings]:
    made = make_settings(hub, max_concurrency=CONCURRENCY)
    yield made
    await delete_topology(made)


@pytest.mark.parametrize("killer", list(KILLERS))
async def test_messages_that_stalled_the_consumer_are_answered_dead_lettered_and_it_keeps_serving(
    few_slots: Settings, username: str, killer: str
) -> None:
    body = KILLERS[killer]
    async with running_service(few_slots), Client(few_slots) as client:
        # As many as the consumer takes at once: before the fix these held every slot for ever.
        sent = [await client.send(body, message_id=unique("poison-")) for _ in range(CONCURRENCY)]
        for correlation_id in sent:
            reply = await client.reply(correlation_id, timeout=30)
            assert reply["ok"] is False
            assert reply["error"]["code"] == "invalid_command", reply
            assert killer != "lone surrogate username" or "surrogate pair" in reply["error"]["message"]
        dead = await dead_letters(few_slots, expected=CONCURRENCY)
        assert [m.body for m in dead] == [body] * CONCURRENCY

        ok = await client.call({"action": "launch", "username": username, "image": "standin"}, timeout=60)
        assert ok["ok"] is True, ok


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ('"cpu": {"limit": Infinity}', "cpu.limit", "finite number"),
        ('"cpu": {"request": NaN, "limit": 2}', "cpu.request", "finite number"),
        ('"cpu": {"limit": 1e999}', "cpu.limit", "finite number"),
        ('"cpu": {"limit": 100000}', "cpu.limit", "less than or equal to 1024"),
        ('"memory": {"limit": 1e308}', "memory.limit", "64 TiB"),
        ('"memory": {"limit": "100000000T"}', "memory.limit", "64 TiB"),
        ('"timeout": Infinity', "timeout", "finite number"),
        ('"json": {"default_url": Infinity}', "json", "Infinity or NaN"),
        ('"json": {"default_url": ' + "[" * 40 + "]" * 40 + "}", "json", "levels deep"),
    ],
)
async def test_numbers_a_cluster_cannot_take_are_refused_naming_the_field(
    service: None, client: Client, username: str, extra: str, field: str, words: str
) -> None:
    reply = await client.call(launch_body(extra, username), timeout=60)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "invalid_command", reply
    assert any(d["field"] == field and words in d["message"] for d in reply["error"]["details"]), reply


async def test_two_different_commands_with_the_same_message_id_both_run(service: None, client: Client) -> None:
    users = unique("a"), unique("b")
    sent = [
        await client.send({"action": "launch", "username": user, "image": "standin:slow-1"}, message_id="shared-id")
        for user in users
    ]
    replies = [await client.reply(correlation_id, timeout=60) for correlation_id in sent]
    assert [r["ok"] for r in replies] == [True, True], replies
    assert [r["username"] for r in replies] == list(users)


async def test_a_copy_from_another_caller_joins_the_running_command_and_both_are_answered(
    service: None, client: Client, username: str
) -> None:
    command = {"action": "launch", "username": username, "image": "standin:slow-2"}
    first = await client.send(command, message_id="same-command")
    async with asyncio.timeout(30):
        while not any(e["type"] == "launch.accepted" for e in client.events_for(first)):
            await asyncio.sleep(0.05)
    second = await client.send(command, message_id="same-command")  # same body, another correlation id

    replies = [await client.reply(first, timeout=60), await client.reply(second, timeout=60)]
    assert [r["ok"] for r in replies] == [True, True], replies
    assert replies[0]["result"]["token"] == replies[1]["result"]["token"]  # one run answered both
    await asyncio.sleep(0.5)
    assert [e["type"] for e in client.events_for(first)].count("launch.accepted") == 1
    assert not [e for e in client.events_for(second) if e["type"] == "launch.accepted"]


async def test_a_bug_on_the_reply_path_still_answers_internal_error_and_dead_letters(
    service: None, client: Client, settings: Settings, username: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(error: object) -> list[dict[str, str]]:
        raise RuntimeError("a bug in describing the errors")

    monkeypatch.setattr(worker, "describe_errors", broken)  # the one way to have a bug on demand
    reply = await client.call(b'{"action": "read"}', timeout=30)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "internal_error", reply
    dead = await dead_letters(settings, expected=1)
    assert [m.body for m in dead] == [b'{"action": "read"}']

    monkeypatch.undo()
    ok = await client.call({"action": "launch", "username": username, "image": "standin"}, timeout=60)
    assert ok["ok"] is True, ok


async def test_a_command_that_cannot_even_be_answered_is_dead_lettered_without_a_reply(
    service: None, client: Client, settings: Settings, username: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unserialisable(reply: object) -> bytes:
        raise RuntimeError("a bug in serialising the reply")

    monkeypatch.setattr(worker.Reply, "body", unserialisable)
    correlation_id = await client.send(b'{"action": "read"}')
    dead = await dead_letters(settings, expected=1)
    assert [m.body for m in dead] == [b'{"action": "read"}']
    assert not client.replies[correlation_id].done()

    monkeypatch.undo()
    ok = await client.call({"action": "launch", "username": username, "image": "standin"}, timeout=60)
    assert ok["ok"] is True, ok


async def test_properties_that_are_not_utf8_are_answered_without_dropping_the_connection(
    service: None, client: Client, settings: Settings, username: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other AMQP clients can put any bytes in short strings; let this publisher do it too.
    strict = pamqp.encode._string

    def as_given(encoder: struct.Struct, value: str | bytes) -> bytes:
        return encoder.pack(len(value)) + value if isinstance(value, bytes) else strict(encoder, value)

    monkeypatch.setattr(pamqp.encode, "_string", as_given)
    properties = aiormq.spec.Basic.Properties(
        correlation_id=b"\xff\xfe-not-utf8",
        message_id=b"\xc3(",
        content_type=b"\x80",
        reply_to=client.reply_queue.name,
    )
    underlay = await client.channel.get_underlay_channel()
    await underlay.basic_publish(
        f'{{"action": "read", "username": "{username}"}}'.encode(),
        routing_key=settings.command_queue,
        properties=properties,
    )
    monkeypatch.undo()

    # Answered once, with the undecodable bytes shown as U+FFFD; before, the consumer's connection
    # dropped on every delivery of it until the queue's delivery limit dead-lettered it.
    async with asyncio.timeout(30):
        while not [b for _, b in client.results if b["_correlation_id"] == "\ufffd\ufffd-not-utf8"]:
            await asyncio.sleep(0.1)
    [result] = [b for _, b in client.results if b["_correlation_id"] == "\ufffd\ufffd-not-utf8"]
    assert result["error"]["code"] == "not_found", result
    ok = await client.call({"action": "launch", "username": username, "image": "standin"}, timeout=60)
    assert ok["ok"] is True, ok


def test_a_headers_table_that_is_not_utf8_reads_as_empty() -> None:
    keys = b"\x02\xff\xfe" + b"t\x01"  # key of 2 bytes that are not UTF-8, then a boolean
    table = struct.pack(">I", len(keys)) + keys
    assert amqp_decoding.field_table(table + b"rest") == (len(table), {})
    good = b"\x01a" + b"t\x01"
    assert amqp_decoding.field_table(struct.pack(">I", len(good)) + good) == (4 + len(good), {"a": True})
