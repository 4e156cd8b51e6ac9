"""Health and metrics over HTTP (aiohttp.web), for Kubernetes probes and Prometheus.

- ``/healthz`` (liveness): answered by the event loop itself, so a stuck loop fails it.
- ``/readyz`` (readiness): 200 while connected to the broker and registered on the command queue
  (active or standby: a standby is ready to take over) and the hub passed its last check
  (``hubcheck.py``, every ``hub_check_interval``); 503 with a JSON reason otherwise.
- ``/metrics``: Prometheus text format (see ``metrics.py`` for the names).

It only reads the broker's and the hub check's state; it never acts on them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from .hubcheck import HubCheck

log = logging.getLogger(__name__)


class Consuming(Protocol):
    @property
    def consuming(self) -> bool: ...


class HealthServer:
    """The HTTP endpoint; ``broker`` and ``hub_check`` may be attached after it starts."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.broker: Consuming | None = None
        self.hub_check: HubCheck | None = None
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self.app = app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)  # probes every few seconds: no access log
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("health and metrics on http://%s:%d/ (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def problems(self) -> list[str]:
        problems = []
        if self.broker is None or not self.broker.consuming:
            problems.append("not connected to RabbitMQ and consuming the command queue")
        if self.hub_check is None or self.hub_check.ok is None:
            problems.append("JupyterHub not checked yet")
        elif self.hub_check.problem is not None:
            problems.append(f"JupyterHub: {self.hub_check.problem}")
        return problems

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self.problems()
        if problems:
            return web.json_response({"status": "not ready", "reasons": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


@contextlib.asynccontextmanager
async def serving_health(host: str, port: int) -> AsyncIterator[HealthServer | None]:
    """The health endpoint for the life of the block; ``None`` when ``port`` is 0 (turned off)."""
    if not port:
        yield None
        return
    server = HealthServer(host, port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
