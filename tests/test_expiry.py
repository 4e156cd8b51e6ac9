"""Launches that expire: removed ttl seconds after ready, on time whatever else waits, never a newer
server, across restarts of the launcher and of the broker (a RabbitMQ node of the test's own)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest

from consumer import expiry
from consumer.client import LauncherClient
from consumer.config import Settings
from schemas import CloudEvent
from tests.conftest import AMQP_URL, delete_topology, make_settings, running_service, unique
from tests.support import rabbitnode
from tests.support.localhub import LocalHub


def bound(ttl: float) -> float:
    """How late a removal may be: the issue's max(5 s, 5% of ttl)."""
    return max(5.0, 0.05 * ttl)


async def delete_expiry_queues(settings: Settings, amqp_url: str = AMQP_URL) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        prefix = f"{settings.command_queue}.expiry"
        for name in [f"{prefix}.due", *(f"{prefix}.wait-{s}s" for s in expiry.LADDER)]:
            await channel.queue_delete(name)


@pytest.fixture
async def ttl_settings(hub: LocalHub) -> AsyncIterator[Settings]:
    made = make_settings(hub)
    yield made
    await delete_expiry_queues(made)
    await delete_topology(made)


class HubWatch:
    """Which servers the hub has running, polled twice a second: when each was first seen gone."""

    def __init__(self, hub: LocalHub, servers: set[tuple[str, str]]) -> None:
        self.hub = hub
        self.servers = set(servers)
        self.gone_at: dict[tuple[str, str], float] = {}
        self.task: asyncio.Task[None] | None = None

    async def running(self, http: aiohttp.ClientSession) -> set[tuple[str, str]]:
        async with http.get(
            f"{self.hub.api_url}/users", params={"state": "active", "limit": "200"},
            headers={"Authorization": f"token {self.hub.token}"},
        ) as response:  # fmt: skip
            response.raise_for_status()
            users = await response.json()
        return {
            (u["name"], name)
            for u in users
            for name, s in (u.get("servers") or {}).items()
            if s.get("ready") or s.get("pending") == "spawn"
        }

    async def _poll(self) -> None:
        async with aiohttp.ClientSession() as http:
            while len(self.gone_at) < len(self.servers):
                try:
                    running = await self.running(http)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.5)
                    continue
                now = time.time()
                for server in self.servers - running:
                    self.gone_at.setdefault(server, now)
                await asyncio.sleep(0.5)

    def start(self) -> HubWatch:
        self.task = asyncio.create_task(self._poll())
        return self

    async def wait(self, timeout: float) -> None:
        assert self.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.task.cancel()


async def test_a_launch_with_a_ttl_is_removed_on_time_with_the_reason(
    ttl_settings: Settings, hub: LocalHub, username: str
) -> None:
    async with (
        running_service(ttl_settings),
        LauncherClient.from_settings(ttl_settings) as client,
        client.events(user=username) as events,
    ):
        started = time.time()
        result = await client.launch(username=username, image="standin", ttl=3)
        assert result.expires_at is not None
        expires = result.expires_at.timestamp()
        assert started + 3 <= expires <= time.time() + 3
        seen: list[CloudEvent] = []
        while not seen or seen[-1].type != "remove.stopped":
            seen.append(await asyncio.wait_for(events.__anext__(), 30))
    removes = [e for e in seen if e.type.startswith("remove.")]
    assert [e.type for e in removes] == ["remove.accepted", "remove.stopped"]
    assert all(e.data["reason"] == "expired" and e.data["ttl"] == 3 for e in removes)
    launch_id = next(e.correlationid for e in seen if e.type == "launch.accepted")
    assert {e.correlationid for e in removes} == {launch_id}  # the removal is traced to the launch
    accepted, stopped = (e.time.timestamp() for e in removes)
    assert accepted >= expires, "removed early"
    assert stopped <= expires + bound(3), f"removed {stopped - expires:.1f} s late"
    async with aiohttp.ClientSession() as http:
        assert (username, "") not in await HubWatch(hub, set()).running(http)


async def test_a_short_ttl_queued_after_a_long_one_is_not_held_back(
    ttl_settings: Settings, hub: LocalHub, username: str
) -> None:
    long_lived, short_lived = (username, "long"), (username, "short")
    async with running_service(ttl_settings), LauncherClient.from_settings(ttl_settings) as client:
        await client.launch(username=username, server_name="long", image="standin", ttl=3600)
        # 45 s: past the in-memory hold, so it goes through the wait queues (4 s and 1 s ones).
        result = await client.launch(username=username, server_name="short", image="standin", ttl=45)
        assert result.expires_at is not None
        watch = HubWatch(hub, {short_lived}).start()
        await watch.wait(45 + 30)
        late = watch.gone_at[short_lived] - result.expires_at.timestamp()
        assert 0 <= late <= bound(45), late
        async with aiohttp.ClientSession() as http:
            assert long_lived in await watch.running(http)
        await client.remove(username, "long")


