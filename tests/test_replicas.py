"""Replicas: one active consumer of the command queue, standbys that take over, the handover order
rule, failover figures, and a clear error for a queue declared with other arguments."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from consumer.broker import Broker, QueueMismatch
from consumer.config import Settings
from tests.conftest import AMQP_URL, Client, running_service, unique
from tests.support.localhub import LocalHub
from tests.support.replica import Replica


class RecordingClient(Client):
    """Keeps every reply (replies are at-least-once) and when the first of each arrived."""

    def __init__(self, settings: Settings, durable_replies: bool = False) -> None:
        super().__init__(settings, durable_replies)
        self.all_replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.first_reply_at: dict[str, float] = {}

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        self.first_reply_at.setdefault(correlation_id, time.monotonic())
        self.all_replies[correlation_id].append(json.loads(message.body))
        await super()._on_reply(message)


def event_time(client: Client, correlation_id: str, event_type: str) -> str:
    (event,) = [e for e in client.events_for(correlation_id) if e["type"] == event_type]
    return str(event["time"])


async def launcher_tokens(hub: LocalHub, username: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"token {hub.token}"}) as session,
        session.get(f"{hub.api_url}/users/{username}/tokens") as response,
    ):
        assert response.status == 200, await response.text()
        tokens = (await response.json())["api_tokens"]
    return [t for t in tokens if (t.get("note") or "").startswith("jupyterhub-launcher")]


async def test_a_command_queue_declared_without_single_active_consumer_stops_start_up_naming_the_queue_argument_and_migration(
    settings: Settings, tmp_path: Path
) -> None:
    # The queue as the previous version declared it: the same arguments but single active consumer.
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            settings.command_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": settings.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-delivery-limit": settings.delivery_limit,
            },
        )
    replica = await Replica(settings, tmp_path / "replica.log").start()
    assert await replica.wait(60) == 2
    log = replica.log()
    assert f"queue '{settings.command_queue}'" in log
    assert "'x-single-active-consumer'" in log
    assert f"rabbitmqctl delete_queue {settings.command_queue}" in log
    assert "Traceback" not in log and "PRECONDITION_FAILED -" not in log


async def test_a_changed_delivery_limit_stops_start_up_naming_x_delivery_limit_and_both_values(
    settings: Settings,
) -> None:
    first = Broker(settings)
    await first.connect()
    await first.close()
    changed = Broker(settings.model_copy(update={"delivery_limit": settings.delivery_limit + 1}))
    with pytest.raises(QueueMismatch) as raised:
        await changed.connect()
    message = str(raised.value)
    assert f"queue '{settings.command_queue}'" in message and "'x-delivery-limit'" in message
    assert f"received '{settings.delivery_limit + 1}' but current is '{settings.delivery_limit}'" in message
    assert changed.connection is not None and changed.connection.is_closed


async def test_only_the_first_subscriber_gets_commands_and_a_standby_becomes_active_when_it_stops_consuming(
    settings: Settings,
) -> None:
    first, second = Broker(settings), Broker(settings)
    got: dict[str, list[bytes]] = {"first": [], "second": []}

    def handler(name: str) -> Any:
        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got[name].append(message.body)
            await message.ack()

        return handle

    await first.connect()
    await second.connect()
    try:
        await first.consume(handler("first"))
        await second.consume(handler("second"))
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()

            async def publish(body: bytes) -> None:
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=settings.command_queue)

            for n in range(5):
                await publish(b"before %d" % n)
            async with asyncio.timeout(30):
                while len(got["first"]) < 5:
                    await asyncio.sleep(0.05)
            assert (first.active, second.active) == (True, False)
            assert got["second"] == []

            await first.stop_consuming()
            assert first.active is False
            for n in range(3):
                await publish(b"after %d" % n)
            async with asyncio.timeout(30):
                while len(got["second"]) < 3:
                    await asyncio.sleep(0.05)
        assert second.active is True
        assert got == {"first": [b"before %d" % n for n in range(5)], "second": [b"after %d" % n for n in range(3)]}
    finally:
        await first.close()
        await second.close()


async def test_on_sigterm_the_standby_takes_over_and_a_remove_waits_for_the_old_replicas_pending_launch(
    hub: LocalHub, settings: Settings, client: Client, username: str, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"shutdown_grace": 30})
    old = await (await Replica(settings, tmp_path / "old.log").start()).consuming()
    new = await (await Replica(settings, tmp_path / "new.log").start()).consuming()
    try:
        launch_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-4"})
        await client.wait_for_event(launch_id, "launch.progress", timeout=60)  # the start is pending on the hub
        assert old.active and not new.active

        old.signal(signal.SIGTERM)
        # It has stopped consuming (the standby is active) and is finishing the launch.
        await old.wait_for_log("waiting up to 30 s for 1 running commands", timeout=30)
        remove_id = await client.send({"action": "remove", "username": username})

        launched = await client.reply(launch_id, timeout=90)
        removed = await client.reply(remove_id, timeout=90)
        assert launched["ok"] is True, launched
        assert removed["ok"] is True, removed
        assert new.active
        assert "remove " + username in new.log() and "remove " + username not in old.log()
        # The remove let the pending start settle: it stopped the server after it was ready.
        assert event_time(client, launch_id, "launch.ready") <= event_time(client, remove_id, "remove.stopped")
        assert await old.wait(60) == 0
        read = await client.call({"action": "read", "username": username})
        assert read["error"]["code"] == "not_found", read
    finally:
        await old.stop()
        await new.stop()


@pytest.mark.timeout(600)
async def test_failover_after_sigkill_of_the_active_replica_with_50_launches_in_flight(
    hub: LocalHub, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 50
    users = [unique("f") for _ in range(n)]
    active = await (await Replica(settings, tmp_path / "active.log").start()).consuming()
    standby = await (await Replica(settings, tmp_path / "standby.log").start()).consuming()
    hub_log_offset = hub.log_path.stat().st_size
    try:
        async with RecordingClient(settings) as client:
            ids = [await client.send({"action": "launch", "username": u, "image": "standin:slow-5"}) for u in users]
            async with asyncio.timeout(120):
                while sum(1 for i in ids if client.events_for(i)) < n:
                    await asyncio.sleep(0.05)
            in_flight = sum(1 for i in ids if i not in client.first_reply_at)
            assert active.active and not standby.active

            killed = time.monotonic()
            active.signal(signal.SIGKILL)
            # A read sent at the kill: its answer times the takeover itself, not the spawns.
            read_id = await client.send({"action": "read", "username": unique("nobody")})
            read = await client.reply(read_id, timeout=120)
            assert read["error"]["code"] == "not_found", read
            read_answered = client.first_reply_at[read_id] - killed
            await active.wait(30)
            replies = await asyncio.gather(*(client.reply(i, timeout=240) for i in ids))
            await asyncio.sleep(2)  # any repeated reply has arrived by now
            after_kill = [client.first_reply_at[i] - killed for i in ids if client.first_reply_at[i] > killed]
            first_reply = min(after_kill)
            all_answered = max(after_kill)

            failed = [r for r in replies if not r["ok"]]
            assert failed == [], failed
            repeats = {i: r for i, r in client.all_replies.items() if len(r) > 1}
            assert all(all(x == r[0] for x in r) for r in repeats.values()), repeats

            hub_log = hub.log_path.read_text(errors="replace")[hub_log_offset:]
            starts = {u: hub_log.count(f"User {u} took") for u in users}
            assert set(starts.values()) == {1}, {u: c for u, c in starts.items() if c != 1}
            tokens = await asyncio.gather(*(launcher_tokens(hub, u) for u in users))
            assert [len(t) for t in tokens] == [1] * n, [t for t in tokens if len(t) != 1]
            assert standby.active

            with capsys.disabled():  # the figures show in `make test` too
                print(
                    f"\nfailover: {in_flight} launches in flight at SIGKILL of the active replica;"
                    f" a read sent at the kill answered by the standby after {read_answered:.2f} s; its first"
                    f" launch reply {first_reply:.2f} s after the kill, all {n} answered ok after"
                    f" {all_answered:.2f} s (spawns take 5 s); repeated replies: {len(repeats)} (identical);"
                    f" servers started once each; one launcher token left per launch"
                )
            # Clean up the servers through the surviving replica.
            removes = await asyncio.gather(*(client.call({"action": "remove", "username": u}) for u in users))
            assert all(r["ok"] for r in removes)
    finally:
        await active.stop()
        await standby.stop()


async def test_a_launch_answered_by_a_replica_that_stopped_before_its_ack_is_answered_again_identically_by_the_next(
    hub: LocalHub, settings: Settings, username: str, tmp_path: Path, monkeypatch: Any
) -> None:
    # The first replica answers and then "dies" before its ack: its ack never happens, and the
    # command goes back to the queue when its connection closes.
    async def no_ack(run: Any, count: int | None = None, **kwargs: Any) -> None:
        # Counted as settled (the worker moves on), but nothing reaches the broker.
        run.settled = len(run.deliveries) if count is None else run.settled + count

    monkeypatch.setattr("consumer.worker._settle", no_ack)
    async with RecordingClient(settings) as client:
        async with running_service(settings):
            standby = await (await Replica(settings, tmp_path / "standby.log").start()).consuming()
            try:
                correlation_id = await client.send({"action": "launch", "username": username, "image": "standin"})
                first = await client.reply(correlation_id, timeout=90)
                assert first["ok"] is True, first
            except BaseException:
                await standby.stop()
                raise
        try:
            async with asyncio.timeout(90):
                while len(client.all_replies[correlation_id]) < 2:
                    await asyncio.sleep(0.1)
            replies = client.all_replies[correlation_id]
            assert replies[1] == replies[0]  # the same token, not a second one
            assert "same answer again" in standby.log()
            assert f"launch {username}/: started" not in standby.log()  # not run again
            tokens = await launcher_tokens(hub, username)
            assert len(tokens) == 1, tokens
            removed = await client.call({"action": "remove", "username": username})
            assert removed["ok"] is True, removed
        finally:
            await standby.stop()
