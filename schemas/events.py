"""Lifecycle events: CloudEvents 1.0 in structured JSON mode, routing key = ``type``.

Structured mode (the whole event as the body, ``application/cloudevents+json``) because CloudEvents
has no official AMQP 0-9-1 binding for headers. No event ever carries a token.
"""

from __future__ import annotations

import uuid
from datetime import datetime, UTC
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/cloudevents+json"

EventType = Literal[
    "launch.accepted",
    "launch.progress",
    "launch.ready",
    "launch.failed",
    "remove.accepted",
    "remove.stopped",
    "remove.failed",
    "read.accepted",
]


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    source: str
    type: EventType
    subject: str  # "<username>/<server_name>"
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: Literal["application/json"] = "application/json"
    correlationid: str | None = None  # the command's AMQP correlation_id
    data: dict[str, Any] = Field(default_factory=dict)


class ProgressData(BaseModel):
    """``launch.progress``: JupyterHub's own progress percentage and message, or the launcher's
    queue: ``queue_position`` (1 = next) while the launcher holds the launch back from a busy or
    full hub."""

    progress: int | None = None
    message: str = ""
    queue_position: int | None = None


class ReadyData(BaseModel):
    url: str


class FailedData(BaseModel):
    code: str
    message: str
