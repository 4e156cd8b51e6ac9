"""Nothing is lost: shutdowns, redeliveries, duplicates, a throttling hub, a restarting hub, a lost connection."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import aio_pika

from consumer.config import Settings
from tests.conftest import AMQP_URL, Client, delete_topology, make_settings, running_service, unique
from tests.support.launcher_process import launcher_process, queued, settings_env, wait_for_queue
from tests.support.localhub import ROOT, LocalHub
from tests.support.rabbitnode import RabbitNode


async def test_sigterm_lets_a_running_launch_finish_then_exits_0_and_logs_no_secret(
    hub: LocalHub, settings: Settings, client: Client, username: str
) -> None:
    env = settings_env(settings, log_level="DEBUG", shutdown_grace=20)
    async with launcher_process(env, ROOT / "tests", stderr=subprocess.PIPE) as process:
        await wait_for_queue(settings)  # the consumer declares it; publish once it exists
        correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-3"})
        await client.wait_for_event(correlation_id, "launch.accepted")
        process.send_signal(signal.SIGTERM)
        reply = await client.reply(correlation_id, timeout=30)
        assert reply["ok"] is True, reply
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert "shutting down" in log and "launch " + username in log
    assert "uvloop event loop" in log  # the CLI runs on uvloop where it is installed, as here
    assert hub.token not in log and hub.signing_key not in log
    assert reply["result"]["token"] not in log


async def test_command_interrupted_after_the_grace_period_is_requeued_and_finished_by_the_next_consumer(
    hub: LocalHub, client: Client, username: str
) -> None:
    settings = client.settings.model_copy(update={"shutdown_grace": 0.5})
    async with running_service(settings):
        correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-4"})
        await client.wait_for_event(correlation_id, "launch.accepted")
    assert await queued(settings) == 1
    assert not client.replies[correlation_id].done()

    async with running_service(settings):
        reply = await client.reply(correlation_id, timeout=60)
    assert reply["ok"] is True, reply
    accepted = [e for e in client.events_for(correlation_id) if e["type"] == "launch.accepted"]
    assert len(accepted) == 2  # the second run followed the spawn the first had started
    await asyncio.sleep(0.3)
    assert [k for k, b in client.results if b["_correlation_id"] == correlation_id] == ["launch.ok"]


async def test_a_copy_of_a_running_command_joins_it_instead_of_launching_twice(
    service: None, client: Client, settings: Settings, username: str
) -> None:
    command = {"action": "launch", "username": username, "image": "standin:slow-2"}
    correlation_id = await client.send(command, message_id="same-id")
    await client.wait_for_event(correlation_id, "launch.accepted")
    await client.send(command, correlation_id=correlation_id, message_id="same-id")

    reply = await client.reply(correlation_id, timeout=60)
    assert reply["ok"] is True
    await asyncio.sleep(0.5)
    assert [e["type"] for e in client.events_for(correlation_id)].count("launch.accepted") == 1
    assert await queued(settings) == 0


async def test_commands_for_the_same_server_run_one_after_another(service: None, client: Client, username: str) -> None:
    launch = client.send({"action": "launch", "username": username, "image": "standin:slow-1"})
    remove = client.send({"action": "remove", "username": username})
    launch_id, remove_id = await launch, await remove
    launched, removed = await client.reply(launch_id), await client.reply(remove_id)
    assert launched["ok"] and removed["ok"], (launched, removed)
    read = await client.call({"action": "read", "username": username})
    assert read["error"]["code"] == "not_found"


async def test_launches_throttled_by_the_hub_with_429_are_retried_until_they_succeed(client: Client) -> None:
    # One pending spawn at a time, and a short Retry-After, so that three launches meet 429s.
    # (spawn_throttle_retry_range is not a config trait in JupyterHub 6.1: set it as a setting.)
    throttled = LocalHub(
        extra={"concurrent_spawn_limit": 1, "tornado_settings": {"spawn_throttle_retry_range": [1, 3]}}
    )
    with throttled:
        settings = make_settings(throttled)
        try:
            async with running_service(settings), Client(settings) as own:
                names = [unique("t") for _ in range(3)]
                replies = await asyncio.gather(
                    *(own.call({"action": "launch", "username": n, "image": "standin:slow-2"}) for n in names)
                )
        finally:
            await delete_topology(settings)
    assert [r["ok"] for r in replies] == [True, True, True], [r["error"] for r in replies]
    log = throttled.log_path.read_text()
    assert "429 POST /hub/api/users/" in log
    # While a start waits out a 429, its progress stream is asked for with a growing backoff, not
    # every 0.2 s (which made 75+ requests in this test).
    assert log.count("400 GET /hub/api/users/") <= 3 * 10


async def test_a_launch_sent_while_the_hub_is_down_succeeds_once_it_is_back(client: Client, username: str) -> None:
    restarting = LocalHub()
    with restarting:
        settings = make_settings(restarting)
        try:
            async with running_service(settings), Client(settings) as own:
                restarting.stop()
                correlation_id = await own.send({"action": "launch", "username": username, "image": "standin"})
                await asyncio.sleep(3)
                await asyncio.to_thread(restarting.start)
                reply = await own.reply(correlation_id, timeout=60)
        finally:
            await delete_topology(settings)
    assert reply["ok"] is True, reply


async def test_a_launch_against_an_unreachable_hub_fails_with_hub_unavailable(hub: LocalHub) -> None:
    settings = make_settings(hub, jupyterhub_url="http://127.0.0.1:9")  # nothing listens on port 9
    try:
        async with running_service(settings), Client(settings) as own:
            reply = await own.call({"action": "launch", "username": unique("d"), "image": "standin", "timeout": 2})
    finally:
        await delete_topology(settings)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "hub_unavailable", reply


def _close_connection(name: str) -> None:
    """Make the broker drop one named connection, as a failing node or network would."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in listing.stdout.splitlines():
        pid, properties = line.split("\t", 1)
        if f'{{"connection_name","{name}"}}' in properties:
            subprocess.run(["rabbitmqctl", "close_connection", pid, "test"], check=True, capture_output=True)
            return
    raise AssertionError(f"no connection named {name!r}")


