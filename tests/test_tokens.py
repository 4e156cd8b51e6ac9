"""Token hygiene against the real hub: when a launch fails, is re-run, or its server is removed, no
token the launcher issued for that server stays valid but the one in the reply of a running server.

Leaked tokens are counted from the hub's own listing of the user's unexpired tokens, by note.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest

from consumer.cleanup import CleanUp, token_note, undo
from consumer.config import Settings
from consumer.hub import HubClient
from tests.conftest import Client, running_service
from tests.support.launcher_process import launcher_process, settings_env, wait_for_queue
from tests.support.localhub import ROOT, LocalHub
from tests.test_hub_restart import launcher_tokens, status_with


@pytest.fixture
async def hub_api(hub: LocalHub) -> AsyncIterator[HubClient]:
    async with aiohttp.ClientSession() as session:
        yield HubClient(session, hub.api_url, hub.token)


async def test_failed_launches_leave_no_valid_launcher_token(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    crashed = await client.call({"action": "launch", "username": username, "image": "standin:crash"})
    assert crashed["error"]["code"] == "spawn_failed", crashed
    assert await launcher_tokens(hub_api, username) == []

    # The hub's spawner refuses another user's claim. The token request is on its way when the
    # start is refused; the hub creates the token whether or not its answer is awaited.
    someone_elses = [{"pvc": f"claim-{username}x", "mount": "/data"}]
    for _ in range(10):
        rejected = await client.call(
            {"action": "launch", "username": username, "image": "standin", "vols": someone_elses}
        )
        assert rejected["error"]["code"] == "options_rejected", rejected
    assert await launcher_tokens(hub_api, username) == []


async def test_a_first_launch_lists_no_tokens_so_its_path_keeps_its_hub_requests(
    service: None, client: Client, username: str, hub: LocalHub
) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "standin"})
    assert reply["ok"], reply
    requests = hub.launcher_requests(username)
    assert f"201 POST /hub/api/users/{username}/tokens" in requests, requests
    assert not [r for r in requests if r.endswith(f"GET /hub/api/users/{username}/tokens")], requests
    assert len(requests) <= 5, requests


async def test_remove_revokes_the_servers_tokens_so_the_old_one_does_not_open_the_next_server(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    # A real single-user server: it asks the hub about every token (the stand-in takes any).
    command = {"action": "launch", "username": username, "image": "jupyter"}
    first = await client.call(command)
    assert first["ok"], first
    assert (await client.call({"action": "remove", "username": username}))["ok"]
    assert await launcher_tokens(hub_api, username) == []

    second = await client.call(command)
    assert second["ok"], second
    url = second["result"]["url"]
    assert await status_with(url, first["result"]["token"]) == 403
    assert await status_with(url, second["result"]["token"]) == 200
    assert len(await launcher_tokens(hub_api, username)) == 1


async def test_a_launch_re_run_after_its_consumer_was_killed_leaves_only_the_replied_token_valid(
    hub: LocalHub, settings: Settings, client: Client, username: str, hub_api: HubClient
) -> None:
    async with launcher_process(settings_env(settings), ROOT / "tests") as process:
        await wait_for_queue(settings)
        correlation_id = await client.send({"action": "launch", "username": username, "image": "standin:slow-4"})
        async with asyncio.timeout(30):
            while not await launcher_tokens(hub_api, username):  # the first run has its token
                await asyncio.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert not client.replies[correlation_id].done()

    async with running_service(settings):
        reply = await client.reply(correlation_id, timeout=90)
    assert reply["ok"] is True, reply
    tokens = await launcher_tokens(hub_api, username)
    assert len(tokens) == 1, tokens  # the first run's token was revoked, the replied one not


async def test_a_deferred_clean_up_stops_the_failed_launchs_server_unless_a_later_launch_handed_it_out(
    service: None, client: Client, username: str, hub_api: HubClient
) -> None:
    # A failed launch's clean-up may run only after the caller has launched the server again (it
    # waited for the hub): that launch's token is newer than the failed launch's, so the server is
    # left running. Tokens of launches before the failed one do not count.
    async def issue(launch: str) -> str:
        await asyncio.sleep(1.1)  # the hub's timestamps tell the tokens' order
        _, token_id = await hub_api.create_token(
            username, [f"access:servers!server={username}/"], 600, token_note(username, "", launch)
        )
        return token_id

    await hub_api.ensure_user(username)
    earlier = await issue("0a")  # an earlier launch's
    failed = await issue("0b")
    assert await undo(hub_api, CleanUp(username=username, launch="0b", stop=True)) is True
    assert failed not in [t["id"] for t in await launcher_tokens(hub_api, username)]

    failed = await issue("0c")
    await asyncio.sleep(1.1)
    launched = await client.call({"action": "launch", "username": username, "image": "standin"})
    assert launched["ok"], launched
    assert await undo(hub_api, CleanUp(username=username, launch="0c", stop=True)) is False
    left = await launcher_tokens(hub_api, username)
    assert failed not in [t["id"] for t in left]
    assert len(left) == 2 and earlier in [t["id"] for t in left]  # and the later launch's
    assert await hub_api.get_server(username) is not None


def test_a_token_note_names_its_server_and_launch_unambiguously() -> None:
    from consumer.cleanup import _issuer

    def token(note: str | None) -> dict[str, str | None]:
        return {"id": "a1", "note": note}

    note = token_note("a.b@c+d", "gpu-1", "0f3a")
    assert note == "jupyterhub-launcher a.b@c+d/gpu-1 launch=0f3a"
    assert _issuer(token(note), "a.b@c+d", "gpu-1") == "0f3a"
    assert _issuer(token(note), "a.b@c+d", "") is None  # the default server is another server
    assert _issuer(token(note), "a.b@c+d", "gpu") is None
    assert _issuer(token(token_note("a.b@c+d", "", "0f3a")), "a.b@c+d", "") == "0f3a"
    assert _issuer(token("jupyterhub-launcher: bob/"), "bob", "") == ""  # an earlier version's note
    assert _issuer(token("my own token"), "bob", "") is None
    assert _issuer(token(None), "bob", "") is None
