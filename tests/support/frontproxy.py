"""A real configurable-http-proxy in front of a hub, to make the window of a hub restart on demand.

While JupyterHub restarts, a proxy that is back before it (a hub-managed proxy restarted first, or
an external one, as in Zero to JupyterHub) answers ``/hub/...`` with 404 ``Not Found`` until the hub
re-adds its route. This proxy routes ``/`` to ``target`` (a LocalHub's own proxy) while routed;
``restart(routed=False)`` is a proxy that has come back without the hub's route: connections through
it break, and requests get its 404 until ``route()``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Self

from tests.support.localhub import find_proxy, free_port


@dataclass
class FrontProxy:
    target: str
    port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, routed: bool = True, timeout: float = 30) -> FrontProxy:
        self.process = subprocess.Popen(
            [
                find_proxy(),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
                "--log-level",
                "warn",
            ],
            env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        give_up = time.monotonic() + timeout
        while True:
            try:
                self._api("GET")
                break
            except OSError:
                if time.monotonic() > give_up or self.process.poll() is not None:
                    raise RuntimeError("configurable-http-proxy did not start") from None
                time.sleep(0.1)
        if routed:
            self.route()
        return self

    def _api(self, method: str, body: dict[str, str] | None = None) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/routes/",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def route(self, target: str | None = None) -> None:
        """Add the hub's route, as the hub does once it is back (or a route to ``target``)."""
        self._api("POST", {"target": target or self.target})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, routed: bool = False) -> None:
        """The proxy goes away (its connections break) and comes back, by default without the
        hub's route."""
        self.stop()
        self.start(routed=routed)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
