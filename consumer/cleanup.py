"""Launcher tokens and the undoing of failed launches: who issued a token, and what is left to undo.

Every token the launcher issues carries a note naming the server it opens and the launch (the
command, across its redeliveries) that issued it: ``jupyterhub-launcher alice/gpu-1 launch=3f2a…``.
JupyterHub lists a user's unexpired tokens with their notes (never the tokens themselves), so stale
tokens are found and revoked by note, even those whose request was cut short but that the hub
created anyway.

A failed launch is undone at once when the hub answers; what could not be undone within a few
seconds becomes a ``CleanUp``, which the worker publishes to the command queue as a durable
follow-up so that neither the reply waits for it nor a restart loses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from datetime import datetime, UTC
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.commands import SERVER_NAME_PATTERN, USERNAME_PATTERN

from .hub import HubClient

log = logging.getLogger(__name__)

NOTE_PREFIX = "jupyterhub-launcher"
# Usernames and server names cannot hold spaces or slashes (schemas.commands), so the note reads back
# unambiguously. The second form is the note of earlier versions, which named no launch.
_NOTE = re.compile(rf"^{NOTE_PREFIX} (?P<server>[^/ ]+/[^/ ]*) launch=(?P<launch>[0-9a-f]+)$")
_OLD_NOTE = re.compile(rf"^{NOTE_PREFIX}: (?P<server>[^/ ]+/[^/ ]*)$")


def new_launch_id(command_id: str = "") -> str:
    """A short id for a launch: the same for every delivery of one command (``command_id`` is its
    message id or body hash), random when there is none."""
    if not command_id:
        return secrets.token_hex(8)
    return hashlib.sha256(command_id.encode()).hexdigest()[:16]


def token_note(username: str, server_name: str, launch: str) -> str:
    return f"{NOTE_PREFIX} {username}/{server_name} launch={launch}"


def _issuer(token: dict[str, Any], username: str, server_name: str) -> str | None:
    """The launch that issued ``token`` for this server: its id, ``""`` for an earlier version's
    token, None for a token the launcher did not issue for this server."""
    note = str(token.get("note") or "")
    match = _NOTE.match(note) or _OLD_NOTE.match(note)
    if match is None or match["server"] != f"{username}/{server_name}":
        return None
    return match.groupdict().get("launch") or ""


def is_launch_token(token: dict[str, Any], username: str, server_name: str) -> bool:
    """Whether the launcher issued ``token`` (a hub token model) for this server."""
    return _issuer(token, username, server_name) is not None


def _created(token: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(token["created"]))
    except (KeyError, TypeError, ValueError):
        return None


class CleanUp(BaseModel):
    """What is left to undo of a failed launch: its tokens, and the server it was starting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(pattern=USERNAME_PATTERN)
    server_name: str = Field("", pattern=SERVER_NAME_PATTERN)
    launch: str = Field(pattern=r"^[0-9a-f]{1,64}$")
    stop: bool = False  # the launch was starting the server: stop it unless it was handed out since
    failed_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))


async def revoke_tokens(
    hub: HubClient, username: str, server_name: str, launch: str | None = None, keep: str | None = None
) -> int:
    """Revoke the launcher's tokens for this server (only launch ``launch``'s, if given) except
    ``keep``; returns how many."""
    tokens = await hub.list_tokens(username)
    stale = [
        str(t["id"])
        for t in tokens
        if (issuer := _issuer(t, username, server_name)) is not None
        and (launch is None or issuer == launch)
        and t.get("id") != keep
    ]
    await _revoke(hub, username, stale)
    return len(stale)


async def _revoke(hub: HubClient, username: str, token_ids: list[str]) -> None:
    outcomes = await asyncio.gather(
        *(hub.revoke_token(username, token_id) for token_id in token_ids), return_exceptions=True
    )
    for outcome in outcomes:  # all finished: none is left running unread
        if isinstance(outcome, BaseException):
            raise outcome


async def undo(hub: HubClient, job: CleanUp) -> bool:
    """Revoke the launch's tokens; returns whether its server should still be stopped.

    A deferred clean-up can run after a later launch of the same server has handed that server out
    (the follow-up could not finish while the hub was down, and the caller launched again): that
    launch's token, issued after ours, still opens it, so the server is left alone. Tokens of launches
    before ours do not count (they opened an earlier run of the server). Our own tokens' creation
    time (the hub's clock) is the reference; when the hub never created one, the failure's time.
    """
    tokens = await hub.list_tokens(job.username)
    # By note only, never by ids the job names: a follow-up read from the queue can revoke no more
    # than the launcher's own tokens for that server and launch.
    ours: set[str] = set()
    others: list[dict[str, Any]] = []
    for token in tokens:
        issuer = _issuer(token, job.username, job.server_name)
        if issuer == job.launch:
            ours.add(str(token["id"]))
        elif issuer is not None:
            others.append(token)
    await _revoke(hub, job.username, sorted(ours))
    if not job.stop:
        return False
    created = [c for t in tokens if str(t.get("id")) in ours and (c := _created(t)) is not None]
    reference = min(created, default=job.failed_at)
    later = [t for t in others if (c := _created(t)) is not None and c > reference]
    if later:
        log.info(
            "%s/%s was launched again since launch %s failed: not stopping it",
            job.username,
            job.server_name,
            job.launch,
        )
        return False
    return True
