"""Replies: the RPC answer to ``reply_to`` and the result event on the reply exchange (same body)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .commands import CpuSpec, GpuSpec, MemorySpec, Volume

ErrorCode = Literal[
    "invalid_command",  # the body is not JSON or not a valid command; the message names the field
    "spawn_failed",  # JupyterHub reported the spawn failed (its message is passed on)
    "spawn_timeout",  # not ready within the command's timeout; the server was stopped
    "not_found",  # read: no such user or server
    "already_running",  # launch: running with other options
    "options_rejected",  # the hub's spawner refused the options (policy), with its message
    "hub_unavailable",  # the hub could not be reached within the command's timeout
    "hub_error",  # the hub answered with an unexpected error
    "internal_error",  # a bug in the launcher; the command is dead-lettered for inspection
]


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    details: Any = None


class LaunchResult(BaseModel):
    """What the older worker returned, plus nothing else: url opens the server with the token."""

    model_config = ConfigDict(extra="forbid")

    image: str
    server_name: str
    token: str
    url: str
    username: str
    cpu: CpuSpec | None = None
    memory: MemorySpec | None = None
    gpu: GpuSpec | None = None
    vols: list[Volume] | None = None
    expires_at: datetime | None = None  # only when the launch had a ttl: when it will be removed


class ServerModel(BaseModel):
    """read: JupyterHub's server model, as the hub returns it (fields vary with its version)."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    ready: bool = False
    pending: str | None = None
    started: datetime | None = None
    last_activity: datetime | None = None
    url: str = ""
    progress_url: str = ""
    user_options: dict[str, Any] | None = None
    stopped: bool = False


class RemoveResult(BaseModel):
    stopped: Literal[True] = True


class Reply(BaseModel):
    ok: bool
    action: str
    username: str
    server_name: str
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def routing_key(self) -> str:
        return f"{self.action}.{'ok' if self.ok else 'error'}"
