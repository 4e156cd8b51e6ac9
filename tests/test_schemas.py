"""The message contract: validation rules, the older worker's shapes, generated documents."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas import LaunchCommand, ReadCommand, RemoveCommand, describe_errors, parse_command, parse_memory
from schemas.export import HERE, documents


def errors(body: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        parse_command(json.dumps(body))
    return {e["field"]: e["message"] for e in describe_errors(caught.value)}


def launch(**fields: object) -> dict:
    return {"action": "launch", "username": "alice", "image": "img", **fields}


@pytest.mark.parametrize(
    ("quantity", "size"),
    [
        ("512M", 512 * 2**20),
        ("1G", 2**30),
        ("1.5Gi", 3 * 2**29),
        ("2Ti", 2 * 2**40),
        ("1024", 1024),
        (2048, 2048),
        ("10K", 10240),
    ],
)
def test_memory_quantities_mean_what_they_mean_to_jupyterhub(quantity: str | int, size: int) -> None:
    assert parse_memory(quantity) == size


@pytest.mark.parametrize("quantity", ["4X", "1e9", "-1G", "0", "1GB", "{1}G", "", "1 G", True])
def test_unparseable_or_non_positive_memory_is_refused(quantity: object) -> None:
    with pytest.raises(ValueError):
        parse_memory(quantity)  # type: ignore[arg-type]


def test_the_older_workers_launch_parameters_are_accepted() -> None:
    command = parse_command(
        json.dumps(
            launch(
                server_name="gpu-1",
                cpu={"request": 1, "limit": 2},
                memory={"request": "2G", "limit": "4Gi"},
                gpu={"request": 1, "limit": 1},
                vols=[{"pvc": "claim-alice", "mount": "/home/jovyan/work/", "subpath": "a/b"}],
                json={"transparent": True, "tolerations": []},
            )
        )
    )
    assert isinstance(command, LaunchCommand)
    assert command.user_options() == {
        "image": "img",
        "cpu": {"request": 1.0, "limit": 2.0},
        "memory": {"request": "2G", "limit": "4Gi"},
        "gpu": {"request": 1, "limit": 1},
        "vols": [{"pvc": "claim-alice", "mount": "/home/jovyan/work", "subpath": "a/b"}],
        "json": {"tolerations": []},
    }


def test_user_options_leave_out_what_was_not_given() -> None:
    command = parse_command(json.dumps(launch(cpu={"limit": 2})))
    assert isinstance(command, LaunchCommand)
    assert command.user_options() == {"image": "img", "cpu": {"limit": 2.0}}


def test_remove_and_read_default_to_the_default_server() -> None:
    assert parse_command('{"action": "remove", "username": "bob"}') == RemoveCommand(action="remove", username="bob")
    assert parse_command('{"action": "read", "username": "bob", "server_name": "x1"}') == ReadCommand(
        action="read", username="bob", server_name="x1"
    )


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (launch(cpu={"request": 3, "limit": 2}), "cpu", "more than limit"),
        (launch(memory={"request": "2G", "limit": "1G"}), "memory", "more than limit"),
        (launch(cpu={"limit": 0}), "cpu.limit", "greater than 0"),
        (launch(gpu={}), "gpu", "give a request, a limit or both"),
        (launch(gpu={"limit": 1.5}), "gpu.limit", "integer"),
        (launch(vols=[{"pvc": "claim-alice", "mount": "relative/path"}]), "vols.0.mount", "absolute"),
        (launch(vols=[{"pvc": "claim-alice", "mount": "/a/../etc"}]), "vols.0.mount", "'..'"),
        (launch(vols=[{"pvc": "claim-alice", "mount": "/w", "subpath": "/abs"}]), "vols.0.subpath", "relative"),
        (launch(vols=[{"pvc": "Claim_Alice", "mount": "/w"}]), "vols.0.pvc", "PVC name"),
        (launch(vols=[{"pvc": "a", "mount": "/w"}, {"pvc": "b", "mount": "/w/"}]), "vols", "share a mount path"),
        (launch(env={"JUPYTERHUB_API_URL": "http://evil"}), "env", "set by JupyterHub"),
        (launch(env={"1BAD": "x"}), "env", "not a valid environment variable name"),
        (launch(image="two words"), "image", "pattern"),
        (launch(server_name="a" * 31), "server_name", "pattern"),
        (launch(server_name="9lives"), "server_name", "pattern"),
        (launch(username="a/b"), "username", "pattern"),
        (launch(timeout=0), "timeout", "greater than 0"),
        (launch(cmd=["sh"]), "cmd", "Extra inputs"),
        ({"action": "remove", "username": "bob", "image": "x"}, "image", "Extra inputs"),
    ],
)
def test_invalid_fields_are_named_with_the_reason(body: dict, field: str, words: str) -> None:
    found = errors(body)
    assert field in found, found
    assert words in found[field]


def test_the_committed_json_schema_and_asyncapi_match_the_models() -> None:
    for name, text in documents().items():
        assert (HERE / name).read_text() == text, f"schemas/{name} is stale: run 'make schemas'"


def test_the_json_schema_describes_every_message() -> None:
    schemas = json.loads(documents()["contract.schema.json"])["components"]["schemas"]
    assert {"LaunchCommand", "RemoveCommand", "ReadCommand", "Reply", "LaunchResult", "CloudEvent"} <= set(schemas)
    assert schemas["LaunchCommand"]["additionalProperties"] is False
    assert "json" in schemas["LaunchCommand"]["properties"]
