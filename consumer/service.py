"""Wires the parts together and runs until SIGTERM/SIGINT, then shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from . import metrics
from .admission import Admission
from .config import Settings
from .expiry import Expiry
from .health import serving_health
from .hub import HubClient
from .hubcheck import HubCheck
from .startup import connect_broker
from .worker import Worker
from .workflows import Workflows

log = logging.getLogger(__name__)
T = TypeVar("T")


async def serve(settings: Settings, stop: asyncio.Event | None = None, started: asyncio.Event | None = None) -> None:
    """Consume commands until ``stop`` is set (SIGTERM and SIGINT set it); ``started`` is set once
    the queues exist and consuming has begun."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before anything that may wait: SIGTERM and SIGINT must work at every stage of start-up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # The hub may be asked for hundreds of progress streams at once: no per-host connection cap.
        connector = aiohttp.TCPConnector(limit=0)
        # The health endpoint comes up first, so that a probe sees "alive, not ready" meanwhile.
        async with (
            serving_health(settings.health_host, settings.health_port) as health,
            aiohttp.ClientSession(connector=connector) as session,
        ):
            admission = Admission(settings.hub_max_requests, settings.hub_max_pending_spawns)
            metrics.watch_admission(admission)
            hub = HubClient(
                session, settings.hub_api_url, settings.jupyterhub_api_token.get_secret_value(), admission=admission
            )
            # Checked while the broker is reached, then every hub_check_interval: logged, not fatal.
            hub_check = HubCheck(hub, settings)
            hub_checking = asyncio.create_task(hub_check.run())
            if health is not None:
                health.hub_check = hub_check
            try:
                broker = await _unless_stopped(connect_broker(settings), stop)
                if broker is None:
                    log.info("stopped during start-up")
                    return
                worker = Worker(settings, broker, Workflows(hub, settings))
                worker.expiry = expiry = Expiry(settings, broker, hub, worker.workflows, worker.locks)
                await expiry.start()
                await broker.consume(worker.on_message)
                if health is not None:
                    health.broker = broker
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
                    await expiry.stop()
                    await worker.drain(settings.shutdown_grace)
                    await broker.close()
            finally:
                await _cancel(hub_checking)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _unless_stopped(step: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """The step's result, or None if ``stop`` is set first (the step is then cancelled)."""
    task = asyncio.create_task(step)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            await _cancel(task)
    return None if task.cancelled() else task.result()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
