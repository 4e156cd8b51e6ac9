"""Wires the parts together and runs until SIGTERM/SIGINT, then shuts down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp

from .admission import Admission
from .broker import Broker
from .config import Settings
from .hub import HubClient
from .worker import Worker
from .workflows import Workflows

log = logging.getLogger(__name__)


async def serve(
    settings: Settings, stop: asyncio.Event | None = None, started: asyncio.Event | None = None
) -> None:
    """Consume commands until ``stop`` is set (SIGTERM and SIGINT set it); ``started`` is set once
    the queues exist and consuming has begun."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The hub may be asked for hundreds of progress streams at once: no per-host connection cap.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        admission = Admission(settings.hub_max_requests, settings.hub_max_pending_spawns)
        hub = HubClient(session, settings.hub_api_url, settings.jupyterhub_api_token.get_secret_value(), admission=admission)
        broker = Broker(settings)
        await broker.connect()
        worker = Worker(settings, broker, Workflows(hub, settings))
        await broker.consume(worker.on_message)
        log.info(
            "consuming %s (hub %s, %s event loop)",
            settings.command_queue,
            settings.hub_api_url,
            type(loop).__module__.split(".")[0],
        )
        if started is not None:
            started.set()
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await broker.stop_consuming()
            await worker.drain(settings.shutdown_grace)
            await broker.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped")
