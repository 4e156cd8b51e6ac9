"""The launcher as a process (``python -m consumer run``), configured through its environment as a
Deployment configures it, and the command queue it declares: for the tests that run it so."""

from __future__ import annotations

import asyncio
import os

import aio_pika

from consumer.config import Settings
from tests.support.localhub import ROOT


def launcher_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a launcher process with the hub, the broker and the names of
    ``settings``, plus ``extra`` (``LAUNCHER_*`` variables). The test run's own ``LAUNCHER_*`` and
    ``JUPYTERHUB_*`` variables are left out: they would change what the process reads."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "JUPYTERHUB_"))}
    return inherited | {
        "PYTHONPATH": str(ROOT),
        "LAUNCHER_JUPYTERHUB_URL": str(settings.jupyterhub_url),
        "LAUNCHER_JUPYTERHUB_API_TOKEN": settings.jupyterhub_api_token.get_secret_value(),
        "LAUNCHER_SPAWNER_SIGNING_KEY": settings.spawner_signing_key.get_secret_value(),
        "LAUNCHER_AMQP_URL": settings.amqp_url.get_secret_value(),
        "LAUNCHER_COMMAND_QUEUE": settings.command_queue,
        "LAUNCHER_REPLY_EXCHANGE": settings.reply_exchange,
        "LAUNCHER_EVENTS_EXCHANGE": settings.events_exchange,
        **extra,
    }


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
