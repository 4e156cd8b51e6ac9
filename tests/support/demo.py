"""``make demo``: a local JupyterHub, the launcher, one launch command, its URL and token.

Runs until Ctrl-C, then removes the server and stops the launcher and the hub.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import aio_pika
import aiohttp

from tests.support.localhub import ROOT, LocalHub

AMQP_URL = os.environ.get("LAUNCHER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# The demo's queues and exchanges, all named after this (a test runs it under a name of its own).
PREFIX = os.environ.get("DEMO_PREFIX", "demo.launcher")
QUEUE = f"{PREFIX}.commands"
QUEUES = (QUEUE, f"{QUEUE}.dead")
EXCHANGES = (f"{PREFIX}.replies", f"{PREFIX}.events", f"{QUEUE}.dlx")


async def rpc(channel: aio_pika.abc.AbstractChannel, command: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    correlation_id = uuid.uuid4().hex
    await channel.default_exchange.publish(
        aio_pika.Message(
            json.dumps(command).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            reply_to=replies.name,
        ),
        routing_key=QUEUE,
    )
    async with replies.iterator(no_ack=True) as messages:
        async with asyncio.timeout(timeout):
            async for message in messages:
                if message.correlation_id == correlation_id:
                    return json.loads(message.body)
    raise RuntimeError("no reply")


async def wait_for_queue(connection: aio_pika.abc.AbstractConnection, launcher: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if launcher.poll() is not None:
            raise RuntimeError(f"the launcher exited ({launcher.returncode}); its log is above")
        channel = await connection.channel()  # a failed passive declare closes its channel
        try:
            await channel.declare_queue(QUEUE, passive=True)
            await channel.close()
            return
        except aio_pika.exceptions.ChannelNotFoundEntity:
            await asyncio.sleep(0.2)
    raise RuntimeError("the launcher did not declare its queue")


async def demo(hub: LocalHub) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LAUNCHER_JUPYTERHUB_URL": hub.url,
        "LAUNCHER_JUPYTERHUB_API_TOKEN": hub.token,
        "LAUNCHER_SPAWNER_SIGNING_KEY": hub.signing_key,
        "LAUNCHER_AMQP_URL": AMQP_URL,
        "LAUNCHER_COMMAND_QUEUE": QUEUE,
        "LAUNCHER_REPLY_EXCHANGE": EXCHANGES[0],
        "LAUNCHER_EVENTS_EXCHANGE": EXCHANGES[1],
    }
    # Its own session: Ctrl-C reaches the demo only, which removes the server before stopping it.
    launcher = subprocess.Popen(  # noqa: ASYNC220 (only forks: returns at once)
        [sys.executable, "-m", "consumer", "run", "--config", str(ROOT / "config.yaml")],
        env=env,
        start_new_session=True,
    )
    stop, body = asyncio.Event(), asyncio.current_task()
    assert body is not None

    def on_signal() -> None:
        # Once the server is up, Ctrl-C removes it; before that, it stops the demo where it is.
        if ready.is_set():
            stop.set()
        else:
            body.cancel()

    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await wait_for_queue(connection, launcher)
            channel = await connection.channel()
            command = {
                "action": "launch",
                "username": "demo",
                "image": "jupyter",
                "cpu": {"request": 0.5, "limit": 1},
                "memory": {"request": "256M", "limit": "1G"},
                "env": {"GREETING": "hello from the launcher"},
            }
            print(f"\n>>> launch command: {json.dumps(command)}", flush=True)
            reply = await rpc(channel, command)
            if not reply["ok"]:
                print(f">>> launch failed: {reply['error']}", flush=True)
                return
            url, token = reply["result"]["url"], reply["result"]["token"]
            async with (
                aiohttp.ClientSession() as http,
                http.get(url + "api/status", headers={"Authorization": f"token {token}"}) as r,
            ):
                status = r.status
            print(
                f"\n>>> notebook URL: {url}\n>>> token:        {token}\n"
                f">>> check it:     curl -H 'Authorization: token {token}' {url}api/status   (answered {status})\n"
                ">>> Ctrl-C to stop.\n",
                flush=True,
            )
            ready.set()
            await stop.wait()
            print(">>> removing the server", flush=True)
            print(await rpc(channel, {"action": "remove", "username": "demo"}), flush=True)
    finally:
        launcher.send_signal(signal.SIGTERM)
        await asyncio.to_thread(launcher.wait, 60)
        await delete_topology()


async def delete_topology() -> None:
    """The durable queues and exchanges the launcher declared: the demo leaves nothing behind."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in QUEUES:
            await channel.queue_delete(queue)
        for exchange in EXCHANGES:
            await channel.exchange_delete(exchange)
    print(f">>> deleted {', '.join(QUEUES + EXCHANGES)}", flush=True)


def main() -> None:
    print("starting a local JupyterHub (null authenticator, 'launcher' service)...", flush=True)
    with LocalHub() as hub:
        print(f"JupyterHub at {hub.url} (log: {hub.log_path})", flush=True)
        try:
            asyncio.run(demo(hub))
        except asyncio.CancelledError:
            print(">>> stopped", flush=True)


if __name__ == "__main__":
    main()