async def test_a_launch_survives_the_loss_of_the_consumers_broker_connection(
    service: None, client: Client, settings: Settings, username: str
) -> None:
    correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-4"})
    await client.wait_for_event(correlation_id, "launch.accepted")
    await asyncio.to_thread(_close_connection, f"jupyterhub-launcher {settings.command_queue}")

    reply = await client.reply(correlation_id, timeout=90)
    assert reply["ok"] is True, reply
    await asyncio.sleep(1)
    # The redelivered copy joined the running launch (or followed its spawn) and was acked.
    assert await queued(settings) == 0
    assert [k for k, b in client.results if b["_correlation_id"] == correlation_id] == ["launch.ok"]


async def test_commands_are_answered_and_acked_when_nobody_subscribes_to_results_or_events(
    service: None, settings: Settings, username: str
) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"action": "launch", "username": username, "image": "standin"}).encode(),
                reply_to=replies.name,
                message_id=unique("m"),
            ),
            routing_key=settings.command_queue,
        )
        async with asyncio.timeout(60):
            while (reply := await replies.get(fail=False, no_ack=True)) is None:
                await asyncio.sleep(0.1)
    assert json.loads(reply.body)["ok"] is True
    await asyncio.sleep(0.5)
    assert await queued(settings) == 0


async def test_a_launch_in_flight_survives_a_broker_restart(hub: LocalHub, username: str) -> None:
    # A broker of the test's own: the shared one on 5672 serves other tests at the same time.
    with RabbitNode() as node:
        settings = make_settings(hub, amqp_url=node.url)
        async with running_service(settings):
            # The caller's reply queue is durable: an exclusive one is gone with the broker until the
            # caller has reconnected, and the launcher may answer before that (the result event still
            # has it).
            async with Client(settings, durable_replies=True) as client:
                correlation_id = await client.send(
                    {"action": "launch", "username": username, "image": "standin:slow-3"}
                )
                await client.wait_for_event(correlation_id, "launch.accepted")
                await asyncio.to_thread(node.restart)

                # The durable command comes back to the reconnected consumer, whose launch finds the
                # server started (or starting) and answers with it.
                reply = await client.reply(correlation_id, timeout=120)
            assert reply["ok"] is True, reply
            assert reply["result"]["url"].endswith(f"/user/{username}/")
            await asyncio.sleep(1)
            connection = await aio_pika.connect(node.url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(settings.command_queue, passive=True)
                assert queue.declaration_result.message_count == 0
