"""LocalLauncherSpawner in a real JupyterHub: options reach the process, the policy refuses clearly,
and only the launcher's signed options are applied.

Hubs: the shared one (``hub``, the test images and maxima), one loading
``examples/jupyterhub_config.py`` (the documented policy) and one without the ``apply_user_options``
hook, as JupyterHub < 5.3 runs it. All have a signing key, shared with the launcher's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from traitlets.config import Config

from consumer.config import Settings
from consumer.hub import HubClient, HubError
from consumer.signing import signed_options
from tests.conftest import Client, delete_topology, make_settings, running_service
from tests.support.localhub import LocalHub

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "jupyterhub_config.py"
TEST_IMAGES = ["standin(:.*)?", "jupyter"]  # the test hub's own images, beside the example's


def load_example() -> Config:
    """The example as JupyterHub's loader reads it (``get_config`` and a service token)."""
    config = Config()
    example_env = {"LAUNCHER_JUPYTERHUB_API_TOKEN": "example-token", "LAUNCHER_SPAWNER_SIGNING_KEY": "example-key"}
    with mock.patch.dict(os.environ, example_env):
        exec(compile(EXAMPLE.read_text(), str(EXAMPLE), "exec"), {"get_config": lambda: config})  # noqa: S102 (our example)
    return config


