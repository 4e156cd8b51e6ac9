"""read and remove take a ``timeout``; a read of an unreachable hub answers within seconds by default;
the older worker's ``skip_check`` is accepted and ignored."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from consumer.config import Settings
from tests.conftest import Client, delete_topology, make_settings, running_service
from tests.support.localhub import LocalHub


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def unreachable_hub(hub: LocalHub) -> AsyncIterator[Settings]:
    # launch_timeout as in production (300 s): a read used to wait all of it.
    made = make_settings(hub, jupyterhub_url=f"http://127.0.0.1:{closed_port()}", launch_timeout=300)
    yield made
    await delete_topology(made)


async def test_a_read_of_an_unreachable_hub_answers_hub_unavailable_by_default_within_read_timeout(
    unreachable_hub: Settings, username: str
) -> None:
    async with running_service(unreachable_hub), Client(unreachable_hub) as client:
        # Far less than launch_timeout; generous over read_timeout for a loaded machine.
        reply = await client.call({"action": "read", "username": username}, timeout=120)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "hub_unavailable", reply
    assert "10 s" in reply["error"]["message"] or "GET" in reply["error"]["message"], reply
    assert unreachable_hub.read_timeout == 10  # the default


async def test_a_read_of_a_hub_that_accepts_connections_and_never_answers_ends_at_its_timeout(
    hub: LocalHub, username: str
) -> None:
    connections: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # read nothing, answer nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = make_settings(hub, jupyterhub_url=f"http://127.0.0.1:{port}", launch_timeout=300)
    try:
        async with running_service(settings), Client(settings) as client:
            # Generous over 3 s, yet short of the 60 s a single request to the hub may take.
            reply = await client.call({"action": "read", "username": username, "timeout": 3}, timeout=40)
        assert reply["error"]["code"] == "hub_unavailable", reply
        assert connections  # the launcher did reach it
    finally:
        for writer in connections:
            writer.close()
        silent.close()
        await silent.wait_closed()
        await delete_topology(settings)


@pytest.mark.parametrize("action", ["read", "remove"])
async def test_read_and_remove_take_a_timeout(unreachable_hub: Settings, username: str, action: str) -> None:
    async with running_service(unreachable_hub), Client(unreachable_hub) as client:
        reply = await client.call({"action": action, "username": username, "timeout": 2}, timeout=120)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "hub_unavailable", reply


async def test_the_older_workers_skip_check_is_accepted_and_ignored(
    service: None, client: Client, username: str
) -> None:
    launched = await client.call({"action": "launch", "username": username, "image": "standin", "skip_check": True})
    assert launched["ok"] is True, launched
    assert "skip_check" not in launched["result"]
    read = await client.call({"action": "read", "username": username, "skip_check": False})
    assert read["ok"] is True, read
    assert "skip_check" not in read["result"]["user_options"]  # not passed on to the hub
    removed = await client.call({"action": "remove", "username": username, "skip_check": True})
    assert removed["ok"] is True, removed
