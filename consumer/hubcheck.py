"""Is the hub there, and does it accept our token? Checked at start-up and then periodically.

A wrong ``jupyterhub_url`` or ``jupyterhub_api_token`` would otherwise show only when the first
command fails. The check does not stop the service: the hub may simply start after the launcher, or
be restarting, and commands that arrive meanwhile are answered (``hub_unavailable`` and the like)
rather than left waiting. Instead, every failed check logs one line saying what is wrong, until a
check succeeds, which is logged once too.
"""

from __future__ import annotations

import asyncio
import logging

from .config import Settings
from .hub import HubClient, HubError, HubUnavailable
from .logs import mask_url

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 15.0  # seconds for both requests of one check
# What the launcher's role must grant (README, "JupyterHub set-up"); a filtered scope such as
# ``servers!group=students`` counts, the hub then answers 403 for users outside it.
REQUIRED_SCOPES = ("admin:users", "servers", "tokens")


class HubCheck:
    def __init__(self, hub: HubClient, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings
        self.where = mask_url(settings.hub_api_url)
        self.problem: str | None = None  # what the last check found wrong
        self.ok: bool | None = None  # None until the first check is done

    async def run(self) -> None:
        """Check now and then every ``hub_check_interval`` seconds, logging failures and recovery."""
        interval = self.settings.hub_check_interval
        while True:
            await self.check()
            await asyncio.sleep(interval)

    async def check(self) -> bool:
        """One check, logged: ``GET /`` (is it JupyterHub?) then ``GET /user`` (is the token valid?)."""
        interval = self.settings.hub_check_interval
        problem, found = await self._problem()
        if problem is not None:
            log.error("JupyterHub at %s: %s (checking again every %g s)", self.where, problem, interval)
        elif self.ok is not True:
            log.info("JupyterHub at %s: %s", self.where, found)
        self.problem, self.ok = problem, problem is None
        return self.ok

    async def _problem(self) -> tuple[str | None, str]:
        """(what is wrong or None, what was found)."""
        # One try per request: the check itself is what repeats.
        hub = self.hub.until(asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                try:
                    version = await hub.version()
                except HubError as error:
                    return (
                        f"GET {self.settings.jupyterhub_api_prefix}/ answered {error} (is this JupyterHub's API?)",
                        "",
                    )
                except (KeyError, TypeError):
                    return f"GET {self.settings.jupyterhub_api_prefix}/ did not answer like JupyterHub", ""
                try:
                    identity = await hub.whoami()
                except HubError as error:
                    if error.status in (401, 403):
                        return f"the launcher's token was refused ({error}): check jupyterhub_api_token", ""
                    return f"GET {self.settings.jupyterhub_api_prefix}/user answered {error}", ""
        except HubUnavailable as error:
            return f"unreachable ({error})", ""
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT:g} s", ""
        except Exception as error:  # noqa: BLE001 (anything else, e.g. a malformed answer or a refused TLS handshake: logged, checked again)
            return f"the check failed ({type(error).__name__}: {error})", ""
        owner = f"{identity.get('kind', 'user')} {identity.get('name', '?')!r}"
        scopes = [str(scope).split("!", 1)[0] for scope in identity.get("scopes") or []]
        missing = [scope for scope in REQUIRED_SCOPES if scope not in scopes]
        if missing:
            return f"the token of {owner} lacks the scopes {', '.join(missing)}: commands will be refused", ""
        return None, f"JupyterHub {version}, token accepted ({owner})"