async def test_a_later_launch_or_a_remove_supersedes_the_schedule(
    ttl_settings: Settings, hub: LocalHub, username: str
) -> None:
    async with running_service(ttl_settings), LauncherClient.from_settings(ttl_settings) as client:
        async with client.events(user=username, types="remove.*") as removes:

            async def started_again() -> str:  # removed, then launched anew without ttl
                await client.launch(username=username, server_name="again", image="standin", ttl=3)
                await client.remove(username, "again")
                await client.launch(username=username, server_name="again", image="standin")
                return "again"

            async def launched_again() -> str:  # the running server launched again without ttl
                await client.launch(username=username, server_name="same", image="standin", ttl=3)
                await client.launch(username=username, server_name="same", image="standin")
                return "same"

            async def longer() -> str:  # launched again with a longer ttl: that one counts
                await client.launch(username=username, server_name="longer", image="standin", ttl=3)
                result = await client.launch(username=username, server_name="longer", image="standin", ttl=10)
                assert result.expires_at is not None
                return "longer"

            async def removed() -> str:
                await client.launch(username=username, server_name="removed", image="standin", ttl=3)
                await client.remove(username, "removed")
                return "removed"

            await asyncio.gather(started_again(), launched_again(), longer(), removed())
            await asyncio.sleep(3 + bound(3) + 1)  # every ttl=3 schedule is past due
            async with aiohttp.ClientSession() as http:
                running = await HubWatch(hub, set()).running(http)
            assert {(username, "again"), (username, "same"), (username, "longer")} <= running
            assert (username, "removed") not in running

            watch = HubWatch(hub, {(username, "longer")}).start()
            await watch.wait(10 + 30)
            assert (username, "longer") in watch.gone_at
            await asyncio.sleep(0.5)
            expired = []
            while not removes._queue.empty():
                event = await removes.__anext__()
                if event.data.get("reason") == "expired":
                    expired.append(event.subject)
            assert expired == [f"{username}/longer", f"{username}/longer"]  # accepted, stopped: nothing else
        await asyncio.gather(client.remove(username, "again"), client.remove(username, "same"))


@pytest.mark.skipif(not rabbitnode.available(), reason="needs RabbitMQ's scripts to start a node of its own")
@pytest.mark.timeout(900)
async def test_fifty_ttls_expire_on_time_across_a_launcher_and_a_broker_restart(hub: LocalHub) -> None:
    with rabbitnode.RabbitNode() as node:
        settings = make_settings(hub, amqp_url=node.url)
        ttls = [5 + (120 - 5) * i / 49 for i in range(50)]
        random.Random(13).shuffle(ttls)  # mixed order: long ones queued before short ones
        users = [unique("x") for _ in ttls]
        expires: dict[tuple[str, str], float] = {}
        service = running_service(settings)
        await service.__aenter__()
        try:
            async with LauncherClient.from_settings(settings) as client:
                results = await asyncio.gather(
                    *(client.launch(username=u, image="standin", ttl=t) for u, t in zip(users, ttls))
                )
            for user, result in zip(users, results):
                assert result.expires_at is not None
                expires[(user, "")] = result.expires_at.timestamp()
            first_launched = time.time()  # all launched (and ready) by now
            watch = HubWatch(hub, set(expires)).start()

            await asyncio.sleep(max(0.0, first_launched + 25 - time.time()))
            await service.__aexit__(None, None, None)  # the launcher restarts
            service = running_service(settings)
            await service.__aenter__()
            restarted_launcher = time.time()

            await asyncio.sleep(max(0.0, first_launched + 55 - time.time()))
            broker_down = time.time()
            await asyncio.to_thread(node.restart)  # the broker restarts under the launcher
            broker_up = time.time()

            await watch.wait(max(expires.values()) - time.time() + 30)
        finally:
            await service.__aexit__(None, None, None)

        late = {server: watch.gone_at.get(server, float("inf")) - due for server, due in expires.items()}
        ttl_of = {(u, ""): t for u, t in zip(users, ttls)}
        print(
            f"\n50 ttls 5-120 s: launcher restarted at +{restarted_launcher - first_launched:.0f} s, broker down"
            f" +{broker_down - first_launched:.0f}..+{broker_up - first_launched:.0f} s;"
            f" removal after expiry (hub polled every 0.5 s): min {min(late.values()):.2f} s,"
            f" median {statistics.median(late.values()):.2f} s, max {max(late.values()):.2f} s"
        )
        assert all(server in watch.gone_at for server in expires), "servers left running"
        early = {s: round(v, 2) for s, v in late.items() if v < 0}
        assert not early, f"removed early: {early}"
        too_late = {s: round(v, 2) for s, v in late.items() if v > bound(ttl_of[s])}
        assert not too_late, f"removed late: {too_late}"
        await delete_expiry_queues(settings, node.url)
