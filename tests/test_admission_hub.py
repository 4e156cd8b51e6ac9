"""Admission control against a real JupyterHub with a spawn limit: a class start in miniature."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.conftest import Client, delete_topology, make_settings, running_service, unique
from tests.support.localhub import LocalHub

SPAWN_LIMIT = 2
# "[I 2026-12-02 12:00:00.123 JupyterHub log:192] 429 POST /hub/api/users/x/server (launcher@127.0.0.1) 12.34ms"
REQUEST = re.compile(
    r"^\[\w (?P<ts>\S+ \S+) [^\]]*\] (?P<status>\d{3}) POST /hub/api/users/(?P<user>[^/\s]+)/server "
    r"\(launcher@[^)]*\) (?P<ms>[\d.]+)ms"
)


@pytest.fixture(scope="module")
def limited_hub() -> Iterator[LocalHub]:
    # JupyterHub's default Retry-After (30-60 s) stays: a retry that waited for it would show.
    with LocalHub(extra={"concurrent_spawn_limit": SPAWN_LIMIT}) as running:
        yield running


def start_requests(hub: LocalHub, users: set[str]) -> list[tuple[str, int, float, float]]:
    """(user, status, arrived, answered) of each start request, from the hub's request log."""
    found = []
    for line in hub.log_path.read_text().splitlines():
        match = REQUEST.match(line)
        if match and match["user"] in users:
            answered = datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            found.append((match["user"], int(match["status"]), answered - float(match["ms"]) / 1000, answered))
    return found


def queue_positions(client: Client, correlation_id: str) -> list[int]:
    return [
        e["data"]["queue_position"]
        for e in client.events_for(correlation_id)
        if e["type"] == "launch.progress" and e["data"].get("queue_position")
    ]


async def test_a_burst_larger_than_the_spawn_limit_succeeds_and_retries_each_429_when_a_slot_frees(
    limited_hub: LocalHub,
) -> None:
    settings = make_settings(limited_hub)
    users = [unique("b") for _ in range(4 * SPAWN_LIMIT)]
    try:
        async with running_service(settings), Client(settings) as client:
            ids = [await client.send({"action": "launch", "username": u, "image": "standin:slow-2"}) for u in users]
            replies = await asyncio.gather(*(client.reply(i, 180) for i in ids))
            await asyncio.sleep(0.5)  # events are best effort and may trail the replies
    finally:
        await delete_topology(settings)
    assert [r["ok"] for r in replies] == [True] * len(users), [r["error"] for r in replies if not r["ok"]]

    starts = start_requests(limited_hub, set(users))
    refused = [(u, answered) for u, status, _, answered in starts if status == 429]
    accepted = [(u, arrived, answered) for u, status, arrived, answered in starts if status in (201, 202)]
    assert refused, "the burst never met the hub's spawn limit: nothing was tested"
    # How long one of our slots takes to free: the longest start the hub held until ready.
    longest_spawn = max(answered - arrived for _, arrived, answered in accepted)
    for user, at in refused:
        retry = min(arrived for u, arrived, _ in accepted if u == user and arrived > at)
        # Retry-After said 30-60 s; the retry went when one of ours became ready.
        assert retry - at <= longest_spawn + 5, (user, retry - at, longest_spawn)

    positions = {u: queue_positions(client, i) for u, i in zip(users, ids)}
    assert any(positions.values()), "no launch reported waiting in the launcher's queue"
    for user, correlation_id in zip(users, ids):
        kinds = ["queued" if e["data"].get("queue_position") else e["type"] for e in client.events_for(correlation_id)]
        if positions[user]:
            assert all(1 <= p <= len(users) for p in positions[user]), positions[user]
            # The launcher's queue comes before the hub's own progress, and the launch still ends ready.
            assert kinds.index("queued") < kinds.index("launch.progress") if "launch.progress" in kinds else True
            assert kinds[-1] == "launch.ready", kinds


async def test_a_read_during_a_burst_is_answered_before_the_queued_launches(limited_hub: LocalHub) -> None:
    settings = make_settings(limited_hub)
    reader = unique("r")
    users = [unique("q") for _ in range(3 * SPAWN_LIMIT)]
    try:
        async with running_service(settings), Client(settings) as client:
            assert (await client.call({"action": "launch", "username": reader, "image": "standin"}))["ok"]
            ids = [await client.send({"action": "launch", "username": u, "image": "standin:slow-3"}) for u in users]
            replied: dict[str, float] = {}

            async def wait(correlation_id: str) -> dict:
                reply = await client.reply(correlation_id, 180)
                replied[correlation_id] = time.monotonic()
                return reply

            waiting = [asyncio.create_task(wait(i)) for i in ids]
            # Wait until launches are held back by the hub's spawn limit.
            async with asyncio.timeout(60):
                while True:
                    queued = [
                        i
                        for i in ids
                        if i not in replied
                        and queue_positions(client, i)
                        and not any(
                            e["type"] == "launch.progress" and "queue_position" not in e["data"]
                            for e in client.events_for(i)
                        )
                    ]
                    if len(queued) >= SPAWN_LIMIT:
                        break
                    await asyncio.sleep(0.05)
            asked = time.monotonic()
            read = await client.call({"action": "read", "username": reader}, timeout=60)
            read_answered = time.monotonic()
            launches = await asyncio.gather(*waiting)
    finally:
        await delete_topology(settings)
    assert read["ok"] and read["result"]["ready"], read
    assert all(r["ok"] for r in launches), [r["error"] for r in launches if not r["ok"]]
    # Every launch still queued when the read was sent was answered after it.
    assert all(replied[i] > read_answered for i in queued), (
        read_answered - asked,
        [replied[i] - asked for i in queued],
    )