@contextlib.contextmanager
def started_hub(
    include: Path | None = None, spawner: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> Iterator[LocalHub]:
    """A LocalHub whose config loads ``include`` first and sets ``spawner`` on the test spawner."""
    extra_env = {"LOCALHUB_SPAWNER": json.dumps(spawner or {})}
    if include is not None:
        extra_env["LOCALHUB_INCLUDE"] = str(include)
    saved = {key: os.environ.get(key) for key in extra_env}
    os.environ.update(extra_env)  # LocalHub passes its environment to the hub process
    try:
        hub = LocalHub(extra=extra or {}).start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def policy_hub() -> Iterator[LocalHub]:
    images = [*load_example().LauncherSpawnerMixin.launcher_allowed_images, *TEST_IMAGES]
    with started_hub(EXAMPLE, {"launcher_allowed_images": images, "launcher_allow_token_in_url": True}) as hub:
        yield hub


@pytest.fixture(scope="module")
def hookless_hub() -> Iterator[LocalHub]:
    with started_hub(spawner={"apply_user_options": None, "launcher_max_cpu": 4}) as hub:
        yield hub


@pytest.fixture(scope="module")
def answer_at_once_hub() -> Iterator[LocalHub]:
    """Zero to JupyterHub's default: start requests answer 202 before the spawn has begun."""
    with started_hub(spawner={"launcher_max_cpu": 4}, extra={"tornado_settings": {"slow_spawn_timeout": 0}}) as hub:
        yield hub


@contextlib.asynccontextmanager
async def launcher(hub: LocalHub) -> AsyncIterator[Client]:
    """The consumer service against ``hub``, and an RPC client for it."""
    settings: Settings = make_settings(hub)
    try:
        async with running_service(settings), Client(settings) as client:
            yield client
    finally:
        await delete_topology(settings)


@contextlib.asynccontextmanager
async def hub_api(hub: LocalHub) -> AsyncIterator[HubClient]:
    async with aiohttp.ClientSession() as session:
        yield HubClient(session, hub.api_url, hub.token)


async def process_env(result: dict[str, Any]) -> dict[str, str]:
    """The single-user process's environment, as the stand-in server reports it."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(result["url"] + "api/launcher-env", headers={"Authorization": f"token {result['token']}"}) as response,
    ):
        assert response.status == 200
        return await response.json()


# -- options reach the process ----------------------------------------------------------------------


async def test_cpu_memory_image_and_env_reach_the_single_user_process(
    service: None, client: Client, username: str
) -> None:
    reply = await client.call(
        {
            "action": "launch",
            "username": username,
            "image": "standin",
            "cpu": {"request": 0.5, "limit": 2},
            "memory": {"request": "512M", "limit": "1G"},
            "env": {"COURSE": "ml-101", "TEMPLATE": "{username}"},
        }
    )
    assert reply["ok"] is True, reply

    env = await process_env(reply["result"])
    assert env["CPU_LIMIT"] == "2.0" and env["CPU_GUARANTEE"] == "0.5"
    assert env["MEM_LIMIT"] == str(2**30) and env["MEM_GUARANTEE"] == str(512 * 2**20)
    assert env["COURSE"] == "ml-101" and env["TEMPLATE"] == "{username}"
    assert env["JUPYTER_IMAGE"] == "standin"
    assert env["JUPYTERHUB_USER"] == username
    assert "JUPYTERHUB_ALLOW_TOKEN_IN_URL" not in env


async def test_a_later_start_does_not_inherit_the_earlier_options(service: None, client: Client, username: str) -> None:
    first = {"action": "launch", "username": username, "server_name": "s", "image": "standin"}
    reply = await client.call({**first, "cpu": {"limit": 2}, "memory": {"limit": "1G"}, "env": {"FIRST": "1"}})
    assert reply["ok"] is True, reply
    assert (await client.call({"action": "remove", "username": username, "server_name": "s"}))["ok"]

    reply = await client.call({**first, "env": {"SECOND": "1"}})
    assert reply["ok"] is True, reply
    env = await process_env(reply["result"])
    assert env["SECOND"] == "1"
    assert "FIRST" not in env and "CPU_LIMIT" not in env and "MEM_LIMIT" not in env


async def test_an_allowed_json_option_reaches_the_process(policy_hub: LocalHub, username: str) -> None:
    async with launcher(policy_hub) as client:
        reply = await client.call(
            {"action": "launch", "username": username, "image": "standin", "json": {"default_url": "/lab"}}
        )
    assert reply["ok"] is True, reply
    assert (await process_env(reply["result"]))["JUPYTERHUB_DEFAULT_URL"] == "/lab"


# -- policy violations come back to the caller -------------------------------------------------------

# Options our schema lets through (it cannot know the hub's policy): the hub refuses them and the
# consumer answers options_rejected with the hub's message.
POLICY = [
    pytest.param(
        {"image": "docker.io/evil/miner:latest"},
        "image: 'docker.io/evil/miner:latest' is not one of the images this hub allows",
        id="image",
    ),
    pytest.param({"cpu": {"limit": 64}}, "cpu.limit: 64 is more than this hub's maximum of 4 cores", id="cpu-max"),
    pytest.param(
        {"memory": {"limit": "64G"}}, "memory.limit: '64G' is more than this hub's maximum of 16G", id="memory-max"
    ),
    pytest.param(
        {"vols": [{"pvc": "claim-bob", "mount": "/bob"}]},
        "vols[0].pvc: 'claim-bob' is not a claim this user may mount",
        id="other-pvc",
    ),
    pytest.param(
        {"json": {"privileged": True}},
        "json.privileged: is not an option this hub allows (allowed: default_url)",
        id="json-privileged",
    ),
    pytest.param({"json": {"cmd": ["/bin/sh"]}}, "json.cmd: is not an option this hub allows", id="json-cmd"),
    pytest.param({"json": {"uid": 0}}, "json.uid: is not an option this hub allows", id="json-uid"),
    pytest.param(
        {"json": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
        "json.volumes: is not an option this hub allows",
        id="json-hostPath",
    ),
    pytest.param({"gpu": {"limit": 3}}, "gpu: 3 is more than this hub's maximum of 2", id="gpu-max"),
    pytest.param(
        {"env": {"GRANT_SUDO": "yes"}}, "env.GRANT_SUDO: is not a variable this hub lets callers set", id="grant-sudo"
    ),
    pytest.param(
        {"env": {"LD_PRELOAD": "/tmp/x.so"}},
        "env.LD_PRELOAD: is not a variable this hub lets callers set",
        id="ld-preload",
    ),
    pytest.param(
        {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}},
        "env.NVIDIA_VISIBLE_DEVICES: is not a variable this hub lets",
        id="all-gpus",
    ),
    pytest.param(
        {"vols": [{"pvc": "claim-alice-smith---63425827", "mount": "/x"}]},
        "vols[0].pvc: 'claim-alice-smith---63425827' is not a claim this user may mount",
        id="slug-claim",
    ),
]


@pytest.mark.parametrize(("options", "message"), POLICY)
async def test_a_policy_violation_comes_back_as_options_rejected_with_the_reason(
    policy_hub: LocalHub, username: str, options: dict[str, Any], message: str
) -> None:
    async with launcher(policy_hub) as client:
        reply = await client.call({"action": "launch", "username": username, "image": "standin", **options})
        assert reply["ok"] is False, reply
        assert reply["error"]["code"] == "options_rejected", reply
        assert message in reply["error"]["message"]
        assert (await client.call({"action": "read", "username": username}))["error"]["code"] == "not_found"


# Options the consumer's schema already refuses; the hub must refuse them too, for publishers that
# talk to the hub directly.
SCHEMA_AND_HUB = [
    pytest.param({"privileged": True}, "unknown option 'privileged'", id="privileged"),
    pytest.param({"cmd": ["/bin/sh"]}, "unknown option 'cmd'", id="cmd"),
    pytest.param({"uid": 0}, "unknown option 'uid'", id="uid"),
    pytest.param(
        {"vols": [{"hostPath": "/", "mount": "/host"}]}, "vols[0]: unknown field 'hostPath'", id="hostPath-vol"
    ),
    pytest.param(
        {"env": {"JUPYTERHUB_API_URL": "http://evil.example/hub/api"}},
        "env.JUPYTERHUB_API_URL: is set by JupyterHub",
        id="api-url-env",
    ),
    pytest.param(
        {"memory": {"limit": "{username}G"}},
        "memory.limit: '{username}G' is not a memory quantity",
        id="quantity-brace",
    ),
    pytest.param({"cpu": {"limit": "{1}"}}, "cpu.limit: '{1}' is not a number", id="cpu-brace"),
    pytest.param(
        {"memory": {"limit": "9" * 400 + "G"}},
        "memory.limit: '9999999999999999'… (401 characters) is too large a memory quantity",
        id="quantity-400-digits",
    ),
]


@pytest.mark.parametrize(("options", "message"), SCHEMA_AND_HUB)
async def test_hostile_options_are_refused_by_the_consumer_schema(
    policy_hub: LocalHub,
    username: str,
    options: dict[str, Any],
    message: str,  # message: the hub's, unused here
) -> None:
    async with launcher(policy_hub) as client:
        reply = await client.call({"action": "launch", "username": username, "image": "standin", **options})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_command"


@pytest.mark.parametrize(("options", "message"), [*POLICY, *SCHEMA_AND_HUB])
async def test_hostile_options_posted_straight_to_the_hub_get_400_with_the_reason(
    policy_hub: LocalHub, username: str, options: dict[str, Any], message: str
) -> None:
    async with hub_api(policy_hub) as api:
        await api.ensure_user(username)
        with pytest.raises(HubError) as raised:
            # Signed as the launcher signs: the policy, not the signature, refuses them.
            await api.start_server(
                username, "", signed_options(policy_hub.signing_key, username, "", {"image": "standin", **options})
            )
        assert raised.value.status == 400
        assert message in raised.value.message
        assert await api.get_server(username) is None


async def test_without_the_hook_a_violation_fails_the_spawn_with_the_reason(
    hookless_hub: LocalHub, username: str
) -> None:
    """JupyterHub < 5.3: start() applies the options, the spawn fails, the progress says why."""
    async with launcher(hookless_hub) as client:
        refused = await client.call(
            {"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 64}}
        )
        accepted = await client.call(
            {"action": "launch", "username": username, "server_name": "ok", "image": "standin", "cpu": {"limit": 3}}
        )
    assert refused["ok"] is False
    assert refused["error"]["code"] == "spawn_failed"
    assert "cpu.limit: 64 is more than this hub's maximum of 4 cores" in refused["error"]["message"]
    assert accepted["ok"] is True, accepted
    assert (await process_env(accepted["result"]))["CPU_LIMIT"] == "3.0"


async def test_when_the_hub_answers_at_once_a_violation_still_reaches_the_caller_with_the_reason(
    answer_at_once_hub: LocalHub, username: str
) -> None:
    async with launcher(answer_at_once_hub) as client:
        reply = await client.call({"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 64}})
    # Whether the refusal beats the hub's answer depends on whether anything before the hook yields
    # to the event loop; either way the reply names the reason.
    assert reply["ok"] is False
    reason = "cpu.limit: 64 is more than this hub's maximum of 4 cores"
    assert (reply["error"]["code"], reply["error"]["message"]) in {
        ("options_rejected", reason),
        ("spawn_failed", f"Spawn failed: {reason}"),
    }


# -- token in URL -------------------------------------------------------------------------------------


async def status_with_token_in_url(result: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(result["url"] + f"api/status?token={result['token']}", allow_redirects=False) as response,
    ):
        return response.status


async def test_token_in_url_opens_the_server_only_when_the_hub_allows_it(
    policy_hub: LocalHub, service: None, client: Client, username: str
) -> None:
    default = await client.call({"action": "launch", "username": username, "image": "jupyter"})
    assert default["ok"] is True, default
    assert await status_with_token_in_url(default["result"]) == 403

    async with launcher(policy_hub) as policy_client:
        allowed = await policy_client.call({"action": "launch", "username": username, "image": "jupyter"})
    assert allowed["ok"] is True, allowed
    assert await status_with_token_in_url(allowed["result"]) == 200


# -- the plain example config -------------------------------------------------------------------------


def test_example_config_declares_the_service_role_and_spawner_the_launcher_needs() -> None:
    config = load_example()
    assert config.JupyterHub.services == [{"name": "launcher", "api_token": "example-token"}]
    assert config.JupyterHub.load_roles == [
        {"name": "launcher", "scopes": ["admin:users", "servers", "tokens"], "services": ["launcher"]}
    ]
    assert config.JupyterHub.spawner_class == "consumer.spawner.LocalLauncherSpawner"
    assert config.JupyterHub.allow_named_servers is True
    assert config.LauncherSpawnerMixin.launcher_signing_key == "example-key"
    assert config.JupyterHub.named_server_limit_per_user + 1 == config.LauncherSpawnerMixin.launcher_user_max_servers


def test_example_config_reads_only_variables_the_launcher_accepts() -> None:
    """Hub and launcher may share one environment: the launcher refuses unknown LAUNCHER_ variables."""
    from consumer.config import Settings

    names = set(re.findall(r"os\.environ\[\"([A-Z_]+)\"\]", EXAMPLE.read_text()))
    assert names == {"LAUNCHER_JUPYTERHUB_API_TOKEN", "LAUNCHER_SPAWNER_SIGNING_KEY"}
    for name in names:
        assert name.removeprefix("LAUNCHER_").lower() in Settings.model_fields


def test_readme_shows_the_example_files_as_they_are() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## JupyterHub set-up", 1)[1].split("\n## ", 1)[0]
    for name in ("jupyterhub_config.py", "z2jh-values.yaml"):
        assert (ROOT / "examples" / name).read_text().strip() in section, name
    assert "launcher_allow_token_in_url" in section


# -- only the launcher sets options ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def as_user(hub: LocalHub, username: str) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session with ``username``'s own token (role ``user``), made through the hub's API as
    the tests' service makes users."""
    async with hub_api(hub) as api:
        await api.ensure_user(username)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"token {hub.token}"}) as service,
        service.post(
            f"{hub.api_url}/users/{username}/tokens", json={"expires_in": 600, "note": "test: the user's own token"}
        ) as response,
    ):
        assert response.status == 201, await response.text()
        token = (await response.json())["token"]
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as session:
        async with session.get(f"{hub.api_url}/user") as response:
            assert response.status == 200
            model = await response.json()
        assert model["name"] == username and model["admin"] is False
        assert f"servers!user={username}" in model["scopes"]  # what a plain user may do with their servers
        yield session


