"""Writes the JSON Schema and AsyncAPI documents of the contract: ``python -m schemas.export``.

The files are committed; a test fails when they differ from what the models generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from .commands import LaunchCommand, ReadCommand, RemoveCommand
from .events import CloudEvent, FailedData, ProgressData, ReadyData
from .replies import LaunchResult, RemoveResult, Reply

HERE = Path(__file__).parent
MODELS = (
    LaunchCommand,
    RemoveCommand,
    ReadCommand,
    Reply,
    LaunchResult,
    RemoveResult,
    CloudEvent,
    ProgressData,
    ReadyData,
    FailedData,
)


def json_schema() -> dict[str, Any]:
    _, schema = models_json_schema(
        [(model, "validation") for model in MODELS],
        ref_template="#/components/schemas/{model}",
        title="jupyterhub-launcher message contract",
    )
    return {"components": {"schemas": schema["$defs"]}, **{k: v for k, v in schema.items() if k != "$defs"}}


def asyncapi(schemas: dict[str, Any]) -> dict[str, Any]:
    def message(name: str, payload: str, content_type: str = "application/json") -> dict[str, Any]:
        return {"name": name, "contentType": content_type, "payload": {"$ref": f"#/components/schemas/{payload}"}}

    return {
        "asyncapi": "2.6.0",
        "info": {
            "title": "jupyterhub-launcher",
            "version": "1",
            "description": "Launch, read and remove Jupyter servers through JupyterHub over RabbitMQ.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "launcher.commands": {
                "description": "The command queue (a durable quorum queue; name set by command_queue). "
                "Properties: message_id, correlation_id, reply_to.",
                "bindings": {"amqp": {"is": "queue", "queue": {"name": "launcher.commands", "durable": True}}},
                "publish": {
                    "message": {
                        "oneOf": [
                            message("launch", "LaunchCommand"),
                            message("remove", "RemoveCommand"),
                            message("read", "ReadCommand"),
                        ]
                    }
                },
            },
            "launcher.replies": {
                "description": "Result events (topic exchange; routing key <action>.ok or <action>.error). "
                "The same body is the RPC reply sent to reply_to.",
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": "launcher.replies", "type": "topic", "durable": True},
                    }
                },
                "subscribe": {"message": message("reply", "Reply")},
            },
            "launcher.events": {
                "description": "Lifecycle events, CloudEvents 1.0 structured mode (topic exchange; routing key = type).",
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": "launcher.events", "type": "topic", "durable": True},
                    }
                },
                "subscribe": {"message": message("event", "CloudEvent", "application/cloudevents+json")},
            },
        },
        "components": {"schemas": schemas["components"]["schemas"]},
    }


def documents() -> dict[str, str]:
    schema = json_schema()
    return {
        "contract.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n",
        "asyncapi.yaml": yaml.safe_dump(asyncapi(schema), sort_keys=False, width=100),
    }


def main() -> None:
    for name, text in documents().items():
        (HERE / name).write_text(text)
        print(f"wrote schemas/{name}")


if __name__ == "__main__":
    main()
