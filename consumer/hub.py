"""A JupyterHub REST API client: users, servers, progress streams and tokens.

It knows HTTP and JupyterHub, nothing of AMQP. Transient failures (connection errors, 5xx, 429) are
retried with the hub's ``Retry-After`` or exponential backoff with jitter until the client's
``deadline`` (a ``loop.time()``), then surface as ``HubUnavailable``.

An error that is not JupyterHub's own JSON answer (``{"status": N, "message": ...}``) did not come
from the hub: while JupyterHub restarts, the configurable-http-proxy in front of it is back first and
answers 404 (``Not Found``, plain text) to ``/hub/api/...`` until the hub re-adds its route. Such a
404 means "hub unavailable" and is retried like a refused connection; it never means "no such user
or server". Likewise a proxy's 502/503 is retried even where the hub's own 500 is an answer. With an ``Admission``, every
request waits for its slot there first, and a start refused with 429 is retried as soon as one of
our spawns frees a slot (see ``admission.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from . import metrics
from .admission import NO_SLOT, Admission, Kind, Slot

log = logging.getLogger(__name__)

# Plain requests should be quick; the hub holds a start request up to slow_spawn_timeout (10 s).
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
# The progress stream sends a keepalive every 8 s: silence for longer means the hub is gone.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=30)
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


class HubError(Exception):
    """The hub answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class HubUnavailable(Exception):
    """The hub could not be reached, or kept failing, until the deadline."""


def _user_path(username: str) -> str:
    return f"/users/{quote(username, safe='')}"


def _path(username: str, server_name: str = "") -> str:
    user = _user_path(username)
    if server_name:
        return f"{user}/servers/{quote(server_name, safe='')}"
    return f"{user}/server"


