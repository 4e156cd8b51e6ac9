"""consumer.client.LauncherClient against the real broker, the real service and a real JupyterHub."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from consumer.broker import Broker
from consumer.client import (
    AlreadyRunning,
    InvalidCommand,
    LauncherClient,
    LauncherError,
    NotDelivered,
    NotFound,
    ReplyTimeout,
    SpawnFailed,
)
from consumer.config import Settings
from schemas import CloudEvent, LaunchResult, RemoveResult, ServerModel
from tests.conftest import AMQP_URL, unique


def client_for(settings: Settings, **options: object) -> LauncherClient:
    return LauncherClient.from_settings(settings, **options)


async def test_launch_read_remove_return_typed_results_and_progress_reaches_the_callback(
    service: None, settings: Settings, username: str
) -> None:
    seen: list[CloudEvent] = []
    async with client_for(settings) as client:
        result = await client.launch(
            username=username, image="standin:slow-1", server_name="lab", cpu={"limit": 1}, on_progress=seen.append
        )
        assert isinstance(result, LaunchResult)
        assert result.url.endswith(f"/user/{username}/lab/") and result.token
        assert result.cpu is not None and result.cpu.limit == 1.0
        assert result.expires_at is None

        types = [e.type for e in seen]
        assert types[0] == "launch.accepted" and "launch.progress" in types, types
        assert {e.subject for e in seen} == {f"{username}/lab"}

        model = await client.read(username, "lab")
        assert isinstance(model, ServerModel)
        assert model.ready is True and model.started is not None
        assert model.user_options == {"image": "standin:slow-1", "cpu": {"limit": 1.0}}

        assert await client.remove(username, "lab") == RemoveResult(stopped=True)
        with pytest.raises(NotFound) as missing:
            await client.read(username, "lab")
        assert missing.value.code == "not_found" and username in missing.value.message
        assert missing.value.reply is not None and missing.value.reply.ok is False


async def test_an_async_progress_callback_is_awaited_in_order(service: None, settings: Settings, username: str) -> None:
    seen: list[str] = []

    async def on_progress(event: CloudEvent) -> None:
        await asyncio.sleep(0.01)  # slower than the events come: they must still arrive in order
        seen.append(event.type)
        if event.type == "launch.progress":
            seen.append(str(event.data["progress"]))

    async with client_for(settings) as client:
        await client.launch(username=username, image="standin:slow-1", on_progress=on_progress)
    assert seen[0] == "launch.accepted"
    percentages = [int(p) for p in seen if p.isdigit()]
    assert percentages == sorted(percentages) and percentages, seen


async def test_failures_raise_the_class_of_their_error_code(service: None, settings: Settings, username: str) -> None:
    async with client_for(settings) as client:
        with pytest.raises(SpawnFailed) as failed:
            await client.launch(username=username, image="standin:crash")
        assert failed.value.message == "Spawn failed: the stand-in image is broken on purpose"
        assert isinstance(failed.value, LauncherError)

        await client.launch(username=username, image="standin")
        with pytest.raises(AlreadyRunning) as running:
            await client.launch(username=username, image="standin", cpu={"limit": 2})
        assert running.value.details["user_options"] == {"image": "standin"}


async def test_an_invalid_command_is_refused_before_anything_is_sent(settings: Settings, username: str) -> None:
    # No service and no command queue: sending anything would fail with NotDelivered instead.
    async with client_for(settings) as client:
        with pytest.raises(InvalidCommand) as invalid:
            await client.launch(username=username, image="standin", memory={"limit": "4X"}, env={"JPY_X": "1"})
    fields = {d["field"] for d in invalid.value.details}
    assert fields == {"memory.limit", "env"}, invalid.value.details
    assert "memory.limit" in invalid.value.message


async def test_events_are_filtered_by_user_server_and_type(service: None, settings: Settings, username: str) -> None:
    other = username + "o"
    async with (
        client_for(settings) as client,
        client.events(user=username, types="launch.ready") as ready,
        client.events(server="", types=["remove.*"]) as removes,
    ):
        await asyncio.gather(
            client.launch(username=username, image="standin"),
            client.launch(username=other, image="standin"),
        )
        await client.remove(other)
        event = await asyncio.wait_for(ready.__anext__(), 30)
        assert event.type == "launch.ready" and event.subject == f"{username}/"
        removed = [await asyncio.wait_for(removes.__anext__(), 30) for _ in range(2)]
        assert [e.type for e in removed] == ["remove.accepted", "remove.stopped"]
        assert {e.subject for e in removed} == {f"{other}/"}
        await asyncio.sleep(0.5)
        assert ready._queue.empty(), "an event for another user or type got through"


async def test_two_hundred_concurrent_calls_share_one_connection(service: None, settings: Settings) -> None:
    users = [unique("c") for _ in range(100)]
    progress: dict[str, list[CloudEvent]] = {u: [] for u in users}

    async def launch(user: str) -> LaunchResult:
        async def on_progress(event: CloudEvent) -> None:
            progress[user].append(event)

        return await client.launch(username=user, image="standin", on_progress=on_progress)

    async def read_missing(user: str) -> str:
        try:
            await client.read(user + "-none")
        except NotFound as error:
            return error.code
        return "found"

    async with client_for(settings) as client:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(launch(u) for u in users), *(read_missing(u) for u in users))
        elapsed = time.monotonic() - started
        launched, reads = outcomes[:100], outcomes[100:]
        assert [r.username for r in launched] == users
        assert reads == ["not_found"] * 100
        # Every launch's callback saw its own launch only, and at least its acceptance.
        for user in users:
            assert progress[user] and {e.subject for e in progress[user]} == {f"{user}/"}
            assert progress[user][0].type == "launch.accepted"
        assert len({e.correlationid for u in users for e in progress[u]}) == 100
        await asyncio.gather(*(client.remove(u) for u in users))
        print(f"\n200 concurrent calls (100 launches, 100 reads): {elapsed:.1f} s")
        assert len(client._pending) == 0 and len(client._progress) == 0


async def test_a_reply_that_never_comes_times_out_after_the_timeout_plus_the_margin_and_the_message_id_is_the_callers(
    settings: Settings, username: str
) -> None:
    broker = Broker(settings)
    await broker.connect()  # the command queue exists, nobody consumes it: the launcher is down
    await broker.close()
    async with client_for(settings, reply_margin=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ReplyTimeout) as timed_out:
            await client.launch(username=username, image="standin", timeout=1, message_id="celery-task-1")
        waited = time.monotonic() - started
        assert 2.0 <= waited < 30, waited
        assert timed_out.value.code == "timeout" and "2 s" in timed_out.value.message
        assert not client._pending
    # The command waits in the queue for the launcher, with the caller's message id.
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.command_queue, passive=True)
        # Consumed, not fetched: the command queue has a single active consumer, which refuses basic.get.
        async with queue.iterator(no_ack=True) as messages:
            queued = await asyncio.wait_for(messages.__anext__(), 5)
        assert queued.message_id == "celery-task-1" and queued.correlation_id == "celery-task-1"
        assert (queued.reply_to or "").startswith("amq.rabbitmq.reply-to.") and b'"timeout":1.0' in queued.body


async def test_a_command_with_no_queue_to_go_to_is_not_delivered(settings: Settings, username: str) -> None:
    async with client_for(settings) as client:
        with pytest.raises(NotDelivered):
            await client.read(username)
        assert not client._pending


def test_from_config_reads_the_services_config_file(tmp_path, monkeypatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("command_queue: team.commands\nevents_exchange: team.events\nlaunch_timeout: 42\n")
    monkeypatch.setenv("LAUNCHER_AMQP_URL", "amqp://u:p@rabbit/")
    client = LauncherClient.from_config(config)
    assert (client.amqp_url, client.command_queue, client.events_exchange) == (
        "amqp://u:p@rabbit/",
        "team.commands",
        "team.events",
    )
    assert client.reply_exchange == "launcher.replies" and client.launch_timeout == 42
