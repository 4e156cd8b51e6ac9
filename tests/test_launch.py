"""Launch, read and remove end to end: RabbitMQ → consumer → real JupyterHub → replies and events."""

from __future__ import annotations

import aiohttp

from tests.conftest import Client


async def test_launch_returns_a_url_that_the_returned_token_opens(service: None, client: Client, username: str) -> None:
    reply = await client.call({"action": "launch", "username": username, "image": "jupyter"})

    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["url"] == f"{client.settings.public_url}/user/{username}/"
    async with aiohttp.ClientSession() as http:
        async with http.get(result["url"] + "api/status", headers={"Authorization": f"token {result['token']}"}) as r:
            assert r.status == 200
        async with http.get(result["url"] + "api/status") as r:
            assert r.status in (302, 403)