@dataclasses.dataclass(frozen=True)
class HubClient:
    session: aiohttp.ClientSession
    api_url: str  # e.g. http://127.0.0.1:8081/hub/api
    token: str = dataclasses.field(repr=False)
    deadline: float | None = None  # loop.time() after which transient failures stop being retried
    admission: Admission | None = None  # limits what is asked of the hub at once; None: no limits

    def until(self, deadline: float) -> HubClient:
        """The same client, retrying transient failures only until ``deadline``."""
        return dataclasses.replace(self, deadline=deadline)

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def _admitted(self, kind: Kind) -> contextlib.AbstractAsyncContextManager[Slot]:
        return contextlib.nullcontext(NO_SLOT) if self.admission is None else self.admission.request(kind)

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        retry_server_errors: bool = True,
        kind: Kind = Kind.CHEAP,
    ) -> tuple[int, Any]:
        """``(status, json or None)``; raises HubError for statuses outside ``ok``."""
        attempt = 0
        route = metrics.hub_route(path)
        while True:
            attempt += 1
            delay: float | None = None
            sent = time.monotonic()
            status = "error"  # no answer (connection failed or timed out)
            try:
                async with (
                    self._admitted(kind),
                    self.session.request(
                        method,
                        self.api_url + path,
                        json=body,
                        headers=self._headers,
                        timeout=REQUEST_TIMEOUT,
                    ) as response,
                ):
                    status = str(response.status)
                    data = await _read_json(response)
                    if _not_routed(response.status, data):
                        # Checked before ``ok``: a proxy's 404 is not the hub's "no such thing".
                        failure = "404 from a proxy with no route to the hub (restarting?)"
                    else:
                        if response.status in ok:
                            return response.status, data
                        message = _message(data, response.reason)
                        if response.status == 429:
                            delay = _retry_after(response.headers.get("Retry-After"))
                        elif response.status < 500 or (not retry_server_errors and _from_hub(data, response.status)):
                            # A proxy's 502/503 (the hub is down behind it) is retried even where
                            # the hub's own 5xx is an answer: a start that did reach the hub is
                            # found pending or running when retried, which the launch handles.
                            raise HubError(response.status, message)
                        failure = f"{response.status} {message}"
            except (TimeoutError, aiohttp.ClientConnectionError) as error:
                failure = f"{type(error).__name__}: {error}"
            finally:
                metrics.HUB_REQUESTS.labels(method, route, status).inc()
                metrics.HUB_REQUEST_DURATION.labels(method, route).observe(time.monotonic() - sent)
            if delay is not None and kind is Kind.START and self.admission is not None:
                # The hub's spawn limit: retry when one of our spawns frees a slot, at the latest
                # after Retry-After (or at the deadline, then give up).
                log.info("hub POST %s: %s; retrying when a spawn slot frees, at most %.0f s", path, failure, delay)
                await self.admission.throttled(self._until_deadline(delay))
                self._check_deadline(0, f"{method} {path}: {failure}")
                continue
            if delay is None:
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
            self._check_deadline(delay, f"{method} {path}: {failure}")
            log.info("hub %s %s failed (%s); retrying in %.1f s", method, path, failure, delay)
            await asyncio.sleep(delay)

    def _until_deadline(self, delay: float) -> float:
        if self.deadline is None:
            return delay
        return max(0.0, min(delay, self.deadline - asyncio.get_running_loop().time()))

    def _check_deadline(self, delay: float, failure: str) -> None:
        if self.deadline is not None and asyncio.get_running_loop().time() + delay > self.deadline:
            raise HubUnavailable(failure)

    async def version(self) -> str:
        _, data = await self._request("GET", "/")
        return str(data["version"])

    async def whoami(self) -> dict[str, Any]:
        """The model of the token's owner (a service or a user), with the token's scopes."""
        _, data = await self._request("GET", "/user")
        return data if isinstance(data, dict) else {}

    async def ensure_user(self, username: str) -> None:
        await self._request("POST", _user_path(username), ok=(201, 409))

    async def get_user(self, username: str) -> dict[str, Any] | None:
        status, data = await self._request("GET", _user_path(username), ok=(200, 404))
        return data if status == 200 else None

    async def get_server(self, username: str, server_name: str = "") -> dict[str, Any] | None:
        """The server model, or None when the user or the server does not exist (or is stopped)."""
        user = await self.get_user(username)
        if user is None:
            return None
        server = (user.get("servers") or {}).get(server_name)
        return server or None

    async def start_server(self, username: str, server_name: str, options: dict[str, Any]) -> int:
        """POST the start: 201 ready, 202 pending. A 500 is not retried: it may be a failed spawn."""
        status, _ = await self._request(
            "POST",
            _path(username, server_name),
            body=options,
            ok=(201, 202),
            retry_server_errors=False,
            kind=Kind.START,
        )
        return status

    async def stop_server(self, username: str, server_name: str = "") -> int:
        """DELETE the server: 204 stopped (or was not running), 202 stopping."""
        status, _ = await self._request("DELETE", _path(username, server_name), ok=(202, 204), kind=Kind.STOP)
        return status

    async def create_token(self, username: str, scopes: list[str], expires_in: int, note: str) -> tuple[str, str]:
        """``(token, token_id)``."""
        _, data = await self._request(
            "POST",
            _user_path(username) + "/tokens",
            body={"scopes": scopes, "expires_in": expires_in, "note": note},
            ok=(200, 201),
        )
        return data["token"], data["id"]

    async def revoke_token(self, username: str, token_id: str) -> None:
        await self._request("DELETE", _user_path(username) + f"/tokens/{quote(token_id)}", ok=(204, 404))

    async def list_tokens(self, username: str) -> list[dict[str, Any]]:
        """The user's unexpired API tokens (``id``, ``note``, ``scopes``, ..., never the token
        itself); none when the user does not exist."""
        status, data = await self._request("GET", _user_path(username) + "/tokens", ok=(200, 404))
        if status != 200 or not isinstance(data, dict):
            return []
        return list(data.get("api_tokens") or [])

    async def progress(self, username: str, server_name: str = "") -> AsyncIterator[dict[str, Any]]:
        """JupyterHub's progress events for a starting server, until it is ready or failed.

        Raises HubError (400: not starting, 403: no ``read:servers``, 404: no such server),
        HubUnavailable (a proxy's 404: no route to the hub) or the connection's errors; a stream
        that ends early just stops iterating.
        """
        # Not admitted: a stream costs the hub little to open and then only waits (admission.py).
        path = _path(username, server_name) + "/progress"
        async with self.session.get(
            self.api_url + path,
            headers={**self._headers, "Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as response:
            # Counted when answered; a stream's duration says nothing of the hub's load, so none.
            metrics.HUB_REQUESTS.labels("GET", metrics.hub_route(path), str(response.status)).inc()
            if response.status != 200:
                data = await _read_json(response)
                if _not_routed(response.status, data):
                    raise HubUnavailable("progress: 404 from a proxy with no route to the hub (restarting?)")
                raise HubError(response.status, _message(data, response.reason))
            async for raw in response.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and keepalive comments
                try:
                    event = json.loads(line[5:])
                except ValueError:
                    continue
                yield event
                if event.get("ready") or event.get("failed"):
                    return


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


def _from_hub(data: Any, status: int) -> bool:
    """JupyterHub answers every API error with JSON ``{"status": <status>, "message": ...}``."""
    return isinstance(data, dict) and data.get("status") == status


def _not_routed(status: int, data: Any) -> bool:
    """A 404 that JupyterHub did not write: a proxy in front of it has no route to it (yet)."""
    return status == 404 and not _from_hub(data, 404)


def _message(data: Any, reason: str | None) -> str:
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return reason or "no message"


def _retry_after(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 1.0
    except ValueError:
        return 1.0