async def post_start(
    session: aiohttp.ClientSession, hub: LocalHub, username: str, server: str, body: Any
) -> tuple[int, str]:
    path = f"{hub.api_url}/users/{username}/server" + (f"s/{server}" if server else "")
    async with session.post(path, data=None if body is None else json.dumps(body)) as response:
        text = await response.text()
        return response.status, (json.loads(text).get("message") or "") if response.status >= 400 else text


# What the security review got past the spawner with a user's own token.
OWN_TOKEN = [
    pytest.param({"image": "docker.io/evil/miner:latest"}, id="image"),
    pytest.param(
        {"image": "standin", "cpu": {"limit": 512}, "memory": {"limit": "4T"}, "gpu": {"limit": 64}}, id="maxima"
    ),
    pytest.param({"image": "standin", "env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, id="all-gpus"),
    pytest.param({"image": "standin", "env": {"GRANT_SUDO": "yes", "NB_UID": "0"}}, id="root"),
    pytest.param({"image": "standin", "env": {"MEM_LIMIT\n": "1"}}, id="newline"),
    pytest.param(
        {"image": "standin", "vols": [{"pvc": "claim-alice-smith---63425827", "mount": "/x"}]}, id="slug-claim"
    ),
    pytest.param(
        {"image": "standin", "vols": [{"pvc": "claim-x", "mount": "//usr/local/bin/before-notebook.d"}]}, id="mount"
    ),
    pytest.param({"image": "standin"}, id="even-allowed-options"),
]


@pytest.mark.parametrize("options", OWN_TOKEN)
async def test_a_user_posting_options_with_their_own_token_gets_400(
    hub: LocalHub, username: str, options: dict[str, Any]
) -> None:
    async with as_user(hub, username) as session:
        status, message = await post_start(session, hub, username, "", options)
        assert (status, message) == (
            400,
            "this hub applies only options signed by its launcher; start without options for the defaults",
        )
        status, message = await post_start(session, hub, username, "", {"user_options": options, "display_name": "x"})
        assert status == 400 and "signed by its launcher" in message
    async with hub_api(hub) as api:
        assert await api.get_server(username) is None


async def test_signed_options_replayed_to_another_user_or_server_get_400(hub: LocalHub, username: str) -> None:
    other = username + "-b"
    signed = signed_options(hub.signing_key, username, "", {"image": "standin", "cpu": {"limit": 1}})
    async with as_user(hub, other) as session:
        status, message = await post_start(session, hub, other, "", signed)
    assert status == 400 and f"does not match these options for {other}'s server ''" in message
    async with as_user(hub, username) as session:
        status, message = await post_start(session, hub, username, "gpu", signed)
    assert status == 400 and f"does not match these options for {username}'s server 'gpu'" in message


@pytest.mark.parametrize("how", ["without-body", "with-empty-object"])
async def test_a_user_starts_their_own_server_without_options_and_gets_the_defaults(
    hub: LocalHub, service: None, client: Client, username: str, how: str
) -> None:
    """JupyterHub reuses the last start's stored options for a start request without any."""
    launched = await client.call(
        {"action": "launch", "username": username, "image": "standin", "cpu": {"limit": 2}, "env": {"FIRST": "1"}}
    )
    assert launched["ok"] is True, launched
    async with hub_api(hub) as api:
        assert (await api.get_server(username) or {})["user_options"] == {
            "image": "standin",
            "cpu": {"limit": 2.0},
            "env": {"FIRST": "1"},
        }
    assert (await client.call({"action": "remove", "username": username}))["ok"]

    async with as_user(hub, username) as session:
        # (The spawn page's start, which needs a login, is in test_spawner_boundary.py.)
        status, _ = await post_start(session, hub, username, "", None if how == "without-body" else {})
        assert status in (201, 202)
        async with hub_api(hub) as api:
            async with asyncio.timeout(60):
                while not ((server := await api.get_server(username)) or {}).get("ready"):
                    await asyncio.sleep(0.5)
        assert server["user_options"] == {}
        async with session.get(f"{hub.url}{server['url']}api/status") as response:
            assert response.status == 200
            # the default command (a real single-user server), not the stand-in the stored options chose
            assert "standin" not in await response.json()
        async with hub_api(hub) as api:
            await api.stop_server(username)


# -- per-user totals and the README's examples, against the example configuration ----------------------


async def test_a_users_servers_together_stay_within_the_per_user_totals(policy_hub: LocalHub, username: str) -> None:
    example = load_example().LauncherSpawnerMixin
    assert (example.launcher_max_cpu, example.launcher_user_max_cpu) == (4, 8)
    launch = {"action": "launch", "username": username, "image": "standin", "memory": {"limit": "1G"}}
    async with launcher(policy_hub) as client:
        first = await client.call({**launch, "server_name": "a", "cpu": {"limit": 4}})
        second = await client.call({**launch, "server_name": "b", "cpu": {"limit": 4}})
        third = await client.call({**launch, "server_name": "c", "cpu": {"limit": 0.5}})
        assert first["ok"] and second["ok"], (first, second)
        assert third["ok"] is False and third["error"]["code"] == "options_rejected", third
        assert third["error"]["message"] == (
            f"cpu: 8 cores on {username}'s other active servers ('a', 'b') and 0.5 cores on this one are more"
            " than this hub's per-user total of 8 cores"
        )
        assert (await client.call({"action": "remove", "username": username, "server_name": "a"}))["ok"]
        assert (await client.call({**launch, "server_name": "c", "cpu": {"limit": 0.5}}))["ok"]


def readme_commands() -> list[dict[str, Any]]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Commands", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    commands, text = [], block.strip()
    decoder = json.JSONDecoder()
    while text:
        command, end = decoder.raw_decode(text)
        commands.append(command)
        text = text[end:].strip()
    return commands


async def test_the_readmes_commands_run_against_the_example_configuration(policy_hub: LocalHub, username: str) -> None:
    commands = readme_commands()
    assert [c["action"] for c in commands] == ["launch", "read", "remove"]
    async with launcher(policy_hub) as client:
        for command in commands:
            # The README's user, here a fresh one: the example's claim is the user's own.
            text = (
                json.dumps(command).replace('"alice"', json.dumps(username)).replace("claim-alice", f"claim-{username}")
            )
            reply = await client.call(json.loads(text), timeout=120)
            assert reply["ok"] is True, (command["action"], reply)
