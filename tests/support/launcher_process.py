"""The launcher as a process (``python -m consumer run``), configured through its environment as a
Deployment configures it, and the command queue it declares: for the tests that run it so."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika

from consumer.config import Settings
from tests.support.localhub import ROOT


def launcher_env(**values: str | float) -> dict[str, str]:
    """The environment of a launcher process: nothing inherited that configures it (the test run's
    own ``LAUNCHER_*`` or hub variables), then ``values`` as settings (``log_level="DEBUG"`` is
    ``LAUNCHER_LOG_LEVEL=DEBUG``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LAUNCHER_") and k not in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL")
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update({f"LAUNCHER_{key.upper()}": str(value) for key, value in values.items()})
    return env


def settings_env(settings: Settings, **values: str | float) -> dict[str, str]:
    """The environment of a launcher configured as ``settings`` (its hub, its signing key, its broker
    and unique names, its health port: 0 in tests, so that launchers side by side do not collide),
    then ``values``."""
    configured: dict[str, str | float] = {
        "jupyterhub_url": str(settings.jupyterhub_url),
        "jupyterhub_api_token": settings.jupyterhub_api_token.get_secret_value(),
        "spawner_signing_key": settings.spawner_signing_key.get_secret_value(),
        "amqp_url": settings.amqp_url.get_secret_value(),
        "command_queue": settings.command_queue,
        "reply_exchange": settings.reply_exchange,
        "events_exchange": settings.events_exchange,
        "health_port": settings.health_port,
    }
    return launcher_env(**(configured | values))


@contextlib.asynccontextmanager
async def launcher_process(env: dict[str, str], cwd: Path, **streams: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m consumer run`` with ``env`` (``streams``: ``stderr=...`` and the like), killed on
    the way out if it still runs: a test that failed halfway leaves no launcher consuming."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "consumer", "run", cwd=cwd, env=env, **streams)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def queued(settings: Settings) -> int:
    """Ready (not delivered) messages in the command queue."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.command_queue, passive=True)
        return queue.declaration_result.message_count or 0


async def wait_for_queue(settings: Settings, timeout: float = 30) -> None:
    """Until a launcher process has declared the command queue: commands published before would
    find no queue to go to."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                await queued(settings)
                return
            except aio_pika.exceptions.ChannelNotFoundEntity:
                await asyncio.sleep(0.2)
